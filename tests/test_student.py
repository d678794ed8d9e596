"""Students: the DistilBERT construction copies the chosen teacher layers bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from offline_kd.teacher.model import tokenizer_sha256
from offline_kd.train.student import (
    StudentError,
    build_student,
    check_compatible,
    default_init_layers,
    load_teacher,
    remap_fewer_layers,
)

LAYER_MAP = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def _build(spec, teacher, **kw):
    return build_student(spec, teacher_path=str(teacher), vocab_size=0, max_positions=0, **kw)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(str(tiny_teacher))


@pytest.mark.parametrize("layers", [None, "1,3"])
def test_distil_copies_chosen_layers_bit_for_bit(tiny_teacher, teacher, layers):
    bundle = _build("distil", tiny_teacher, init_layers=layers)
    s, t = bundle.model.state_dict(), teacher.state_dict()
    chosen = [0, 2] if layers is None else [1, 3]
    assert bundle.init_layers == chosen and bundle.kind == "distil"
    assert type(bundle.model).__name__ == "DistilBertForMaskedLM"
    assert bundle.model.config.n_layers == 2 and bundle.model.config.dim == 32
    assert bundle.model.config.activation == teacher.config.hidden_act == "gelu"
    for si, ti in enumerate(chosen):
        for bert, db in LAYER_MAP.items():
            for p in ("weight", "bias"):
                a = s[f"distilbert.transformer.layer.{si}.{db}.{p}"]
                b = t[f"bert.encoder.layer.{ti}.{bert}.{p}"]
                assert torch.equal(a, b), (si, ti, bert, p)
    V = teacher.config.vocab_size  # the student's vocabulary is padded beyond it (see the last test)
    assert torch.equal(
        s["distilbert.embeddings.word_embeddings.weight"][:V], t["bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(s["distilbert.embeddings.LayerNorm.weight"], t["bert.embeddings.LayerNorm.weight"])
    folded = (
        t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.equal(s["distilbert.embeddings.position_embeddings.weight"], folded)
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_layer_norm.bias"], t["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(s["vocab_projector.bias"][:V], t["cls.predictions.bias"])
    m = bundle.model
    assert m.vocab_projector.weight is m.distilbert.embeddings.word_embeddings.weight  # still tied


def test_distil_full_depth_reproduces_teacher(tiny_teacher, teacher):
    """With every teacher layer copied, the student computes the teacher's function (segment 0)."""
    student = _build("distil", tiny_teacher, init_layers="0,1,2,3").model.eval()
    ids = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 10:] = 0
    with torch.no_grad():
        a = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        b = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    torch.testing.assert_close(b.hidden_states[0], a.hidden_states[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.logits[..., : a.logits.shape[-1]], a.logits, atol=1e-4, rtol=1e-4)


def test_named_layer_count_and_bad_layers(tiny_teacher):
    assert _build("distil-3l", tiny_teacher).init_layers == [0, 2, 3]
    with pytest.raises(StudentError, match="out of range"):
        _build("distil", tiny_teacher, init_layers="0,9")
    assert default_init_layers(12, 6) == [0, 2, 4, 6, 8, 10]


def test_remap_for_non_bert_teacher():
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32
    )
    t = RobertaForMaskedLM(cfg)
    s, layers = remap_fewer_layers(t, init_layers=[1, 3])
    assert type(s) is RobertaForMaskedLM and s.config.num_hidden_layers == 2
    ts, ss = t.state_dict(), s.state_dict()
    for si, ti in enumerate(layers):
        for k, v in ss.items():
            if f"layer.{si}." in k:
                assert torch.equal(v, ts[k.replace(f"layer.{si}.", f"layer.{ti}.")])
    assert torch.equal(ss["lm_head.dense.weight"], ts["lm_head.dense.weight"])


@pytest.fixture(scope="module")
def store_fit(tiny_teacher):
    """build_student kwargs for presets, and check_compatible kwargs of a store they fit."""
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    preset = dict(teacher_path=str(tiny_teacher), vocab_size=vocab, max_positions=64)
    sha = tokenizer_sha256(build_student("tiny", **preset).tokenizer)
    store = dict(store_vocab_size=vocab, store_tokenizer_sha256=sha, teacher_hidden_size=32, need_hidden=True)
    return preset, store


