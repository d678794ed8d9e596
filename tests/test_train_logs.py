"""Training as a cluster job sees it: plain log lines in files, the gradient norm, the hyperparameters,
DeepSpeed's monitors, held-out evaluation during training and the model card built from it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIST_VARS
from test_train import _base, _free_port

from offline_kd.train.metrics import read_csv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cli" / "train.py"
TINY_DS = ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json"
STEP_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train step (\d+)/(\d+) \(\d+\.\d%\) \| loss \S+ \(kl \S+, mlm \S+, cos \S+\) "
    r"\| grad_norm (\S+) \| lr \S+ \| tok/s \S+ \| epoch \d+ \| elapsed \S+ ETA \S+$"
)


def _run(args: list, launcher: list[str] | None = None, **env_vars: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | env_vars
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _ds_with_monitors(tmp: Path, **overrides) -> Path:
    ds = json.loads(TINY_DS.read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "monitor") + "/", "job_name": "csv"}
    ds["tensorboard"] = {"enabled": True, "output_path": str(tmp / "monitor") + "/", "job_name": "tb"}
    ds.update(overrides)
    path = tmp / "ds.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.fixture(scope="module")
def heldout_text(tmp_path_factory) -> Path:
    from offline_kd.examples.tiny import make_documents

    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text("\n".join(make_documents(72)[60:]) + "\n")
    return path


@pytest.fixture(scope="module")
def hub():
    from local_hub import LocalHub

    hub = LocalHub()
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def run(tiny_store, heldout_text, tmp_path_factory, hub):
    """12 steps into a log file (no TTY), a line every 5 steps, held-out text scored every 6 steps,
    final/ pushed to a local stand-in of the hub."""
    tmp = tmp_path_factory.mktemp("logs")
    out = tmp / "run"
    args = ["--store", tiny_store, "--student", "distil", "--output", out, "--deepspeed_config",
            _ds_with_monitors(tmp), "--max-steps", 12, "--log-every", 5, "--eval-corpus", heldout_text,
            "--eval-every", 6, "--license", "apache-2.0", "--language", "en",
            "--push-to-hub", "someone/tiny-student"]  # fmt: skip
    log = _run(args, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0")
    return tmp, out, log


def test_a_log_file_gets_plain_lines_with_grad_norm_and_the_hyperparameters(run):
    tmp, out, log = run
    assert "\r" not in log and "\x1b[" not in log
    steps = [STEP_LINE.match(line) for line in log.splitlines() if " train step " in line]
    assert all(steps), [line for line in log.splitlines() if " train step " in line]
    assert [int(m.group(1)) for m in steps] == [1, 5, 10, 12] and {m.group(2) for m in steps} == {"12"}
    rows = read_csv(out / "logs" / "metrics.csv")
    norms = [float(r["grad_norm"]) for r in rows]
    assert len(norms) == 12 and all(math.isfinite(n) and n > 0 for n in norms)
    assert [float(m.group(3)) for m in steps] == pytest.approx(
        [norms[s - 1] for s in (1, 5, 10, 12)], rel=1e-2
    )
    hp_lines = [line for line in log.splitlines() if "hyperparameters: " in line]
    assert len(hp_lines) == 1
    hp = json.loads(hp_lines[0].split("hyperparameters: ", 1)[1])
    assert hp["train.max_steps"] == 12 and hp["train.loss.alpha_kl"] == 5.0
    assert hp["deepspeed.train_batch_size"] == 8 and hp["deepspeed.optimizer.params.lr"] == 0.001
    assert json.loads((out / "logs" / "hparams.json").read_text())["train"]["heldout"]["eval_every"] == 6


def test_deepspeed_monitors_receive_our_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, out, _ = run
    rows = read_csv(out / "logs" / "metrics.csv")
    for name, column in (("loss_loss", "loss"), ("train_grad_norm", "grad_norm"), ("loss_kl", "kl")):
        monitored = read_csv(tmp / "monitor" / "csv" / f"kd_{name}.csv")
        assert [int(r["step"]) for r in monitored] == list(range(8, 97, 8))  # DeepSpeed's x: samples seen
        assert [float(r[next(k for k in r if k != "step")]) for r in monitored] == pytest.approx(
            [float(r[column]) for r in rows]
        )
    events = EventAccumulator(str(next((tmp / "monitor" / "tb").rglob("events.*")).parent))
    events.Reload()
    assert {"kd/loss/loss", "kd/train/grad_norm", "kd/eval/accuracy"} <= set(events.Tags()["scalars"])


def test_held_out_text_is_scored_as_kd_eval_scores_the_exported_student(run, heldout_text):
    from offline_kd.publish.evaluate import EvalConfig, evaluate

    _, out, log = run
    evals = read_csv(out / "logs" / "eval.csv")
    assert [int(r["step"]) for r in evals] == [6, 12]
    assert all(r["teacher_agreement"] == "" for r in evals)  # raw text carries no teacher signal
    assert len([line for line in log.splitlines() if " eval step " in line]) == 2
    final = evaluate(EvalConfig(model=str(out / "final"), corpus=[str(heldout_text)], max_sequences=256))
    assert int(evals[-1]["masked_tokens"]) == final.masked_tokens
    assert float(evals[-1]["accuracy"]) == pytest.approx(final.accuracy)
    assert float(evals[-1]["masked_perplexity"]) == pytest.approx(final.masked_perplexity, rel=1e-4)


def test_model_card_metadata_eval_results_and_usage(run, heldout_text, tiny_teacher):
    from huggingface_hub import ModelCard

    _, out, _ = run
    card = ModelCard.load(out / "final" / "README.md")
    assert (card.data.license, card.data.language, card.data.pipeline_tag) == (
        "apache-2.0",
        ["en"],
        "fill-mask",
    )
    assert card.data.base_model is None  # a local teacher is no hub id: the body gives its absolute path
    assert f"`{Path(tiny_teacher).resolve()}`" in card.text
    last = read_csv(out / "logs" / "eval.csv")[-1]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == pytest.approx(
        {k: float(last[k]) for k in ("accuracy", "masked_perplexity")}, rel=1e-5, abs=1e-6
    )
    assert {r.dataset_name for r in card.data.eval_results} == {str(heldout_text)}
    assert 'pipeline("fill-mask", model="someone/tiny-student")' in card.text
    assert card.data.model_name == "tiny-student"
    rows = read_csv(out / "logs" / "metrics.csv")
    assert f"| {np.mean([float(r['loss']) for r in rows]):.4f} |" in card.text  # mean of the last steps


def test_kd_eval_updates_the_card(run, heldout_text, tmp_path):
    from click.testing import CliRunner
    from huggingface_hub import ModelCard

    from offline_kd.cli.kd import main as kd
    from offline_kd.publish.model_card import EVAL_BEGIN

    model = tmp_path / "model"
    shutil.copytree(run[1] / "final", model)
    extra = tmp_path / "extra.txt"
    extra.write_text(heldout_text.read_text() * 2)
    res = CliRunner().invoke(
        kd,
        ["eval", "--model", str(model), "--corpus", str(extra), "--update-card", "--json", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout)
    card = ModelCard.load(model / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == pytest.approx(
        {k: scored[k] for k in ("accuracy", "masked_perplexity")}, rel=1e-5, abs=1e-6
    )
    assert (
        card.text.count(EVAL_BEGIN) == 1
        and f"On `{extra}`" in card.text
        and str(heldout_text) not in card.text
    )
    assert card.data.license == "apache-2.0"  # the rest of the card is kept


def test_push_to_hub_uploads_final(run, hub):
    _, out, log = run
    final = out / "final"
    assert hub.files["someone/tiny-student"] == {
        str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()
    }
    assert ("POST", "/api/repos/create") in hub.requests and "pushed " in log
    assert "license: apache-2.0" in hub.validated[0]["content"]  # the card's metadata, checked by the hub


@pytest.mark.slow
def test_two_ranks_zero3_log_once_and_score_a_held_out_store(
    tiny_store, tiny_teacher, heldout_text, tmp_path
):
    """ZeRO-3 on 2 ranks: one line per logged step (rank 0), DeepSpeed's gradient norm, and the
    agreement with the teacher's stored top-1 on a held-out store, as the exported student gives it."""
    from conftest import run_tiny_precompute
    from transformers import AutoModelForMaskedLM

    from offline_kd.store.signal_store import open_store

    held = tmp_path / "held.zarr"
    run_tiny_precompute(tiny_teacher, heldout_text, held, views=1)
    ds = _ds_with_monitors(tmp_path, zero_optimization={"stage": 3}, train_micro_batch_size_per_gpu=2)
    out = tmp_path / "z3"
    log = _run(
        _base(tiny_store, out, ds) + ["--max-steps", 3, "--log-every", 1, "--eval-corpus", held],
        launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())],
    )
    lines = [line for line in log.splitlines() if " train step " in line]
    assert [int(STEP_LINE.search(line.split("] ", 1)[-1]).group(1)) for line in lines] == [1, 2, 3]
    assert "\r" not in log and len([line for line in log.splitlines() if "hyperparameters: " in line]) == 1
    assert all(math.isfinite(float(r["grad_norm"])) for r in read_csv(out / "logs" / "metrics.csv"))

    (last,) = read_csv(out / "logs" / "eval.csv")
    store = open_store(str(held))
    n = store.meta.num_sequences
    rows = store.read(0, 0, n, ["masked_input_ids", "lengths", "mlm_mask", "topk_ids"])
    attention = torch.from_numpy(
        (np.arange(rows["mlm_mask"].shape[1])[None] < rows["lengths"][:, None]).astype(int)
    )
    model = AutoModelForMaskedLM.from_pretrained(out / "final").eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(rows["masked_input_ids"].astype(np.int64)), attention_mask=attention
        ).logits
    sel = torch.from_numpy(rows["mlm_mask"])
    agree = float(
        (logits[sel].argmax(-1) == torch.from_numpy(rows["topk_ids"][..., 0].astype(np.int64))[sel])
        .float()
        .mean()
    )
    assert int(last["sequences"]) == n and float(last["teacher_agreement"]) == pytest.approx(agree, abs=1e-6)
