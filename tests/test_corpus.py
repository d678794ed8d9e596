"""Corpus ingestion: formats, packing, filters, holdout, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from offline_kd.data.corpus import (
    CorpusError,
    CorpusStats,
    load_documents,
    pack_sequences,
    prepare_corpus,
    split_holdout,
)


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


def test_text_jsonl_parquet_agree(tmp_path, tiny_docs, tiny_corpus):
    import datasets

    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(tiny_docs)))
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": tiny_docs}).to_parquet(str(pq))
    a = load_documents([tiny_corpus])["text"]
    b = load_documents([jl], text_field="body")["text"]
    c = load_documents(str(pq))["text"]
    assert a == b == c == tiny_docs
    both = load_documents([tiny_corpus, pq])
    assert len(both) == 2 * len(tiny_docs)
    with pytest.raises(CorpusError, match="no field 'text'"):
        load_documents([jl])


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(CorpusError, match="empty.*empty.txt"):
        load_documents([empty])
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents([str(tmp_path / "nope.txt")])


def test_undecodable_bytes_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nanother\n\xff\xfe broken\nend\n")
    with pytest.raises(CorpusError, match=r"bad\.txt.*not valid UTF-8 at line 3"):
        load_documents([bad])
    bad_jl = tmp_path / "bad.jsonl"
    bad_jl.write_bytes(b'{"text": "fine"}\n{"text": "broken \xff here"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*not valid UTF-8 at line 2"):
        load_documents([bad_jl])


def test_packing_layout_and_determinism(tiny_corpus, tok):
    docs = load_documents([tiny_corpus])
    stats = CorpusStats(sources=[str(tiny_corpus)], text_field="text")
    packed = pack_sequences(docs, tok, max_length=32, seed=0, stats=stats)
    arr = np.asarray(packed["input_ids"])
    lengths = np.asarray(packed["length"])
    assert arr.shape[1] == 32 and (arr[:, 0] == tok.cls_token_id).all()
    assert (lengths > 11).all()
    # padding only in the last sequence of the (single) packing batch
    assert (lengths[:-1] == 32).all()
    assert (arr[-1, lengths[-1] :] == tok.pad_token_id).all()
    # the packed stream is exactly the shuffled documents separated by [SEP]
    stream = np.concatenate([a[1:n] for a, n in zip(arr, lengths, strict=True)])
    n_real = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs["text"])
    assert len(stream) == n_real and (stream == tok.sep_token_id).sum() == len(docs)
    again = pack_sequences(docs, tok, max_length=32, seed=0)
    np.testing.assert_array_equal(np.asarray(again["input_ids"]), arr)
    other = pack_sequences(docs, tok, max_length=32, seed=1)
    assert not np.array_equal(np.asarray(other["input_ids"])[:5], arr[:5])
    assert stats.num_sequences == len(
        packed
    ) and stats.dropped_short + stats.dropped_unk == stats.packed_sequences - len(packed)


def test_filters_drop_short_and_unk(tmp_path, tok):
    import datasets

    docs = datasets.Dataset.from_dict(
        {"text": ["tiny", "zzzqqq xxjjj " * 20, "the house by the river was quiet " * 2]}
    )
    stats = CorpusStats(sources=[], text_field="text")
    packed = pack_sequences(docs, tok, max_length=64, shuffle=False, stats=stats, pack_batch_documents=1)
    assert stats.packed_sequences >= 3
    assert stats.dropped_short >= 1 and stats.dropped_unk >= 1
    for ids, n in zip(packed["input_ids"], packed["length"], strict=True):
        assert n > 11
        real = [t for t in ids[:n] if t not in tok.all_special_ids or t == tok.unk_token_id]
        assert sum(t == tok.unk_token_id for t in real) <= 0.5 * len(real)


def test_holdout_split_and_file(tmp_path, tiny_corpus, tiny_docs, tok):
    docs = load_documents([tiny_corpus])
    kept, held = split_holdout(docs, 0.25, seed=3)
    assert len(kept) + len(held) == len(docs) and 0 < len(held) < len(docs) / 2
    assert not set(kept["text"]) & set(held["text"])
    kept2, held2 = split_holdout(docs, 0.25, seed=3)
    assert held2["text"] == held["text"]
    path = tmp_path / "held.txt"
    packed, stats = prepare_corpus(
        [tiny_corpus], tok, max_length=32, seed=3, holdout_fraction=0.25, holdout_file=str(path)
    )
    assert path.read_text().splitlines() == held["text"]
    assert stats.held_out_documents == len(held) and stats.as_dict()["holdout"]["fraction"] == 0.25
    with pytest.raises(ValueError):
        split_holdout(docs, 1.0)


def test_corpus_values_name_files_datasets_and_hub_paths(tmp_path):
    from offline_kd.data.sources import parse_source

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "ds").mkdir()
    assert parse_source(str(tmp_path / "a.jsonl")).kind == "json"
    cases = {
        "bookcorpus": ("bookcorpus", None, "train", None),
        "wikimedia/wikipedia:20231101.en": ("wikimedia/wikipedia", "20231101.en", "train", None),
        "wikimedia/wikipedia@b04c8d1:20231101.fr:train": ("wikimedia/wikipedia", "20231101.fr", "train", "b04c8d1"),
        "org/name::validation": ("org/name", None, "validation", None),
        "hf://datasets/org/name@v1.0:cfg": ("org/name", "cfg", "train", "v1.0"),
        f"{tmp_path / 'ds'}:cfg:test": (str(tmp_path / "ds"), "cfg", "test", None),
    }  # fmt: skip
    for spec, (path, config, split, revision) in cases.items():
        s = parse_source(spec)
        assert (s.kind, s.path, s.config, s.split, s.revision) == (
            "dataset",
            path,
            config,
            split,
            revision,
        ), spec
    files = parse_source("hf://datasets/org/name@refs%2Fconvert%2Fparquet/plain_text/train/*.parquet")
    assert (files.kind, files.revision) == ("parquet", "refs%2Fconvert%2Fparquet")
    assert parse_source("s3://bucket/corpus.jsonl").kind == "json"
    for missing in ("missing.txt", "data/missing.parquet", "./corpus"):
        with pytest.raises(CorpusError, match="does not exist"):
            parse_source(missing)
    with pytest.raises(CorpusError, match="neither"):
        parse_source("not a name/at all")


def _dataset_directory(root, tiny_docs):
    """A dataset directory as a hub repository holds one: two configs, splits, parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("documents", "sentences"):
        (root / sub).mkdir(parents=True)
    pq.write_table(pa.table({"text": tiny_docs[:40]}), root / "documents" / "train.parquet")
    pq.write_table(pa.table({"text": tiny_docs[40:]}), root / "documents" / "test.parquet")
    sentences = [s.strip() + "." for d in tiny_docs for s in d.split(".") if s.strip()]
    pq.write_table(pa.table({"text": sentences}), root / "sentences" / "train.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: documents\n  default: true\n  data_files:\n"
        "  - split: train\n    path: documents/train.parquet\n  - split: test\n    path: documents/test.parquet\n"
        "- config_name: sentences\n  data_files:\n  - split: train\n    path: sentences/train.parquet\n---\n"
    )
    return sentences


