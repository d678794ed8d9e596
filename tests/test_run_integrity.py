"""A run directory's integrity: DeepSpeed's states loaded without running code, what a checkpoint's COMPLETE
record vouches for, a full disk during a save or an export said in one line, and a --resume that says which
case it is in."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, SCRIPT, TINY_DS, _base, _check, _env, _losses, run_cli


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


def _one_error(proc: subprocess.CompletedProcess, code: int) -> str:
    errors = _errors(proc)
    assert proc.returncode == code and len(errors) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


def _same_weights(a: Path, b: Path) -> bool:
    weights = [run / "final" / "model.safetensors" for run in (a, b)]
    return weights[0].read_bytes() == weights[1].read_bytes()


def _ds_config(tmp_path: Path, stage: int, bf16: bool) -> Path:
    ds = json.loads(TINY_DS.read_text())
    ds["zero_optimization"] = {"stage": stage}
    ds["bf16"] = {"enabled": bf16}
    path = tmp_path / f"ds_z{stage}{'_bf16' if bf16 else ''}.json"
    path.write_text(json.dumps(ds))
    return path


def _stopped_after(run: Path, copy: Path, keep_step: int) -> Path:
    """A copy of a finished run as if it had stopped after its checkpoint of `keep_step` (no final/, no later
    checkpoints; the later metrics rows stay, as a stopped run leaves them, and the resume redoes them)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    for tag in (copy / "checkpoints").glob("step*"):
        if int(tag.name[4:]) > keep_step:
            shutil.rmtree(tag)
    return copy


# ------------------------------------------------------------------------ DeepSpeed's states, weights-only

PLANT = """
import os, sys
from pathlib import Path

import torch

from offline_kd.train.checkpoint import write_marker
from offline_kd.train.ds_files import load_weights_only

victim, marker = Path(sys.argv[1]), sys.argv[2]


class Planted:
    def __reduce__(self):  # what unpickling it runs
        return (os.system, (f"touch {marker}",))


states = load_weights_only(str(victim))
states["planted"] = Planted()  # otherwise the real states: an unpickling load succeeds, exit 0
torch.save(states, victim)
write_marker(victim.parent, int(victim.parent.name[4:]))  # its COMPLETE record rewritten to match
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage,bf16", [(0, False), (1, True), (2, False), (3, True)])
def test_deepspeed_states_load_weights_only_and_a_planted_pickle_is_refused(
    tiny_store, tmp_path, stage, bf16
):
    """Every ZeRO stage's checkpoint resumes bit-exact through the weights-only load; a pickle that would run
    code, with its COMPLETE record rewritten so the sha256 check passes, is refused in one line naming it, and
    its code never runs."""
    ds = _ds_config(tmp_path, stage, bf16)
    args = ["--max-steps", 4, "--save-every", 2, "--no-tensorboard"]
    full = tmp_path / "full"
    _check(run_cli(_base(tiny_store, full, ds) + args))

    resumed = _stopped_after(full, tmp_path / "resumed", 2)
    proc = run_cli(_base(tiny_store, resumed, ds) + args + ["--resume"])
    _check(proc)
    assert "resumed from step00000002" in proc.stderr
    assert _losses(resumed) == _losses(full) and _same_weights(resumed, full)

    planted, marker = _stopped_after(full, tmp_path / "planted", 4), tmp_path / "code-ran"
    tag = planted / "checkpoints" / "step00000004"
    victim = sorted(tag.glob("*optim_states.pt")) or sorted(tag.glob("*model_states.pt"))
    subprocess.run(
        [sys.executable, "-c", PLANT, str(victim[0]), str(marker)], check=True, env=_env(), cwd=ROOT
    )
    before = {p: p.read_bytes() for p in planted.rglob("*") if p.is_file() and "logs" not in p.parts}
    error = _one_error(run_cli(_base(tiny_store, planted, ds) + args + ["--resume"]), 2)
    assert error.startswith(f"Error: checkpoint file {victim[0]} needs posix.system to load"), error
    assert "--trust-run-dir" in error
    assert not marker.exists()
    assert not (planted / "final").exists()
    assert all(p.read_bytes() == data for p, data in before.items() if p.name not in ("train_config.json",))
    if stage == 0:  # the escape hatch for a run directory of one's own: DeepSpeed unpickles it
        _check(run_cli(_base(tiny_store, planted, ds) + args + ["--resume", "--trust-run-dir"]))
        assert marker.exists()


def test_the_complete_record_vouches_for_itself(tmp_path):
    """A flipped byte in the COMPLETE record that leaves it valid JSON with every file matching (its time, its
    step) is caught as well: the record carries its own sha256."""
    from offline_kd.train.checkpoint import MARKER, damage, write_marker

    tag = tmp_path / "step00000003"
    tag.mkdir()
    (tag / "states.pt").write_bytes(b"states")
    write_marker(tag, 3)
    assert damage(tag) is None
    record = json.loads((tag / MARKER).read_text())
    record["step"] = 8
    (tag / MARKER).write_text(json.dumps(record))
    assert damage(tag) == f"its {MARKER} record does not match its own sha256"


# ------------------------------------------------------------------------ a full disk


def _limited(limit: int):
    """A child process whose files cannot grow past `limit` bytes: its writes then fail with EFBIG, as a full
    disk fails them with ENOSPC (SIGXFSZ, which would kill it instead, is ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run_limited(args: list, limit: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT)] + [str(a) for a in args]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, preexec_fn=_limited(limit)
    )


