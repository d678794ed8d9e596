"""Signal store: schema, reader API, signals vs a direct teacher forward, refusal and corruption."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import run_tiny_precompute

from offline_kd.store.signal_store import (
    ARRAY_NAMES,
    DIGESTS,
    SignalStore,
    StoreCorruptionError,
    StoreError,
    StoreMeta,
    StoreMismatchError,
    array_specs,
    dtypes_for,
    estimate_bytes_per_token,
    temperature_index,
)
from offline_kd.teacher.model import compute_signals, load_teacher


def test_schema_and_meta(tiny_store):
    s = SignalStore.open(str(tiny_store))
    m = s.meta
    assert (m.max_length, m.top_k, m.views, m.temperatures, m.hidden) == (32, 8, 2, [1.0, 2.0], True)
    assert m.num_shards == -(-m.num_sequences // m.shard_sequences)
    assert s.is_complete() and s.committed().dtype == bool
    assert m.as_dict()["format"] == "offline_kd.signal_store"
    assert s.temperature_index(2.0) == 1
    with pytest.raises(KeyError, match="temperature 3"):
        s.temperature_index(3.0)
    # Every codec chain ends in crc32c (inner chunks and shard index), readable with plain zarr.
    g = zarr.open_group(str(tiny_store), mode="r")
    for name in ("input_ids", "masked_input_ids", "topk_ids", "topk_logits", "lse", "hidden", "mlm_mask"):
        (sharding,) = g[name].metadata.codecs
        assert type(sharding.codecs[-1]).__name__ == "Crc32cCodec", name
        assert type(sharding.index_codecs[-1]).__name__ == "Crc32cCodec", name
    assert g["topk_ids"].dtype == np.uint16
    assert g.attrs["offline_kd"]["teacher"]["weights_sha256"] == m.teacher["weights_sha256"]


def test_arrays_follow_the_schema_table(tiny_store):
    s = SignalStore.open(str(tiny_store))
    m = s.meta
    g = zarr.open_group(str(tiny_store), mode="r")
    assert sorted(g.keys()) == sorted(ARRAY_NAMES + ("committed", DIGESTS, "teacher_head"))
    for spec in array_specs(m):
        shape, chunks, shards = spec.layout(m)
        arr = g[spec.name]
        assert (arr.shape, arr.chunks, arr.shards) == (shape, chunks, shards), spec.name
        assert arr.dtype == np.dtype(spec.dtype_for(m)) == np.dtype(m.dtypes.get(spec.name, m.id_dtype))
    assert m.dtypes == dtypes_for(m.vocab_size)
    # the size estimate is exactly the uncompressed bytes of the arrays with a position axis
    positional = sum(g[spec.name].nbytes for spec in array_specs(m) if spec.per_position)
    bpt = estimate_bytes_per_token(m.top_k, m.views, len(m.temperatures), m.hidden_size, m.vocab_size)
    assert bpt == positional / (m.num_sequences * m.max_length)
    # the format description lists every array of the table
    doc = (Path(__file__).parents[1] / "docs" / "store-format.md").read_text(encoding="utf-8")
    for name in ARRAY_NAMES + ("committed", DIGESTS):
        assert f"| `{name}` |" in doc, name


def test_absent_array_is_not_created_written_or_read(tmp_path, tiny_store):
    full = SignalStore.open(str(tiny_store))
    meta = StoreMeta.from_dict(dict(full.meta.as_dict(), hidden=False))
    s = SignalStore.create(str(tmp_path / "nohidden.zarr"), meta)
    assert "hidden" not in s.fields and "hidden" not in zarr.open_group(s.url, mode="r").keys()
    R = meta.shard_sequences
    d = full.read(0, 0, R)
    s.write_inputs(0, d["input_ids"], d["lengths"])
    s.write_view(0, 0, d)  # the hidden states passed along are ignored
    got = s.read(0, 0, R)
    assert sorted(got) == sorted(set(ARRAY_NAMES) - {"hidden"})
    for k, v in got.items():
        np.testing.assert_array_equal(v, d[k], err_msg=k)
    with pytest.raises(KeyError, match="without --hidden"):
        s.read(0, 0, R, fields=["hidden"])
    no_hidden = estimate_bytes_per_token(meta.top_k, meta.views, 2, None, meta.vocab_size)
    with_hidden = estimate_bytes_per_token(meta.top_k, meta.views, 2, 32, meta.vocab_size)
    assert with_hidden - no_hidden == meta.views * 32 * 2  # float16 [H] per position and view


def test_temperature_index_tolerance():
    temps = [1.0, 2.0, 2.0]
    assert temperature_index(temps, 2.0) == 1  # the first match
    assert temperature_index(temps, 2.0 + 5e-7) == 1
    with pytest.raises(KeyError, match="temperature 2.000002 is not stored"):
        temperature_index(temps, 2.000002)


def test_read_shapes_and_padding(tiny_store):
    s = SignalStore.open(str(tiny_store))
    m = s.meta
    n = min(5, m.num_sequences)
    d = s.read(1, 0, n)
    L, K, H = m.max_length, m.top_k, m.hidden_size
    assert d["input_ids"].shape == (n, L) and d["lengths"].shape == (n,)
    assert d["topk_ids"].shape == (n, L, K) and d["topk_logits"].dtype == np.float32
    assert d["lse"].shape == (n, L, 2) and d["hidden"].shape == (n, L, H) and d["hidden"].dtype == np.float16
    assert d["mlm_mask"].dtype == bool
    # sorted descending, lse >= max logit / T
    assert np.all(np.diff(d["topk_logits"], axis=-1) <= 0)
    for t, T in enumerate(m.temperatures):
        real = np.arange(L)[None] < d["lengths"][:, None]
        assert np.all(d["lse"][..., t][real] >= d["topk_logits"][..., 0][real] / T - 1e-5)
    only = s.read(0, 2, 4, fields=["lengths"])
    assert list(only) == ["lengths"]
    # the last (partial) shard reads fine; padding positions are zero
    last = s.read(0, m.num_sequences - 1, m.num_sequences)
    pad = np.arange(L) >= last["lengths"][0]
    assert np.all(last["topk_logits"][0][pad] == 0)


def test_masks_differ_between_views_and_spare_specials(tiny_store):
    s = SignalStore.open(str(tiny_store))
    special = set(s.meta.tokenizer["special_ids"])
    a, b = s.read(0, 0, 8), s.read(1, 0, 8)
    assert not np.array_equal(a["mlm_mask"], b["mlm_mask"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    ids = a["input_ids"][a["mlm_mask"]]
    assert not set(ids.tolist()) & special
    # unmasked positions are the input
    np.testing.assert_array_equal(a["masked_input_ids"][~a["mlm_mask"]], a["input_ids"][~a["mlm_mask"]])
    frac = a["mlm_mask"].sum() / a["lengths"].sum()
    assert 0.1 < frac < 0.25


def test_signals_match_direct_teacher_forward(tiny_store, tiny_teacher):
    s = SignalStore.open(str(tiny_store))
    t = load_teacher(str(tiny_teacher), device="cpu")
    assert t.weights_sha256 == s.meta.teacher["weights_sha256"]
    assert t.tokenizer_sha256 == s.meta.tokenizer_sha256
    n = 6
    for view in (0, 1):
        d = s.read(view, 3, 3 + n)
        L = s.meta.max_length
        attn = torch.from_numpy((np.arange(L)[None] < d["lengths"][:, None]).astype(np.int64))
        ids = torch.from_numpy(d["masked_input_ids"].astype(np.int64))
        with torch.inference_mode():
            out = t.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        logits = out.logits.float()
        real = attn.bool().numpy()
        ref_vals, ref_ids = logits.topk(s.meta.top_k, dim=-1)
        np.testing.assert_allclose(d["topk_logits"][real], ref_vals.numpy()[real], atol=1e-4)
        # ids agree except possibly on exact ties
        agree = (d["topk_ids"][real] == ref_ids.numpy()[real]).mean()
        assert agree > 0.999
        for ti, T in enumerate(s.meta.temperatures):
            ref_p = torch.softmax(logits / T, dim=-1)
            gathered = torch.gather(ref_p, -1, torch.from_numpy(d["topk_ids"].astype(np.int64))).numpy()
            stored_p = np.exp(d["topk_logits"] / T - d["lse"][..., ti : ti + 1])
            np.testing.assert_allclose(stored_p[real], gathered[real], atol=1e-5)
            assert np.all(stored_p[real].sum(-1) <= 1 + 1e-5)
        h = out.hidden_states[-1].numpy()
        np.testing.assert_allclose(d["hidden"][real].astype(np.float32), h[real], atol=1e-2, rtol=1e-2)
        # direct compute_signals gives the stored values bit for bit on CPU
        sig = compute_signals(t.model, ids, attn, s.meta.top_k, s.meta.temperatures, hidden=True)
        np.testing.assert_array_equal(sig.topk_logits, d["topk_logits"])
        np.testing.assert_array_equal(sig.lse, d["lse"])


def test_refuses_mismatched_settings(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, out)
    with pytest.raises(StoreMismatchError) as e:
        run_tiny_precompute(tiny_teacher, tiny_corpus, out, top_k=4, seed=1)
    msg = str(e.value)
    assert "top_k" in msg and "seed" in msg and "max_length" not in msg
    # same settings: resumes (nothing to do) without touching it
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    assert r.shards_written == [] and r.complete


def test_refuses_store_from_another_teacher(tmp_path, tiny_store, tiny_docs, tiny_corpus):
    from conftest import build_tiny_teacher, make_documents

    other = build_tiny_teacher(tmp_path / "other", tiny_docs, seed=1)
    out = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, out)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        run_tiny_precompute(other, tiny_corpus, out)
    # another tokenizer (vocabulary trained on other text)
    other_tok = build_tiny_teacher(tmp_path / "other_tok", make_documents(60, seed=5))
    with pytest.raises(StoreMismatchError) as e:
        run_tiny_precompute(other_tok, tiny_corpus, out)
    assert "tokenizer_sha256" in str(e.value) and "corpus.fingerprint" in str(e.value)


def test_crashed_creation_is_redone_but_foreign_groups_are_kept(tmp_path, tiny_teacher, tiny_corpus):
    half = tmp_path / "half.zarr"
    g = zarr.open_group(str(half), mode="w")
    g.create_array("input_ids", shape=(4, 4), dtype="uint16")  # arrays but no attributes yet
    assert run_tiny_precompute(tiny_teacher, tiny_corpus, half, views=1, hidden=False).complete
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("weights", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a signal store"):
        run_tiny_precompute(tiny_teacher, tiny_corpus, foreign)


def _shard_file(store: Path, array: str, shard: int, view: int = 0) -> Path:
    g = zarr.open_group(str(store), mode="r")
    ndim = g[array].ndim
    parts = ([str(view)] if array not in ("input_ids", "lengths") else []) + [str(shard)]
    parts += ["0"] * (ndim - len(parts))
    return store / array / "c" / Path(*parts)


def test_corruption_raises_naming_the_chunk(tmp_path, tiny_store):
    out = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, out)
    f = _shard_file(out, "topk_logits", 1, view=1)
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    s = SignalStore.open(str(out))
    R = s.meta.shard_sequences
    s.read(0, R, 2 * R)  # other view is fine
    s.read(1, 0, R)  # other shard is fine
    with pytest.raises(StoreCorruptionError) as e:
        s.read(1, R, 2 * R)
    msg = str(e.value)
    assert "topk_logits" in msg and "view 1" in msg and "shard 1" in msg


def test_open_errors(tmp_path):
    with pytest.raises(StoreError):
        SignalStore.open(str(tmp_path / "nope.zarr"))
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a finished signal store"):
        SignalStore.open(str(tmp_path / "empty.zarr"))


def test_fsspec_url_store_matches_local(tiny_store, tiny_teacher, tiny_corpus):
    """A store written through an fsspec URL (in-memory filesystem) holds the same signals."""
    url = "memory://offline_kd_test/tiny.zarr"
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, url, views=1, hidden=False)
    assert r.complete
    remote, local = SignalStore.open(url), SignalStore.open(str(tiny_store))
    assert remote.meta.views == 1 and not remote.meta.hidden
    n = remote.meta.num_sequences
    a, b = remote.read(0, 0, n), local.read(0, 0, n, fields=list(remote.fields))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert SignalStore.open("file://" + str(tiny_store)).is_complete()


def test_a_committed_shard_whose_file_is_gone_is_corruption_not_zeros(tmp_path, tiny_store):
    """zarr reads a missing chunk file as its fill value; the store says the file is missing instead."""
    import shutil

    from offline_kd.store.signal_store import SignalStore, StoreCorruptionError

    store = tmp_path / "lost.zarr"
    shutil.copytree(tiny_store, store)
    gone = sorted((store / "hidden" / "c").rglob("*"))
    for f in [f for f in gone if f.is_file()]:
        f.unlink()
    s = SignalStore.open(str(store))
    with pytest.raises(
        StoreCorruptionError, match=r"array 'hidden' view 0, shard 0 is committed but its file is missing"
    ):
        s.read(0, 0, s.meta.shard_sequences)
    assert s.read(0, 0, s.meta.shard_sequences, fields=["input_ids", "lengths"])["lengths"].sum() > 0
