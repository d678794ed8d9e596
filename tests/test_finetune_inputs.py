"""`kd finetune` on local task files, and every bad input stopped in one ``Error:`` line before training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_finetune import write_glue_mirror

from offline_kd.cli.kd import main
from offline_kd.downstream import metrics

WEIGHTS_LOADED = "Loading weights"


def write_local_task(root: Path, docs: list[str], fractional: bool = False) -> Path:
    """train.csv and validation.tsv with a text field and a string label (or a fractional score)."""
    import csv

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n, sep in (("train.csv", 24, ","), ("validation.tsv", 12, "\t")):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["body", "genre"])
            for i in range(n):
                text = rng.choice(docs)[:120]
                label = round(rng.random() * 5, 2) if fractional else ("letter", "walk", "garden")[i % 3]
                w.writerow([text, label])
    return root


def kd(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["finetune", *map(str, args)], catch_exceptions=False)
    return res.exit_code, res.output


def the_error(code: int, output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 2, output[-3000:]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert WEIGHTS_LOADED not in output, output[-3000:]  # stopped before any model loaded
    return lines[0]


def test_local_csv_and_tsv_task_with_string_labels(tmp_path, tiny_docs, tiny_teacher):
    task = write_local_task(tmp_path / "genre", tiny_docs)
    out = tmp_path / "out"
    code, output = kd("--model", tiny_teacher, "--task", task, "--text-fields", "body", "--label-field", "genre",
                      "--eval-split", "validation", "--max-steps", "1", "--batch-size", "8", "--no-speed",
                      "--no-progress", "--output", out)  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    (row,) = report["tasks"]["genre"].values()
    assert set(row["metrics"]) == {"accuracy", "macro_f1"}
    assert report["teacher"] is None and row["retention"] is None
    cell = next((out / "cells").rglob("seed42.json"))
    assert json.loads(cell.read_text())["eval_examples"] == {"validation": 12}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_docs, tiny_teacher):
    """A directory of inputs that cannot work, each next to its good counterpart."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    no_tok = root / "no_tokenizer"
    AutoModelForMaskedLM.from_pretrained(tiny_teacher).save_pretrained(no_tok)
    three = root / "three_labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_teacher, num_labels=3).save_pretrained(three)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(three)
    return {
        "task": write_local_task(root / "genre", tiny_docs),
        "scores": write_local_task(root / "scores", tiny_docs, fractional=True),
        "no_tok": no_tok,
        "three": three,
        "root": root,
    }


LOCAL = ["--text-fields", "body", "--label-field", "genre"]
CASES = {
    "missing label field": (["--task", "{task}", "--text-fields", "body", "--label-field", "sentiment"],
                            "--label-field: --task {task} split 'train' has no field 'sentiment'"),
    "missing text field": (["--task", "{task}", "--text-fields", "body,title", "--label-field", "genre"],
                           "--text-fields: --task {task} split 'train' has no field 'title'"),
    "no such GLUE task": (["--task", "glue:sst3"], "--task glue:sst3: no such GLUE task"),
    "no such task path": (["--task", "{root}/nope"], "neither glue:NAME nor an existing task"),
    "missing eval split": (["--task", "{task}", *LOCAL, "--eval-split", "dev"], "--eval-split dev: no such split"),
    "model without tokenizer": (["--task", "{task}", *LOCAL, "--model", "{no_tok}"], "no tokenizer"),
    "classification of a regression task": (
        ["--task", "{scores}", *LOCAL, "--task-type", "classification"],
        "--task-type classification: scores has a fractional label",
    ),
    "regression of string labels": (["--task", "{task}", *LOCAL, "--task-type", "regression"],
                                    "--task-type regression: genre has a non-numeric label"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_training(case, bad, tiny_teacher, tmp_path):
    args, expected = CASES[case]
    args = [a.format(**bad) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_teacher)]
    code, output = kd(*args, "--output", tmp_path / "out", "--no-progress")
    line = the_error(code, output)
    assert expected.format(**bad) in line, line
    assert not (tmp_path / "out" / "cells").exists()


def test_a_head_of_the_wrong_size_is_refused(bad, tmp_path):
    """A classifier with 3 outputs on a 3-class task works; on GLUE SST-2 (2 classes) it is refused."""

    mirror = write_glue_mirror(tmp_path / "glue", ["the house by the river", "a letter in the morning"] * 4)
    code, output = kd("--model", bad["three"], "--task", "glue:sst2", "--glue-source", mirror, "--output",
                      tmp_path / "out")  # fmt: skip
    line = the_error(code, output)
    assert "its classification head has 3 outputs, glue:sst2 needs 2" in line


def test_official_metrics():
    labels = [0, 1, 1, 0, 1]
    assert metrics.compute("matthews_correlation", [0, 1, 1, 0, 1], labels) == pytest.approx(1.0)
    assert metrics.compute("f1", [1, 1, 1, 1, 1], labels) == pytest.approx(0.75)
    assert metrics.compute("pearson", [1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) > 0.99
    assert metrics.compute("spearmanr", [5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) == 0.0  # constant: no correlation
    assert metrics.split_suffix("validation_mismatched", 2) == "_mismatched"


def test_glue_all_is_the_nine_tasks_of_distilbert():
    from offline_kd.downstream.tasks import expand_tasks

    nine = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    assert expand_tasks(["glue:all", "glue:SST-2"]) == [f"glue:{t}" for t in nine]
