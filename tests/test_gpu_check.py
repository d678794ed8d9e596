"""`make gpu-check` (benchmarks/gpu_check.py): one line and exit 0 without a GPU; each part in its own
process and time limit, so a failing or hanging part still leaves the others in the dated report."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing to check."
    ]
    assert not list(tmp_path.iterdir())


def test_a_failing_or_hanging_part_leaves_the_others_in_the_report(tmp_path):
    gc = _module()
    py = [sys.executable, "-c"]
    parts = [
        gc.Part("good", "A part that prints a table", 60, py + ["print('| x | 1 |')"], {}),
        gc.Part("bad", "A part that fails", 60, py + ["import sys; print('boom'); sys.exit(3)"], {}),
        gc.Part("slow", "A part that hangs", 2, py + ["import time; time.sleep(30)"], {}),
        gc.Part("late", "A part after the budget", 60, py + ["print('never')"], {}),
    ]
    # The hanging part's own 2 s limit ends it long before its 30 s sleep; the deadline is generous.
    # The report is rewritten after every part: a call cut off at its limit keeps the parts done.
    written = []

    def on_result(so_far):
        path = gc.write_report(tmp_path, so_far, smoke=True, wall=1.0)
        written.append(path.read_text().count("\n## "))

    results = gc.run_parts(
        parts,
        time.monotonic() + 300,
        skip={"late": "not run: no time left in the budget"},
        on_result=on_result,
    )
    assert [r.status for r in results] == ["ok", "failed (rc 3)", "timed out", "skipped"]
    assert written == [1, 2, 3, 4]
    report = gc.write_report(tmp_path, results, smoke=True, wall=1.0).read_text()
    assert "| A part that prints a table | ok |" in report and "| x | 1 |" in report
    assert "failed (rc 3)" in report and "boom" in report and "timed out" in report


def test_the_parts_fit_one_device_call_and_can_be_chosen(tmp_path):
    """Each part's limit adds up to less than the default budget, which leaves a 10-minute call room for
    starting up; every part the docstring promises is planned; --parts names them, refused before any work."""
    gc = _module()
    parts = gc.plan(tmp_path, smoke=False)
    names = [p.name for p in parts]
    assert names == [
        "tests", "kernels", "exact", "precompute", "train_step", "train_step_shipped", "step_cost", "e2e"
    ]  # fmt: skip
    assert sum(p.timeout for p in parts) < gc.DEFAULT_BUDGET <= 600 - 45
    assert any("--compile" in p.argv for p in parts) and any("ds_distilbert" in p.argv for p in parts)
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--parts", "kernels,nope",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and "--parts: unknown nope" in res.stderr
