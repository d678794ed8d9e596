"""Model card metadata from a store's provenance: hub teachers and datasets, inherited license."""

from __future__ import annotations

import dataclasses

from huggingface_hub import ModelCard

from offline_kd.publish.model_card import card_data, hub_dataset, update_eval
from offline_kd.runtime.settings import CardConfig, TrainConfig
from offline_kd.store.signal_store import open_store


def test_hub_dataset_ids_of_corpus_sources(tiny_corpus):
    assert hub_dataset("wikimedia/wikipedia:20231101.en") == "wikimedia/wikipedia"
    assert hub_dataset("bookcorpus:plain_text:train") == "bookcorpus"
    assert hub_dataset("wikimedia/wikipedia@b04c8d1:20231101.en:train") == "wikimedia/wikipedia"
    assert hub_dataset("hf://datasets/owner/name@rev/data/train.parquet") == "owner/name"
    assert hub_dataset(str(tiny_corpus)) is None and hub_dataset("s3://bucket/corpus.txt") is None


def test_hub_teacher_and_datasets_or_a_local_teachers_card(tiny_store, tiny_teacher, tmp_path):
    meta = open_store(str(tiny_store)).meta
    cfg = TrainConfig(store=str(tiny_store), student="distil", output=str(tmp_path))
    hub_meta = dataclasses.replace(
        meta,
        teacher={**meta.teacher, "name_or_path": "google-bert/bert-base-uncased"},
        corpus={**meta.corpus, "sources": ["wikimedia/wikipedia:20231101.en", "bookcorpus", "local.txt"]},
    )
    data = card_data(cfg, hub_meta, None, "student")
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.datasets == ["bookcorpus", "wikimedia/wikipedia"] and data.eval_results is None

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: mit\nlanguage: [en, fr]\n---\n# teacher\n")
    local = dataclasses.replace(meta, teacher={**meta.teacher, "name_or_path": str(teacher)})
    data = card_data(cfg, local, None, "student")
    assert (data.base_model, data.license, data.language) == (None, "mit", ["en", "fr"])
    data = card_data(dataclasses.replace(cfg, card=CardConfig(license="apache-2.0")), local, None, "student")
    assert data.license == "apache-2.0"


def test_update_eval_gives_a_model_without_a_card_one(tmp_path):
    path = update_eval(tmp_path, {"source": "held.txt", "sequences": 3, "masked_tokens": 40, "accuracy": 0.25,
                                  "masked_perplexity": 12.5, "teacher_agreement": None})  # fmt: skip
    card = ModelCard.load(path)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "accuracy": 0.25, "masked_perplexity": 12.5
    }  # fmt: skip
    assert "| masked accuracy | 0.2500 |" in card.text and "agreement" not in card.text
