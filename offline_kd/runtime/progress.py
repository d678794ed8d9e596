"""Progress as a terminal or a log file wants it: a tqdm bar on a TTY, plain lines otherwise.

A bar redraws one line with ``\\r`` and cursor codes; in a file that is one endless line. Without a
TTY (or with ``--no-progress``) the same progress is one plain, timestamped line every N units or
every S seconds, whichever comes first, plus the first and the last, as the Hugging Face Trainer
logs to files::

    2026-11-22 14:31:07 train step 20/600 (3.3%) | loss 3.1416 kl 1.2 mlm 2.9 cos 0.11 | ... | ETA 4m12s

Only the caller's rank 0 creates one (`enabled`); the others stay silent.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def human(x: float) -> str:
    """12345.6 -> '12.3k'."""
    if not math.isfinite(x):
        return str(x)
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


def duration(seconds: float) -> str:
    """75 -> '1m15s', 3725 -> '1h02m'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts units (steps, sequences) towards `total`; shows a bar or writes plain lines."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        enabled: bool = True,
        bar: bool = True,
        every: int = 0,
        every_seconds: float = 60.0,
        initial: int = 0,
        stream: TextIO | None = None,
    ):
        """`bar`: a tqdm bar when `stream` is a TTY; otherwise (and with ``bar=False``) a line every
        `every` units (0: by time only) or `every_seconds` seconds."""
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.every, self.every_seconds = every, every_seconds
        self.count = self._start = initial
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = self._last_line = time.monotonic()
        self._last_count = initial
        self._fields: dict[str, str] = {}
        self.bar = None
        if enabled and bar and _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=self.stream
            )

    def update(self, n: int = 1, fields: dict[str, str] | None = None) -> None:
        """Advance by `n`; `fields` (name -> formatted value) replace the shown ones."""
        if not self.enabled:
            return
        self.count += n
        if fields is not None:
            self._fields = fields
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(self._fields, refresh=False)
            return
        now = time.monotonic()
        first = self._last_count == self._start
        by_count = self.every > 0 and self.count // self.every > self._last_count // self.every
        by_time = now - self._last_line >= self.every_seconds
        if first or by_count or by_time or self.count >= self.total:
            self.write_line(now)

    def write_line(self, now: float | None = None) -> None:
        """One plain line with the current position, the fields, the elapsed time and the ETA."""
        now = time.monotonic() if now is None else now
        self._last_line, self._last_count = now, self.count
        print(self.line(now), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A timestamped line of its own (an evaluation, the hyperparameters), above a bar if any."""
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self._t0
        done = self.count - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.count / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.unit} {self.count}/{self.total} ({pct:.1f}%)"]
        parts += [f"{k} {v}" for k, v in self._fields.items()]
        parts.append(f"elapsed {duration(elapsed)} ETA {duration(eta)}")
        return f"{time.strftime('%Y-%m-%d %H:%M:%S')} " + " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_library_bars(rank: int = 0, stream: TextIO | None = None) -> None:
    """Turn off the progress bars of ``datasets``, ``transformers`` and ``huggingface_hub`` (loading
    weights, mapping, filtering) on ranks above 0 and wherever `stream` is no terminal: in a log
    file each is a line of ``\\r`` frames, and every rank would write its own."""
    if rank == 0 and _isatty(stream if stream is not None else sys.stderr):
        return
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
