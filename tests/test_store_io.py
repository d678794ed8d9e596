"""Store I/O: per-array codecs, whole-shard encoding identical to zarr's, several writer threads,
and stores written before the per-array codecs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.codecs as zc
from conftest import assert_same_store, run_tiny_precompute, store_files

from offline_kd.precompute.run import _CommitOrder, writer_threads
from offline_kd.precompute.verify import verify_store
from offline_kd.runtime.settings import PrecomputeConfig, VerifyConfig
from offline_kd.store.shard_codec import ShardCodec
from offline_kd.store.signal_store import SignalStore, StoreError, StoreMeta, array_codecs, shard_range
from offline_kd.train.reader import ReaderConfig, StoreReader

# What `compression` said, and what every array had, before the codec was chosen per array.
OLD_COMPRESSION = {"codec": "zstd", "level": 1, "checksum": "crc32c"}


def _codec_names(array) -> list[str]:
    (sharding,) = array.metadata.codecs
    return [type(c).__name__ for c in sharding.codecs]


@pytest.mark.parametrize("compressors", ["zstd", "none"])
def test_shard_codec_writes_and_reads_what_zarr_does(tmp_path, compressors):
    """Whole shards, a partial last shard, all-zero chunks and shards, -0.0 and every stored dtype."""
    rng = np.random.default_rng(0)
    n, rows, chunk = 45, 16, 4  # 3 shards, the last one 13 rows
    arrays = {
        "f32": rng.normal(size=(n, 6, 3)).astype(np.float32),
        "f16": rng.normal(size=(n, 5)).astype(np.float16),
        "u16": rng.integers(0, 60000, (n, 7)).astype(np.uint16),
        "i32": rng.integers(-5, 5, n).astype(np.int32),
        "b": rng.random((n, 3)) < 0.2,
        "u8": rng.integers(0, 255, (n, 9)).astype(np.uint8),
    }
    arrays["f32"][4:8] = 0.0  # an empty chunk inside a shard: left out of the shard
    arrays["f32"][9, 1, 1] = -0.0  # not empty: -0.0 differs from the fill value bitwise
    arrays["f16"][16:32] = 0  # an empty shard: no file
    codecs = [zc.ZstdCodec(level=1), zc.Crc32cCodec()] if compressors == "zstd" else [zc.Crc32cCodec()]
    for mode in ("zarr", "encoder"):
        g = zarr.open_group(str(tmp_path / mode), mode="w")
        for name, a in arrays.items():
            for per_view in (False, True):
                row = a.shape[1:]
                one = (1,) if per_view else ()
                arr = g.create_array(
                    f"{name}{int(per_view)}", shape=one + a.shape, dtype=a.dtype, chunks=one + (chunk, *row),
                    shards=one + (rows, *row), serializer=zc.BytesCodec(), compressors=codecs,
                    fill_value=False if a.dtype == bool else 0,
                )  # fmt: skip
                enc = ShardCodec.for_array(arr, int(per_view))
                assert enc is not None
                for shard, start in enumerate(range(0, n, rows)):
                    part = a[start : start + rows]
                    if mode == "encoder":
                        enc.write(shard, part, 0 if per_view else None)
                    else:
                        arr[(0,) * per_view + (slice(start, start + rows),)] = part
    assert_same_store(tmp_path / "zarr", tmp_path / "encoder")
    assert not (tmp_path / "zarr" / "f160" / "c" / "1").exists()
    # Reads of whole chunks give what zarr reads: across shards, up to the end, empty chunks and shards.
    g = zarr.open_group(str(tmp_path / "encoder"), mode="r")
    for name, arr in g.arrays():
        per_view = arr.ndim > arrays[name[:-1]].ndim
        codec = ShardCodec.for_array(arr, int(per_view))
        for start, stop in ((0, n), (4, 8), (12, 24), (16, 32), (40, n), (28, 43), (6, 16)):
            assert codec.aligned(start, stop) == ((start, stop) not in ((28, 43), (6, 16)))
            if codec.aligned(start, stop):
                got = codec.read(start, stop, 0 if per_view else None)
                want = arr[(0,) * per_view + (slice(start, stop),)]
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, start, stop)


def test_shard_codec_leaves_other_layouts_to_zarr(tmp_path):
    g = zarr.open_group(str(tmp_path), mode="w")
    kw = dict(shape=(8, 4), dtype="float32", chunks=(2, 4), shards=(4, 4))
    blosc = g.create_array("blosc", compressors=[zc.BloscCodec(), zc.Crc32cCodec()], **kw)
    no_crc = g.create_array("no_crc", compressors=[zc.ZstdCodec()], **kw)
    two_axes = g.create_array("two_axes", compressors=[zc.Crc32cCodec()], **dict(kw, chunks=(2, 2)))
    ones = g.create_array("ones", compressors=[zc.Crc32cCodec()], fill_value=1.0, **kw)
    for arr in (blosc, no_crc, two_axes, ones):
        assert ShardCodec.for_array(arr, 0) is None, arr.name


def test_the_schema_chooses_the_codec_of_each_array(tiny_store):
    s = SignalStore.open(str(tiny_store))
    codecs = array_codecs(s.meta)
    assert codecs["hidden"] == "none" and codecs["topk_logits"] == "zstd"
    assert s.meta.compression["checksum"] == "crc32c" and s.meta.compression["arrays"] == codecs
    g = zarr.open_group(str(tiny_store), mode="r")
    for name, codec in codecs.items():
        want = ["BytesCodec", *(["ZstdCodec"] if codec == "zstd" else []), "Crc32cCodec"]
        assert _codec_names(g[name]) == want, name


def test_writer_threads_write_the_same_store(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}.zarr"
        r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, writer_threads=threads)
        assert r.complete and r.shards_written == list(range(r.num_shards))
        assert_same_store(out, tiny_store)


def test_a_failing_writer_thread_stops_the_run_and_later_shards_stay_uncommitted(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus, monkeypatch
):
    """Disk full in shard 2 with three writer threads: the same one-line error as with one; shards 0
    and 1 commit, none after 2 does (commits stay in order); a rerun completes the same store."""
    out = tmp_path / "full.zarr"
    real_write = SignalStore.write_view

    def write_view(self, shard, view, arrays):
        if shard == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "hidden/c/0/2/0/0")
        real_write(self, shard, view, arrays)

    monkeypatch.setattr(SignalStore, "write_view", write_view)
    with pytest.raises(StoreError, match=rf"^disk full while writing shard 2 of '{out}'; committed shards"):
        run_tiny_precompute(tiny_teacher, tiny_corpus, out, writer_threads=3)
    committed = SignalStore.open(str(out)).committed()
    assert committed[:2].all() and not committed[2:].any()
    monkeypatch.setattr(SignalStore, "write_view", real_write)
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, writer_threads=3)
    assert r.shards_skipped == [0, 1] and r.complete
    assert_same_store(out, tiny_store)


def test_commit_order():
    order = _CommitOrder()
    assert order.wait_turn(0)
    order.done(0, True)
    order.done(2, False)  # shard 2 failed before its turn
    assert order.wait_turn(1)  # an earlier shard still commits
    order.done(1, True)
    assert not order.wait_turn(3)  # a later one does not


def test_writer_threads_default_and_refusal(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    cfg = PrecomputeConfig(teacher="t", corpus=["c"], output="o")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert writer_threads(cfg) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert writer_threads(cfg) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert writer_threads(cfg) == 4  # capped: more threads only hold more shards in memory
    cfg.writer_threads = 7
    assert writer_threads(cfg) == 7
    from click.testing import CliRunner

    from offline_kd.cli.kd import main

    args = ["precompute", "--teacher", tiny_teacher, "--corpus", tiny_corpus, "--output", tmp_path / "s.zarr"]
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--writer-threads", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert [line for line in r.output.splitlines() if line.startswith("Error:")] == [
        "Error: --writer-threads 0: must be at least 1"
    ]
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------- stores written before per-array codecs
def _write_old_store(src: Path, out: Path, shards: list[int] | None = None) -> Path:
    """The store at `src` rewritten as the previous code wrote it: zstd for every array (the old
    `compression` attribute) and every shard through zarr's own write; only `shards` committed."""
    have = SignalStore.open(str(src))
    meta = StoreMeta.from_dict(dict(have.meta.as_dict(), compression=dict(OLD_COMPRESSION)))
    s = SignalStore.create(str(out), meta)
    shutil.copytree(src / "teacher_head", out / "teacher_head")  # the head's layout did not change
    m = s.meta
    for shard in range(m.num_shards) if shards is None else shards:
        a, b = shard_range(m, shard)
        for view in range(m.views):
            d = have.read(view, a, b)
            for name in s.fields:
                arr = s.array(name)
                per_view = arr.ndim > d[name].ndim
                if per_view or view == 0:
                    arr[(view,) * per_view + (slice(a, b),)] = d[name]
        s.mark_committed(shard)
    return out


