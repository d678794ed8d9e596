"""`kd finetune` on GLUE-format fixtures: a local mirror laid out like the hub's ``nyu-mll/glue``
(single sentence, sentence pair and regression), two seeds, resume, the report and the model card."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from offline_kd.cli.kd import main
from offline_kd.examples.tiny import build_tiny_teacher


def _rows(docs: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(docs)[:160], rng.choice(docs)[:160]) for _ in range(n)]


def write_glue_mirror(root: Path, docs: list[str]) -> Path:
    """sst2, mrpc and stsb as the hub's nyu-mll/glue repository lays them out: CONFIG/SPLIT-*.parquet.
    The labels follow a rule of the text (only the pipeline is under test here)."""
    from datasets import Dataset

    for split, n, seed in (("train", 32, 0), ("validation", 16, 1), ("test", 8, 2)):
        rows = _rows(docs, n, seed)
        test = split == "test"  # GLUE's test labels are hidden: -1
        tables = {
            "sst2": {"sentence": [a for a, _ in rows], "label": [-1 if test else int("house" in a) for a, _ in rows]},
            "mrpc": {"sentence1": [a for a, _ in rows], "sentence2": [b for _, b in rows],
                     "label": [-1 if test else int(len(a) > len(b)) for a, b in rows]},
            "stsb": {"sentence1": [a for a, _ in rows], "sentence2": [b for _, b in rows],
                     "label": [-1.0 if test else 5.0 * len(set(a.split()) & set(b.split())) / 12 for a, b in rows]},
        }  # fmt: skip
        for config, table in tables.items():
            table["idx"] = list(range(n))
            (root / config).mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(table).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def glue_mirror(tmp_path_factory, tiny_docs) -> Path:
    return write_glue_mirror(tmp_path_factory.mktemp("glue"), tiny_docs)


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, tiny_docs) -> Path:
    """A smaller masked LM with the teacher's kind of vocabulary: 2 layers of 32."""
    return build_tiny_teacher(tmp_path_factory.mktemp("student"), tiny_docs, layers=2)


FAST = ["--max-steps", "2", "--batch-size", "8", "--eval-batch-size", "16", "--latency-samples", "3",
        "--no-progress"]  # fmt: skip


def run_kd(*args: str):
    return CliRunner().invoke(main, ["finetune", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, glue_mirror, tiny_teacher, tiny_student):
    out = tmp_path_factory.mktemp("finetune")
    args = ["--teacher", f"teacher={tiny_teacher}", "--model", f"student={tiny_student}", "--glue-source",
            str(glue_mirror), "--task", "glue:sst2", "--task", "glue:mrpc", "--task", "glue:stsb",
            "--seeds", "2", "--output", str(out), "--update-card", *FAST]  # fmt: skip
    result = run_kd(*args)
    assert result.exit_code == 0, result.output
    return out, args, result


def test_glue_mirror_single_pair_and_regression_with_two_seeds(glue_run, tiny_student):
    out, _, result = glue_run
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["glue:sst2", "glue:mrpc", "glue:stsb"]
    expected = {
        "glue:sst2": {"accuracy"},
        "glue:mrpc": {"f1", "accuracy"},
        "glue:stsb": {"pearson", "spearmanr"},
    }
    for task, metrics in expected.items():
        for model in ("teacher", "student"):
            row = report["tasks"][task][model]
            assert set(row["metrics"]) == metrics
            assert row["seeds"] == [42, 43]
            assert -1.0 <= row["score"] <= 1.0
        teacher, student = report["tasks"][task]["teacher"], report["tasks"][task]["student"]
        if teacher["score"] > 0:  # retention: the student's median score over the teacher's
            assert teacher["retention"] == pytest.approx(1.0)
            assert student["retention"] == pytest.approx(student["score"] / teacher["score"])
        else:  # a ratio to a correlation at or below zero means nothing
            assert teacher["retention"] is None and student["retention"] is None
    assert set(report["macro"]) == {"teacher", "student"}
    # 16 validation rows each; GLUE's test split (labels -1) is never read
    cell = json.loads((out / "cells" / "student" / "glue_stsb" / "seed43.json").read_text())
    assert cell["eval_examples"] == {"validation": 16} and cell["train_steps"] == 2
    speed = report["speed"]["models"]
    assert speed["student"]["parameters"] < speed["teacher"]["parameters"]
    assert speed["student"]["disk_bytes"] < speed["teacher"]["disk_bytes"]
    assert report["speed"]["ratios"]["teacher"]["cpu_speedup"] == pytest.approx(1.0)
    md = (out / "report.md").read_text()
    assert "### glue:stsb" in md and "Pearson r" in md and "### Summary" in md
    assert (out / "report.png").stat().st_size > 1000
    assert "### Summary" in result.output


def test_card_records_downstream_results(glue_run, tiny_student):
    from huggingface_hub import ModelCard

    from offline_kd.publish.model_card import update_eval

    card = ModelCard.load(tiny_student / "README.md")
    results = {(r.dataset_name, r.metric_type) for r in card.data.eval_results}
    assert ("glue:mrpc", "f1") in results and ("glue:stsb", "spearmanr") in results
    assert "## Downstream evaluation" in card.text and "| glue:sst2 |" in card.text
    assert {r.dataset_type for r in card.data.eval_results} == {"nyu-mll/glue"}  # a mirror of it
    # `kd eval --update-card` replaces the held-out results and keeps the downstream ones
    update_eval(tiny_student, {"accuracy": 0.5, "masked_perplexity": 9.0, "source": "heldout.txt"})
    types = [r.task_type for r in ModelCard.load(tiny_student / "README.md").data.eval_results]
    assert types.count("fill-mask") == 2 and types.count("text-classification") == len(results)


def test_rerun_skips_finished_cells(glue_run):
    out, args, _ = glue_run
    cells = sorted((out / "cells").rglob("seed*.json"))
    assert len(cells) == 2 * 3 * 2
    before = {p: p.stat().st_mtime_ns for p in cells}
    result = run_kd(*args)
    assert result.exit_code == 0, result.output
    assert "12 cell(s) done, 0 to run" in result.output
    assert {p: p.stat().st_mtime_ns for p in cells} == before


def test_a_retrained_model_runs_its_cells_again(glue_mirror, tiny_student, tmp_path):
    """A cell's fingerprint follows the model's weights: new weights in the same directory, a new cell."""
    import os
    import shutil

    from offline_kd.downstream.finetune import fingerprint, parse_model
    from offline_kd.downstream.tasks import LocalTaskOptions, load_task
    from offline_kd.runtime.settings import FinetuneConfig

    model = tmp_path / "student"
    shutil.copytree(tiny_student, model)
    cfg = FinetuneConfig(model=[str(model)], task=["glue:sst2"], glue_source=str(glue_mirror))
    task = load_task("glue:sst2", LocalTaskOptions(glue_source=str(glue_mirror)))
    ref = parse_model(str(model))
    before = fingerprint(cfg, ref, task, 42)
    assert fingerprint(cfg, ref, task, 42) == before != fingerprint(cfg, ref, task, 43)
    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint(cfg, ref, task, 42) != before
