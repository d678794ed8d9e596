"""Each commit records the crc32c of every chunk of its shard: a valid chunk in the wrong place is found.

A crc32c says that a chunk is intact, not that it is the right one: a shard file moved or copied to
another shard's position decodes cleanly. The digests recorded at the commit (`chunk_crc32c`) bind
every chunk to its array, view and shard; `kd verify` and every read check them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import run_tiny_precompute, store_files

from offline_kd.cli.kd import main
from offline_kd.precompute.verify import verify_store
from offline_kd.store.shard_codec import ShardCodec
from offline_kd.store.signal_store import (
    ATTR_KEY,
    DIGESTS,
    SPECS,
    SignalStore,
    StoreCorruptionError,
    digest_slots,
)
from offline_kd.train.reader import ReaderConfig, StoreReader


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_file(store: Path, array: str, shard: int, view: int | None) -> Path:
    """The one file of `array`'s shard `shard` (of `view` for a per-view array)."""
    ndim = zarr.open_group(str(store), mode="r")[array].ndim
    parts = ([] if view is None else [str(view)]) + [str(shard)]
    return store / array / "c" / Path(*parts, *["0"] * (ndim - len(parts)))


def _swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def _verify(store: Path) -> tuple[int, list[str]]:
    r = CliRunner().invoke(main, ["verify", str(store)])
    return r.exit_code, [line for line in r.output.splitlines() if line.startswith("ERROR:")]


def _epoch(store: Path, epoch: int, workers: int = 0, **reader) -> list[dict]:
    cfg = ReaderConfig(
        url=str(store), micro_batch_size=4, seed=3, temperature=2.0, num_workers=workers, **reader
    )
    return list(StoreReader(cfg).epoch_batches(epoch))


def test_every_commit_records_the_crc32c_of_its_chunks_and_an_untouched_store_verifies(tiny_store):
    s = SignalStore.open(str(tiny_store))
    m = s.meta
    assert m.digests == DIGESTS
    g = zarr.open_group(str(tiny_store), mode="r")
    rows = g[DIGESTS][:]  # plain zarr reads the record
    n = m.shard_sequences // m.chunk_sequences
    for shard in range(m.num_shards):
        assert np.array_equal(rows[shard], s.chunk_digests(shard))
        for i, (name, view) in enumerate(digest_slots(m)):
            files = ShardCodec.for_array(g[name], int(SPECS[name].per_view))  # the chunks as they are
            assert np.array_equal(rows[shard, i * n : (i + 1) * n], files.stored_crcs(shard, view)), (
                name,
                view,
            )
    code, errors = _verify(tiny_store)
    assert code == 0 and errors == []
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tiny_store), "--json"]).stdout)
    assert info["digests"] is True


@pytest.mark.parametrize(
    ("array", "view"),
    [("input_ids", None), ("topk_logits", 1), ("hidden", 0)],
    ids=["input_ids", "topk", "hidden"],
)
def test_a_shard_file_swapped_with_another_valid_one_is_named_by_verify_and_the_reader(
    tmp_path, tiny_store, array, view
):
    """`hidden` has no compressor: its shard files are the same size and so are their indexes; only
    the chunks' own checksums tell them apart."""
    store = _copy(tiny_store, tmp_path / "swapped.zarr")
    _swap(_shard_file(store, array, 1, view), _shard_file(store, array, 2, view))
    code, errors = _verify(store)
    v = "" if view is None else f" view {view},"
    assert code == 1 and len(errors) == 2, errors
    for shard, line in zip((1, 2), errors, strict=True):
        assert f"array '{array}'{v} shard {shard}: the chunk of sequences" in line
        assert "is not the one committed there" in line
    R = SignalStore.open(str(store)).meta.shard_sequences
    with pytest.raises(
        StoreCorruptionError, match=rf"array '{array}'{v} shard 1: the chunk of sequences \[8, 12\)"
    ):
        SignalStore.open(str(store)).read(view or 0, R + 1, R + 2)  # one row of the chunk: checked too
    with pytest.raises(StoreCorruptionError, match=rf"array '{array}'{v} shard [12]: the chunk"):
        _epoch(store, epoch=view or 0)  # the training reader: the epoch of that view


