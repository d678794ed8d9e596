"""Preemption is a checkpoint, not a loss: SIGTERM, SIGINT and SIGUSR1 end a run after a saved step.

SLURM, Kubernetes and spot instances send SIGTERM some seconds before they kill a job (SLURM can send
SIGUSR1 earlier still, with ``--signal``); a user presses Ctrl-C. The first such signal on any rank asks
every rank to finish the optimizer step it is in, write a complete checkpoint and exit with status
128 + the signal's number, after one line saying how to resume. A second signal exits at once.

Ranks agree on stopping after every step through a small all-reduce on a gloo group: host memory only,
so it never waits for the GPU. The same message carries rank 0's clock, so ``--save-every-minutes``
saves on every rank at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from offline_kd.runtime import env
from offline_kd.runtime.distributed import silent_ranks
from offline_kd.runtime.errors import RankFailed, RunFailed

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(RunFailed):
    """The run stopped on a signal after saving a checkpoint; its exit status is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopAndSaveRequests:
    """Signals asking the run to stop, and wall-clock saves, agreed on by every rank after each step."""

    def __init__(self, world: int, save_every_minutes: float = 0.0, timeout_s: float = 1800.0):
        import datetime

        self.world, self.every_s = world, save_every_minutes * 60.0
        self.signum = 0  # the first signal this process received
        self._previous: dict[int, object] = {}
        self._last_save = time.monotonic()
        timeout = datetime.timedelta(seconds=timeout_s)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None  # host memory

    def __enter__(self) -> StopAndSaveRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum:  # the second signal: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
            "(a second signal stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def agree(self, step: int, is_main: bool) -> tuple[int, bool]:
        """(the signal any rank received or 0, whether rank 0's clock says a timed save is due), the same on
        every rank, after optimizer step `step`."""
        if env.PAUSE_AFTER_STEP.get():
            self._pause_for_tests(step)
        due = bool(self.every_s) and is_main and time.monotonic() - self._last_save >= self.every_s
        message = torch.tensor([self.signum, int(due)], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(message, op=dist.ReduceOp.MAX, group=self._group)
        signum, due = int(message[0]), bool(message[1])
        return signum, due

    def _pause_for_tests(self, step: int) -> None:
        """The OFFLINE_KD_PAUSE_AFTER_STEP hook: a signal lands at a step the test chose."""
        at, _, release = env.PAUSE_AFTER_STEP.get().partition(":")
        if int(at) != step:
            return
        Path(release + ".paused").touch()
        while not Path(release).exists() and not self.signum:
            time.sleep(0.05)

    def saved(self) -> None:
        """A checkpoint was written: the wall-clock interval starts again."""
        self._last_save = time.monotonic()


# What torch's gloo and NCCL collectives say when a peer stops answering within the timeout.
_NO_ANSWER = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def hung_rank_error(exc: BaseException, step: int, timeout_s: float) -> RankFailed | None:
    """The one-line failure for a collective that failed because a rank stopped answering, naming the rank
    that fell behind (from the rendezvous store), or None when `exc` is something else."""
    text = str(exc).lower()
    if (
        isinstance(exc, RunFailed)
        or not isinstance(exc, RuntimeError)
        or not any(s in text for s in _NO_ANSWER)
    ):
        return None
    silent = silent_ranks(quiet_s=max(3 * 2.0, timeout_s / 2))
    who = ", ".join(f"rank {r} (silent for {age:.0f} s)" for r, age in silent) or "a rank"
    return RankFailed(
        f"{who} stopped answering: no reply within --collective-timeout {timeout_s:g} s after step {step}; "
        "ending the job (rerun with --resume once every rank is healthy)"
    )
