"""Crashes and misuse: exact resume with dropout, one writer per store rank, orphans, bad inputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import ROOT, SCRIPT, _base, _check, _env, _losses, run_cli

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


def test_rng_state_files_hold_no_pickle(tmp_path):
    import random

    import numpy as np
    import torch

    from offline_kd.checkpoint import load_rng_state, rng_state, save_rng_state, set_rng_state

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
    """`torch.load(..., weights_only=False)` runs code from the file: it has no place here."""
    offenders = []
    for folder in ("offline_kd", "kernels", "cli", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if "weights_only=False" in text or "pickle.load" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
