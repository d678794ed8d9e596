"""The teacher pass: corpus -> masked views -> teacher signals -> signal store (see docs/resume.md)."""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline_kd import __version__
from offline_kd.data.cache import prepare_once
from offline_kd.data.masking import MaskingConfig, mask_batch, smoothing_weights, weights_sha256
from offline_kd.precompute.checks import check_precompute
from offline_kd.precompute.dry_run import DryRunEstimate, dry_run
from offline_kd.runtime import env
from offline_kd.runtime.distributed import local_device, rank_and_world
from offline_kd.runtime.errors import RankFailed
from offline_kd.runtime.progress import Progress, quiet_library_bars
from offline_kd.runtime.settings import PrecomputeConfig
from offline_kd.store.lease import StoreLease
from offline_kd.store.signal_store import (
    ATTR_KEY,
    HEAD_GROUP,
    SignalStore,
    StoreError,
    StoreMeta,
    default_compression,
    diff_meta,
    dtypes_for,
    num_shards_for,
    shard_range,
)
from offline_kd.teacher.errors import TeacherError
from offline_kd.teacher.head import CHECK_TOPK, reproduction_check, save_head
from offline_kd.teacher.host_signals import HostSignals
from offline_kd.teacher.model import Teacher, load_teacher, teacher_signals

# Crash tests only (offline_kd.runtime.env): widen the window before each commit, or stop there.
_DELAY = float(env.PRECOMPUTE_DELAY.get())
_PAUSE = env.PAUSE_BEFORE_COMMIT.get()


def _pause_before_commit(commits_so_far: int) -> None:
    """The OFFLINE_KD_PAUSE_BEFORE_COMMIT test hook (`offline_kd.runtime.env.PAUSE_BEFORE_COMMIT`)."""
    count, _, release = _PAUSE.partition(":")
    if int(count) != commits_so_far + 1:
        return
    if release:
        Path(release + ".paused").touch()
    while not (release and Path(release).exists()):
        time.sleep(0.05)


@dataclass
class PrecomputeResult:
    url: str
    num_sequences: int
    num_shards: int
    shards_written: list[int]
    shards_skipped: list[int]
    complete: bool
    seconds: float
    tokens: int
    dry_run: bool = False
    estimated_bytes: int | None = None
    meta: dict | None = None
    loop_seconds: float = 0.0  # time spent masking, running the teacher and writing shards
    estimate: DryRunEstimate | None = None  # the dry run's report


