"""Store I/O: write and read tokens per CPU-second at the bert-base shape, per codec choice.

    python benchmarks/store_io.py                       # 262,144 tokens, 1 and 2 writer threads / workers
    python benchmarks/store_io.py --dir /dev/shm --repeats 5

The store has the bert-base shape of a default `kd precompute`: L = 512, k = 64, temperatures 1 and 2,
float16 hidden states with H = 768, one view, chunks of 16 sequences. The signals are synthetic
(random ids, sorted normal logits, normal hidden states), so their compressibility is about that
of a real fp32 teacher pass (docs/results.md, "Store I/O"). `--teacher-dtype bfloat16` rounds the
logits and hidden states to bf16 values first, as a bf16 teacher pass gives them: their low bits
are zero, and zstd gets more out of them.

Write: the store is created through `SignalStore.create` and every shard goes through precompute's
own writer (`offline_kd.precompute.run._write_shard`: whole shards on `--writer-threads` threads,
committed in order), so what is timed is what `kd precompute` does after the teacher. `writer
zarr` is the write before this change (zarr's generic `array[...] = ...`), for comparison.
Read: `offline_kd.train.reader.StoreReader` batches (top-k, lse at T = 2, hidden states, masks) with 0, 1
or 2 DataLoader workers; a worker's CPU is counted from its own process clock, from the start of
its first group to the end of its last (reading, collating and handing batches over through shared
memory), so the one-off start of a worker (importing torch) is left out and reported apart; the
training process's CPU (receiving the batches) is counted too.

Tokens per CPU-second is tokens divided by the CPU seconds of every thread and process doing the
work (user + system): unlike wall-clock throughput it does not depend on what else runs on the
machine. CPU/wall says how many cores the work kept busy. Each figure is the median of --repeats. The
system part of a write (the kernel copying files into the page cache, and writing them back) varies
most from run to run on a shared disk, hence also tokens per user-CPU-second; `--dir /dev/shm`
takes the disk out.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from offline_kd.precompute.run import _CommitOrder, _ShardJob, _write_shard
from offline_kd.store.signal_store import (
    SCHEMA,
    SignalStore,
    StoreMeta,
    default_compression,
    dtypes_for,
    num_shards_for,
    shard_range,
)
from offline_kd.train.reader import ReaderConfig, StoreBatches, StoreReader

L, K, H, VOCAB = 512, 64, 768, 30522
CODEC_CHOICES = {
    "zstd-1 everywhere (before)": {"codec": "zstd", "level": 1, "checksum": "crc32c"},
    "schema (hidden none, rest zstd-1)": default_compression(),
    "none (crc32c only)": dict(default_compression(), arrays={s.name: "none" for s in SCHEMA}),
}


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def user_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def make_meta(sequences: int, shard: int, chunk: int, compression: dict) -> StoreMeta:
    return StoreMeta(
        num_sequences=sequences, max_length=L, top_k=K, views=1, temperatures=[1.0, 2.0], hidden=True,
        hidden_size=H, vocab_size=VOCAB, tokenizer_sha256="synthetic", pad_token_id=0, teacher={},
        tokenizer={}, masking={}, seed=0, corpus={}, shard_sequences=shard, chunk_sequences=chunk,
        num_shards=num_shards_for(sequences, shard), dtypes=dtypes_for(VOCAB), compression=dict(compression),
    )  # fmt: skip


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded (toward zero) to bfloat16 ones, still float32."""
    return (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def synthetic_shard(rng: np.random.Generator, n: int, bf16_pass: bool) -> tuple:
    """(input_ids, lengths, masking arrays, teacher arrays) of `n` full-length sequences."""
    ids = rng.integers(1000, VOCAB, (n, L)).astype(np.int64)
    mask = rng.random((n, L)) < 0.15
    logits = -np.sort(-rng.normal(8, 3, (n, L, K)).astype(np.float32), axis=-1)
    hidden = rng.normal(0, 1, (n, L, H)).astype(np.float32)
    if bf16_pass:  # a bf16 teacher's numbers: exact in float32 (16 zero bits) and float16 (3 zero bits)
        logits, hidden = _bf16(logits), _bf16(hidden)
    masking = {"masked_input_ids": np.where(mask, 103, ids), "mlm_mask": mask}
    teacher = {
        "topk_ids": rng.integers(0, VOCAB, (n, L, K)).astype(np.uint16),
        "topk_logits": logits,
        "lse": rng.normal(12, 1, (n, L, 2)).astype(np.float32),
        "hidden": hidden.astype(np.float16),
    }
    return ids, np.full(n, L, dtype=np.int64), masking, teacher


class _Computed:
    """Stands in for the teacher's HostSignals: the arrays are ready."""

    def __init__(self, arrays: dict) -> None:
        self.arrays = arrays

    def result(self, seq_offset: int) -> dict:
        return self.arrays


class _NoLease:
    def ensure_held(self) -> None:
        pass


def write_store(url: str, meta: StoreMeta, shards: list, threads: int, zarr_writer: bool) -> dict:
    """Write every shard through precompute's writer; CPU and wall seconds of the writes alone."""
    store = SignalStore.create(url, meta)
    if zarr_writer:  # no shard encoder: every array through zarr's own write
        store._codecs.update(dict.fromkeys(store.fields))
    order, lease = _CommitOrder(), _NoLease()
    c0, u0, w0 = cpu_seconds(), user_seconds(), time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [
            pool.submit(_write_shard, _ShardJob(store, url, i, i, ids, lengths, [(m, _Computed(t))]), lease, order)
            for i, (ids, lengths, m, t) in enumerate(shards)
        ]  # fmt: skip
        for f in futures:
            f.result()
    cpu, user, wall = cpu_seconds() - c0, user_seconds() - u0, time.monotonic() - w0
    assert store.is_complete()
    return {"cpu": cpu, "user": user, "wall": wall, "bytes": store.nbytes_stored()}


class _TimedBatches(StoreBatches):
    """Reader groups that carry their process's id and CPU clock (every thread) before and after reading
    them: from a worker's first group to its last, its CPU includes handing the batches over
    (pickling into shared memory, on the queue's thread) but not its start."""

    def load_group(self, g0: int, g1: int) -> list[dict[str, torch.Tensor]]:
        c0 = time.process_time()
        out = super().load_group(g0, g1)
        clock = [os.getpid(), c0, time.process_time()]
        out[0]["_cpu"] = torch.tensor(clock, dtype=torch.float64)
        return out


class _TimedReader(StoreReader):
    batches_type = _TimedBatches


def read_store(url: str, workers: int, micro_batch: int) -> dict:
    """One epoch of training batches; CPU of the reading (in the workers, when there are some)."""
    cfg = ReaderConfig(url=url, micro_batch_size=micro_batch, num_workers=workers, temperature=2.0)
    reader = _TimedReader(cfg)
    tokens, clocks = 0, {}
    c0, k0, w0 = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN), time.monotonic()
    for batch in reader.epoch_batches(0):
        if "_cpu" in batch:
            pid, start, end = batch.pop("_cpu").tolist()
            first, _ = clocks.get(pid, (start, end))
            clocks[pid] = (min(first, start), end)
        tokens += int(batch["attention_mask"].sum())
    main_cpu, wall = cpu_seconds() - c0, time.monotonic() - w0
    children = cpu_seconds(resource.RUSAGE_CHILDREN) - k0
    worker_cpu = sum(end - start for start, end in clocks.values())
    cpu = main_cpu if workers == 0 else main_cpu + worker_cpu
    return {"cpu": cpu, "wall": wall, "tokens": tokens, "start": max(0.0, children - worker_cpu)}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sequences", type=int, default=512, help="sequences of 512 tokens (default 262,144 tokens)"
    )
    ap.add_argument(
        "--shard-size", type=int, default=128, help="sequences a shard (4 shards: work for 2 threads)"
    )
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--threads", default="1,2", help="writer threads and reader workers to measure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument(
        "--teacher-dtype", choices=("float32", "bfloat16"), default="float32", help="of the synthetic pass"
    )
    ap.add_argument("--dir", default=None, help="where the stores go (default: the temp directory)")
    ap.add_argument("--skip-zarr-writer", action="store_true", help="leave out the zarr writer rows")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    shards, a = [], 0
    meta0 = make_meta(args.sequences, args.shard_size, args.chunk_size, default_compression())
    for i in range(meta0.num_shards):
        a, b = shard_range(meta0, i)
        shards.append(synthetic_shard(rng, b - a, args.teacher_dtype == "bfloat16"))
    tokens = args.sequences * L
    write_rows, read_rows = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, compression in CODEC_CHOICES.items():
            meta = make_meta(args.sequences, args.shard_size, args.chunk_size, compression)
            writers = ("encoder",) if args.skip_zarr_writer else ("zarr", "encoder")
            for writer in writers:
                for t in threads:
                    runs = []
                    for r in range(args.repeats):
                        url = str(Path(tmp) / f"w{r}.zarr")
                        runs.append(write_store(url, meta, shards, t, writer == "zarr"))
                        if r < args.repeats - 1:
                            shutil.rmtree(url)
                    write_rows.append((name, writer, t, runs))
                    print(f"  write {name} / {writer} / {t}: {tokens / median_of(runs, 'cpu'):,.0f} tok/CPU-s",
                          flush=True)  # fmt: skip
            url = str(Path(tmp) / f"w{args.repeats - 1}.zarr")  # the encoder's store of this codec choice
            for w in [0, *threads]:
                runs = [read_store(url, w, args.micro_batch) for _ in range(args.repeats)]
                read_rows.append((name, w, runs))
                print(f"  read {name} / {w} workers: {runs[0]['tokens'] / median_of(runs, 'cpu'):,.0f} tok/CPU-s",
                      flush=True)  # fmt: skip
            shutil.rmtree(url)
    print_tables(args, tokens, write_rows, read_rows)


