"""The teacher's MLM head: extracted from real (tiny) masked-LM teachers, stored in zarr, rebuilt."""

from __future__ import annotations

import pytest
import torch
import zarr

from offline_kd.teacher.errors import TeacherError
from offline_kd.teacher.head import (
    GROUP,
    check_head_fits,
    extract_head,
    load_head,
    save_head,
)
from offline_kd.teacher.model import head_from_teacher, load_teacher

SMALL = dict(vocab_size=97, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _bert(act: str = "gelu"):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(hidden_size=32, hidden_act=act, **SMALL)).eval()


def _roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(RobertaConfig(hidden_size=32, **SMALL)).eval()


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2, hidden_dim=64, activation="gelu")
    return DistilBertForMaskedLM(cfg).eval()


def _logits_and_hidden(model, n: int = 10):
    ids = torch.randint(0, 97, (3, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize(
    "make, cls_name, first_key",
    [
        (_bert, "BertOnlyMLMHead", "cls.predictions.transform.dense.weight"),
        (lambda: _bert("gelu_new"), "BertOnlyMLMHead", "cls.predictions.transform.dense.weight"),
        (_roberta, "RobertaLMHead", "lm_head.dense.weight"),
        (_distilbert, "DistilBertForMaskedLM", "vocab_transform.weight"),
    ],
)
def test_extracted_head_reproduces_the_teachers_logits(make, cls_name, first_key):
    torch.manual_seed(0)
    model = make()
    spec = extract_head(model)
    assert spec.class_name == cls_name
    assert spec.keys["dense.weight"] == first_key
    assert spec.vocab_size == 97 and spec.hidden_size == 32
    # every stored key is one of the teacher's own state-dict keys, holding the same values
    teacher_sd = model.state_dict()
    for key, value in spec.state_dict().items():
        assert torch.equal(value, teacher_sd[key].float())
    logits, hidden = _logits_and_hidden(model)
    assert torch.allclose(spec.module(hidden), logits, atol=1e-5, rtol=0)


def test_a_head_with_an_extra_input_is_refused():
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    cfg = MobileBertConfig(
        hidden_size=32, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, **SMALL
    )
    with pytest.raises(TeacherError, match="inputs beyond the last hidden state"):
        extract_head(MobileBertForMaskedLM(cfg).eval())


def test_an_unrecognised_head_is_refused():
    from transformers import AlbertConfig, AlbertForMaskedLM

    model = AlbertForMaskedLM(AlbertConfig(hidden_size=32, embedding_size=16, **SMALL)).eval()
    with pytest.raises(TeacherError, match="not a recognised function of the last hidden state"):
        extract_head(model)


def test_a_head_that_does_not_reproduce_the_logits_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    class ScaledLogits(BertForMaskedLM):
        """The head's output is not what the model returns: logits are rescaled after it."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    model = ScaledLogits(BertConfig(hidden_size=32, **SMALL)).eval()
    with pytest.raises(TeacherError, match="does not reproduce the teacher's logits"):
        extract_head(model)


def test_saved_head_is_plain_zarr_and_rebuilds_exactly(tmp_path):
    torch.manual_seed(0)
    model = _bert()
    spec = extract_head(model)
    root = zarr.open_group(str(tmp_path / "h.zarr"), mode="w", zarr_format=3)
    save_head(root, spec)

    g = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")[GROUP]
    attrs = g.attrs["offline_kd_head"]
    assert attrs["class"] == "BertOnlyMLMHead"
    assert attrs["config"]["activation"] == "gelu" and attrs["config"]["vocab_size"] == 97
    for role, key in attrs["parameters"].items():
        assert g[key].dtype == "float32"
        assert torch.equal(torch.from_numpy(g[key][...]), spec.module.state_dict()[role])

    head = load_head(zarr.open_group(str(tmp_path / "h.zarr"), mode="r"))
    logits, hidden = _logits_and_hidden(model)
    assert torch.equal(head(hidden), spec.module(hidden))
    assert not any(p.requires_grad for p in head.parameters())
    assert load_head(g, dtype=torch.bfloat16).decoder.weight.dtype == torch.bfloat16


def test_a_corrupt_head_array_is_named(tmp_path):
    from offline_kd.store.signal_store import StoreCorruptionError

    spec = extract_head(_bert())
    path = tmp_path / "h.zarr"
    save_head(zarr.open_group(str(path), mode="w", zarr_format=3), spec)
    chunk = next(p for p in (path / GROUP / "cls.predictions.decoder.weight" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptionError, match="'cls.predictions.decoder.weight' is corrupt"):
        load_head(zarr.open_group(str(path), mode="r"))
    # a chunk file that is gone reads back as zeros: the recorded sha256 catches it
    chunk.unlink()
    with pytest.raises(
        StoreCorruptionError, match="'cls.predictions.decoder.weight' does not match its sha256"
    ):
        load_head(zarr.open_group(str(path), mode="r"))


def test_vocabulary_and_hidden_size_must_match():
    head = extract_head(_bert()).module
    check_head_fits(head, 97, 32, "store")
    with pytest.raises(TeacherError, match="vocabulary of 97 but store has 98"):
        check_head_fits(head, 98, 32, "store")
    with pytest.raises(TeacherError, match="hidden size 32 but store stores 64"):
        check_head_fits(head, 97, 64, "store")


def test_head_from_teacher_checks_the_weights_hash(tiny_teacher):
    t = load_teacher(str(tiny_teacher), device="cpu", dtype="float32")
    head = head_from_teacher(str(tiny_teacher), t.weights_sha256)
    assert head.vocab_size == t.vocab_size
    with pytest.raises(TeacherError) as e:
        head_from_teacher(str(tiny_teacher), "0" * 64)
    msg = str(e.value)
    assert "\n" not in msg and t.weights_sha256 in msg and "0" * 64 in msg
