"""Precompute: kill -9 and resume, two ranks, dry run, bad teacher, byte identity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr
from conftest import (
    TINY_FLAGS,
    assert_same_store,
    kill_when_paused,
    pause_env,
    run_tiny_precompute,
    save_nan_teacher,
    wait_until,
)

from offline_kd.precompute.run import assigned_shards, rank_and_world
from offline_kd.store.signal_store import SignalStore, StoreError
from offline_kd.teacher.errors import TeacherError, TeacherFailed


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
    marker = tmp_path / "pause"  # never created: the run waits before its third commit until killed
    env = pause_env(marker, before_commit=3)
    proc = subprocess.Popen(kd_cmd(tiny_teacher, tiny_corpus, out), env=env, stderr=subprocess.PIPE)
    kill_when_paused(proc, marker)
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
    """Rank 0 prepares the corpus once into the cache beside the store; rank 1 never reads the raw corpus."""
    out = tmp_path / "two.zarr"
    hf_cache = {r: tmp_path / f"hf-datasets-rank{r}" for r in (0, 1)}  # where `datasets` would cache its work
    stderr = {r: tmp_path / f"rank{r}.err" for r in (0, 1)}

    def start(r: int) -> subprocess.Popen:
        return subprocess.Popen(
            kd_cmd(tiny_teacher, tiny_corpus, out, "--rank", str(r), "--world-size", "2"),
            stdout=subprocess.PIPE,
            stderr=stderr[r].open("w"),
            text=True,
            env=dict(os.environ, HF_DATASETS_CACHE=str(hf_cache[r])),
        )

    # Rank 1 first, and rank 0 only once rank 1 says it waits for the corpus rank 0 prepares.
    procs = {1: start(1)}
    wait_until(lambda: "waiting for rank 0 to prepare the corpus" in stderr[1].read_text(), procs[1])
    procs[0] = start(0)
    errs, logs = {}, {}
    for r, p in procs.items():
        out_text, _ = p.communicate(timeout=300)
        errs[r] = stderr[r].read_text()
        assert p.returncode == 0, errs[r][-2000:]
        logs[r] = out_text + errs[r]
    assert SignalStore.open(str(out)).is_complete()
    assert_same_store(out, tiny_store)
    # Progress in a file: plain lines from rank 0 only, no bars (theirs or the libraries').
    assert all("\r" not in log and "\x1b[" not in log for log in logs.values())
    assert "/2 seq " not in logs[1] and "precompute rank 0/2 seq " in logs[0]
    entries = list((tmp_path / "two.zarr.corpus").iterdir())
    assert len(entries) == 1 and (entries[0] / "corpus.json").is_file(), entries
    assert "prepared the corpus in" in errs[0] and "prepared the corpus in" not in errs[1]
    assert "rank 1: waiting for rank 0 to prepare the corpus" in errs[1]
    # Reading the text file, tokenizing and packing leave arrow files in rank 0's cache only.
    assert list(hf_cache[0].rglob("*.arrow"))
    assert not (hf_cache[1].exists() and list(hf_cache[1].rglob("*.arrow")))


def test_rank_waits_for_the_corpus_then_stops_in_one_line(tmp_path, tiny_teacher, tiny_corpus):
    """Under a launcher, a rank > 0 whose rank 0 never prepares the corpus says so, and why it may be."""
    out = tmp_path / "alone.zarr"
    env = dict(os.environ, RANK="1", WORLD_SIZE="2")
    res = subprocess.run(
        kd_cmd(tiny_teacher, tiny_corpus, out, "--wait-timeout", "2"), env=env, capture_output=True, text=True
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr[-2000:]
    assert lines[-1].startswith("Error: rank 1: rank 0 has not prepared the corpus in ")
    assert "after 2 s" in lines[-1] and "--cache-dir" in lines[-1] and "--wait-timeout" in lines[-1]
    assert any(line.startswith("rank 1: waiting for rank 0 to prepare the corpus") for line in lines)


@pytest.mark.slow
def test_rank_0_failing_to_prepare_stops_the_others(tmp_path, tiny_teacher):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff\xfe bytes\n")
    out = tmp_path / "bad.zarr"
    procs = {
        r: subprocess.Popen(
            kd_cmd(tiny_teacher, bad, out, "--rank", str(r), "--world-size", "2"),
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"),
        )
        for r in (1, 0)
    }
    errs = {r: p.communicate(timeout=300)[1] for r, p in procs.items()}
    assert procs[0].returncode == 2 and "not valid UTF-8 at line 2" in errs[0].splitlines()[-1]
    assert procs[1].returncode == 1
    assert "rank 1: rank 0 failed to prepare the corpus" in errs[1] and "UTF-8" in errs[1]


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
    d = save_nan_teacher(tiny_teacher, tmp_path / "nan_teacher")
    # With the head stored, its check on the first batch finds the NaN before the store exists.
    out = tmp_path / "nan.zarr"
    with pytest.raises(TeacherFailed, match=r"NaN/inf logits for sequence 0 at position 0"):
        run_tiny_precompute(d, tiny_corpus, out)
    assert not out.exists()
    # Without it, the teacher pass finds it and commits nothing.
    with pytest.raises(TeacherFailed, match=r"NaN/inf logits for sequence 0 at position 0"):
        run_tiny_precompute(d, tiny_corpus, out, store_head=False)
    s = SignalStore.open(str(out))
    assert not s.committed().any()
    # compute_signals names the global sequence index
    from transformers import AutoModelForMaskedLM

    from offline_kd.teacher.model import compute_signals

    m = AutoModelForMaskedLM.from_pretrained(d)

    ids = torch.full((2, 8), 5)
    attn = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(TeacherFailed, match="sequence 40"):
        compute_signals(m, ids, attn, 4, [1.0], hidden=False, seq_offset=40)


def test_the_teacher_keeps_its_checkpoints_layers_and_the_store_records_it(tiny_store, tiny_teacher):
    """transformers >= 5.25 swaps in hub kernels unless asked not to; the teacher is loaded as its
    checkpoint defines it, and the store's provenance says so."""
    from offline_kd.teacher.model import load_teacher

    assert SignalStore.open(str(tiny_store)).meta.teacher["hub_kernels"] is False
    model = load_teacher(str(tiny_teacher), device="cpu").model
    assert getattr(model, "use_kernels", False) is False
