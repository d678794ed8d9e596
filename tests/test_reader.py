"""The store reader: rank sharding without overlap, deterministic order, view replay, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offline_kd.store.signal_store import SignalStore
from offline_kd.train.reader import EpochOrder, ReaderConfig, StoreReader


def _cfg(store, **kw):
    base = dict(url=str(store), micro_batch_size=4, seed=3, temperature=2.0, buffer_chunks=2)
    base.update(kw)
    return ReaderConfig(**base)


def _rows(reader, epoch, start=0):
    return [b["rows"].numpy() for b in reader.epoch_batches(epoch, start=start)]


def test_epoch_order_is_a_permutation_with_chunk_locality():
    o = EpochOrder(103, 4, seed=1, epoch=0, buffer_chunks=3)
    rows = o.global_rows(0, 103)
    assert sorted(rows.tolist()) == list(range(103))
    # each shuffle buffer is a contiguous run of positions drawn from at most 3 chunks
    for a, b in zip(o.offsets[:-1], o.offsets[1:], strict=True):
        assert len(np.unique(rows[a:b] // 4)) <= 3
    assert not np.array_equal(rows, EpochOrder(103, 4, seed=1, epoch=1, buffer_chunks=3).global_rows(0, 103))
    assert np.array_equal(rows, EpochOrder(103, 4, seed=1, epoch=0, buffer_chunks=3).global_rows(0, 103))


def test_ranks_disjoint_and_deterministic(tiny_store):
    S = SignalStore.open(str(tiny_store)).meta.num_sequences
    per_rank = []
    for rank in range(3):
        reader = StoreReader(_cfg(tiny_store), world_size=3, rank=rank)
        a, b = _rows(reader, 0), _rows(reader, 0)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert len(a) == (S // 3) // 4
        per_rank.append(np.concatenate(a))
    allrows = np.concatenate(per_rank)
    assert len(np.unique(allrows)) == len(allrows)  # no overlap between ranks
    assert allrows.min() >= 0 and allrows.max() < S


def test_batches_carry_the_view_of_the_epoch(tiny_store):
    store = SignalStore.open(str(tiny_store))
    meta = store.meta
    reader = StoreReader(_cfg(tiny_store, trim_padding=False))
    for epoch in (0, 1, 2):
        view = epoch % meta.views
        batch = next(reader.epoch_batches(epoch))
        rows = batch["rows"].numpy()
        ref = {k: np.stack([store.read(view, r, r + 1)[k][0] for r in rows]) for k in store.fields}
        assert np.array_equal(batch["input_ids"].numpy(), ref["masked_input_ids"].astype(np.int64))
        assert np.array_equal(batch["topk_ids"].numpy(), ref["topk_ids"].astype(np.int64))
        assert np.array_equal(batch["topk_logits"].numpy(), ref["topk_logits"])
        assert np.array_equal(batch["lse"].numpy(), ref["lse"][..., store.temperature_index(2.0)])
        assert np.array_equal(batch["hidden"].numpy(), ref["hidden"])
        labels = np.where(ref["mlm_mask"], ref["input_ids"].astype(np.int64), -100)
        assert np.array_equal(batch["labels"].numpy(), labels)
        lengths = ref["lengths"]
        assert np.array_equal(batch["attention_mask"].sum(1).numpy(), lengths)
    # padding is trimmed to the longest sequence of the micro-batch by default
    b = next(StoreReader(_cfg(tiny_store)).epoch_batches(0))
    assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())


def test_resume_position_and_workers_give_the_same_stream(tiny_store):
    reader = StoreReader(_cfg(tiny_store))
    full = _rows(reader, 1)
    assert all(np.array_equal(a, b) for a, b in zip(full[5:], _rows(reader, 1, start=5), strict=True))
    with_workers = StoreReader(_cfg(tiny_store, num_workers=2))
    assert all(np.array_equal(a, b) for a, b in zip(full[3:], _rows(with_workers, 1, start=3), strict=True))


def test_unstored_temperature_is_refused(tiny_store):
    with pytest.raises(ValueError, match=r"temperature 3.0 is not stored"):
        next(StoreReader(_cfg(tiny_store, temperature=3.0)).epoch_batches(0))
    batch = next(StoreReader(_cfg(tiny_store, temperature=None, hidden=False)).epoch_batches(0))
    assert "lse" not in batch and "hidden" not in batch
    assert batch["topk_logits"].dtype == torch.float32


def test_exact_kl_batches_never_read_the_top_k(tiny_store, tmp_path):
    """The exact KL reads hidden states, masks and labels only: a store copy without its top-k arrays
    gives the same batches."""
    import shutil

    store = tmp_path / "no_topk.zarr"
    shutil.copytree(tiny_store, store)
    for name in ("topk_ids", "topk_logits", "lse"):
        shutil.rmtree(store / name)
    cfg = dict(temperature=None, topk=False, hidden=True)
    got = next(StoreReader(_cfg(store, **cfg)).epoch_batches(1))
    want = next(StoreReader(_cfg(tiny_store)).epoch_batches(1))
    assert not {"topk_ids", "topk_logits", "lse"} & set(got)
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_batches_from_workers_equal_batches_read_in_process(tiny_store):
    """Workers build their batches in shared memory: the same tensors, dtypes and values."""
    for trim in (True, False):
        want = list(StoreReader(_cfg(tiny_store, trim_padding=trim)).epoch_batches(1))
        got = list(StoreReader(_cfg(tiny_store, trim_padding=trim, num_workers=2)).epoch_batches(1))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
                assert a[k].is_contiguous(), k
