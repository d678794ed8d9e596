"""The corpus prepared once for every rank: rank 0 loads, tokenizes, packs, filters and fingerprints
it into a cache directory on storage every rank reads; the other ranks wait for it, then map it.

Layout of ``CACHE_DIR/<key>/`` (renamed into place whole, so its presence means it is complete):
``dataset/`` (the packed sequences, `datasets.Dataset.save_to_disk`), ``corpus.json`` (what
ingestion did and the fingerprint), ``heldout.txt`` (the held-out documents) and, with mask
smoothing, ``token_counts.npy``. ``<key>`` hashes everything the packed corpus depends on (sources,
text field, row grouping, length, seed, hold-out, tokenizer), so a rerun (a resume) reads the entry
instead of preparing again, and a changed setting prepares a new one. A failure on rank 0 is left
in ``<key>.failed`` so the waiting ranks stop at once with its message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline_kd.data.corpus import CorpusStats, corpus_fingerprint, prepare_corpus, token_counts
from offline_kd.runtime.errors import RankFailed
from offline_kd.runtime.settings import PrecomputeConfig
from offline_kd.store.storage import is_local, local_path

CACHE_FORMAT = 1  # bumped when packing changes what a key's entry holds
STATUS_EVERY_S = 300.0  # a waiting rank says it still waits this often
POLL_S = 1.0


@dataclass
class PreparedCorpus:
    """The packed corpus, what ingestion did, its fingerprint and, with smoothing, token counts."""

    packed: Any  # datasets.Dataset ("input_ids", "length")
    stats: CorpusStats
    fingerprint: str
    counts: np.ndarray | None = None
    entry: Path | None = None  # the cache entry it was read from, if any


def cache_root(cfg: PrecomputeConfig, world_size: int) -> Path | None:
    """Where the corpus is prepared for every rank: ``--cache-dir``, else ``STORE.corpus`` beside a
    local store; None for one rank without ``--cache-dir`` (it prepares in memory-mapped temp files)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().absolute()
    if world_size == 1 or not is_local(cfg.output):
        return None
    store = local_path(cfg.output).expanduser().absolute()
    return store.with_name(store.name + ".corpus")


def cache_key(cfg: PrecomputeConfig, tokenizer_sha256: str) -> str:
    """Everything the packed corpus depends on (not --num-proc: the result is the same for any)."""
    spec = {
        "format": CACHE_FORMAT,
        "sources": [str(s) for s in cfg.corpus],
        "text_field": cfg.text_field or "text",
        "group_rows": {str(k): int(v) for k, v in sorted((cfg.group_rows or {}).items())},
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "holdout": cfg.holdout,
        "tokenizer_sha256": tokenizer_sha256,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def prepare_once(
    cfg: PrecomputeConfig, tokenizer, tokenizer_sha256: str, vocab_size: int, rank: int, world_size: int
) -> PreparedCorpus:
    """The packed corpus for this rank: prepared here (one rank, or rank 0 into the cache) or read
    from the cache rank 0 prepared (ranks > 0, after waiting up to ``--wait-timeout`` seconds)."""
    root = cache_root(cfg, world_size)
    if root is None:
        return _prepare(cfg, tokenizer, vocab_size, cfg.holdout_file, write_holdout=True)
    entry = root / cache_key(cfg, tokenizer_sha256)
    if rank == 0 and not (entry / "corpus.json").is_file():
        _build(cfg, tokenizer, vocab_size, entry)
    elif rank != 0:
        _wait_for(entry, cfg.wait_timeout, rank)
    prepared = _read(entry, cfg, vocab_size)
    if rank == 0 and cfg.holdout_file is not None:
        shutil.copyfile(entry / "heldout.txt", cfg.holdout_file)
    return prepared


def _prepare(cfg: PrecomputeConfig, tokenizer, vocab_size: int, holdout_file, write_holdout: bool):
    packed, stats = prepare_corpus(
        cfg.corpus, tokenizer, max_length=cfg.max_length, seed=cfg.seed, text_field=cfg.text_field,
        holdout_fraction=cfg.holdout, holdout_file=holdout_file, write_holdout=write_holdout,
        group=_group(cfg), num_proc=cfg.num_proc,
    )  # fmt: skip
    counts = token_counts(packed, vocab_size) if cfg.mask_smoothing is not None else None
    return PreparedCorpus(packed, stats, corpus_fingerprint(packed), counts)


def _group(cfg: PrecomputeConfig) -> dict[str, int]:
    from offline_kd.data.sources import check_group_rows

    return check_group_rows(cfg.group_rows, cfg.corpus)


def _build(cfg: PrecomputeConfig, tokenizer, vocab_size: int, entry: Path) -> None:
    """Rank 0: prepare into a private directory, then rename it into place (complete or absent)."""
    failed = entry.with_name(entry.name + ".failed")
    failed.unlink(missing_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    t0 = time.monotonic()
    try:
        tmp.mkdir(parents=True)
        prepared = _prepare(cfg, tokenizer, vocab_size, str(tmp / "heldout.txt"), write_holdout=True)
        prepared.packed.save_to_disk(str(tmp / "dataset"), num_proc=cfg.num_proc)
        if prepared.counts is not None:
            np.save(tmp / "token_counts.npy", prepared.counts)
        record = {"stats": dataclasses.asdict(prepared.stats), "fingerprint": prepared.fingerprint}
        (tmp / "corpus.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        if entry.exists():  # an entry left incomplete by hand: replaced
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{type(e).__name__}: {e}", encoding="utf-8")
        raise
    print(f"prepared the corpus in {entry} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)


def _wait_for(entry: Path, timeout: float, rank: int) -> None:
    """Ranks > 0: wait for rank 0's entry, saying so, and stop on its failure or at the timeout."""
    failed = entry.with_name(entry.name + ".failed")
    started = time.time()
    t0 = time.monotonic()
    said = None
    while not (entry / "corpus.json").is_file():
        waited = time.monotonic() - t0
        if failed.is_file() and failed.stat().st_mtime >= started - 1.0:  # not one left by an earlier run
            raise RankFailed(
                f"rank {rank}: rank 0 failed to prepare the corpus in {entry}: "
                f"{failed.read_text(encoding='utf-8').strip()}"
            )
        if waited > timeout:
            raise RankFailed(
                f"rank {rank}: rank 0 has not prepared the corpus in {entry} after {timeout:.0f} s; see rank "
                "0's log, check that --cache-dir is on storage every rank reads, or raise --wait-timeout"
            )
        if said is None or waited - said >= STATUS_EVERY_S:
            verb = "waiting" if said is None else f"still waiting ({waited:.0f} s)"
            print(
                f"rank {rank}: {verb} for rank 0 to prepare the corpus in {entry} "
                f"(--wait-timeout {timeout:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            said = waited
        time.sleep(POLL_S)


def _read(entry: Path, cfg: PrecomputeConfig, vocab_size: int) -> PreparedCorpus:
    import datasets

    record = json.loads((entry / "corpus.json").read_text(encoding="utf-8"))
    stats = CorpusStats(**record["stats"])
    stats.holdout_file = str(cfg.holdout_file) if cfg.holdout_file is not None else None
    packed = datasets.load_from_disk(str(entry / "dataset"))  # memory-mapped, not copied
    counts = None
    if cfg.mask_smoothing is not None:
        path = entry / "token_counts.npy"
        counts = np.load(path, allow_pickle=False) if path.is_file() else token_counts(packed, vocab_size)
    return PreparedCorpus(packed, stats, record["fingerprint"], counts, entry)
