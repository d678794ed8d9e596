"""User mistakes and clean failures, and how every entry point reports them.

A user's input that cannot work raises `UsageError` (or one of its subclasses: `CorpusError`,
`TeacherError`, `StudentError`, `StoreError`) with a message naming the input. A run that stops for
a reason its message explains (a non-finite loss) raises `RunFailed`. Every entry point (``kd *``,
``cli/train.py`` under any launcher) runs inside `exit_on_error`: one line ``Error: <message>`` on
stderr, exit status 2 for a usage error and 1 for a failed run, no traceback. Under a launcher every
rank raises the same error and only rank 0 prints it, except a `RankFailed` that one rank sees alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from offline_kd.runtime.launcher import launcher_env

USAGE_EXIT = 2
FAILED_EXIT = 1
# Launchers (deepspeed, torchrun) kill every process once one exits: ranks > 0 wait this long
# before exiting so that rank 0 has printed the error first.
_RANK0_GRACE_S = 3.0


class UsageError(ValueError):
    """An input (a path, a URL, a config, a flag's value) that cannot work; named in the message."""

    exit_code = USAGE_EXIT


class RunFailed(RuntimeError):
    """A run stopped for a reason its message explains (nothing the user typed was wrong)."""

    exit_code = FAILED_EXIT


class RankFailed(RunFailed):
    """A failure one rank sees alone (it timed out waiting for rank 0): every rank prints its own."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def report(exc: UsageError | RunFailed) -> int:
    """Print ``Error: ...`` on rank 0 (other ranks stay silent); return the exit status."""
    if launcher_env().rank == 0 or isinstance(exc, RankFailed):
        print(f"Error: {one_line(exc)}", file=sys.stderr, flush=True)
    else:
        time.sleep(_RANK0_GRACE_S)
    return int(getattr(exc, "exit_code", USAGE_EXIT))


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn a `UsageError` or `RunFailed` into ``Error: ...`` and `SystemExit` with its status."""
    try:
        yield
    except (UsageError, RunFailed) as exc:
        raise SystemExit(report(exc)) from None
