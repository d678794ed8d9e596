"""Crashes: exact resume with dropout, no unpickling of run files, concurrent creators, orphaned partial files."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_store, run_tiny_precompute, wait_until
from test_train import ROOT, SCRIPT, _base, _check, _env, _losses, run_cli

from offline_kd.store.signal_store import SignalStore

# ------------------------------------------------------------------------ exact resume, dropout on


@pytest.fixture(scope="module")
def dropout_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher with dropout on: the `distil` student takes its dropout probabilities."""
    out = tmp_path_factory.mktemp("dropout") / "teacher"
    shutil.copytree(tiny_teacher, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact_with_dropout(tiny_store, dropout_teacher, tmp_path):
    args = ["--teacher", dropout_teacher, "--epochs", 1, "--save-every", 2, "--no-tensorboard"]
    full = tmp_path / "full"
    _check(run_cli(_base(tiny_store, full) + args))
    assert json.loads((full / "final" / "config.json").read_text())["dropout"] == 0.1

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT)] + [str(a) for a in _base(tiny_store, killed) + args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "checkpoints" / "step00000006" / "COMPLETE"
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)  # somewhere in steps 7-8 or the save of step 8
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "final").exists()
    resumed = run_cli(_base(tiny_store, killed) + args + ["--resume"])
    _check(resumed)
    assert "resumed from step0000000" in resumed.stderr
    assert "not an exact continuation" not in resumed.stderr
    assert _losses(killed) == _losses(full)
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)


def _stop_args(teacher) -> list:
    return ["--teacher", teacher, "--epochs", 1, "--no-tensorboard"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_store, dropout_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _check(run_cli(_base(tiny_store, out) + _stop_args(dropout_teacher)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_saves_the_step_and_the_resumed_run_is_bit_exact(
    tiny_store, dropout_teacher, uninterrupted, tmp_path, signame
):
    """What a scheduler sends before it kills a job (and Ctrl-C): the run finishes its step, saves it, says
    how to resume in one line and exits 128 + the signal; resuming gives the uninterrupted run's losses and
    weights."""
    stopped, release = tmp_path / "stopped", tmp_path / "release"
    cmd = [sys.executable, str(SCRIPT)] + [
        str(a) for a in _base(tiny_store, stopped) + _stop_args(dropout_teacher)
    ]
    env = dict(_env(), OFFLINE_KD_PAUSE_AFTER_STEP=f"3:{release}")  # waits after step 3 for the signal
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: Path(f"{release}.paused").exists(), proc)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame), err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: stopped by {signame} after step 3; checkpoint step00000003 saved: rerun the same command "
        "with --resume to continue"
    ], err[-3000:]
    assert "Traceback" not in err and not (stopped / "final").exists()
    assert (stopped / "checkpoints" / "step00000003" / "COMPLETE").exists()
    if signame != "SIGTERM":
        return  # the same handler and save: one resume checks what follows
    resumed = run_cli(_base(tiny_store, stopped) + _stop_args(dropout_teacher) + ["--resume"])
    _check(resumed)
    assert "resumed from step00000003" in resumed.stderr
    assert _losses(stopped) == _losses(uninterrupted)
    a, b = _final_weights(uninterrupted), _final_weights(stopped)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate], ids=["one-flipped-byte", "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumes_bit_exact(
    tiny_store, dropout_teacher, tmp_path, damage
):
    run = tmp_path / "run"
    args = _base(tiny_store, run) + ["--teacher", dropout_teacher, "--epochs", 1, "--save-every", 2,
                                     "--no-tensorboard"]  # fmt: skip
    _check(run_cli(args))
    losses, weights = _losses(run), _final_weights(run)
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    last, before = tags[-1], tags[-2]
    record = json.loads((run / "checkpoints" / last / "COMPLETE").read_text())
    assert {"size", "sha256"} <= set(record["files"]["mp_rank_00_model_states.pt"])
    damage(run / "checkpoints" / last / "mp_rank_00_model_states.pt")
    resumed = run_cli(args + ["--resume"])
    _check(resumed)
    assert f"checkpoint {last} is damaged (mp_rank_00_model_states.pt " in resumed.stderr
    assert f"resumed from {before}" in resumed.stderr
    assert _losses(run) == losses
    again = _final_weights(run)
    assert again.keys() == weights.keys() and all(bool((again[k] == weights[k]).all()) for k in weights)


