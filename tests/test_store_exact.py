"""Stores for the exact KL source: the stored head, --top-k 0, --hidden-dtype, format 1 stores,
and `kd verify --exact` on good and damaged stores (tiny real teacher, real precompute)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import run_tiny_precompute

from offline_kd.cli.kd import main
from offline_kd.precompute.verify import inspect_store, verify_store
from offline_kd.runtime.settings import VerifyConfig
from offline_kd.store.hidden_dtype import decode
from offline_kd.store.signal_store import ATTR_KEY, SignalStore, StoreError
from offline_kd.teacher.errors import TeacherError
from offline_kd.teacher.head import (
    GROUP,
    extract_head,
    load_head,
    reproduction_check,
    save_head,
)
from offline_kd.teacher.model import compute_signals, load_teacher, resolve_head
from offline_kd.train.reader import ReaderConfig, StoreReader


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory, tiny_teacher, tiny_corpus):
    """--top-k 0, bfloat16 hidden states, one view."""
    out = tmp_path_factory.mktemp("exact") / "exact.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out, top_k=0, hidden_dtype="bfloat16", views=1)
    return out


def _copy(src, tmp_path, name="copy.zarr"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_precompute_stores_the_head_and_its_check(tiny_store, tiny_teacher):
    s = SignalStore.open(str(tiny_store))
    assert s.meta.format_version == 2 and s.meta.kl_sources() == ["topk", "exact"]
    head = load_head(s)
    t = load_teacher(str(tiny_teacher), device="cpu", dtype="float32")
    spec = extract_head(t.model)
    for role, value in spec.module.state_dict().items():
        assert torch.equal(head.state_dict()[role], value), role
    check = s.meta.teacher_head["check"]
    assert check["positions"] > 100 and check["hidden_dtype"] == "float16"
    assert check["top1_agreement"] >= 0.99 and check["kl_t1_mean"] < 1e-5
    # the stored hidden states through the stored head give the stored top-k
    d = s.read(0, 0, 4)
    real = np.arange(s.meta.max_length)[None] < d["lengths"][:, None]
    z = head(torch.from_numpy(d["hidden"]).float())
    stored = torch.from_numpy(d["topk_logits"])
    recovered = z.gather(-1, torch.from_numpy(d["topk_ids"].astype(np.int64)))
    assert torch.allclose(recovered[torch.from_numpy(real)], stored[torch.from_numpy(real)], atol=0.02)


def test_topk_zero_store_has_hidden_masks_and_head_only(exact_store, tiny_teacher):
    s = SignalStore.open(str(exact_store))
    g = zarr.open_group(str(exact_store), mode="r")
    assert not {"topk_ids", "topk_logits", "lse"} & set(g.keys())
    assert {"hidden", "mlm_mask", "masked_input_ids", GROUP} <= set(g.keys())
    assert s.meta.kl_sources() == ["exact"] and s.meta.temperatures == []
    assert g["hidden"].dtype == np.uint16 and s.meta.hidden_dtype == "bfloat16"
    with pytest.raises(KeyError, match="--top-k 0"):
        s.read(0, 0, 1, fields=["topk_ids"])
    # the stored bits are the teacher's hidden state rounded to bfloat16
    t = load_teacher(str(tiny_teacher), device="cpu", dtype="float32")
    d = s.read(0, 0, 2)
    attn = (np.arange(s.meta.max_length)[None] < d["lengths"][:, None]).astype(np.int64)
    sig = compute_signals(
        t.model, d["masked_input_ids"].astype(np.int64), attn, 0, [], True, hidden_dtype="bfloat16"
    )
    assert sig.topk_ids is None and sig.lse is None
    np.testing.assert_array_equal(sig.hidden, d["hidden"])
    info = inspect_store(str(exact_store))
    assert info["kl_sources"] == ["exact"] and info["head_bytes"] > 0


def test_reader_on_a_topk_zero_store(exact_store):
    reader = StoreReader(
        ReaderConfig(url=str(exact_store), micro_batch_size=4, temperature=None, hidden=True)
    )
    batch = next(reader.epoch_batches(0))
    assert "topk_ids" not in batch and "topk_logits" not in batch and "lse" not in batch
    assert batch["hidden"].dtype == torch.bfloat16 and batch["hidden"].shape[:2] == batch["input_ids"].shape
    with pytest.raises(ValueError, match="--kl-source exact"):
        StoreReader(ReaderConfig(url=str(exact_store), micro_batch_size=4, temperature=2.0))


def test_topk_zero_needs_hidden_states(tmp_path, tiny_teacher, tiny_corpus):
    with pytest.raises(ValueError, match="needs --hidden and --store-head"):
        run_tiny_precompute(tiny_teacher, tiny_corpus, tmp_path / "x.zarr", top_k=0, hidden=False)
    assert not (tmp_path / "x.zarr").exists()


def test_float8_hidden_states(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "fp8.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out, hidden_dtype="float8_e4m3fn", views=1, top_k=4)
    s = SignalStore.open(str(out))
    assert zarr.open_group(str(out), mode="r")["hidden"].dtype == np.uint8
    d = s.read(0, 0, 2)
    h = decode(d["hidden"], "float8_e4m3fn")
    assert h.dtype == torch.float8_e4m3fn
    reader = StoreReader(ReaderConfig(url=str(out), micro_batch_size=2, temperature=2.0, shuffle=False))
    batch = next(reader.epoch_batches(0))
    L = batch["hidden"].shape[1]
    assert batch["hidden"].dtype == torch.bfloat16
    assert torch.equal(batch["hidden"].float(), h[:, :L].float())  # widened exactly
    assert verify_store(str(out), VerifyConfig(sample=4, exact=True)).ok


def test_float8_refuses_hidden_states_beyond_its_range(tmp_path, tiny_teacher, tiny_corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    d = tmp_path / "loud_teacher"
    m = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        m.bert.encoder.layer[-1].output.LayerNorm.weight.mul_(1000.0)
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    with pytest.raises(
        TeacherError, match="beyond float8_e4m3fn's range of ±448; use --hidden-dtype bfloat16"
    ):
        run_tiny_precompute(d, tiny_corpus, tmp_path / "x.zarr", hidden_dtype="float8_e4m3fn")
    assert not (tmp_path / "x.zarr").exists()


def test_a_swapped_head_fails_the_reproduction_check(tiny_teacher, tiny_docs, tmp_path):
    from conftest import build_tiny_teacher

    other = build_tiny_teacher(tmp_path / "other", tiny_docs, seed=1)
    t = load_teacher(str(tiny_teacher), device="cpu", dtype="float32", head=True)
    wrong = load_teacher(str(other), device="cpu", dtype="float32", head=True).head.module
    ids = torch.randint(5, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    good = reproduction_check(t.model, t.head.module, ids, attn, "float16", 8)
    assert good["top1_agreement"] == 1.0 and good["positions"] == 96
    with pytest.raises(TeacherError, match="does not reproduce the teacher's logits.*--no-store-head"):
        reproduction_check(t.model, wrong, ids, attn, "float16", 8)


def test_a_teacher_whose_head_cannot_be_stored(tmp_path, tiny_teacher, tiny_corpus):
    from transformers import AutoTokenizer, MobileBertConfig, MobileBertForMaskedLM

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    cfg = MobileBertConfig(
        vocab_size=len(tok), hidden_size=32, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    d = tmp_path / "mobilebert"
    MobileBertForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(TeacherError, match="inputs beyond the last hidden state.*--no-store-head"):
        run_tiny_precompute(d, tiny_corpus, tmp_path / "m.zarr")
    run_tiny_precompute(d, tiny_corpus, tmp_path / "m.zarr", store_head=False, views=1)
    s = SignalStore.open(str(tmp_path / "m.zarr"))
    assert s.meta.kl_sources() == ["topk"] and GROUP not in s.group
    assert inspect_store(str(tmp_path / "m.zarr"))["exact_needs_teacher"]


def _as_format_1(store, tmp_path):
    """A copy of ``store`` as this package wrote it before format 2: no head, no new attributes."""
    old = _copy(store, tmp_path, "v1.zarr")
    shutil.rmtree(old / GROUP)
    g = zarr.open_group(str(old), mode="r+")
    attrs = dict(g.attrs[ATTR_KEY])
    for key in ("hidden_dtype", "teacher_head"):
        attrs.pop(key)
    attrs["format_version"] = 1
    g.attrs[ATTR_KEY] = attrs
    return old


def test_format_1_store_takes_the_head_from_the_teacher(tiny_store, tiny_teacher, tiny_docs, tmp_path):
    from conftest import build_tiny_teacher

    old = _as_format_1(tiny_store, tmp_path)
    s = SignalStore.open(str(old))
    assert s.meta.hidden_dtype == "float16" and s.meta.kl_sources() == ["topk"]
    info = inspect_store(str(old))
    assert info["exact_needs_teacher"] and info["head_bytes"] == 0
    with pytest.raises(StoreError, match="no stored teacher head.*pass --teacher"):
        resolve_head(s)
    head = resolve_head(s, str(tiny_teacher))
    assert torch.equal(head.decoder.weight, load_head(SignalStore.open(str(tiny_store))).decoder.weight)
    other = build_tiny_teacher(tmp_path / "other", tiny_docs, seed=2)
    with pytest.raises(TeacherError) as e:
        resolve_head(s, str(other))
    assert "\n" not in str(e.value) and s.meta.teacher["weights_sha256"] in str(e.value)
    rep = verify_store(str(old), VerifyConfig(teacher=str(tiny_teacher), sample=4, exact=True))
    assert rep.ok, rep.errors
    assert rep.exact["top1_agreement"] >= 0.99


def test_verify_exact_passes_on_a_good_store(tiny_store):
    r = CliRunner().invoke(main, ["verify", str(tiny_store), "--exact", "--sample", "6", "--json"])
    assert r.exit_code == 0, r.output
    exact = json.loads(r.stdout)["exact"]
    assert exact["sequences"] == 6 and exact["top1_agreement"] >= 0.99 and exact["topk_agreement"] >= 0.99
    assert exact["max_logit_error"] < 0.02 and max(exact["mean_kl"].values()) < 1e-5
    r = CliRunner().invoke(main, ["verify", str(tiny_store), "--exact", "--sample", "2"])
    assert r.exit_code == 0 and "exact: 2 sequence(s)" in r.output and "OK" in r.output


def test_verify_exact_fails_on_a_perturbed_head(tiny_store, tiny_teacher, tmp_path):
    bad = _copy(tiny_store, tmp_path)
    s = SignalStore.open(str(bad))
    # the token most often first in the stored top-k: its decoder row, scaled, changes those logits
    d = s.read(0, 0, s.meta.num_sequences, fields=["topk_ids", "lengths"])
    real = np.arange(s.meta.max_length)[None] < d["lengths"][:, None]
    token = int(np.bincount(d["topk_ids"][..., 0][real].astype(np.int64)).argmax())
    spec = extract_head(load_teacher(str(tiny_teacher), device="cpu", dtype="float32").model)
    with torch.no_grad():
        spec.module.decoder.weight[token] *= 1.5
    save_head(zarr.open_group(str(bad), mode="r+"), spec)  # a well-formed store of the wrong head
    r = CliRunner().invoke(main, ["verify", str(bad), "--exact", "--sample", "8"])
    assert r.exit_code == 1, r.output
    assert "differ from the stored ones" in r.output and "sequence " in r.output and "FAILED" in r.output


def test_verify_exact_fails_on_drifted_hidden_states_naming_the_sequence(tiny_store, tmp_path):
    from offline_kd.precompute.verify_exact import sample_sequences

    bad = _copy(tiny_store, tmp_path)
    s = SignalStore.open(str(bad), mode="r+")
    seq = int(sample_sequences(s.meta.num_sequences, 8)[3])
    view = seq % s.meta.views
    h = s.array("hidden")
    rows = h[view, seq].astype(np.float32)
    rng = np.random.default_rng(0)
    h[view, seq] = (rows + rng.normal(0.0, 0.5, rows.shape) * (rows != 0)).astype(np.float16)
    s.mark_committed(seq // s.meta.shard_sequences)  # as if written so: the digests of the drifted chunk
    rep = verify_store(str(bad), VerifyConfig(sample=8, exact=True))
    assert not rep.ok
    assert len(rep.errors) == 1 and f"view {view}, sequence {seq}:" in rep.errors[0]


def test_verify_exact_needs_hidden_states(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "nohidden.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out, hidden=False, views=1)
    r = CliRunner().invoke(main, ["verify", str(out), "--exact"])
    assert r.exit_code == 2 and "Error:" in r.output and "no hidden states" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_hidden_dtypes_agree_and_the_size_estimate_follows_them():
    from offline_kd.runtime.settings import HIDDEN_DTYPES
    from offline_kd.store.hidden_dtype import TORCH_DTYPES
    from offline_kd.store.signal_store import HIDDEN_STORAGE, estimate_bytes_per_token

    assert set(HIDDEN_DTYPES) == set(HIDDEN_STORAGE) == set(TORCH_DTYPES)
    V, H = 30522, 768
    fp16 = estimate_bytes_per_token(0, 1, 0, H, V, "float16")
    assert fp16 == estimate_bytes_per_token(0, 1, 0, H, V, "bfloat16")
    assert fp16 - estimate_bytes_per_token(0, 1, 0, H, V, "float8_e4m3fn") == H
    # --top-k 0: ids, masks and hidden states only; top-k 64 adds ids, logits and the lse
    assert fp16 == 2 + 2 + 1 + 2 * H
    assert estimate_bytes_per_token(64, 1, 2, H, V) - fp16 == 64 * (2 + 4) + 2 * 4
