"""End to end on CPU: tiny teacher → tiny_store → student with DeepSpeed (real launcher, real store)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DIST_VARS, restore_process_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cli" / "train.py"
TINY_DS = ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "offline_kd" / "torch_extensions"))
LOSS_COLUMNS = ("step", "epoch", "samples", "tokens", "loss", "kl", "mlm", "cos", "lr")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    args: list[str], launcher: list[str] | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _losses(run_dir: Path) -> list[tuple]:
    from offline_kd.train.metrics import read_csv

    return [tuple(r[c] for c in LOSS_COLUMNS) for r in read_csv(run_dir / "logs" / "metrics.csv")]


def _base(store, out, ds=TINY_DS) -> list:
    return [
        "--store",
        store,
        "--student",
        "distil",
        "--output",
        out,
        "--deepspeed_config",
        ds,
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def full_run(tiny_store, tmp_path_factory):
    """Two epochs uninterrupted (12 steps each), checkpoints every 6 steps."""
    out = tmp_path_factory.mktemp("train") / "full"
    _check(run_cli(_base(tiny_store, out) + ["--epochs", 2, "--save-every", 6]))
    return out


def test_loss_falls_and_outputs_are_complete(full_run, tiny_teacher):
    from offline_kd.train.metrics import read_csv

    rows = read_csv(full_run / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    first = [float(r["loss"]) for r in rows if r["epoch"] == "0"]
    second = [float(r["loss"]) for r in rows if r["epoch"] == "1"]
    assert sum(second) / len(second) < sum(first) / len(first) - 0.3
    for col in ("kl", "mlm", "cos", "lr", "tokens_per_s", "reader_wait_s"):
        assert all(r[col] != "" for r in rows), col
    assert any((full_run / "logs" / "tb").glob("events.out.tfevents.*"))
    final = full_run / "final"
    for name in ("config.json", "model.safetensors", "README.md", "train_config.json", "ds_config.json"):
        assert (final / name).exists(), name
    card = (final / "README.md").read_text()
    assert str(tiny_teacher) in card and "corpus fingerprint" in card and "5.0·KL" in card
    ds = json.loads((final / "ds_config.json").read_text())
    assert ds["scheduler"]["params"]["total_num_steps"] == 24 and ds["train_batch_size"] == 8
    assert {t.name for t in (full_run / "checkpoints").iterdir() if (t / "COMPLETE").exists()} == {
        f"step{s:08d}" for s in (6, 12, 18, 24)
    }


def test_exported_student_fills_a_mask(full_run, tiny_teacher):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(full_run / "final")
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    tok = AutoTokenizer.from_pretrained(full_run / "final")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    # trained with a vocabulary padded to a multiple of 64, exported with the tokenizer's
    assert model.config.vocab_size == len(tok) == model.get_output_embeddings().weight.shape[0]
    fill = pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")
    preds = fill(f"the old house {tok.mask_token} the river .")
    assert len(preds) == 5 and all(0.0 <= p["score"] <= 1.0 for p in preds)
    # the training actually changed the student (it is not the initialisation)
    from offline_kd.train.student import build_student

    init = build_student("distil", teacher_path=str(tiny_teacher), vocab_size=0, max_positions=0).model
    assert not torch.equal(init.vocab_transform.weight, model.vocab_transform.weight)


def test_resume_reproduces_the_uninterrupted_losses(full_run, tiny_store, tmp_path):
    out = tmp_path / "resumed"
    # stop mid-epoch at a step that is not a checkpoint step (9): the final save marks step 9
    _check(
        run_cli(
            _base(tiny_store, out)
            + ["--epochs", 2, "--save-every", 6, "--max-steps", 9, "--schedule-steps", 24]
        )
    )
    assert len(_losses(out)) == 9
    proc = run_cli(_base(tiny_store, out) + ["--epochs", 2, "--save-every", 6, "--resume"])
    _check(proc)
    assert "resumed from step00000009" in proc.stderr
    assert _losses(out) == _losses(full_run)


@pytest.mark.slow
def test_two_ranks_zero2_hold_identical_parameters(tiny_store, tmp_path):
    ds = json.loads(TINY_DS.read_text())
    ds["zero_optimization"] = {"stage": 2}
    ds["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "ds_z2.json").write_text(json.dumps(ds))
    out = tmp_path / "z2"
    args = _base(tiny_store, out, tmp_path / "ds_z2.json") + [
        "--max-steps",
        3,
        "--debug-param-hash",
        "--save-every",
        3,
    ]
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())]
    _check(run_cli(args, launcher=launcher))
    hashes = [(out / "debug" / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    rows = _losses(out)
    assert len(rows) == 3 and all(r[2] == "8" for r in rows)  # 2 micro × 2 accumulation × 2 ranks
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").exists()
    assert (out / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- refusals
# In-process (train() directly): a one-process group on a free port, no launcher.


_restore_process_state = pytest.fixture(scope="module", autouse=True)(restore_process_state)


def _cfg(store, out, **kw):
    from offline_kd.runtime.options import from_fields
    from offline_kd.train.loop import TrainConfig

    base = dict(
        store=str(store), student="distil", output=str(out), deepspeed_config=str(TINY_DS), progress=False
    )
    base.update(kw)
    return from_fields(TrainConfig, **base)


# Each case: (TrainConfig overrides, the exception, a pattern of its message).


def _bigger_vocabulary(tiny_teacher, tmp_path):
    from offline_kd.train.student import StudentError

    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    spec = tmp_path / "bigger_vocab.json"
    spec.write_text(
        json.dumps(dict(model_type="distilbert", vocab_size=vocab + 5, dim=32, n_layers=1, n_heads=2))
    )
    return dict(student=str(spec)), StudentError, rf"vocabulary mismatch.*{vocab + 5}.*{vocab}"


def _other_tokens(tiny_teacher, tmp_path):
    """Same vocabulary size, different tokens: both fingerprints are named."""
    from offline_kd.train.student import StudentError

    tokdir = tmp_path / "other_tok"
    shutil.copytree(tiny_teacher, tokdir)
    (tokdir / "tokenizer.json").unlink()
    vocab = (tokdir / "vocab.txt").read_text().splitlines()
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]
    (tokdir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    message = r"tokenizer mismatch: the student's tokenizer sha256 [0-9a-f]{64} differs"
    return dict(student=str(tokdir)), StudentError, message


def _narrower(tiny_teacher, tmp_path):
    from offline_kd.train.student import StudentError

    return dict(student="tiny-narrow"), StudentError, "hidden width mismatch: student 16 vs teacher 32"


def _unstored_temperature(tiny_teacher, tmp_path):
    from offline_kd.train.loss import LossConfig

    message = "temperature 3.0 is not one of the store's temperatures"
    return dict(loss=LossConfig(temperature=3.0, kl_source="topk")), ValueError, message


@pytest.mark.parametrize(
    "case",
    [_bigger_vocabulary, _other_tokens, _narrower, _unstored_temperature],
    ids=["vocabulary", "tokenizer", "width", "temperature"],
)
def test_refused_before_step_0(tiny_store, tiny_teacher, tmp_path, case):
    from offline_kd.train.loop import train

    overrides, error, message = case(tiny_teacher, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(_cfg(tiny_store, out, **overrides))
    assert not out.exists()  # refused before anything was written


def test_width_mismatch_with_projection_trains(tiny_store, tmp_path):
    from transformers import AutoModelForMaskedLM

    from offline_kd.train.loop import train

    out = tmp_path / "proj"
    result = train(_cfg(tiny_store, out, student="tiny-narrow", hidden_projection=True, max_steps=2))
    assert result.steps == 2
    from safetensors.torch import load_file

    proj = load_file(str(out / "projection.safetensors"))
    assert proj["weight"].shape == (32, 16)
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert model.config.dim == 16 and not any("projection" in k for k in model.state_dict())


def test_corrupt_chunk_is_named(tiny_store, tmp_path):
    from offline_kd.store.signal_store import StoreCorruptionError
    from offline_kd.train.loop import train
    from offline_kd.train.loss import LossConfig

    store = tmp_path / "corrupt.zarr"
    shutil.copytree(tiny_store, store)
    shard = store / "topk_logits" / "c" / "0" / "1" / "0" / "0"  # view 0, shard 1
    data = bytearray(shard.read_bytes())
    for i in range(40, 60):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        StoreCorruptionError, match=r"topk_logits.*view 0.*chunk of sequences \[\d+, \d+\).*shard 1"
    ):
        # the top-k KL reads the damaged topk_logits
        train(_cfg(store, tmp_path / "c", epochs=1, loss=LossConfig(kl_source="topk")))


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path):
    import numpy as np
    import zarr

    from offline_kd.store.signal_store import SignalStore
    from offline_kd.train.checkpoint import latest_complete
    from offline_kd.train.ledger import NonFiniteLossError
    from offline_kd.train.loop import train
    from offline_kd.train.loss import LossConfig
    from offline_kd.train.reader import ReaderConfig, StoreReader

    store = tmp_path / "nan.zarr"
    shutil.copytree(tiny_store, store)
    # the first sequence of micro-batch 6 of epoch 0 (micro-batches 6-7 make optimizer step 4)
    reader = StoreReader(ReaderConfig(url=str(store), micro_batch_size=4, seed=0, temperature=2.0))
    batches = list(reader.epoch_batches(0, start=6, stop=7))
    row = int(batches[0]["rows"][0])
    g = zarr.open_group(str(store), mode="r+")
    logits = g["topk_logits"][0, row]
    logits[0, 0] = np.nan
    g["topk_logits"][0, row] = logits
    s = SignalStore.open(str(store), mode="r+")
    s.mark_committed(row // s.meta.shard_sequences)  # as if written so: the digests of the poisoned chunk
    out = tmp_path / "n"
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*step 4 .*last good checkpoint: step00000003"):
        # the top-k KL reads the poisoned topk_logits
        train(_cfg(store, out, save_every=1, epochs=1, loss=LossConfig(kl_source="topk")))
    assert latest_complete(out / "checkpoints") == "step00000003"
    assert not (out / "checkpoints" / "step00000004").exists()
    assert not (out / "final").exists()


# Tensor methods that read a value back to the host: on CUDA each waits for the queued GPU work.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}


def _reads_in(code_dir: str):
    """A TorchFunctionMode that records host reads made directly by code under `code_dir` (a library's own
    reads, e.g. DeepSpeed's inside engine.step, are attributed to the library). What `DevicePrefetch._fetch`
    computes from a reader batch before copying it to the device works on host tensors even on a GPU (the
    fused loss's row indices), so it is not a read back."""
    import traceback

    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        seen: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                stack = traceback.extract_stack(limit=6)
                caller = stack[-2]
                on_host = any(f.name == "_fetch" and f.filename.endswith("train/loop.py") for f in stack)
                if code_dir in caller.filename and not on_host:
                    self.seen.append(
                        f"{caller.filename.split('offline_kd/')[-1]}:{caller.lineno} {func.__name__}"
                    )
            return func(*args, **(kwargs or {}))

    return Reads()


def test_an_optimizer_step_reads_nothing_back_to_the_host(tiny_store, tmp_path, monkeypatch):
    """Between flushes the training loop leaves every loss sum, token count, gradient norm and finiteness
    check on the device (on a GPU a read would stall the host every micro-batch). Checked on the code path
    here; on a GPU the test below counts the synchronisations themselves."""
    import offline_kd.train.loop as loop

    probe, steps = _reads_in("/offline_kd/train/"), []

    def watched(*args, **kwargs):
        with probe:
            loop_step(*args, **kwargs)
        steps.append(len(probe.seen))

    loop_step = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", watched)
    result = loop.train(_cfg(tiny_store, tmp_path / "r", max_steps=3, epochs=1))
    assert len(steps) == 3 and probe.seen == []
    assert result.metrics["step"] == 3 and result.metrics["tokens"] > 0  # the flush read them back


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_synchronises_only_in_deepspeed(tiny_store, tmp_path, monkeypatch):
    """With torch's sync debug mode on, the synchronising calls of a step come from DeepSpeed, never from
    offline_kd's loop or loss."""
    import warnings

    import torch

    import offline_kd.train.loop as loop

    caught: list = []

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                loop_step(*args, **kwargs)
            caught.extend(str(x.filename) for x in w if "synchroniz" in str(x.message))
        finally:
            torch.cuda.set_sync_debug_mode(0)

    loop_step = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", watched)
    loop.train(_cfg(tiny_store, tmp_path / "r", max_steps=3, epochs=1))
    assert [f for f in caught if "/offline_kd/" in f] == []
