"""One writer per rank of a store: a lease file that the holder keeps fresh and that expires.

The leases of ``STORE`` live beside it, in ``STORE.leases/`` (outside the Zarr hierarchy, which
only holds arrays). Rank ``r``'s lease is the file ``rank<r>.<generation>.json`` with the highest
generation; it records the holder (host, process id, start time), its token and its last
heartbeat. A writer

1. reads the newest lease of its rank; a live holder makes it refuse with a one-line
   :class:`LeaseError` naming the lease file and the holder;
2. otherwise (none, or an expired one) creates the next generation's file *exclusively*: of two
   writers taking over the same expired lease, one creates the file and the other finds it and
   refuses;
3. rewrites its file every ``expiry / 4`` seconds (the heartbeat) and checks, before each
   commit, that no newer generation exists and that its own file is still there and holds its
   token (where a filesystem cannot create exclusively, the last of several takers' writes wins);
4. deletes its file when it finishes, fails or is interrupted.

A holder is live while its last heartbeat is younger than the expiry it recorded. A holder on
this machine (same host name, boot and process namespace) whose process is gone is expired at
once, so rerunning a killed command does not wait. Atomicity per filesystem: docs/resume.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from offline_kd.store.signal_store import StoreError
from offline_kd.store.storage import filesystem, is_local, local_path

SUFFIX = ".leases"
DEFAULT_EXPIRY = 120.0
_NAME = re.compile(r"^rank(\d+)\.(\d+)\.json$")


class LeaseError(StoreError):
    """Another live process writes the same rank of the store, or this process lost its lease."""


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _machine() -> str:
    """This machine and process namespace: pids are comparable only within one."""
    boot = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None where /proc is absent."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _process_running(pid: int, start: str | None) -> bool:
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    """What a lease file records."""

    rank: int
    world_size: int
    token: str
    host: str
    machine: str
    pid: int
    pid_start: str | None
    started: float
    heartbeat: float
    expiry: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        return cls(**json.loads(data))

    def is_live(self, now: float, machine: str) -> bool:
        if self.machine == machine:
            return _process_running(self.pid, self.pid_start)
        return now - self.heartbeat < self.expiry

    def describe(self, now: float) -> str:
        return (
            f"pid {self.pid} on {self.host}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
            f"last heartbeat {max(now - self.heartbeat, 0.0):.1f} s ago"
        )


class StoreLease:
    """The lease of one rank of a store; a context manager (acquire on enter, release on exit)."""

    def __init__(
        self,
        url: str,
        rank: int,
        world_size: int = 1,
        expiry: float = DEFAULT_EXPIRY,
        storage_options: dict | None = None,
    ):
        if expiry <= 0:
            raise ValueError(f"the lease expiry must be positive, got {expiry}")
        self.url = str(url).rstrip("/") + SUFFIX
        self.local = is_local(self.url)
        if self.local:
            self.fs, self.dir = LocalFileSystem(), str(local_path(self.url))
        else:  # the store's own filesystem and --storage-option values
            self.fs = filesystem(self.url, storage_options)
            self.dir = self.fs._strip_protocol(self.url)
        self.rank, self.world_size, self.expiry = int(rank), int(world_size), float(expiry)
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._holder: Holder | None = None

    # ------------------------------------------------------------------ files
    def _path(self, generation: int) -> str:
        return f"{self.dir}/rank{self.rank}.{generation:06d}.json"

    def _display(self, generation: int) -> str:
        return f"{self.url}/rank{self.rank}.{generation:06d}.json"

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.dir)  # object stores cache listings; other writers change it
        try:
            names = self.fs.ls(self.dir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        gens = []
        for name in names:
            m = _NAME.match(str(name).rstrip("/").rsplit("/", 1)[-1])
            if m and int(m.group(1)) == self.rank:
                gens.append(int(m.group(2)))
        return sorted(gens)

    def _read(self, generation: int) -> Holder | None:
        try:
            return Holder.from_json(self.fs.cat_file(self._path(generation)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:
            raise LeaseError(
                f"unreadable lease file {self._display(generation)} ({e}); if no process writes "
                f"rank {self.rank} of the store, delete it"
            ) from e

    def _create_exclusive(self, generation: int, data: bytes) -> bool:
        """Write the file only if it does not exist; False when another writer was first."""
        path = self._path(generation)
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            for _ in range(5):  # another rank may remove the empty folder between the two steps
                os.makedirs(self.dir, exist_ok=True)
                try:
                    Path(tmp).write_bytes(data)
                    break
                except FileNotFoundError:
                    continue
            try:
                os.link(tmp, path)  # atomic, complete and exclusive: fails if `path` exists
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _rewrite(self, data: bytes) -> None:
        path = self._path(self.generation)
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _delete(self, generation: int) -> None:
        try:
            self.fs.rm_file(self._path(generation))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> StoreLease:
        """Take the lease or raise :class:`LeaseError` naming the live holder."""
        machine = _machine()
        for _ in range(20):
            now = time.time()
            gens = self._generations()
            if gens:
                holder = self._read(gens[-1])
                if holder is None:
                    continue  # released meanwhile: look again
                if holder.is_live(now, machine):
                    raise LeaseError(
                        f"rank {self.rank} of {self.url[: -len(SUFFIX)]!r} is being written by another "
                        f"process ({holder.describe(now)}; lease file {self._display(gens[-1])}): wait "
                        f"for it to finish; a lease expires {holder.expiry:g} s after its holder's last "
                        "heartbeat, at once when its process on this machine is gone"
                    )
            # Every process that saw the same files tries the same name: exactly one creates it.
            generation = gens[-1] + 1 if gens else 0
            pid = os.getpid()
            self._holder = Holder(
                self.rank, self.world_size, uuid.uuid4().hex, socket.gethostname(), machine, pid,
                _process_start(pid), now, now, self.expiry,
            )  # fmt: skip
            if self._create_exclusive(generation, self._holder.to_json()):
                if not self._is_mine(generation):
                    continue  # a store without exclusive creation: another taker wrote it last
                self.generation = generation
                for old in gens:  # expired holders' files
                    self._delete(old)
                self._start_heartbeat()
                return self
        raise LeaseError(f"could not take the lease of rank {self.rank} in {self.url}: too much contention")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="kd-store-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(self.expiry / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                if self._check() is not None:
                    return
                self._holder.heartbeat = time.time()
                self._rewrite(self._holder.to_json())
            except OSError:
                continue  # a transient error: the next beat retries, the expiry has slack

    def _check(self) -> str | None:
        """Why this process no longer holds the lease, or None while it does."""
        if self.lost is None and self.generation is not None:
            gens = self._generations()
            if self.generation not in gens:
                self.lost = f"its lease file {self._display(self.generation)} was removed"
            elif gens[-1] > self.generation:
                self.lost = f"another process took it over ({self._display(gens[-1])})"
            elif not self._is_mine(self.generation):  # only where creation is not exclusive
                self.lost = f"another process took it over ({self._display(self.generation)})"
        return self.lost

    def _is_mine(self, generation: int) -> bool:
        try:
            holder = self._read(generation)
        except LeaseError:  # unreadable: not this process's file
            return False
        return holder is not None and holder.token == self._holder.token

    def ensure_held(self) -> None:
        """Raise :class:`LeaseError` when another writer has taken this rank over."""
        why = self._check()
        if why is not None:
            raise LeaseError(f"lost the lease of rank {self.rank} of {self.url[: -len(SUFFIX)]!r}: {why}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None:
            if self._is_mine(self.generation):  # never another taker's file of the same name
                self._delete(self.generation)
            if self.local:
                try:
                    os.rmdir(self.dir)  # only when no other rank holds a lease
                except OSError:
                    pass
        self.generation = None

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
