"""Shared fixtures: a tiny real BERT teacher (`offline_kd.examples.tiny`, the hub is unreachable), its corpus and store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offline_kd.examples.tiny import build_tiny_teacher, make_documents  # tests import these from here too

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return make_documents(60)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_docs) -> Path:
    """A one-document-a-line text corpus."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(tiny_docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_docs) -> Path:
    """Directory of a saved tiny BertForMaskedLM (4 layers, hidden 32) and its tokenizer."""
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"), tiny_docs)


# --- signal store fixtures (offline_kd.store.signal_store / offline_kd.precompute.run) ---


def run_tiny_precompute(teacher, corpus, output, **overrides):
    """Precompute a tiny store with the settings of the `tiny_store` fixture (overridable)."""
    from offline_kd.precompute.run import PrecomputeConfig, precompute

    kwargs = dict(
        teacher=str(teacher),
        corpus=[str(corpus)],
        output=str(output),
        max_length=32,
        top_k=8,
        temperatures=[1.0, 2.0],
        views=2,
        hidden=True,
        seed=0,
        batch_size=8,
        shard_size=8,
        chunk_size=4,
        device="cpu",
        progress=False,
    )
    kwargs.update(overrides)
    return precompute(PrecomputeConfig(**kwargs))


# The options of the `tiny_store` fixture, as CLI flags.
TINY_FLAGS = [
    "--max-length", "32", "--top-k", "8", "--temperatures", "1,2", "--views", "2", "--hidden",
    "--seed", "0", "--batch-size", "8", "--shard-size", "8", "--chunk-size", "4", "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def store_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """The two store directories hold the same files, byte for byte."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    differing = [k for k in fa if fa[k] != fb[k]]
    assert not differing, differing


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_teacher, tiny_corpus) -> Path:
    """Path of a complete signal store precomputed from `tiny_corpus` with `tiny_teacher`.

    max_length 32, top_k 8, views 2, temperatures [1, 2], hidden states on, 8 sequences a shard
    (4 a chunk). Open it with `offline_kd.store.signal_store.SignalStore.open(str(path))`. Treat it as read-only.
    """
    out = tmp_path_factory.mktemp("store") / "tiny.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    return out


# ------------------------------------------------------------------------------ in-process training
# Launcher variables: a subprocess run clears them, an in-process run sets them (a one-process group).
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def restore_process_state():
    """For a module of in-process train() runs (use as a module-scoped autouse fixture): afterwards the
    process group is shut down and the launcher variables are as before."""
    from offline_kd.runtime.distributed import shutdown_distributed

    saved = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    shutdown_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pause_env(marker: Path, before_commit: int, env: dict | None = None) -> dict:
    """The environment of a `kd precompute` that stops before its ``before_commit``-th commit (that shard's
    arrays written), creates ``marker.paused`` and waits until ``marker`` exists (the
    OFFLINE_KD_PAUSE_BEFORE_COMMIT hook of offline_kd.precompute.run)."""
    return dict(env or os.environ, OFFLINE_KD_PAUSE_BEFORE_COMMIT=f"{before_commit}:{marker}")


def wait_until(ready, proc, timeout: float = 300.0) -> None:
    """Wait for ``ready()`` while ``proc`` runs; a process that ended or a deadline passed fails the test."""
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, (proc.stderr.read() if proc.stderr else "")[-2000:]
        assert time.monotonic() < deadline, f"not ready after {timeout} s"
        time.sleep(0.02)


def kill_when_paused(proc, marker: Path, timeout: float = 300.0) -> None:
    """SIGKILL a `kd precompute` started with `pause_env(marker, ...)` once it is paused mid-shard (it
    cannot finish in between: it waits for a release that never comes). Killed whatever happens."""
    import signal

    try:
        wait_until(lambda: Path(f"{marker}.paused").exists(), proc, timeout)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def save_nan_teacher(tiny_teacher: Path, directory: Path) -> Path:
    """The tiny teacher with one NaN in its output bias (every logit of that id is NaN), saved to directory."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    m = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        m.cls.predictions.bias[7] = float("nan")
    m.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(directory)
    return directory
