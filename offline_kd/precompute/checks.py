"""Every input of ``kd precompute`` checked before the teacher loads or the corpus is read."""

from __future__ import annotations

import os
from pathlib import Path

from offline_kd.runtime import hub_kernels
from offline_kd.runtime.checks import check_device, check_model_source, max_positions
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.settings import PrecomputeConfig


def check_precompute(cfg: PrecomputeConfig, world_size: int) -> None:
    """Settings, device, teacher config and corpus sources of ``kd precompute``."""
    from offline_kd.data.corpus import check_group_rows, check_sources
    from offline_kd.store.signal_store import check_output
    from offline_kd.store.storage import check_store_url

    _check_precompute_settings(cfg, world_size)
    hub_kernels.check(cfg.hub_kernels)
    # The store's filesystem installed and its bucket answering; a local output under a writable directory.
    check_store_url(cfg.output, cfg.storage_options, writing=not cfg.dry_run)
    # Nothing but a store (or nothing) there: the user's own files are neither mixed with a store's nor
    # deleted by --overwrite.
    check_output(cfg.output, cfg.storage_options, label=f"--output {cfg.output}")
    check_device(cfg.device)
    label = f"--teacher {cfg.teacher}"
    config = check_model_source(
        cfg.teacher, label, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
        need_weights=not cfg.dry_run,  # a dry run reads the config and the tokenizer only
    )  # fmt: skip
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and cfg.top_k > vocab:
        raise UsageError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary size {vocab}")
    positions = max_positions(config)
    if positions is not None and cfg.max_length > positions:
        raise UsageError(
            f"--max-length {cfg.max_length} exceeds the teacher's max_position_embeddings {positions}"
        )
    check_sources(cfg.corpus)
    check_group_rows(cfg.group_rows, cfg.corpus)
    _check_corpus_cache(cfg, world_size)


def _check_corpus_cache(cfg: PrecomputeConfig, world_size: int) -> None:
    """Where rank 0 prepares the corpus for every rank (`offline_kd.data.cache`)."""
    from offline_kd.store.storage import is_local

    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise UsageError(f"--num-proc {cfg.num_proc}: must be at least 1")
    if cfg.wait_timeout <= 0:
        raise UsageError(f"--wait-timeout {cfg.wait_timeout}: must be positive")
    if cfg.cache_dir is None:
        if world_size > 1 and not is_local(cfg.output):
            raise UsageError(
                f"--cache-dir: {world_size} ranks writing the remote store {cfg.output!r} need a directory "
                "every rank reads (a shared filesystem) where rank 0 prepares the corpus once"
            )
        return
    if "://" in cfg.cache_dir:
        raise UsageError(
            f"--cache-dir {cfg.cache_dir}: must be a directory on a filesystem every rank mounts"
        )
    existing = Path(cfg.cache_dir).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--cache-dir {cfg.cache_dir}: {existing} is not a writable directory")


def _check_precompute_settings(cfg: PrecomputeConfig, world_size: int) -> None:
    from offline_kd.store.signal_store import CODECS, HIDDEN_STORAGE

    if cfg.top_k < 0:
        raise UsageError(f"--top-k {cfg.top_k}: must be at least 0")
    if cfg.top_k == 0 and not (cfg.hidden and cfg.store_head):
        raise UsageError(
            "--top-k 0 stores no top-k signals: the store is for the exact KL source, which needs "
            "--hidden and --store-head"
        )
    if cfg.hidden_dtype not in HIDDEN_STORAGE:
        raise UsageError(f"--hidden-dtype {cfg.hidden_dtype}: must be one of {sorted(HIDDEN_STORAGE)}")
    if cfg.hidden_codec not in CODECS:
        raise UsageError(f"--hidden-codec {cfg.hidden_codec}: must be one of {', '.join(CODECS)}")
    if cfg.views < 1:
        raise UsageError(f"--views {cfg.views}: must be at least 1")
    if cfg.top_k > 0 and (not cfg.temperatures or any(t <= 0 for t in cfg.temperatures)):
        raise UsageError(f"--temperatures {cfg.temperatures}: must be positive")
    for flag, value in (("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if cfg.writer_threads is not None and cfg.writer_threads < 1:
        raise UsageError(f"--writer-threads {cfg.writer_threads}: must be at least 1")
    if cfg.chunk_size is not None and (cfg.chunk_size < 1 or cfg.shard_size % cfg.chunk_size):
        raise UsageError(f"--chunk-size {cfg.chunk_size}: must divide --shard-size {cfg.shard_size}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise UsageError(f"--holdout {cfg.holdout}: must be in [0, 1)")
    if cfg.holdout_file is not None:
        parent = Path(cfg.holdout_file).expanduser().absolute().parent
        if not parent.is_dir():
            raise UsageError(f"--holdout-file {cfg.holdout_file}: no such directory {parent}")
    if cfg.overwrite and world_size > 1:
        from offline_kd.store.signal_store import StoreError

        raise StoreError("--overwrite with several ranks is racy: delete the store first, then run all ranks")
    _check_max_length(cfg)


def _check_max_length(cfg: PrecomputeConfig) -> None:
    from offline_kd.data.corpus import MIN_TOKENS

    if cfg.max_length <= MIN_TOKENS:
        raise UsageError(
            f"--max-length {cfg.max_length}: too small: sequences of at most {MIN_TOKENS} real tokens are "
            f"dropped as degenerate, so none would be left; use at least {MIN_TOKENS + 1}"
        )
