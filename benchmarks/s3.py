"""Object store against local disk: precompute and training tokens/s side by side, in one run.

The object store is moto's S3 server on 127.0.0.1, started here (the S3 protocol over HTTP,
reached through s3fs exactly as a real bucket would be). It keeps objects in memory and is
written in Python, so a request costs more than on a real object store while the network is
loopback: the S3 column shows the cost of the protocol path (fsspec, s3fs, HTTP, one object per
shard and array), not a real network's bandwidth or latency.

Rows, each run for the local disk and for S3 with the same settings, interleaved, median of
``--repeats``:

- precompute: the shard loop (masking, teacher forward, writing and committing shards) in real
  tokens/s, and the whole call (opening the store, corpus preparation included);
- training: one-process DeepSpeed steps (`offline_kd.train.loop.train`, CPU config) in real tokens/s,
  median over the steps after the first, and the share of step time spent waiting for the reader;
- reader: the training reader alone (decompress, shuffle, collate) in real tokens/s.

    python benchmarks/s3.py [--teacher auto|tiny|minilm-random-head|DIR] [--documents 200] [--max-length 128]
                            [--steps 8] [--repeats 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from precompute import pick_teacher  # noqa: E402  (the same teachers as the precompute benchmark)
from test_s3 import moto_s3_server  # noqa: E402

BUCKET = "kd-bench"


def precompute_once(common: dict, url: str, storage_options: dict | None) -> tuple[float, float]:
    """(shard-loop tokens/s, whole-call tokens/s) of one precompute to ``url``."""
    from offline_kd.precompute.run import PrecomputeConfig, precompute

    t0 = time.perf_counter()
    res = precompute(PrecomputeConfig(output=url, storage_options=storage_options, **common))
    wall = time.perf_counter() - t0
    assert res.complete, url
    return res.tokens / res.loop_seconds, res.tokens / wall


def train_once(
    url: str, storage_options: dict | None, out: Path, steps: int, ds: dict
) -> tuple[float, float]:
    """Median real tokens/s of the optimizer steps after the first, and the share of their time
    spent waiting for the reader."""
    from offline_kd.runtime.options import from_fields
    from offline_kd.runtime.settings import TrainConfig
    from offline_kd.train.loop import train
    from offline_kd.train.metrics import read_csv

    cfg = from_fields(
        TrainConfig, store=url, student="distil", output=str(out), deepspeed_config=ds, max_steps=steps,
        schedule_steps=steps, epochs=100, progress=False, tensorboard=False, storage_options=storage_options,
    )  # fmt: skip
    train(cfg)
    rows = read_csv(out / "logs" / "metrics.csv")[1:]
    wait = sum(float(r["reader_wait_s"]) for r in rows) / sum(float(r["step_time_s"]) for r in rows)
    return statistics.median(float(r["tokens_per_s"]) for r in rows), wait


def reader_once(url: str, storage_options: dict | None, micro_batch: int) -> float:
    """Real tokens/s of one epoch of the training reader (one process, no workers)."""
    from offline_kd.train.reader import ReaderConfig, StoreReader

    reader = StoreReader(
        ReaderConfig(url=url, micro_batch_size=micro_batch, temperature=2.0, storage_options=storage_options)
    )
    t0, tokens = time.perf_counter(), 0
    for batch in reader.epoch_batches(0):
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--teacher", default="auto", help="auto | tiny | minilm-random-head | a masked-LM directory"
    )
    ap.add_argument("--corpus", default=str(ROOT / "offline_kd" / "data" / "sample_corpus.txt"))
    ap.add_argument("--documents", type=int, default=200, help="first N documents of the corpus")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="training steps per run")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        teacher_dir, teacher_desc = pick_teacher(args.teacher, tmp)
        corpus = tmp / "corpus.txt"
        lines = Path(args.corpus).read_text(encoding="utf-8").splitlines()[: args.documents]
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        common = dict(
            teacher=teacher_dir, corpus=[str(corpus)], max_length=args.max_length, top_k=64,
            temperatures=[1.0, 2.0], views=1, hidden=True, seed=0, batch_size=args.batch_size,
            shard_size=args.shard_size, device="cpu", dtype="float32", progress=False,
        )  # fmt: skip
        ds = json.loads((ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json").read_text())
        ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=1)
        with moto_s3_server(tmp / "moto.log", BUCKET) as endpoint:
            s3 = {"endpoint_url": endpoint}
            backends = {
                "local disk": (lambda name: str(tmp / name), None),
                "S3 (moto, localhost)": (lambda name: f"s3://{BUCKET}/{name}", s3),
            }
            # First-call costs (caches, DeepSpeed's ops, the process group) are paid here, untimed.
            precompute_once(common, str(tmp / "warmup.zarr"), None)
            train_once(str(tmp / "warmup.zarr"), None, tmp / "train-warmup", 2, ds)
            results: dict[str, dict[str, list[float]]] = {b: {} for b in backends}
            for r in range(args.repeats):
                for backend, (where, opts) in backends.items():
                    loop, whole = precompute_once(common, where(f"store{r}.zarr"), opts)
                    res = results[backend]
                    res.setdefault("precompute: shard loop", []).append(loop)
                    res.setdefault("precompute: whole call", []).append(whole)
                    out = tmp / f"train-{r}-{backend.split()[0]}"
                    tok_s, wait = train_once(where(f"store{r}.zarr"), opts, out, args.steps, ds)
                    res.setdefault("training steps (1 rank)", []).append(tok_s)
                    res.setdefault("  share waiting for reader", []).append(wait)
                    res.setdefault("store reader alone", []).append(
                        reader_once(where(f"store{r}.zarr"), opts, args.micro_batch)
                    )
        from offline_kd.store.signal_store import SignalStore

        meta = SignalStore.open(str(tmp / "store0.zarr")).meta
    print(
        f"\nteacher: {teacher_desc}; {meta.num_sequences} sequences x {meta.max_length}, top-{meta.top_k}, "
        f"hidden states, {meta.num_shards} shards of {meta.shard_sequences}; CPU, torch threads "
        f"{torch.get_num_threads()}; student distil, micro-batch {args.micro_batch}; "
        f"median of {args.repeats} (interleaved)\n"
    )
    local, remote = results.values()
    names = list(backends)
    print(f"{'stage (real tokens/s)':<28}{names[0]:>14}{names[1]:>22}{'S3 / local':>12}")
    for stage in local:
        a, b = statistics.median(local[stage]), statistics.median(remote[stage])
        if "share" in stage:
            print(f"{stage:<28}{a:>14.1%}{b:>22.1%}")
        else:
            print(f"{stage:<28}{a:>14,.0f}{b:>22,.0f}{b / a:>12.2f}")


if __name__ == "__main__":
    main()
