"""Training with --kl-source exact: the teacher's full distribution recomputed from the stored hidden states
through its MLM head (the store's, or for a store without one the teacher's), on the tiny teacher and store
(real precompute, real DeepSpeed engine)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIST_VARS, restore_process_state, run_tiny_precompute

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cli" / "train.py"
TINY_DS = ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "offline_kd" / "torch_extensions"))


_restore_process_state = pytest.fixture(scope="module", autouse=True)(restore_process_state)


def _cfg(store, out, ds=TINY_DS, loss: dict | None = None, **train):
    from offline_kd.runtime.options import from_fields
    from offline_kd.train.loop import TrainConfig
    from offline_kd.train.loss import LossConfig

    return from_fields(
        TrainConfig,
        store=str(store), student="distil", output=str(out), deepspeed_config=str(ds), progress=False,
        tensorboard=False, loss=LossConfig(**{"kl_source": "exact", **(loss or {})}), **train,
    )  # fmt: skip


def _ds_with(tmp_path: Path, **changes) -> Path:
    ds = json.loads(TINY_DS.read_text())
    ds.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def _rows(run_dir: Path) -> list[dict]:
    from offline_kd.train.metrics import read_csv

    return read_csv(run_dir / "logs" / "metrics.csv")


def _first_step_losses(store: Path, teacher: Path, T: float) -> tuple[float, float]:
    """(kl, mlm) of optimizer step 1 computed independently: the initial student on micro-batches 0 and 1,
    against T²·KL over the full vocabulary of the teacher's own head applied to the stored hidden states."""
    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM

    from offline_kd.store.signal_store import open_store
    from offline_kd.train.reader import ReaderConfig, StoreReader
    from offline_kd.train.student import build_student

    meta = open_store(str(store)).meta
    V = int(meta.vocab_size)  # the student's logits are padded to a multiple of 64 columns
    reader = StoreReader(ReaderConfig(url=str(store), micro_batch_size=4, seed=0, hidden=True, topk=False))
    student = build_student(
        "distil", teacher_path=str(teacher), vocab_size=meta.vocab_size, max_positions=512,
        pad_token_id=meta.pad_token_id, seed=0,
    ).model.eval()  # fmt: skip
    from offline_kd.teacher.head import extract_head
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead

    # the head as training runs it by default: fp16 matmul inputs, fp32 accumulation (the KL here is ~5e-4,
    # so the fp32 head's would differ in the third digit)
    head = ReducedPrecisionHead(
        extract_head(AutoModelForMaskedLM.from_pretrained(teacher)).module, torch.float16
    )
    kls, mlms = [], []
    with torch.no_grad():
        for b in reader.epoch_batches(0, start=0, stop=2):
            rows = b["attention_mask"].bool()
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[rows][:, :V]
            z = head(b["hidden"][rows])[:, :V]
            p = (z / T).log_softmax(-1)
            kls.append(T * T * (p.exp() * (p - (s / T).log_softmax(-1))).sum(-1).mean().item())
            mlms.append(F.cross_entropy(s, b["labels"][rows], ignore_index=-100).item())
    return sum(kls) / 2, sum(mlms) / 2


