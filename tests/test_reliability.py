"""Crashes and misuse: exact resume with dropout, one writer per store rank, orphans, bad inputs."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_store, pause_env, run_tiny_precompute, wait_until
from fsspec.implementations.memory import MemoryFileSystem
from test_precompute import kd_cmd
from test_train import ROOT, SCRIPT, _base, _check, _env, _losses, run_cli

from offline_kd.store.lease import Holder, LeaseError, StoreLease
from offline_kd.store.signal_store import SignalStore

# ------------------------------------------------------------------------ exact resume, dropout on


@pytest.fixture(scope="module")
def dropout_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher with dropout on: the `distil` student takes its dropout probabilities."""
    out = tmp_path_factory.mktemp("dropout") / "teacher"
    shutil.copytree(tiny_teacher, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact_with_dropout(tiny_store, dropout_teacher, tmp_path):
    args = ["--teacher", dropout_teacher, "--epochs", 1, "--save-every", 2, "--no-tensorboard"]
    full = tmp_path / "full"
    _check(run_cli(_base(tiny_store, full) + args))
    assert json.loads((full / "final" / "config.json").read_text())["dropout"] == 0.1

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT)] + [str(a) for a in _base(tiny_store, killed) + args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "checkpoints" / "step00000006" / "COMPLETE"
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)  # somewhere in steps 7-8 or the save of step 8
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "final").exists()
    resumed = run_cli(_base(tiny_store, killed) + args + ["--resume"])
    _check(resumed)
    assert "resumed from step0000000" in resumed.stderr
    assert "not an exact continuation" not in resumed.stderr
    assert _losses(killed) == _losses(full)
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)


def test_rng_state_files_hold_no_pickle(tmp_path):
    import random

    import numpy as np
    import torch

    from offline_kd.train.checkpoint import load_rng_state, rng_state, save_rng_state, set_rng_state

    np.random.seed(3)
    np.random.randn(1)  # leaves a cached Gaussian in NumPy's legacy state
    random.gauss(0, 1)  # and one in Python's
    path = tmp_path / "rng.safetensors"
    save_rng_state(path, rng_state())
    after = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_rng_state(path))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == after
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle stream


def test_no_unsafe_unpickling_in_the_project():
    """Unpickling (`pickle` loads, `torch.load` with `weights_only` off) runs code from the file: it
    has no place here, in code, tests, scripts or docs."""
    unsafe = ("weights_only" + "=False", "pickle" + ".load")
    offenders, seen = [], 0
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info") or not path.is_file():
            continue
        if (
            path.suffix not in (".py", ".md", ".toml", ".json", ".cfg", ".sh", ".txt")
            and path.name != "Makefile"
        ):
            continue
        seen += 1
        text = path.read_text(errors="replace")
        if any(u in text for u in unsafe):
            offenders.append(str(rel))
    assert seen > 50 and not offenders


# ------------------------------------------------------------------------ one writer per store rank


def _lease_files(store: Path) -> list[Path]:
    return sorted(Path(str(store) + ".leases").glob("rank*.json"))


