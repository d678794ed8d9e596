"""Students: the DistilBERT construction copies the chosen teacher layers bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from offline_kd.student import (
    StudentError,
    build_student,
    check_compatible,
    default_init_layers,
    load_teacher,
    remap_fewer_layers,
)
from offline_kd.teacher import tokenizer_sha256

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
    assert torch.equal(
        s["distilbert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(s["distilbert.embeddings.LayerNorm.weight"], t["bert.embeddings.LayerNorm.weight"])
    folded = (
        t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.equal(s["distilbert.embeddings.position_embeddings.weight"], folded)
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_layer_norm.bias"], t["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])
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
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)


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


def test_presets_configs_and_compatibility(tiny_teacher, tmp_path):
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    preset = dict(teacher_path=str(tiny_teacher), vocab_size=vocab, max_positions=64)
    tiny = build_student("tiny", **preset)
    assert tiny.kind == "preset" and tiny.model.config.vocab_size == vocab
    sha = tokenizer_sha256(tiny.tokenizer)
    kw = dict(store_vocab_size=vocab, store_tokenizer_sha256=sha, teacher_hidden_size=32, need_hidden=True)
    check_compatible(tiny, hidden_projection=False, **kw)  # same vocab, tokenizer, width
    with pytest.raises(StudentError, match=r"tokenizer mismatch.*" + "0" * 64):
        check_compatible(tiny, hidden_projection=False, **{**kw, "store_tokenizer_sha256": "0" * 64})
    narrow = build_student("tiny-narrow", **preset)
    with pytest.raises(StudentError, match="hidden width mismatch: student 16 vs teacher 32"):
        check_compatible(narrow, hidden_projection=False, **kw)
    check_compatible(narrow, hidden_projection=True, **kw)
    check_compatible(narrow, hidden_projection=False, **{**kw, "need_hidden": False})
    # a HF config.json (BERT, random init) with another vocabulary is refused
    (tmp_path / "bert.json").write_text(
        json.dumps(dict(model_type="bert", vocab_size=vocab + 7, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64))
    )  # fmt: skip
    bert = _build(str(tmp_path / "bert.json"), tiny_teacher)
    assert bert.kind == "config" and type(bert.model).__name__ == "BertForMaskedLM"
    with pytest.raises(StudentError, match=f"vocabulary mismatch.*{vocab + 7}.*{vocab}"):
        check_compatible(bert, hidden_projection=False, **kw)
    with pytest.raises(StudentError, match="unknown student"):
        _build("nope", tiny_teacher)
