"""Known, expected library warnings, silenced by logger and message, never a whole logger.

- `partial_load`: transformers' load report (its missing/unexpected keys table, and a tied-weights
  warning) for a load that is partial on purpose, e.g. an encoder checkpoint loaded into a
  ``*ForMaskedLM`` whose head is fitted next. Only for the duration of that load.
- `drop_expected_deepspeed_warnings`: DeepSpeed's "Setting accelerator to CPU" where CPU is what
  the run asks for (the demo, the tests), and its scheduler's "Attempting to get learning rate from
  scheduler before it has started", which DeepSpeed itself triggers before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

CPU_ACCELERATOR = "Setting accelerator to CPU"
LR_BEFORE_START = "Attempting to get learning rate from scheduler before it has started"


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`; passes every other one."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def drop_expected_deepspeed_warnings(cpu_expected: bool) -> None:
    """Install the filter on DeepSpeed's logger (before or after ``import deepspeed``: the logger
    object is the same); installing it again replaces the previous one."""
    logger = logging.getLogger("DeepSpeed")
    for f in [f for f in logger.filters if isinstance(f, DropMessages)]:
        logger.removeFilter(f)
    logger.addFilter(DropMessages(LR_BEFORE_START, *((CPU_ACCELERATOR,) if cpu_expected else ())))


@contextmanager
def partial_load() -> Iterator[None]:
    """transformers at error level for one deliberately partial ``from_pretrained``."""
    import transformers.utils.logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