def _bert_config(tmp_path, vocab_size: int):
    path = tmp_path / "bert.json"
    path.write_text(
        json.dumps(dict(model_type="bert", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64))
    )  # fmt: skip
    return path


def test_presets_and_hf_configs_build(tiny_teacher, store_fit, tmp_path):
    preset, store = store_fit
    tiny = build_student("tiny", **preset)
    assert tiny.kind == "preset" and tiny.true_vocab_size == store["store_vocab_size"]
    bert = _build(str(_bert_config(tmp_path, store["store_vocab_size"] + 7)), tiny_teacher)
    assert bert.kind == "config" and type(bert.model).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize(
    "spec, projection, store_overrides",
    [
        ("tiny", False, {}),  # same vocab, tokenizer, width
        ("tiny-narrow", True, {}),  # narrower, with a learned projection
        ("tiny-narrow", False, {"need_hidden": False}),  # narrower, no cosine loss
    ],
)
def test_compatible_students_pass(store_fit, spec, projection, store_overrides):
    preset, store = store_fit
    check_compatible(
        build_student(spec, **preset), hidden_projection=projection, **{**store, **store_overrides}
    )


def _other_tokenizer(tiny_teacher, store_fit, tmp_path):
    preset, store = store_fit
    tiny = build_student("tiny", **preset)
    check_compatible(tiny, hidden_projection=False, **{**store, "store_tokenizer_sha256": "0" * 64})


def _narrower_without_projection(tiny_teacher, store_fit, tmp_path):
    preset, store = store_fit
    check_compatible(build_student("tiny-narrow", **preset), hidden_projection=False, **store)


def _config_with_other_vocabulary(tiny_teacher, store_fit, tmp_path):
    _, store = store_fit
    bert = _build(str(_bert_config(tmp_path, store["store_vocab_size"] + 7)), tiny_teacher)
    check_compatible(bert, hidden_projection=False, **store)


def _unknown_spec(tiny_teacher, store_fit, tmp_path):
    _build("nope", tiny_teacher)


@pytest.mark.parametrize(
    "refused, message",
    [
        (_other_tokenizer, r"tokenizer mismatch.*" + "0" * 64),
        (_narrower_without_projection, "hidden width mismatch: student 16 vs teacher 32"),
        (_config_with_other_vocabulary, r"vocabulary mismatch.*{bigger}.*{vocab}"),
        (_unknown_spec, "unknown student"),
    ],
    ids=["tokenizer", "width", "vocabulary", "unknown-spec"],
)
def test_refusals(tiny_teacher, store_fit, tmp_path, refused, message):
    vocab = store_fit[1]["store_vocab_size"]
    with pytest.raises(StudentError, match=message.format(bigger=vocab + 7, vocab=vocab)):
        refused(tiny_teacher, store_fit, tmp_path)


def test_vocabulary_padded_for_training_and_trimmed_on_export(tiny_teacher, teacher, tmp_path):
    """Built students carry embeddings and an output layer padded to a multiple of 64 rows (aligned logit
    rows for the kernels); the export trims them: the exported model has the tokenizer's vocabulary and
    gives the trained model's logits on it."""
    from transformers import AutoModelForMaskedLM

    from offline_kd.train.export import export_student
    from offline_kd.train.student import VOCAB_MULTIPLE

    V = teacher.config.vocab_size
    assert V % VOCAB_MULTIPLE  # the fixture's vocabulary needs padding, or this would test nothing
    bundle = _build("distil", tiny_teacher)
    W = bundle.model.config.vocab_size
    assert bundle.true_vocab_size == V and W % VOCAB_MULTIPLE == 0 and W - V < VOCAB_MULTIPLE
    assert bundle.model.get_input_embeddings().weight.shape[0] == W
    assert bundle.model.get_output_embeddings().weight.shape[0] == W
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        padded_logits = bundle.model(input_ids=ids).logits
    assert padded_logits.shape[-1] == W
    state = {"student." + k: v for k, v in bundle.model.state_dict().items()}
    export_student(bundle, state, tmp_path / "final")
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "final")
    assert exported.config.vocab_size == V
    assert exported.get_input_embeddings().weight.shape[0] == V
    assert exported.get_output_embeddings().weight.shape[0] == V
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, padded_logits[..., :V])
