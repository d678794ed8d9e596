"""The teacher stage's errors: one a user's input causes, one the teacher's own outputs cause."""

from __future__ import annotations

from offline_kd.runtime.errors import RunFailed, UsageError


class TeacherError(UsageError):
    """The teacher cannot be used as given (no MLM head, an unsupported head, no fast tokenizer): exit 2."""


class TeacherFailed(RunFailed):
    """The teacher ran but its outputs cannot be stored (NaN/inf logits): nothing the user typed, exit 1."""
