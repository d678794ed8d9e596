"""Progress in a log file: plain timestamped lines, never a bar's carriage returns or cursor codes."""

from __future__ import annotations

import io
import re

from offline_kd.runtime.progress import Progress, duration

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train step (\d+)/20 \(\d+\.\d%\) \| loss 1\.5 \| elapsed \S+ ETA \S+$"
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _steps(text: str) -> list[int]:
    return [int(LINE.match(line).group(1)) for line in text.splitlines()]


def test_a_file_gets_a_line_at_the_first_every_nth_and_the_last_step():
    out = io.StringIO()
    p = Progress(20, desc="train", unit="step", bar=True, every=5, every_seconds=3600, stream=out)
    for _ in range(20):
        p.update(1, {"loss": "1.5"})
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert _steps(text) == [1, 5, 10, 15, 20]


def test_lines_by_time_and_a_resumed_count():
    out = io.StringIO()
    p = Progress(20, desc="train", unit="step", every=0, every_seconds=0.0, initial=12, stream=out)
    for _ in range(8):
        p.update(1, {"loss": "1.5"})
    assert _steps(out.getvalue()) == list(range(13, 21))


def test_a_terminal_gets_a_bar_and_no_progress_gets_lines():
    tty = _Tty()
    bar = Progress(20, desc="train", unit="step", every=5, stream=tty)
    bar.update(1, {"loss": "1.5"})
    bar.close()
    assert "\r" in tty.getvalue() and not LINE.search(tty.getvalue().replace("\r", "\n").split("\n")[-1])
    tty = _Tty()
    lines = Progress(20, desc="train", unit="step", bar=False, every=5, stream=tty)
    lines.update(1, {"loss": "1.5"})
    assert _steps(tty.getvalue()) == [1]


def test_other_ranks_write_nothing():
    out = io.StringIO()
    p = Progress(20, desc="train", unit="step", enabled=False, every=1, stream=out)
    p.update(1, {"loss": "1.5"})
    p.note("eval")
    p.close()
    assert out.getvalue() == ""


def test_eta_and_durations():
    assert (duration(5), duration(75), duration(3725), duration(float("nan"))) == (
        "5s",
        "1m15s",
        "1h02m",
        "?",
    )
    p = Progress(20, desc="train", unit="step", stream=io.StringIO())
    p.count = 10
    assert p.line(p._t0 + 20.0).endswith("elapsed 20s ETA 20s")  # 10 steps in 20 s, 10 to go