def test_rng_state_files_hold_no_pickle(tmp_path):
    import random

    import numpy as np
    import torch

    from offline_kd.train.checkpoint import load_rng_state, rng_state, save_rng_state, set_rng_state

    np.random.seed(3)
    np.random.randn(1)  # leaves a cached Gaussian in NumPy's legacy state
    random.gauss(0, 1)  # and one in Python's
    path = tmp_path / "rng.safetensors"
    save_rng_state(path, rng_state())
    after = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_rng_state(path))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == after
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle stream


def test_no_unsafe_unpickling_in_the_project():
    """Unpickling (`pickle` loads, `torch.load` with `weights_only` off) runs code from the file: it
    has no place here, in code, tests, scripts or docs."""
    unsafe = ("weights_only" + "=False", "pickle" + ".load")
    offenders, seen = [], 0
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info") or not path.is_file():
            continue
        if (
            path.suffix not in (".py", ".md", ".toml", ".json", ".cfg", ".sh", ".txt")
            and path.name != "Makefile"
        ):
            continue
        seen += 1
        text = path.read_text(errors="replace")
        if any(u in text for u in unsafe):
            offenders.append(str(rel))
    assert seen > 50 and not offenders


# ------------------------------------------------------------------------ creation and orphans


def test_creation_keeps_what_another_creator_wrote(tmp_path, tiny_store):
    """Creating over a group whose arrays already exist (a concurrent creator's) empties nothing."""
    import zarr

    from offline_kd.store.signal_store import ATTR_KEY

    out = tmp_path / "c.zarr"
    shutil.copytree(tiny_store, out)
    meta = SignalStore.open(str(out)).meta
    g = zarr.open_group(str(out), mode="r+")
    attrs = dict(g.attrs)
    g.attrs.clear()  # the other creator has not written the attributes yet
    store = SignalStore.create(str(out), meta)
    assert store.is_complete()
    assert_same_store(out, tiny_store)
    assert zarr.open_group(str(out)).attrs[ATTR_KEY] == attrs[ATTR_KEY]


def _plant_partial(path: Path) -> Path:
    """A zero-byte temporary file named as zarr's local store names them before the rename."""
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"")
    return partial


def _kill_mid_shard(store: Path, shard: int) -> set[Path]:
    """What a kill -9 leaves of `shard`: the inputs and view 0 written, view 1 not, no commit, and
    temporary files of zarr's atomic writes (returned)."""
    (store / "committed" / "c" / str(shard)).unlink()
    planted = {_plant_partial(store / "committed" / "c" / str(shard))}
    for array in ("masked_input_ids", "mlm_mask", "topk_ids", "topk_logits", "lse", "hidden"):
        view1 = store / array / "c" / "1" / str(shard)
        shard_file = view1 if view1.is_file() else next(f for f in view1.rglob("*") if f.is_file())
        shard_file.unlink()
        planted.add(_plant_partial(shard_file))
    return planted


def test_resume_removes_the_partial_files_of_a_killed_run(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    import warnings

    out = tmp_path / "orphans.zarr"
    shutil.copytree(tiny_store, out)
    _kill_mid_shard(out, 2)
    other_rank = _kill_mid_shard(out, 3)
    _plant_partial(out / "zarr.json")  # a kill while the root metadata was written
    # rank 0 of 2 owns the even shards: it removes their partial files and the metadata's, no others
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, rank=0, world_size=2)
    assert not [w for w in caught if "not recognized" in str(w.message)]
    assert r.shards_written == [2]
    assert set(out.rglob("*.partial")) == other_rank
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    assert r.shards_written == [3] and r.complete
    assert not list(out.rglob("*.partial"))
    assert_same_store(out, tiny_store)


