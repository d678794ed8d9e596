"""Rank, world size, device and barrier: the process-group facts every stage asks for.

Launchers (``torchrun``, ``deepspeed``) describe the process group through ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, SLURM's ``srun`` through ``SLURM_PROCID``, ``SLURM_NTASKS`` and
``SLURM_LOCALID`` (`offline_kd.runtime.launcher`); without a launcher a run is rank 0 of 1. The teacher pass
(`precompute`) needs no process group, only those numbers; training joins a real group
(`init_distributed`) because DeepSpeed and the per-micro-batch loss sums need collectives.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.launcher import export_slurm_env, launcher_env


def free_port() -> int:
    """A TCP port free on this host now (for a one-process group without a launcher)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else the launcher's (torchrun/deepspeed, then SLURM); else (0, 1)."""
    env = launcher_env()
    r = rank if rank is not None else env.rank
    w = world_size if world_size is not None else env.world_size
    if w < 1 or not 0 <= r < w:
        raise UsageError(f"--rank {r} is not in [0, --world-size {w})")
    return r, w


def init_distributed(local_rank: int | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a one-process group when nothing is set.
    `timeout_s`: how long a collective waits for every rank before it fails (default: DeepSpeed's)."""
    import datetime

    import deepspeed

    export_slurm_env()  # under srun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* from SLURM's variables
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ["LOCAL_RANK"] = "0"
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(**kwargs)
    return dist.get_rank(), dist.get_world_size()


HEARTBEAT_S = 2.0


def start_heartbeat() -> None:
    """Every rank writes the time to the rendezvous store every few seconds from a daemon thread, so a
    rank whose process stopped (SIGSTOP, a dead node) can be told from one merely waiting (`silent_ranks`)."""
    import threading
    import time

    store = _default_store()
    if store is None:
        return
    key = f"offline_kd/alive/{dist.get_rank()}"

    def beat() -> None:
        while True:
            try:
                store.set(key, repr(time.time()))
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="kd-rank-heartbeat", daemon=True).start()


def silent_ranks(quiet_s: float) -> list[tuple[int, float]]:
    """(rank, seconds since its last heartbeat) of the ranks silent for over `quiet_s` seconds."""
    import time

    store = _default_store()
    if store is None:
        return []
    out = []
    for r in range(dist.get_world_size()):
        try:
            age = time.time() - float(store.get(f"offline_kd/alive/{r}"))
        except Exception:  # noqa: BLE001 - never reported
            continue
        if age > quiet_s:
            out.append((r, age))
    return out


def _default_store():
    """The process group's rendezvous store (a small key-value service every rank reaches), if any."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a torch without it: no progress records, a plainer message
        return None


def shutdown_distributed() -> None:
    """Destroy the process group through DeepSpeed, which also drops its cached clones of the group, so a
    later `init_distributed` in this process starts clean (torch's own destroy leaves those stale)."""
    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def rank() -> int:
    """This process's rank in the initialised group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the initialised group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()


def make_current(device: str | torch.device) -> None:
    """Make a CUDA device this process's current one (`torch.cuda.set_device`); nothing for other devices.

    Triton launches on the current device, and so does every allocation without an explicit device: a rank
    that only names ``cuda:$LOCAL_RANK`` would still launch on cuda:0 with pointers on cuda:r."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())


def local_device(explicit: str | None = None) -> str:
    """An explicit device wins; else this process's GPU (``cuda:$LOCAL_RANK``) if any; else cpu. A CUDA
    device is made the current one (`make_current`)."""
    device = explicit or (f"cuda:{launcher_env().local_rank}" if torch.cuda.is_available() else "cpu")
    make_current(device)
    return device


def accelerator_device() -> torch.device:
    """This rank's device as DeepSpeed's accelerator sees it (cpu under its CPU accelerator), made the
    current one (`make_current`)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    device = torch.device(accelerator.device_name(launcher_env().local_rank))
    make_current(device)
    return device