def print_tables(args, tokens: int, write_rows: list, read_rows: list) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\n{tokens:,} tokens (L = {L}, k = {K}, H = {H} float16, synthetic {args.teacher_dtype} pass), shards of "
        f"{args.shard_size} sequences, chunks of {args.chunk_size}; median of {args.repeats}; {cpus} CPUs\n"
    )
    print(
        "| codecs | writer | threads | write tok/CPU-s | tok/user-CPU-s | write tok/s (wall) | CPU/wall | "
        "bytes/token |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, writer, t, runs in write_rows:
        cpu, user, wall = median_of(runs, "cpu"), median_of(runs, "user"), median_of(runs, "wall")
        print(
            f"| {name} | {writer} | {t} | {tokens / cpu:,.0f} | {tokens / user:,.0f} | {tokens / wall:,.0f} | "
            f"{cpu / wall:.2f} | {median_of(runs, 'bytes') / tokens:,.0f} |"
        )
    print("\n| codecs | reader workers | read tok/CPU-s | read tok/s (wall) | worker start, CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for name, w, runs in read_rows:
        n = runs[0]["tokens"]
        print(
            f"| {name} | {w} | {n / median_of(runs, 'cpu'):,.0f} | {n / median_of(runs, 'wall'):,.0f} | "
            f"{median_of(runs, 'start'):.1f} |"
        )


if __name__ == "__main__":
    main()