def test_exact_trains_on_the_teachers_full_distribution(tiny_store, tiny_teacher, tmp_path):
    """Step 1's logged KL is the full-vocabulary KL to head(stored hidden) at an unstored temperature;
    the loss falls; the exported student loads; the head is in neither checkpoint nor export."""
    from offline_kd.train.loop import train

    out = tmp_path / "exact"
    result = train(_cfg(tiny_store, out, loss={"temperature": 3.0}, epochs=2, save_every=12))
    rows = _rows(out)
    assert result.steps == len(rows) == 24
    kl, mlm = _first_step_losses(tiny_store, tiny_teacher, 3.0)
    # The student starts from the teacher's layers: a small KL (~5e-4), summed in another order here.
    assert float(rows[0]["kl"]) == pytest.approx(kl, rel=1e-3)
    assert float(rows[0]["mlm"]) == pytest.approx(mlm, rel=1e-4)
    first, second = (sum(float(r["loss"]) for r in rows if r["epoch"] == e) / 12 for e in ("0", "1"))
    assert second < first - 0.3, (first, second)
    states = sorted((out / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    assert len(states) == 2
    for p in states:  # the engine's module: the student alone (no teacher head, no frozen extras)
        saved = torch.load(p, map_location="cpu", weights_only=True)
        assert saved["module"] and all(k.startswith("student.") for k in saved["module"]), p
        assert not saved["frozen_param_shapes"], p
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert type(model).__name__ == "DistilBertForMaskedLM"
    assert not any("predictions" in k or "teacher" in k for k in model.state_dict())
    assert json.loads((out / "final" / "train_config.json").read_text())["loss"]["kl_source"] == "exact"
    assert "5.0·KL(T=3.0, exact: full vocabulary" in (out / "final" / "README.md").read_text()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_under_each_zero_stage(tiny_store, tmp_path, stage):
    from transformers import AutoModelForMaskedLM

    from offline_kd.train.loop import train

    ds = _ds_with(tmp_path, zero_optimization={"stage": stage})
    out = tmp_path / f"z{stage}"
    assert train(_cfg(tiny_store, out, ds, max_steps=3)).steps == 3
    assert all(torch.isfinite(torch.tensor(float(r["kl"]))) for r in _rows(out))
    assert AutoModelForMaskedLM.from_pretrained(out / "final").config.n_layers == 2


def test_head_is_not_a_parameter_of_the_distill_module(tiny_teacher):
    from transformers import AutoModelForMaskedLM

    from offline_kd.train.loop import DistillModule
    from offline_kd.train.loss import LossConfig

    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    student = torch.nn.Linear(2, 2)
    module = DistillModule(student, LossConfig(kl_source="exact"), teacher_head=teacher.cls)
    assert module.teacher_head is teacher.cls
    assert len(list(module.parameters())) == 2 and set(module.state_dict()) == {
        "student.weight",
        "student.bias",
    }
    module.half()  # what DeepSpeed's fp16/bf16 does to the module: the head stays fp32
    assert teacher.cls.predictions.decoder.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------- refusals


def _store_without_hidden(tiny_teacher, tiny_corpus, tmp_path):
    store = tmp_path / "nohidden.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, hidden=False)
    return store, {}, r"--kl-source exact .* the store .*nohidden.zarr has none \(precompute with --hidden"


def _other_teacher(tiny_teacher, tiny_corpus, tmp_path):
    """A store without its head (as written before heads were stored) and a --teacher with other weights:
    both hashes are named."""
    from transformers import AutoModelForMaskedLM

    from offline_kd.teacher.model import load_teacher

    store = tmp_path / "headless.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, store_head=False)
    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_teacher, other)
    model = AutoModelForMaskedLM.from_pretrained(other)
    with torch.no_grad():
        model.cls.predictions.transform.dense.weight.mul_(1.5)
    model.save_pretrained(other)
    theirs, ours = load_teacher(str(other)).weights_sha256, load_teacher(str(tiny_teacher)).weights_sha256
    assert theirs != ours
    return store, {"teacher": str(other)}, rf"(?=.*{theirs})(?=.*{ours})"


def _head_of_another_vocabulary(tiny_teacher, tiny_corpus, tmp_path):
    """The store's head swapped for one with 5 more logits than the store's vocabulary."""
    import zarr
    from transformers import BertConfig, BertForMaskedLM

    from offline_kd.teacher.head import GROUP, extract_head, save_head

    store = tmp_path / "swapped.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store)
    config = BertConfig.from_pretrained(tiny_teacher)
    config.vocab_size += 5
    torch.manual_seed(0)
    shutil.rmtree(store / GROUP)
    save_head(zarr.open_group(str(store), mode="r+"), extract_head(BertForMaskedLM(config).eval()))
    return store, {}, rf"vocabulary of {config.vocab_size}.*has {config.vocab_size - 5}"


def _topk_on_a_head_only_store(tiny_teacher, tiny_corpus, tmp_path):
    store = tmp_path / "head_only.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, top_k=0)
    return (
        store,
        {"loss": {"kl_source": "topk"}},
        r"--kl-source topk .*--top-k 0: train with --kl-source exact",
    )


@pytest.mark.parametrize(
    "case",
    [_store_without_hidden, _other_teacher, _head_of_another_vocabulary, _topk_on_a_head_only_store],
    ids=["no-hidden", "teacher-hash", "head-vocabulary", "topk-on-head-only"],
)
def test_exact_refused_before_step_0(tiny_teacher, tiny_corpus, tmp_path, case):
    from offline_kd.runtime.errors import UsageError
    from offline_kd.train.loop import train

    store, overrides, message = case(tiny_teacher, tiny_corpus, tmp_path)
    out = tmp_path / "run"
    loss = overrides.pop("loss", None)
    with pytest.raises(UsageError, match=message):
        train(_cfg(store, out, loss=loss, **overrides))
    assert not out.exists()  # refused before anything was written


def test_exact_on_a_store_without_its_head_uses_the_recorded_teachers(tiny_teacher, tiny_corpus, tmp_path):
    """A store written without a head (format 1 stores) trains with the head of the teacher it records
    (weights hash checked): the same first step as the head the store would hold."""
    from offline_kd.train.loop import train

    store = tmp_path / "headless.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, store_head=False)
    out = tmp_path / "headless_run"
    train(_cfg(store, out, max_steps=1))
    kl, _ = _first_step_losses(store, tiny_teacher, 2.0)
    assert float(_rows(out)[0]["kl"]) == pytest.approx(kl, rel=1e-3)


@pytest.mark.parametrize(
    "layout, expected",
    [({}, "exact"), ({"store_head": False}, "topk"), ({"hidden": False}, "topk")],
    ids=["hidden-and-head", "no-head", "no-hidden"],
)
def test_auto_kl_source_follows_the_store(tiny_teacher, tiny_corpus, tmp_path, caplog, layout, expected):
    """The default --kl-source auto trains on the exact distribution when the store holds the hidden states
    and the teacher's head, else on the stored top-k, and one log line says which."""
    import logging

    from offline_kd.train.loop import train

    store = tmp_path / "store.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, **layout)
    out = tmp_path / "run"
    loss = {"kl_source": "auto", **({} if layout.get("hidden", True) else {"alpha_cos": 0.0})}
    with caplog.at_level(logging.INFO, logger="offline_kd.train.loop"):
        assert train(_cfg(store, out, loss=loss, max_steps=1)).steps == 1
    assert f"--kl-source auto: {expected}" in caplog.text
    assert json.loads((out / "train_config.json").read_text())["loss"]["kl_source"] == expected
    if expected == "exact":
        kl, _ = _first_step_losses(store, tiny_teacher, 2.0)
        assert float(_rows(out)[0]["kl"]) == pytest.approx(kl, rel=1e-3)


def test_exact_trains_from_a_head_only_store(tiny_teacher, tiny_corpus, tmp_path):
    """--top-k 0 (hidden states, masks and the head only): the exact KL trains from it."""
    from offline_kd.train.loop import train

    store = tmp_path / "head_only.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, top_k=0)
    out = tmp_path / "head_only_run"
    assert train(_cfg(store, out, max_steps=2)).steps == 2
    kl, _ = _first_step_losses(store, tiny_teacher, 2.0)
    assert float(_rows(out)[0]["kl"]) == pytest.approx(kl, rel=1e-3)


def test_exact_refusal_is_one_line_on_the_command_line(tiny_teacher, tiny_corpus, tmp_path):
    store, _, _ = _store_without_hidden(tiny_teacher, tiny_corpus, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--store", store, "--student", "distil", "--output", tmp_path / "o",
         "--kl-source", "exact", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "has none (precompute with --hidden" in errors[0]
    assert "Traceback" not in proc.stderr


def test_nan_in_a_recovered_logit_stops_naming_the_step(tiny_store, tmp_path):
    """A NaN stored hidden state makes the head's logits NaN: the run stops at that step, keeps the last
    good checkpoint and exports nothing. The cosine loss is off, so only the exact KL sees the NaN."""
    import numpy as np
    import zarr

    from offline_kd.store.signal_store import SignalStore
    from offline_kd.train.checkpoint import latest_complete
    from offline_kd.train.ledger import NonFiniteLossError
    from offline_kd.train.loop import train
    from offline_kd.train.reader import ReaderConfig, StoreReader

    store = tmp_path / "nan.zarr"
    shutil.copytree(tiny_store, store)
    # the first sequence of micro-batch 6 of epoch 0 (micro-batches 6-7 make optimizer step 4)
    reader = StoreReader(ReaderConfig(url=str(store), micro_batch_size=4, seed=0, topk=False))
    row = int(next(reader.epoch_batches(0, start=6, stop=7))["rows"][0])
    g = zarr.open_group(str(store), mode="r+")
    hidden = g["hidden"][0, row]
    hidden[1, 3] = np.nan
    g["hidden"][0, row] = hidden
    s = SignalStore.open(str(store), mode="r+")
    s.mark_committed(row // s.meta.shard_sequences)  # as if written so: the digests of the poisoned chunk
    out = tmp_path / "n"
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 4 .*kl=nan.*checkpoint: step00000003"
    ):
        train(_cfg(store, out, loss={"alpha_cos": 0.0}, save_every=1, epochs=1))
    assert latest_complete(out / "checkpoints") == "step00000003"
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_zero3_exact(tiny_store, tmp_path):
    """`deepspeed cli/train.py --kl-source exact` on 2 CPU ranks with ZeRO-3: identical parameters on both
    ranks, and a student that loads with AutoModelForMaskedLM."""
    from transformers import AutoModelForMaskedLM

    ds = _ds_with(tmp_path, zero_optimization={"stage": 3}, train_micro_batch_size_per_gpu=2)
    out = tmp_path / "z3"
    args = ["--store", tiny_store, "--student", "distil", "--output", out, "--deepspeed_config", ds,
            "--kl-source", "exact", "--temperature", "1.5", "--max-steps", 2, "--debug-param-hash",
            "--no-progress"]  # fmt: skip
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run(
        launcher + [str(SCRIPT)] + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    hashes = [(out / "debug" / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    rows = _rows(out)
    assert len(rows) == 2 and all(r["samples"] == "8" for r in rows)  # 2 micro × 2 accumulation × 2 ranks
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert type(model).__name__ == "DistilBertForMaskedLM"
