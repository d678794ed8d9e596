"""The wheel, installed into a fresh virtual environment, runs from outside the checkout.

The wheel is built without network access (setuptools and wheel come from the ``dev`` extra) from a
copy of the sources. The fresh environment sees this interpreter's packages (torch, transformers,
deepspeed, ...) but not the checkout: ``offline_kd`` must come from the wheel, with its DeepSpeed
configs, and train through ``deepspeed --module offline_kd.cli.train``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
IGNORED = shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__", ".*cache", ".whl")


def _run(cmd: list, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, " ".join(map(str, cmd)) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
        tmp,
    )
    (wheel,) = (tmp / "dist").glob("offline_kd-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A venv that sees this interpreter's site-packages (also when this one is itself a venv)."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    seen = _run([python, "-c", "import sys; print('\\n'.join(sys.path))"], path).stdout.split()
    host = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and p not in seen]
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], path
    ).stdout.strip()
    # Appended after the venv's own site-packages: the wheel's offline_kd comes first; .pth files of
    # those directories (the checkout's editable install) are not run.
    Path(purelib, "host_packages.pth").write_text("\n".join(host) + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path, tiny_store):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("offline_kd/configs/ds_cpu_tiny.json", "offline_kd/configs/ds_distilbert.json",
                    "offline_kd/cli/train.py", "offline_kd/kernels/__init__.py", "offline_kd/data/sample_corpus.txt"):  # fmt: skip
        assert shipped in names, shipped

    python = fresh_venv(tmp_path / "venv")
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [python, "-c", "import offline_kd, offline_kd.configs as c; print(offline_kd.__file__, c.__file__)"],
        elsewhere,
    )
    assert all(p.startswith(str(tmp_path / "venv")) for p in where.stdout.split()), where.stdout

    help_text = _run([tmp_path / "venv" / "bin" / "kd", "--help"], elsewhere).stdout
    assert all(cmd in help_text for cmd in ("precompute", "inspect", "verify", "eval", "demo"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `deepspeed` is `python -m deepspeed.launcher.runner`; it starts the ranks with this python.
    launcher = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", port]
    train = ["--module", "offline_kd.cli.train", "--store", tiny_store, "--student", "distil",
             "--output", "run", "--max-steps", "2", "--no-progress"]  # fmt: skip
    _run(launcher + train, elsewhere)
    run = elsewhere / "run"
    resolved = (run / "ds_config.json").read_text()
    assert '"train_micro_batch_size_per_gpu": 4' in resolved  # the shipped default, ds_cpu_tiny
    assert (run / "final" / "model.safetensors").exists()
    assert len((run / "logs" / "metrics.csv").read_text().splitlines()) == 3  # header + 2 steps
