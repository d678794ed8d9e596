"""User mistakes and clean failures, and how every entry point reports them.

A user's input that cannot work raises `UsageError` (or one of its subclasses: `CorpusError`,
`TeacherError`, `StudentError`, `StoreError`) with a message naming the input. A run that stops for
a reason its message explains (a non-finite loss) raises `RunFailed`. Every entry point (``kd *``,
``cli/train.py`` under any launcher) runs inside `exit_on_error`: one line ``Error: <message>`` on
stderr, exit status 2 for a usage error and 1 for a failed run, no traceback. Under a launcher every
rank raises the same error and only rank 0 prints it, except a `RankFailed` that one rank sees alone.
"""

from __future__ import annotations

import errno
import os
import re
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


class DiskFull(RankFailed):
    """A write ran out of space (a full disk, a quota, a file-size limit). Each rank that hit it says so: on
    a node-local disk the others may not have."""


# A full disk, an exhausted quota and a file-size limit (RLIMIT_FSIZE, a filesystem's maximum) all end a write
# the same way: nothing more fits, and freeing space (or raising the limit) is the fix.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR = re.compile(r"os error (\d+)\)")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, is a write that ran out of space:
    an `OSError` with one of `DISK_FULL_ERRNOS`, or a library's error carrying one in its text (safetensors'
    and tokenizers' Rust errors end in "(os error 28)", torch's C++ writers name the strerror)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if any(int(n) in DISK_FULL_ERRNOS for n in _OS_ERROR.findall(text)):
            return True
        if any(os.strerror(n) in text for n in DISK_FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
