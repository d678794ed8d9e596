"""Precompute: kill -9 and resume, two ranks, dry run, bad teacher, byte identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from conftest import TINY_FLAGS, assert_same_store, run_tiny_precompute

from offline_kd.precompute import assigned_shards, rank_and_world
from offline_kd.store import SignalStore, StoreError
from offline_kd.teacher import TeacherError


def kd_cmd(teacher, corpus, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "offline_kd.cli.kd", "precompute", "--teacher", str(teacher),
        "--corpus", str(corpus), "--output", str(out), *TINY_FLAGS, *extra,
    ]  # fmt: skip


def committed_count(out: Path) -> int:
    d = out / "committed" / "c"
    return len(list(d.iterdir())) if d.exists() else 0


@pytest.mark.slow
def test_kill9_and_resume_is_byte_identical(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "resumed.zarr"
    env = dict(os.environ, OFFLINE_KD_PRECOMPUTE_DELAY="0.15")
    proc = subprocess.Popen(kd_cmd(tiny_teacher, tiny_corpus, out), env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while committed_count(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.2)  # land the kill in the middle of a shard
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    s = SignalStore.open(str(out))
    done = s.committed()
    assert 2 <= done.sum() < s.meta.num_shards
    # rerun the same command: committed shards are skipped, the rest recomputed
    res = subprocess.run(kd_cmd(tiny_teacher, tiny_corpus, out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"skipped {int(done.sum())} already committed" in res.stdout
    assert SignalStore.open(str(out)).is_complete()
    assert_same_store(out, tiny_store)


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "two.zarr"
    procs = [
        subprocess.Popen(
            kd_cmd(tiny_teacher, tiny_corpus, out, "--rank", str(r), "--world-size", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)  # rank 1 first: it must wait for rank 0 to create the store
    ]
    logs = []
    for p in procs:
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        logs.append(out_text + err)
    assert SignalStore.open(str(out)).is_complete()
    assert_same_store(out, tiny_store)
    # Progress in a file: plain lines from rank 0 only, no bars (theirs or the libraries').
    assert all("\r" not in log and "\x1b[" not in log for log in logs)
    assert "/2 seq " not in logs[0] and "precompute rank 0/2 seq " in logs[1]


def test_rank_env_and_assignment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world(None, None) == (3, 4)
    assert rank_and_world(0, 2) == (0, 2)
    with pytest.raises(ValueError):
        rank_and_world(2, 2)
    shards = [assigned_shards(10, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_in_process_resume_skips_committed(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "partial.zarr"
    # rank 0 of 2 writes half the shards; then a single-rank run finishes the rest
    r0 = run_tiny_precompute(tiny_teacher, tiny_corpus, out, rank=0, world_size=2)
    assert not r0.complete and r0.shards_written == list(range(0, r0.num_shards, 2))
    r1 = run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    assert r1.shards_skipped == r0.shards_written and r1.complete
    assert_same_store(out, tiny_store)


def test_dry_run_estimates_and_writes_nothing(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "dry.zarr"
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, dry_run=True)
    assert r.dry_run and r.estimated_bytes > r.num_sequences * 32 * 8 * 6
    assert not out.exists()


def test_overwrite_replaces_store(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "ow.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out, views=1, hidden=False)
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, views=1, hidden=False, top_k=4, overwrite=True)
    assert r.complete
    s = SignalStore.open(str(out))
    assert s.meta.top_k == 4 and "hidden" not in zarr.open_group(str(out), mode="r")
    with pytest.raises(KeyError, match="hidden"):
        s.read(0, 0, 1, fields=["hidden"])
    with pytest.raises(StoreError, match="overwrite"):
        run_tiny_precompute(tiny_teacher, tiny_corpus, out, overwrite=True, rank=0, world_size=2)


def test_teacher_without_mlm_head_is_refused(tmp_path, tiny_teacher, tiny_corpus):
    from transformers import AutoTokenizer, BertConfig, BertModel

    cfg = BertConfig.from_pretrained(tiny_teacher)
    d = tmp_path / "encoder_only"
    BertModel(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    with pytest.raises(TeacherError, match="masked-LM head"):
        run_tiny_precompute(d, tiny_corpus, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_holdout_file_and_attrs(tmp_path, tiny_teacher, tiny_corpus, tiny_docs):
    held = tmp_path / "heldout.txt"
    out = tmp_path / "h.zarr"
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, holdout=0.2, holdout_file=str(held), views=1)
    lines = held.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) < len(tiny_docs) * 0.4 and set(lines) <= set(tiny_docs)
    corpus = SignalStore.open(str(out)).meta.corpus
    assert corpus["held_out_documents"] == len(lines)
    assert corpus["holdout"] == {"fraction": 0.2, "file": str(held)}
    assert corpus["documents"] == len(tiny_docs)
    assert r.complete


def test_nan_teacher_fails_naming_sequence_and_commits_nothing(tmp_path, tiny_teacher, tiny_corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    d = tmp_path / "nan_teacher"
    m = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        m.cls.predictions.bias[7] = float("nan")
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    # With the head stored, its check on the first batch finds the NaN before the store exists.
    out = tmp_path / "nan.zarr"
    with pytest.raises(TeacherError, match=r"NaN/inf logits for sequence 0 at position 0"):
        run_tiny_precompute(d, tiny_corpus, out)
    assert not out.exists()
    # Without it, the teacher pass finds it and commits nothing.
    with pytest.raises(TeacherError, match=r"NaN/inf logits for sequence 0 at position 0"):
        run_tiny_precompute(d, tiny_corpus, out, store_head=False)
    s = SignalStore.open(str(out))
    assert not s.committed().any()
    # compute_signals names the global sequence index
    from offline_kd.teacher import compute_signals

    ids = torch.full((2, 8), 5)
    attn = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(TeacherError, match="sequence 40"):
        compute_signals(m, ids, attn, 4, [1.0], hidden=False, seq_offset=40)