def test_dataset_directory_config_and_split_in_provenance(tmp_path, tiny_docs, tok):
    _dataset_directory(tmp_path / "ds", tiny_docs)
    root = str(tmp_path / "ds")
    assert load_documents(root)["text"] == tiny_docs[:40]  # the default config's train split
    assert load_documents(f"{root}::test")["text"] == tiny_docs[40:]
    _, stats = prepare_corpus([f"{root}:documents:test"], tok, max_length=32)
    assert stats.as_dict()["datasets"] == [
        {"source": f"{root}:documents:test", "name": root, "config": "documents", "split": "test",
         "revision": None, "commit": None}
    ]  # fmt: skip
    with pytest.raises(CorpusError, match="could not read corpus source .*nosuch"):
        load_documents(f"{root}:nosuch")


def test_group_rows_makes_documents_of_sentences(tmp_path, tiny_docs, tok):
    from offline_kd.data.sources import check_group_rows
    from offline_kd.runtime.errors import UsageError

    sentences = _dataset_directory(tmp_path / "ds", tiny_docs)
    src = f"{tmp_path / 'ds'}:sentences"
    assert check_group_rows({str(tmp_path / "ds"): "8"}, [src]) == {src: 8}  # by its path, too
    group = check_group_rows({src: "8"}, [src])
    held_file = tmp_path / "held.txt"
    packed, stats = prepare_corpus(
        [src], tok, max_length=32, holdout_fraction=0.3, holdout_file=str(held_file), group=group
    )
    groups = [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]
    assert stats.documents == len(groups) and stats.as_dict()["group_rows"] == {src: 8}
    # Held out by document: whole groups of 8 sentences.
    held = held_file.read_text().splitlines()
    assert held and set(held) <= set(groups) and stats.held_out_documents == len(held)
    # One [SEP] per document, not per sentence.
    seps = sum(int((np.asarray(r) == tok.sep_token_id).sum()) for r in packed["input_ids"])
    assert 0 < seps <= len(groups) - len(held) < len(sentences) // 4
    for bad, match in (({src: "0"}, "positive integer"), ({"other": "4"}, "no --corpus source")):
        with pytest.raises(UsageError, match=match):
            check_group_rows(bad, [src])


def test_num_proc_gives_the_same_sequences(tiny_corpus, tok):
    from offline_kd.data.corpus import corpus_fingerprint

    docs = load_documents(str(tiny_corpus))
    one = pack_sequences(docs, tok, max_length=16, seed=1, pack_batch_documents=7)
    two = pack_sequences(docs, tok, max_length=16, seed=1, pack_batch_documents=7, num_proc=2)
    assert len(one) > 20 and corpus_fingerprint(one) == corpus_fingerprint(two)