def assigned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: shard i belongs to rank i mod world_size."""
    return list(range(rank, num_shards, world_size))


def _chunk_size(cfg: PrecomputeConfig) -> int:
    if cfg.chunk_size is not None:
        c = cfg.chunk_size
    else:
        # ~2 MB of topk_logits per chunk at L=512, K=64: 16 sequences; never more than a shard.
        # Without top-k (--top-k 0) the same rows as at K = 64: 12 MiB hidden chunks at H = 768.
        c = max(1, min(cfg.shard_size, (2 << 20) // max(1, cfg.max_length * (cfg.top_k or 64) * 4)))
        while cfg.shard_size % c:
            c -= 1
    if cfg.shard_size % c:
        raise ValueError(f"shard size {cfg.shard_size} must be a multiple of the chunk size {c}")
    return c


def build_meta(
    cfg, teacher, stats, num_sequences: int, fingerprint: str, masking: MaskingConfig, wsha
) -> StoreMeta:
    tok = teacher.tokenizer_info()
    corpus = stats.as_dict()
    corpus["fingerprint"] = fingerprint
    m = masking.as_dict()
    m["token_weights_sha256"] = wsha
    m["scheme"] = "numpy.default_rng([seed, view, sequence]); ceil(p*n) positions without replacement"
    m["random_tokens"] = f"uniform over the non-special ids below {len(teacher.tokenizer)}"
    return StoreMeta(
        num_sequences=num_sequences,
        max_length=cfg.max_length,
        top_k=cfg.top_k,
        views=cfg.views,
        # No log-sum-exps without top-k: the exact KL source needs no stored temperature.
        temperatures=[float(t) for t in cfg.temperatures] if cfg.top_k > 0 else [],
        hidden=bool(cfg.hidden),
        hidden_size=teacher.hidden_size,
        vocab_size=teacher.vocab_size,
        tokenizer_sha256=teacher.tokenizer_sha256,
        pad_token_id=int(tok["pad_token_id"]),
        teacher=teacher.provenance(),
        tokenizer=tok,
        masking=m,
        seed=cfg.seed,
        corpus=corpus,
        shard_sequences=cfg.shard_size,
        chunk_sequences=_chunk_size(cfg),
        num_shards=num_shards_for(num_sequences, cfg.shard_size),
        dtypes=dtypes_for(teacher.vocab_size, cfg.hidden_dtype),
        compression=default_compression(hidden=cfg.hidden_codec),  # the schema's codecs, and --hidden-codec
        package_version=__version__,
        hidden_dtype=cfg.hidden_dtype,
        teacher_head={"group": HEAD_GROUP, "class": teacher.head.class_name} if _wants_head(cfg) else {},
    )


def _wait_for_store(cfg, meta: StoreMeta, rank: int) -> SignalStore:
    """Ranks > 0 wait until rank 0 has written the root attributes, then check they match."""
    deadline = time.monotonic() + cfg.wait_timeout
    last = None
    while time.monotonic() < deadline:
        try:
            store = SignalStore.open(cfg.output, mode="r+", storage_options=cfg.storage_options)
            diff = diff_meta(store.group.attrs.asdict()[ATTR_KEY], meta.as_dict())
            if not diff:
                return store
            last = f"its settings differ from this rank's: {', '.join(diff)}"
        except StoreError as e:
            last = str(e)
        time.sleep(0.2)
    raise RankFailed(
        f"rank {rank}: timed out after {cfg.wait_timeout:.0f} s (--wait-timeout) waiting for rank 0 to "
        f"create {cfg.output!r} ({last})"
    )


def precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    """Run the teacher over the corpus and write (or resume) the signal store. See docs/resume.md."""
    t0 = time.monotonic()
    rank, world = rank_and_world(cfg.rank, cfg.world_size)
    check_precompute(cfg, world)  # every input, the store URL included, before the teacher or the corpus
    if cfg.dry_run:  # the teacher's config and a sample of the corpus: no weights, nothing written
        est = dry_run(cfg)
        return PrecomputeResult(
            cfg.output, est.sequences, est.num_shards, [], [], False, time.monotonic() - t0, est.tokens,
            dry_run=True, estimated_bytes=est.bytes, estimate=est,
        )  # fmt: skip
    quiet_library_bars(rank)  # no \r frames in log files, no bar from ranks above 0
    # One live writer per rank: a second one is refused before any expensive work.
    with StoreLease(cfg.output, rank, world, cfg.lease_seconds, cfg.storage_options) as lease:
        prep = _load_and_prepare(cfg, rank, world)
        # Rank 0 creates (or reopens for resume) the store; the others wait for its attributes.
        if rank == 0:
            write_head = (lambda g: save_head(g, prep.teacher.head)) if _wants_head(cfg) else None
            store = SignalStore.create(
                cfg.output, prep.meta, cfg.storage_options, overwrite=cfg.overwrite, write_head=write_head
            )
        else:
            store = _wait_for_store(cfg, prep.meta, rank)
        meta = store.meta
        mine = assigned_shards(meta.num_shards, rank, world)
        # Only this rank writes its shards, so what a killed run left half-written there is orphaned.
        store.remove_partial_files(mine)
        done = store.committed()
        todo = [i for i in mine if not done[i]]
        skipped = [i for i in mine if done[i]]
        written, tokens_done, loop_seconds = _write_shards(cfg, prep, store, todo, rank, world, lease)
        complete = store.is_complete()
    return PrecomputeResult(
        cfg.output, len(prep.packed), meta.num_shards, written, skipped, complete, time.monotonic() - t0,
        tokens_done, meta=meta.as_dict(), loop_seconds=loop_seconds,
    )  # fmt: skip


def _load_and_prepare(cfg: PrecomputeConfig, rank: int, world: int) -> _Prepared:
    """The teacher, the packed corpus and the store's metadata (with the head check on rank 0)."""
    teacher = _load_checked_teacher(cfg)
    prep = _prepare(cfg, teacher, rank, world)
    if _wants_head(cfg) and rank == 0:
        prep.meta.teacher_head["check"] = _check_head(cfg, prep)
    return prep


def _load_checked_teacher(cfg: PrecomputeConfig) -> Teacher:
    """The teacher, with its MLM head when the store keeps one (refused if the head cannot be stored).

    Settings, the teacher's config and the corpus were checked before (`offline_kd.precompute.checks`)."""
    teacher = load_teacher(
        cfg.teacher,
        cfg.revision,
        local_device(cfg.device),
        cfg.dtype,
        cfg.trust_remote_code,
        head=_wants_head(cfg),
        hub_kernels=cfg.hub_kernels,
    )
    if _wants_head(cfg) and teacher.head is None:
        raise TeacherError(
            f"{teacher.head_error} (precompute with --no-store-head for a top-k store without it)"
        )
    if cfg.compile:  # compiled on the first forward, again for each new batch shape
        teacher.model = torch.compile(teacher.model)
    return teacher