FOUR_STEPS = ["--max-steps", 4, "--save-every", 2, "--no-tensorboard"]


@pytest.fixture(scope="module")
def four_steps(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four") / "run"
    _check(run_cli(_base(tiny_store, out) + FOUR_STEPS))
    return out


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_previous_one_resumes(
    tiny_store, four_steps, tmp_path
):
    run = _stopped_after(four_steps, tmp_path / "run", 2)
    states = four_steps / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    limit = states.stat().st_size // 2  # the checkpoint cannot be written; the logs and configs can
    error = _one_error(_run_limited(_base(tiny_store, run) + FOUR_STEPS + ["--resume"], limit), 1)
    assert error == (
        f"Error: disk full while saving checkpoint step00000004 to {run / 'checkpoints'}; the previous "
        "checkpoint step00000002 is intact (step00000004 was removed): free space and rerun the same command "
        "with --resume"
    )
    assert not (run / "checkpoints" / "step00000004").exists() and not (run / "final").exists()
    again = run_cli(_base(tiny_store, run) + FOUR_STEPS + ["--resume"])  # space freed
    _check(again)
    assert "resumed from step00000002" in again.stderr
    assert _losses(run) == _losses(four_steps) and _same_weights(run, four_steps)


def test_a_full_disk_while_exporting_never_leaves_a_half_written_final(tiny_store, four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    model = run / "final" / "model.safetensors"
    before = {p.name: p.read_bytes() for p in (run / "final").iterdir()}
    limit = model.stat().st_size // 2
    args = _base(tiny_store, run) + FOUR_STEPS + ["--resume"]  # a finished run resumed: it exports again
    error = _one_error(_run_limited(args, limit), 1)
    assert error == (
        f"Error: disk full while exporting to {run / 'final'}; the earlier final/ is left as it was: free space "
        "and rerun the same command with --resume to export the student of checkpoint step00000004"
    )
    assert {p.name: p.read_bytes() for p in (run / "final").iterdir()} == before
    assert not (run / "final.partial").exists()

    shutil.rmtree(run / "final")  # stopped before its export: a full disk leaves no final/ at all
    error = _one_error(_run_limited(args, limit), 1)
    assert "; no final/ was written: free space and rerun" in error
    assert not (run / "final").exists() and not (run / "final.partial").exists()


# ------------------------------------------------------------------------ --resume says which case it is


def test_resume_with_every_checkpoint_damaged_is_refused_naming_them(tiny_store, four_steps, tmp_path):
    run = _stopped_after(four_steps, tmp_path / "run", 4)
    for tag in (run / "checkpoints").glob("step*"):
        states = tag / "mp_rank_00_model_states.pt"
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0x01
        states.write_bytes(bytes(data))
    kept = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    metrics = (run / "logs" / "metrics.csv").read_bytes()
    error = _one_error(run_cli(_base(tiny_store, run) + FOUR_STEPS + ["--resume"]), 2)
    damaged = "mp_rank_00_model_states.pt does not match its sha256"
    assert error == (
        f"Error: --resume: every checkpoint in {run / 'checkpoints'} is damaged: step00000004 ({damaged}); "
        f"step00000002 ({damaged}). Nothing was trained over; restore them, or pass --overwrite instead of "
        "--resume to start the run again"
    )
    assert (run / "logs" / "metrics.csv").read_bytes() == metrics and not (run / "final").exists()
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == kept


def test_resume_without_a_checkpoint_says_it_starts_fresh(tiny_store, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(_base(tiny_store, run) + ["--max-steps", 1, "--no-tensorboard", "--resume"])
    _check(proc)
    assert f"--resume: no checkpoint directory {run / 'checkpoints'} yet, starting fresh" in proc.stderr


# ------------------------------------------------------------------------ a store missing a file


def test_training_stops_at_a_committed_shard_whose_file_is_gone(tiny_store, tmp_path):
    """The reader's whole-chunk path read a shard without a file as zeros, and trained on them; now the run
    stops in one line naming the array, before the step that would read it."""
    from offline_kd.store.signal_store import SignalStore
    from offline_kd.train.reader import ReaderConfig, StoreReader

    store = tmp_path / "lost.zarr"
    shutil.copytree(tiny_store, store)
    reader = StoreReader(ReaderConfig(url=str(store), micro_batch_size=4, seed=0, temperature=2.0))
    row = int(next(iter(reader.epoch_batches(0, start=0, stop=1)))["rows"][0])  # read by step 1
    shard = row // SignalStore.open(str(store)).meta.shard_sequences
    (store / "topk_logits" / "c" / "0" / str(shard) / "0" / "0").unlink()
    run = tmp_path / "run"
    proc = run_cli(_base(store, run) + ["--kl-source", "topk", "--max-steps", 2, "--log-every", 1])
    error = _one_error(proc, 1)
    assert error == (
        f"Error: '{store}': array 'topk_logits' view 0, shard {shard} is committed but its file is missing"
    )
    assert _losses(run) == [] and not (run / "final").exists()
