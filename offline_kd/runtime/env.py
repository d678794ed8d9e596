"""Every environment variable of offline_kd's own, declared once with its help.

The launchers' variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, SLURM_*) are read in
`offline_kd.runtime.launcher`; libraries read their own (AWS_*, HF_*, USE_HUB_KERNELS, TRITON_INTERPRET).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str

    def get(self) -> str:
        """The value in this process's environment; the default when unset or empty."""
        return os.environ.get(self.name) or self.default


KERNELS = EnvVar(
    "OFFLINE_KD_KERNELS",
    "auto",
    "Loss-kernel backend: auto (Triton on CUDA, the chunked PyTorch reference elsewhere), triton or reference.",
)
CACHE = EnvVar(
    "OFFLINE_KD_CACHE",
    str(os.path.join("~", ".cache", "offline_kd")),
    "Where the demo and the benchmarks cache the MiniLM teacher they fit.",
)
PRECOMPUTE_DELAY = EnvVar(
    "OFFLINE_KD_PRECOMPUTE_DELAY",
    "0",
    "Crash tests only: seconds kd precompute sleeps after writing each (shard, view), before the commit.",
)
PAUSE_BEFORE_COMMIT = EnvVar(
    "OFFLINE_KD_PAUSE_BEFORE_COMMIT",
    "",
    "Crash tests only: N[:RELEASE]: before its N-th commit (that shard's arrays written) kd precompute "
    "creates RELEASE.paused and waits until the file RELEASE exists (forever without one).",
)
PAUSE_AFTER_STEP = EnvVar(
    "OFFLINE_KD_PAUSE_AFTER_STEP",
    "",
    "Preemption tests only: N:RELEASE: after optimizer step N training creates RELEASE.paused and waits until "
    "the file RELEASE exists or a stop signal arrives.",
)
ALL = (KERNELS, CACHE, PRECOMPUTE_DELAY, PAUSE_BEFORE_COMMIT, PAUSE_AFTER_STEP)