@dataclass
class _Prepared:
    """Everything decided before the first shard: the packed corpus, how it is masked, the meta."""

    teacher: Teacher
    packed: Any  # datasets.Dataset of packed sequences ("input_ids", "length")
    masking: MaskingConfig
    weights: np.ndarray | None  # per-token masking weights (--mask-smoothing), else uniform
    meta: StoreMeta


def _prepare(cfg: PrecomputeConfig, teacher: Teacher, rank: int, world: int) -> _Prepared:
    """The packed corpus (prepared once for every rank: `offline_kd.data.cache`), its masking and meta."""
    corpus = prepare_once(cfg, teacher.tokenizer, teacher.tokenizer_sha256, teacher.vocab_size, rank, world)
    masking = MaskingConfig(mlm_probability=cfg.mlm_probability, smoothing=cfg.mask_smoothing)
    weights = None
    if cfg.mask_smoothing is not None:
        weights = smoothing_weights(corpus.counts, cfg.mask_smoothing)
        weights[teacher.special_ids()] = 0.0
    meta = build_meta(
        cfg, teacher, corpus.stats, len(corpus.packed), corpus.fingerprint, masking, weights_sha256(weights)
    )
    return _Prepared(teacher, corpus.packed, masking, weights, meta)


def _wants_head(cfg: PrecomputeConfig) -> bool:
    """The store keeps the teacher's head: with the hidden states it is the exact KL source."""
    return bool(cfg.hidden and cfg.store_head)


def _check_head(cfg: PrecomputeConfig, prep: _Prepared) -> dict:
    """Figures of the head on the first batch's stored hidden states against the teacher's logits
    (refused beyond the tolerance of :func:`offline_kd.teacher.head.reproduction_check`)."""
    teacher = prep.teacher
    n = min(cfg.batch_size, len(prep.packed))
    rows = prep.packed.with_format("numpy")[0:n]
    ids = np.asarray(rows["input_ids"], dtype=np.int64)
    lengths = np.asarray(rows["length"], dtype=np.int64)
    tok = teacher.tokenizer_info()
    masked, _ = mask_batch(
        ids, lengths, prep.masking, tok["special_ids"], len(teacher.tokenizer), tok["mask_token_id"],
        cfg.seed, range(n), 0, prep.weights,
    )  # fmt: skip
    attn = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return reproduction_check(
        teacher.model, teacher.head.module, torch.from_numpy(masked), torch.from_numpy(attn),
        cfg.hidden_dtype, cfg.top_k or CHECK_TOPK,
    )  # fmt: skip


def _progress_bar(cfg: PrecomputeConfig, total: int, rank: int, world: int) -> Progress:
    """Rank 0's progress over its own shards: a bar on a TTY, else a plain line every 30 s."""
    desc = f"precompute rank 0/{world}" if world > 1 else "precompute"
    return Progress(total, desc=desc, unit="seq", enabled=rank == 0, bar=cfg.progress, every_seconds=30.0)


def writer_threads(cfg: PrecomputeConfig) -> int:
    """``--writer-threads``, else the CPUs this process may use shared among the ranks on its node.

    At most 4 by default: a thread writes a bert-base store at ~0.45M tokens per CPU-second
    (docs/results.md, "Store I/O"), so 4 busy cores outrun a GPU teacher's ~1M tokens/s, and each
    thread holds a shard of signals in memory."""
    if cfg.writer_threads is not None:
        return cfg.writer_threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    ranks_here = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(4, cpus // ranks_here))


class _CommitOrder:
    """Shards commit in the order they were computed (resume trusts the commit record; docs/resume.md).

    Shard ``i`` (its index in this run's list) waits for ``i - 1``'s commit; after a shard fails,
    no later one commits (their arrays are written, and recomputed on resume like any uncommitted
    shard), while earlier ones still do."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._failed_at = math.inf

    def wait_turn(self, i: int) -> bool:
        """Block until shard ``i`` may commit; False when an earlier shard failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._next == i or self._failed_at < i)
            return self._failed_at > i

    def done(self, i: int, committed: bool) -> None:
        with self._cond:
            if committed:
                self._next = i + 1
            else:
                self._failed_at = min(self._failed_at, i)
            self._cond.notify_all()