@pytest.mark.slow
def test_second_writer_of_a_rank_is_refused_and_the_store_stays_intact(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    out = tmp_path / "shared.zarr"
    release = tmp_path / "release"  # the first writer holds the lease, paused before its first commit
    first = subprocess.Popen(
        kd_cmd(tiny_teacher, tiny_corpus, out),
        env=pause_env(release, before_commit=1, env=_env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: Path(f"{release}.paused").exists(), first)
        second = subprocess.run(
            kd_cmd(tiny_teacher, tiny_corpus, out), env=_env(), capture_output=True, text=True, timeout=300
        )
        release.touch()
        _, first_err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, second.stderr
    assert "rank 0" in errors[0] and "being written by another process" in errors[0]
    assert f"{out}.leases/rank0." in errors[0] and f"pid {first.pid}" in errors[0]
    assert_same_store(out, tiny_store)
    assert not Path(f"{out}.leases").exists()  # released on exit


@pytest.mark.slow
def test_a_killed_writers_lease_does_not_block_the_rerun(tmp_path, tiny_teacher):
    """A holder on this machine whose process is gone is expired at once."""
    store = tmp_path / "s.zarr"
    code = (
        "import sys, time\n"
        "from offline_kd.store.lease import StoreLease\n"
        f"StoreLease({str(store)!r}, 0).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseError, match=rf"pid {holder.pid} on "):
            StoreLease(str(store), 0).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    assert len(_lease_files(store)) == 1  # left behind by the kill
    with StoreLease(str(store), 0) as lease:
        assert _lease_files(store) == [Path(lease._path(lease.generation))]
    assert not _lease_files(store)


def _plant_holder(store: Path, rank: int, generation: int, heartbeat: float, expiry: float) -> Path:
    """A lease held by a process on another machine (its pid cannot be checked from here)."""
    holder = Holder(rank, 1, "t0", "elsewhere", "elsewhere|boot|ns", 4242, "1", heartbeat, heartbeat, expiry)
    path = Path(f"{store}.leases") / f"rank{rank}.{generation:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(holder.to_json())
    return path


def test_a_lease_from_another_machine_expires_after_its_last_heartbeat(tmp_path):
    store = tmp_path / "s.zarr"
    planted = _plant_holder(store, 0, 5, time.time(), expiry=600.0)
    with pytest.raises(
        LeaseError, match=r"pid 4242 on elsewhere.*last heartbeat .* s ago; lease file .*rank0\.0+5\.json"
    ):
        StoreLease(str(store), 0).acquire()
    with StoreLease(str(store), 1):  # another rank is not affected
        pass
    _plant_holder(store, 0, 5, time.time() - 601.0, expiry=600.0)  # its last heartbeat: over an expiry ago
    with StoreLease(str(store), 0) as lease:
        assert lease.generation > 5 and not planted.exists()


@pytest.mark.parametrize("round_", range(5))
def test_of_writers_starting_at_once_exactly_one_takes_the_lease(tmp_path, round_):
    store, n = tmp_path / "s.zarr", 8
    won, refused = _contend(str(store), n)
    try:
        assert len(won) == 1 and len(refused) == n - 1
        assert all("being written by another process" in e for e in refused)
        assert len(_lease_files(store)) == 1
    finally:
        for lease in won:
            lease.release()


def test_heartbeat_keeps_the_lease_fresh_and_a_taken_over_writer_stops(tmp_path):
    store = tmp_path / "s.zarr"
    expiry = 0.4
    lease = StoreLease(str(store), 0, expiry=expiry).acquire()
    try:
        path = Path(lease._path(lease.generation))
        first = Holder.from_json(path.read_bytes())
        deadline = time.monotonic() + 120
        now = first
        # Two and a half expiries past the first heartbeat: only the heartbeat thread can get it there.
        while now.heartbeat < first.heartbeat + 2.5 * expiry and time.monotonic() < deadline:
            time.sleep(0.05)
            now = Holder.from_json(path.read_bytes())
        assert now.heartbeat >= first.heartbeat + 2.5 * expiry
        assert not first.is_live(now.heartbeat, machine="another machine")  # without it: expired by then
        assert now.is_live(now.heartbeat, machine="another machine")
        lease.ensure_held()
        _plant_holder(store, 0, lease.generation + 1, time.time(), expiry=60)  # a newer writer
        with pytest.raises(LeaseError, match="lost the lease of rank 0.*another process took it over"):
            lease.ensure_held()
    finally:
        lease.release()


class CheckThenWriteFileSystem(MemoryFileSystem):
    """An object store without exclusive creation: ``mode="create"`` checks, then writes, with a
    pause between the two, so concurrent takers all pass the check and the last write wins."""

    protocol = "checkthenwrite"
    store: dict = {}  # noqa: RUF012 - fsspec's memory filesystems keep their files per class
    pseudo_dirs = [""]  # noqa: RUF012

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create" and self.exists(path):
            raise FileExistsError(path)
        time.sleep(0.05)
        return super().pipe_file(path, value, **kwargs)


def _contend(url: str, n: int, **kwargs) -> tuple[list[StoreLease], list[str]]:
    """``n`` threads taking rank 0's lease of ``url`` at once: (leases taken, refusals)."""
    import threading

    start, won, refused = threading.Barrier(n), [], []

    def contend():
        start.wait()
        try:
            won.append(StoreLease(url, 0, expiry=30, **kwargs).acquire())
        except LeaseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_the_lease_on_an_fsspec_store_refuses_a_second_writer_and_expires():
    """The same protocol through fsspec (an in-memory object store) as on local disk."""
    fs = MemoryFileSystem()
    url = f"memory://lease-{uuid.uuid4().hex}/s.zarr"
    with StoreLease(url, 0) as lease:
        assert [Path(p).name for p in fs.ls(f"{url}.leases", detail=False)] == ["rank0.000000.json"]
        with pytest.raises(LeaseError, match=rf"being written by another process \(pid {os.getpid()} "):
            StoreLease(url, 0).acquire()
    assert not fs.exists(f"{url}.leases/rank0.000000.json")
    other = Holder(0, 1, "t0", "elsewhere", "elsewhere|boot|ns", 4242, "1", time.time(), time.time(), 600.0)
    fs.pipe_file(f"{url}.leases/rank0.000007.json", other.to_json())
    with pytest.raises(LeaseError, match=r"pid 4242 on elsewhere"):
        StoreLease(url, 0).acquire()
    stale = time.time() - 601.0  # the same holder, its last heartbeat over an expiry ago
    other = Holder(0, 1, "t0", "elsewhere", "elsewhere|boot|ns", 4242, "1", stale, stale, 600.0)
    fs.pipe_file(f"{url}.leases/rank0.000007.json", other.to_json())
    with StoreLease(url, 0) as lease:
        assert lease.generation == 8 and not fs.exists(f"{url}.leases/rank0.000007.json")
    won, refused = _contend(f"memory://lease-{uuid.uuid4().hex}/t.zarr", 8)
    try:
        assert len(won) == 1 and len(refused) == 7
    finally:
        for lease in won:
            lease.release()


def test_without_exclusive_creation_exactly_one_of_concurrent_takers_keeps_the_lease():
    """Where creation is check-then-write, several takers may believe they won; the token in the
    file decides, and every other one stops before its next commit."""
    import fsspec

    fsspec.register_implementation("checkthenwrite", CheckThenWriteFileSystem, clobber=True)
    for round_ in range(3):
        url = f"checkthenwrite://r{round_}/s.zarr"
        won, refused = _contend(url, 6)
        try:
            assert len(won) + len(refused) == 6 and won
            held = []
            for lease in won:
                try:
                    lease.ensure_held()
                    held.append(lease)
                except LeaseError as e:
                    assert "another process took it over" in str(e)
            assert len(held) == 1
        finally:
            for lease in won:
                lease.release()
        assert StoreLease(url, 0)._generations() == []  # the holder deleted its file, nobody else's


# ------------------------------------------------------------------------ creation and orphans


def test_creation_keeps_what_another_creator_wrote(tmp_path, tiny_store):
    """Creating over a group whose arrays already exist (a concurrent creator's) empties nothing."""
    import zarr

    from offline_kd.store.signal_store import ATTR_KEY

    out = tmp_path / "c.zarr"
    shutil.copytree(tiny_store, out)
    meta = SignalStore.open(str(out)).meta
    g = zarr.open_group(str(out), mode="r+")
    attrs = dict(g.attrs)
    g.attrs.clear()  # the other creator has not written the attributes yet
    store = SignalStore.create(str(out), meta)
    assert store.is_complete()
    assert_same_store(out, tiny_store)
    assert zarr.open_group(str(out)).attrs[ATTR_KEY] == attrs[ATTR_KEY]


def _plant_partial(path: Path) -> Path:
    """A zero-byte temporary file named as zarr's local store names them before the rename."""
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"")
    return partial


def _kill_mid_shard(store: Path, shard: int) -> set[Path]:
    """What a kill -9 leaves of `shard`: the inputs and view 0 written, view 1 not, no commit, and
    temporary files of zarr's atomic writes (returned)."""
    (store / "committed" / "c" / str(shard)).unlink()
    planted = {_plant_partial(store / "committed" / "c" / str(shard))}
    for array in ("masked_input_ids", "mlm_mask", "topk_ids", "topk_logits", "lse", "hidden"):
        view1 = store / array / "c" / "1" / str(shard)
        shard_file = view1 if view1.is_file() else next(f for f in view1.rglob("*") if f.is_file())
        shard_file.unlink()
        planted.add(_plant_partial(shard_file))
    return planted


def test_resume_removes_the_partial_files_of_a_killed_run(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    import warnings

    out = tmp_path / "orphans.zarr"
    shutil.copytree(tiny_store, out)
    _kill_mid_shard(out, 2)
    other_rank = _kill_mid_shard(out, 3)
    _plant_partial(out / "zarr.json")  # a kill while the root metadata was written
    # rank 0 of 2 owns the even shards: it removes their partial files and the metadata's, no others
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, rank=0, world_size=2)
    assert not [w for w in caught if "not recognized" in str(w.message)]
    assert r.shards_written == [2]
    assert set(out.rglob("*.partial")) == other_rank
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    assert r.shards_written == [3] and r.complete
    assert not list(out.rglob("*.partial"))
    assert_same_store(out, tiny_store)


# ------------------------------------------------------------------------ bad inputs: one line each


class FullMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose disk holds `quota` bytes of store files (leases aside)."""

    protocol = "fullmem"
    store: dict = {}  # noqa: RUF012 - fsspec's memory filesystems keep their files per class
    pseudo_dirs = [""]  # noqa: RUF012
    quota = 0
    used = 0

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        cls = type(self)
        if ".leases/" not in path:
            if cls.used + len(value) > cls.quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            cls.used += len(value)
        return super().pipe_file(path, value, mode=mode, **kwargs)


def _kd(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from offline_kd.cli.kd import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _precompute(teacher, corpus, out, *extra) -> tuple[int, str]:
    return _kd(*kd_cmd(teacher, corpus, out, *extra)[3:])


def _output_is_a_file(teacher, corpus, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code, output = _precompute(teacher, corpus, out)

    def nothing_lost():
        assert out.read_text() == "keep me" and not Path(f"{out}.leases").exists()

    return code, output, rf"Error: store '{out}' is an existing file, not a directory", nothing_lost


def _truncated_teacher(teacher, corpus, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "t.zarr"
    code, output = _precompute(broken, corpus, out)
    return code, output, rf"Error: teacher '{broken}' cannot be loaded: .*incomplete metadata", lambda: None


def _empty_corpus(teacher, corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, output = _precompute(teacher, empty, tmp_path / "e.zarr")
    return code, output, rf"Error: corpus file '{empty}' is empty", lambda: None


def _max_length_4(teacher, corpus, tmp_path):
    out = tmp_path / "m.zarr"
    code, output = _kd(*kd_cmd(teacher, corpus, out)[3:], "--max-length", "4")

    def nothing_written():
        assert not out.exists()

    return (
        code,
        output,
        r"Error: --max-length 4: too small: sequences of at most 11 real tokens",
        nothing_written,
    )


def _disk_full_while_creating(teacher, corpus, tmp_path):
    import fsspec

    fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)
    FullMemoryFileSystem.store.clear()
    FullMemoryFileSystem.quota, FullMemoryFileSystem.used = 1500, 0  # the group and an array or two
    url = f"fullmem://{tmp_path.name}/full.zarr"
    code, output = _precompute(teacher, corpus, url, "--views", "1", "--no-hidden")

    def resumes_once_space_is_freed():
        FullMemoryFileSystem.quota = 1 << 30
        again, again_output = _precompute(teacher, corpus, url, "--views", "1", "--no-hidden")
        assert again == 0 and "complete" in again_output, again_output
        assert SignalStore.open(url).is_complete()

    return (
        code,
        output,
        rf"Error: disk full while creating '{url}'; free space and rerun",
        resumes_once_space_is_freed,
    )


@pytest.mark.parametrize(
    "case",
    [_output_is_a_file, _truncated_teacher, _empty_corpus, _max_length_4, _disk_full_while_creating],
    ids=["output-is-a-file", "truncated-teacher", "empty-corpus", "max-length-4", "disk-full-creating"],
)
def test_bad_precompute_input_is_one_error_line(case, tiny_teacher, tiny_corpus, tmp_path):
    code, output, message, nothing_lost = case(tiny_teacher, tiny_corpus, tmp_path)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 2 and "Traceback" not in output, output
    assert len(errors) == 1 and re.match(message, errors[0]), output
    nothing_lost()


def _train_store_typo(store, tmp_path):
    out = tmp_path / "run"
    return (
        ["--store", tmp_path / "stroe.zarr", "--output", out],
        r"Error: no signal store at '.*stroe\.zarr'",
        out,
    )


def _train_output_is_a_file(store, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    return (
        ["--store", store, "--output", out],
        rf"Error: --output {out}: is an existing file, not a run directory",
        out,
    )


def _train_corrupt_chunk_in_a_worker(store, tmp_path):
    corrupt = tmp_path / "corrupt.zarr"
    shutil.copytree(store, corrupt)
    shard = corrupt / "topk_logits" / "c" / "0" / "1" / "0" / "0"  # view 0, shard 1
    data = bytearray(shard.read_bytes())
    data[40:60] = bytes(b ^ 0xFF for b in data[40:60])
    shard.write_bytes(bytes(data))
    # the top-k KL reads the damaged topk_logits
    args = ["--store", corrupt, "--output", tmp_path / "run", "--num-workers", 1, "--epochs", 1]
    args += ["--kl-source", "topk"]
    return (
        args,
        r"Error: .*'topk_logits' view 0, chunk of sequences \[\d+, \d+\) \(shard 1\) is corrupt",
        None,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [_train_store_typo, _train_output_is_a_file, _train_corrupt_chunk_in_a_worker],
    ids=["store-typo", "output-is-a-file", "corrupt-chunk-num-workers-1"],
)
def test_bad_training_input_is_one_error_line(case, tiny_store, tmp_path):
    args, message, out = case(tiny_store, tmp_path)
    before = out.read_bytes() if out is not None and out.is_file() else None
    base = [
        "--student",
        "distil",
        "--deepspeed_config",
        ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json",
        "--no-progress",
    ]
    proc = run_cli(base + args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert len(errors) == 1 and re.match(message, errors[0]), proc.stderr[-4000:]
    if out is not None:  # refused before anything was written
        assert out.read_bytes() == before if before is not None else not out.exists()


def test_verify_calls_an_uncommitted_shard_unwritten_not_corrupt(tmp_path, tiny_store):
    out = tmp_path / "unfinished.zarr"
    shutil.copytree(tiny_store, out)
    last = SignalStore.open(str(out)).meta.num_shards - 1
    _kill_mid_shard(out, last)
    code, output = _kd("verify", out)
    assert code == 1
    assert f"incomplete: 1 shard(s) not committed: [{last}]" in output
    assert f"uncommitted shard(s) [{last}] are not yet written" in output
    assert "differs" not in output and "corrupt" not in output
    assert f"checked {last} shard(s)" in output
