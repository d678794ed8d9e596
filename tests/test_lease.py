"""One writer per store rank: the lease (offline_kd.store.lease) on local disk and through fsspec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_store, pause_env, wait_until
from fsspec.implementations.memory import MemoryFileSystem
from test_precompute import kd_cmd
from test_train import _env

from offline_kd.store.lease import Holder, LeaseError, StoreLease


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