def _write_shards(
    cfg: PrecomputeConfig,
    prep: _Prepared,
    store: SignalStore,
    todo: list[int],
    rank: int,
    world: int,
    lease: StoreLease,
) -> tuple[list[int], int, float]:
    """Compute and write the shards ``todo``, committed in order.

    Returns the shards written, the real tokens seen and the seconds spent masking, running the
    teacher and writing."""
    meta = store.meta
    tok = prep.teacher.tokenizer_info()
    data = prep.packed.with_format("numpy")
    n_todo = sum(shard_range(meta, i)[1] - shard_range(meta, i)[0] for i in todo)
    bar = _progress_bar(cfg, n_todo * meta.views, rank, world)
    written: list[int] = []
    # Writer threads, each encoding and writing whole shards while the teacher computes the next: up
    # to `threads` shards in flight (one each: whole files per thread, no locks on the data path).
    threads = writer_threads(cfg)
    writer = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kd-store-writer")
    order = _CommitOrder()
    pending: deque[Future] = deque()
    tokens_done = 0
    t_start = time.monotonic()
    try:
        for i, shard in enumerate(todo):
            a, b = shard_range(meta, shard)
            rows = data[a:b]
            ids = np.asarray(rows["input_ids"], dtype=np.int64)
            lengths = np.asarray(rows["length"], dtype=np.int64)
            views = []
            for v in range(meta.views):
                views.append(_run_view(cfg, prep, meta, ids, lengths, a, v, tok))
                tokens_done += int(lengths.sum())
                el = max(time.monotonic() - t_start, 1e-9)
                bar.update(b - a, {"tok/s": f"{tokens_done / el:,.0f}", "shard": str(shard)})
            while len(pending) >= threads:  # bounded memory: the teacher waits for the oldest shard
                written.append(pending.popleft().result())  # re-raises the writer's error
            job = _ShardJob(store, cfg.output, shard, i, ids, lengths, views)
            pending.append(writer.submit(_write_shard, job, lease, order))
        while pending:
            written.append(pending.popleft().result())
    finally:
        writer.shutdown(wait=True)  # shards already computed still finish and commit
        bar.close()
    return written, tokens_done, time.monotonic() - t_start


@dataclass
class _ShardJob:
    """One computed shard handed to a writer thread."""

    store: SignalStore
    output: str
    shard: int
    index: int  # position in this run's list of shards: the commit order
    ids: np.ndarray
    lengths: np.ndarray
    views: list[tuple]


def _write_shard(job: _ShardJob, lease: StoreLease, order: _CommitOrder) -> int:
    """Runs on a writer thread while the teacher computes the next shards; commits last, in order."""
    store, shard = job.store, job.shard
    committed = False
    try:
        lease.ensure_held()
        a = shard_range(store.meta, shard)[0]
        views = [{**out, **signals.result(a)} for out, signals in job.views]  # waits for the copies
        store.write_inputs(shard, job.ids, job.lengths)
        for v, out in enumerate(views):
            store.write_view(shard, v, out)
            if _DELAY:
                time.sleep(_DELAY)  # tests: widen the window for a kill mid-shard
        if not order.wait_turn(job.index):
            return shard  # an earlier shard failed: its error is the one raised
        if _PAUSE:
            _pause_before_commit(job.index)
        lease.ensure_held()  # a writer that lost its rank to another process does not commit
        store.mark_committed(shard)
        committed = True
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"disk full while writing shard {shard} of {job.output!r}; committed shards are "
                f"kept, free space and rerun the same command to resume"
            ) from e
        raise
    finally:
        order.done(job.index, committed)
    return shard


def _run_view(
    cfg: PrecomputeConfig,
    prep: _Prepared,
    meta: StoreMeta,
    ids: np.ndarray,
    lengths: np.ndarray,
    offset: int,
    view: int,
    tok: dict,
) -> tuple[dict[str, np.ndarray], HostSignals]:
    """The per-view arrays of sequences ``offset + [0, n)``: mask them, then run the teacher."""
    teacher = prep.teacher
    n, L = ids.shape
    masked, mlm = mask_batch(
        ids, lengths, prep.masking, tok["special_ids"], len(teacher.tokenizer), tok["mask_token_id"],
        cfg.seed, range(offset, offset + n), view, prep.weights,
    )  # fmt: skip
    signals = HostSignals(meta, n, teacher.device)  # the teacher's arrays (the schema says which)
    attn = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
    for s in range(0, n, cfg.batch_size):
        e = min(s + cfg.batch_size, n)
        sig = teacher_signals(
            teacher.model, torch.from_numpy(masked[s:e]), torch.from_numpy(attn[s:e]),
            meta.top_k, meta.temperatures, meta.hidden, meta.hidden_dtype, offset + s,
        )  # fmt: skip
        signals.put(s, sig, offset)
    return {"masked_input_ids": masked, "mlm_mask": mlm}, signals
