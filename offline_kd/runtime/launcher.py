"""Rank, world size and local rank as a launcher describes them in the environment.

``torchrun`` and ``deepspeed`` set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. SLURM's ``srun``
sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` for each task; they are used when no
torchrun/deepspeed variables are set, so ``srun python -m offline_kd.cli.train ...`` and ``srun kd
precompute ...`` need no rank arguments. Without either, a process is rank 0 of 1.

No torch here: the entry points read the rank before (and without) importing it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LauncherEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torch" (torchrun/deepspeed), "slurm" or "none"


def _int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def launcher_env() -> LauncherEnv:
    """torchrun/deepspeed's variables if set, else SLURM's, else rank 0 of 1."""
    rank, world = _int("RANK"), _int("WORLD_SIZE")
    if rank is not None and world is not None:
        return LauncherEnv(rank, world, _int("LOCAL_RANK") or 0, "torch")
    rank, world = _int("SLURM_PROCID"), _int("SLURM_NTASKS")
    if rank is not None and world is not None:
        return LauncherEnv(rank, world, _int("SLURM_LOCALID") or 0, "slurm")
    return LauncherEnv(0, 1, _int("LOCAL_RANK") or 0, "none")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def export_slurm_env() -> bool:
    """Under ``srun`` without torchrun/deepspeed variables, set them from SLURM's; True if it did.

    ``MASTER_ADDR`` defaults to the first host of the step's node list (where task 0 runs) and
    ``MASTER_PORT`` to a port derived from the job id, so every task agrees without talking.
    """
    env = launcher_env()
    if env.source != "slurm":
        return False
    os.environ["RANK"] = str(env.rank)
    os.environ["WORLD_SIZE"] = str(env.world_size)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + (_int("SLURM_JOB_ID") or 0) % 20000)
    return True