def _kd(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from offline_kd.cli.kd import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_verify_calls_an_uncommitted_shard_unwritten_not_corrupt(tmp_path, tiny_store):
    out = tmp_path / "unfinished.zarr"
    shutil.copytree(tiny_store, out)
    last = SignalStore.open(str(out)).meta.num_shards - 1
    _kill_mid_shard(out, last)
    code, output = _kd("verify", out)
    assert code == 1
    assert f"incomplete: 1 shard(s) not committed: [{last}]" in output
    assert f"uncommitted shard(s) [{last}] are not yet written" in output
    assert "differs" not in output and "corrupt" not in output
    assert f"checked {last} shard(s)" in output


# ------------------------------------------------------------------------ run directories: one writer, ours


def _one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    _check(run_cli(_base(tiny_store, out) + ["--max-steps", 2, "--save-every", 1, "--no-tensorboard"]))
    return out


def test_a_directory_of_someone_elses_files_is_refused_and_left_alone(tiny_store, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        error = _one_error(run_cli(_base(tiny_store, out) + ["--max-steps", 1, *extra]))
        assert f"--output {out}: holds files that are not an offline_kd run (notes.txt, sub)" in error
    assert (
        sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]
        and (out / "notes.txt").read_text() == "keep me"
    )


def test_a_finished_run_is_not_trained_over_unless_asked(tiny_store, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("the user's")  # a file of the user's inside a run directory
    before = (run / "final" / "model.safetensors").read_bytes()
    error = _one_error(run_cli(_base(tiny_store, run) + ["--max-steps", 2, "--save-every", 1]))
    assert "is a finished run (final/ exists); pass --resume to continue it or --overwrite" in error
    assert (run / "final" / "model.safetensors").read_bytes() == before
    both = _one_error(run_cli(_base(tiny_store, run) + ["--resume", "--overwrite"]))
    assert "--resume and --overwrite: choose one" in both
    again = run_cli(_base(tiny_store, run) + ["--max-steps", 1, "--overwrite", "--no-tensorboard"])
    _check(again)
    assert (run / "notes.txt").read_text() == "the user's"  # --overwrite deletes only what the tool wrote
    assert not any((run / "checkpoints").glob("step*"))  # the earlier run's are gone
    assert len(_losses(run)) == 1 and not (run / "final.partial").exists()


@pytest.mark.slow
def test_a_second_training_into_a_running_runs_directory_is_refused(tiny_store, tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    cmd = [sys.executable, str(SCRIPT)] + [str(a) for a in _base(tiny_store, out) + ["--max-steps", 3]]
    env = dict(_env(), OFFLINE_KD_PAUSE_AFTER_STEP=f"1:{release}")
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: Path(f"{release}.paused").exists(), first)
        error = _one_error(run_cli(_base(tiny_store, out) + ["--max-steps", 3, "--resume"]))
        assert f"rank 0 of '{out}' is being written by another process (pid {first.pid} " in error
        release.touch()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert [int(r[0]) for r in _losses(out)] == [1, 2, 3]  # one run's rows, each step once
    assert not Path(f"{out}.leases").exists() or not list(Path(f"{out}.leases").iterdir())


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_job_naming_it(tiny_store, tmp_path):
    """SIGSTOP on one of two ranks: the other's next collective times out after --collective-timeout and
    the job ends in one line naming the silent rank, instead of hanging."""
    import psutil
    from test_train import _free_port

    out, release = tmp_path / "run", tmp_path / "release"
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(SCRIPT)]
    args = _base(tiny_store, out) + ["--max-steps", 4, "--collective-timeout", 10, "--no-tensorboard"]
    env = dict(_env(), OFFLINE_KD_PAUSE_AFTER_STEP=f"1:{release}")  # both ranks wait after step 1
    proc = subprocess.Popen(
        launcher + [str(a) for a in args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: Path(f"{release}.paused").exists(), proc)
        ranks = {
            int(c.environ().get("RANK", -1)): c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "RANK" in c.environ()
        }
        ranks[1].suspend()  # SIGSTOP: the process is there, and answers nothing
        release.touch()
        lines = []
        for line in proc.stdout:  # until the healthy rank names the silent one
            lines.append(line)
            if "stopped answering" in line:
                break
        ranks[1].kill()  # the launcher would wait 30 s for a stopped process to take its SIGTERM
        rest, _ = proc.communicate(timeout=300)
        output = "".join(lines) + rest
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            child.kill()
        proc.kill()
    assert proc.returncode != 0, output[-3000:]
    errors = [line for line in output.splitlines() if "Error: " in line]
    assert any(
        "rank 1 (silent for " in e and "stopped answering: no reply within --collective-timeout 10 s" in e
        for e in errors
    ), output[-4000:]