def test_a_copied_shard_file_fails_in_a_reader_process_naming_it(tmp_path, tiny_store):
    """One valid file copied over another (not swapped): the training reader's worker process refuses it."""
    store = _copy(tiny_store, tmp_path / "copied.zarr")
    last = SignalStore.open(str(store)).meta.num_shards - 2  # a full shard (the last one is partial)
    shutil.copyfile(_shard_file(store, "lse", 0, 1), _shard_file(store, "lse", last, 1))
    with pytest.raises(StoreCorruptionError, match=rf"array 'lse' view 1, shard {last}: the chunk"):
        _epoch(store, epoch=1, workers=1)
    assert len(_epoch(store, epoch=0)) > 0  # the other view is intact


def test_a_committed_shard_without_its_digests_is_corruption(tmp_path, tiny_store):
    store = _copy(tiny_store, tmp_path / "lost.zarr")
    (store / DIGESTS / "c" / "3" / "0").unlink()
    code, errors = _verify(store)
    assert code == 1 and errors == [
        f"ERROR: '{store}': shard 3 is committed but its digests ({DIGESTS}) are missing"
    ]
    with pytest.raises(StoreCorruptionError, match="shard 3 is committed but its digests"):
        _epoch(store, epoch=0)
    row = store / DIGESTS / "c" / "4" / "0"
    row.write_bytes(row.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreCorruptionError, match="the digests of shard 4 are corrupt"):
        SignalStore.open(str(store)).read(0, 32, 40)
    shutil.rmtree(store / DIGESTS)
    with pytest.raises(StoreCorruptionError, match=f"array '{DIGESTS}' has shape None"):
        SignalStore.open(str(store))


def _without_digests(src: Path, dst: Path) -> Path:
    """`src` as the code before the digests wrote it: no `chunk_crc32c`, no `digests` attribute (every
    other file is the same: the digests changed nothing else)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(DIGESTS))
    g = zarr.open_group(str(dst), mode="r+")
    g.attrs[ATTR_KEY] = {k: v for k, v in g.attrs[ATTR_KEY].items() if k != "digests"}
    return dst


def test_a_store_written_before_the_digests_opens_verifies_trains_and_resumes_without_them(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    old = _without_digests(tiny_store, tmp_path / "old.zarr")
    s = SignalStore.open(str(old))
    assert s.meta.digests == "" and s.chunk_digests(0) is None
    rep = verify_store(str(old))
    assert rep.ok, rep.errors
    assert any("records no chunk digests" in n for n in rep.notes)
    got, want = _epoch(old, 1), _epoch(tiny_store, 1)
    assert len(got) == len(want)
    assert all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(got, want, strict=True)
    )
    # half written before, finished now: it stays a store without digests
    half = _without_digests(tiny_store, tmp_path / "half.zarr")
    for shard in (4, 5):
        (half / "committed" / "c" / str(shard)).unlink()
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, half)
    assert r.shards_written == [4, 5] and r.complete
    assert not (half / DIGESTS).exists() and store_files(half) == store_files(old)


def test_the_reader_refuses_a_lost_file_of_a_store_without_digests(tmp_path, tiny_store):
    """Reads straight into the training batch (`read_into`: every row of a run of chunks is used, as in
    an unshuffled epoch) check for a lost file as `read` does: never zeros."""
    old = _without_digests(tiny_store, tmp_path / "old.zarr")
    _shard_file(old, "hidden", 2, 0).unlink()
    assert len(_epoch(old, epoch=1, shuffle=False)) > 0  # the other view is intact
    with pytest.raises(
        StoreCorruptionError, match="array 'hidden' view 0, shard 2 is committed but its file is missing"
    ):
        _epoch(old, epoch=0, shuffle=False)