def test_a_store_with_the_old_codecs_opens_verifies_reads_and_resumes(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    old = _write_old_store(tiny_store, tmp_path / "old.zarr")
    g = zarr.open_group(str(old), mode="r")
    assert _codec_names(g["hidden"]) == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert all(c == "zstd" for c in array_codecs(SignalStore.open(str(old)).meta).values())
    rep = verify_store(str(old), VerifyConfig(sample=2, exact=True))
    assert rep.ok, rep.errors
    cfg = dict(url=str(old), micro_batch_size=4, seed=3, temperature=2.0, buffer_chunks=2)
    got = list(StoreReader(ReaderConfig(**cfg)).epoch_batches(1))
    want = list(StoreReader(ReaderConfig(**dict(cfg, url=str(tiny_store)))).epoch_batches(1))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Half written by the old code, finished by this one: the store keeps its codecs, and the shards
    # written now are the bytes the old code would have written.
    half = _write_old_store(tiny_store, tmp_path / "half.zarr", shards=[0, 1])
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, half, writer_threads=2)
    assert r.shards_skipped == [0, 1] and r.complete
    assert_same_store(half, old)


def test_kd_verify_and_training_on_a_store_with_the_old_codecs(tmp_path, tiny_store):
    old = _write_old_store(tiny_store, tmp_path / "old.zarr")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    verify = subprocess.run(
        [sys.executable, "-m", "offline_kd.cli.kd", "verify", str(old)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    train = subprocess.run(
        [sys.executable, str(root / "cli" / "train.py"), "--store", str(old), "--student", "distil",
         "--output", str(tmp_path / "run"), "--no-progress", "--max-steps", "2", "--epochs", "1"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (tmp_path / "run" / "final").is_dir()
    assert store_files(old)  # untouched by reading


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_reads_of_whole_chunks_never_need_zarrs_read(
    where, tmp_path, tiny_store, tiny_teacher, tiny_corpus, monkeypatch
):
    """The shard codec reads a local and an fsspec store by itself: zarr's read path is only the fallback
    for what it does not expect (a corrupt chunk, another layout), which `_locate_corruption` then names."""
    url = str(tiny_store)
    if where == "fsspec":
        url = f"memory://{tmp_path.name}/tiny.zarr"
        run_tiny_precompute(tiny_teacher, tiny_corpus, url)
    want = {v: SignalStore.open(str(tiny_store)).read(v, 0, 16) for v in (0, 1)}

    def no_zarr_read(self, selection):
        raise AssertionError("read through zarr")

    monkeypatch.setattr(zarr.Array, "__getitem__", no_zarr_read)
    s = SignalStore.open(url)
    for v in (0, 1):
        got = s.read(v, 0, 16)
        assert all(got[k].tobytes() == want[v][k].tobytes() for k in want[v]), v
    batches = list(
        StoreReader(ReaderConfig(url=url, micro_batch_size=4, seed=3, temperature=2.0)).epoch_batches(0)
    )
    assert batches and all(torch.isfinite(b["topk_logits"]).all() for b in batches)


def test_hidden_codec_zstd_compresses_the_hidden_states_too(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    """--hidden-codec zstd (smaller stores from a bf16 teacher pass): the same signals, zstd on `hidden`."""
    from offline_kd.runtime.errors import UsageError
    from offline_kd.store.signal_store import SPECS

    assert PrecomputeConfig(teacher="t", corpus=["c"], output="o").hidden_codec == SPECS["hidden"].codec
    out = tmp_path / "zstd.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out, hidden_codec="zstd")
    assert _codec_names(zarr.open_group(str(out), mode="r")["hidden"]) == [
        "BytesCodec",
        "ZstdCodec",
        "Crc32cCodec",
    ]
    s, ref = SignalStore.open(str(out)), SignalStore.open(str(tiny_store))
    assert all(c == "zstd" for c in array_codecs(s.meta).values())
    rep = verify_store(str(out))
    assert rep.ok, rep.errors
    for v in (0, 1):
        got, want = s.read(v, 0, s.meta.num_sequences), ref.read(v, 0, s.meta.num_sequences)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want), v
    with pytest.raises(UsageError, match=r"^--hidden-codec lz4: must be one of zstd, none$"):
        run_tiny_precompute(tiny_teacher, tiny_corpus, tmp_path / "bad.zarr", hidden_codec="lz4")
