"""Precompute benchmark: writer overhead vs a bare teacher forward, and store bytes/token vs k and hidden.

    python benchmarks/precompute.py                       # MiniLM-L6-shaped teacher if installed, else tiny
    python benchmarks/precompute.py --teacher tiny        # a tiny BERT (offline_kd.examples.tiny)
    python benchmarks/precompute.py --teacher DIR         # any saved masked-LM directory
    python benchmarks/precompute.py --dtype bfloat16      # a bf16 teacher: extraction vs the bare bf16 forward

The MiniLM-shaped teacher is the pip-shipped all-MiniLM-L6-v2 encoder (bert-base vocabulary,
30,522 logits, 6 layers, hidden 384) loaded into BertForMaskedLM; its MLM head is freshly
initialised, which does not change the cost. Bytes/token for several k come from one teacher pass
at the largest k: the top-k of a sorted top-128 is its first k columns, written to separate stores
exactly as `kd precompute` would write them.

The signal extraction is timed twice against the same bare forward, interleaved batch by batch over
--repeats rounds (medians): `compute_signals` as it is, and the previous formula (an fp32 copy of the
logits, a top-k, one logsumexp(z / T) per temperature). "extraction x bare" is (stage - bare) / bare, in
wall time and in this process's CPU time (the steadier of the two on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import TEACHERS, build_teacher, write_corpus_head


def pick_teacher(kind: str, tmp: Path) -> tuple[str, str]:
    """``auto``: the MiniLM encoder with a random head where it is installed, else the tiny teacher."""
    if kind != "auto":
        return build_teacher(kind, tmp)
    try:
        return build_teacher("minilm-random-head", tmp)
    except Exception as e:  # noqa: BLE001 - any failure to provide it: say so and time the tiny one
        print(f"(MiniLM unavailable: {e}; using the tiny teacher)", file=sys.stderr)
        return build_teacher("tiny", tmp)


@torch.inference_mode()
def previous_signals(model, ids, attn, k, temperatures):
    """The extraction before the fused pass: fp32 copies of the [B, L, V] logits (for comparison)."""
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, return_dict=True)
    logits = out.logits.float()
    real = attn.bool()
    assert bool((torch.isfinite(logits).all(dim=-1) | ~real).all())
    vals, idx = logits.topk(k, dim=-1, largest=True, sorted=True)
    lse = torch.stack([torch.logsumexp(logits if t == 1.0 else logits / t, dim=-1) for t in temperatures], -1)
    m = real.unsqueeze(-1)
    hid = out.hidden_states[-1].float().masked_fill(~m, 0.0).to(torch.float16).numpy()
    vals, idx, lse = vals.masked_fill(~m, 0.0), idx.masked_fill(~m, 0), lse.masked_fill(~m, 0.0)
    return vals.numpy(), idx.numpy(), lse.numpy(), hid


def time_interleaved(stages: dict, batches: list[tuple[int, int]], repeats: int) -> dict:
    """Run each batch through every stage in turn (rotating the order), so that changes in the machine's load
    hit all stages alike; per stage, the medians over rounds of the summed wall and CPU seconds."""
    wall = {name: [0.0] * repeats for name in stages}
    cpu = {name: [0.0] * repeats for name in stages}
    names = list(stages)
    for r in range(repeats):
        for i, (s, e) in enumerate(batches):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                w, c = time.perf_counter(), time.process_time()
                stages[name](s, e)
                wall[name][r] += time.perf_counter() - w
                cpu[name][r] += time.process_time() - c
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--teacher", default="auto", help=f"auto | {' | '.join(TEACHERS)} | a masked-LM directory"
    )
    ap.add_argument("--corpus", default=None, help="one document a line (default: the embedded sample)")
    ap.add_argument("--documents", type=int, default=100, help="first N documents of the corpus")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--ks", default="8,32,64,128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="teacher dtype")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the timed stages (median)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offline_kd.precompute.run import PrecomputeConfig, precompute
    from offline_kd.store.signal_store import SignalStore, StoreMeta, estimate_bytes_per_token
    from offline_kd.teacher.model import compute_signals, load_teacher

    ks = [int(k) for k in args.ks.split(",")]
    kmax = max(ks + [args.top_k])
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        teacher_dir, teacher_desc = pick_teacher(args.teacher, tmp)
        corpus = write_corpus_head(tmp / "corpus.txt", args.documents, args.corpus)

        common = dict(
            teacher=teacher_dir, corpus=[str(corpus)], max_length=args.max_length, temperatures=[1.0, 2.0],
            views=1, seed=0, batch_size=args.batch_size, shard_size=32, device="cpu", dtype=args.dtype,
            progress=False,
        )  # fmt: skip
        # 1) a precompute at --top-k with hidden states (gives the masked inputs; warms up)
        res = precompute(
            PrecomputeConfig(output=str(tmp / "run.zarr"), top_k=args.top_k, hidden=True, **common)
        )
        store = SignalStore.open(str(tmp / "run.zarr"))
        S, L = store.meta.num_sequences, store.meta.max_length
        data = store.read(0, 0, S, fields=["masked_input_ids", "lengths"])
        tokens = int(data["lengths"].sum())
        attn = torch.from_numpy((np.arange(L)[None] < data["lengths"][:, None]).astype(np.int64))
        ids = torch.from_numpy(data["masked_input_ids"].astype(np.int64))

        t = load_teacher(teacher_dir, device="cpu", dtype=args.dtype)

        # 2) a bare forward on the same batches; 3) forward + top-k/lse/hidden extraction, now and before
        def bare(s: int, e: int) -> None:
            with torch.inference_mode():
                t.model(input_ids=ids[s:e], attention_mask=attn[s:e])

        def signals(s: int, e: int):
            return compute_signals(t.model, ids[s:e], attn[s:e], kmax, [1.0, 2.0], hidden=True)

        def previous(s: int, e: int):
            return previous_signals(t.model, ids[s:e], attn[s:e], kmax, [1.0, 2.0])

        stages = {
            "bare forward": bare,
            f"forward + signals (k={kmax})": signals,
            f"  previous fp32 extraction (k={kmax})": previous,
        }
        batches = [(s, min(s + args.batch_size, S)) for s in range(0, S, args.batch_size)]
        timings = time_interleaved(stages, batches, args.repeats)
        # the timed precompute runs after the others (the first run above doubled as warm-up)
        cpu = time.process_time()
        res = precompute(
            PrecomputeConfig(output=str(tmp / "run2.zarr"), top_k=args.top_k, hidden=True, **common)
        )
        timings[f"kd precompute (k={args.top_k}, hidden)"] = (res.loop_seconds, time.process_time() - cpu)
        sig = {"topk_ids": [], "topk_logits": [], "lse": [], "hidden": []}
        for s, e in batches:
            out = signals(s, e)
            for k in sig:
                sig[k].append(getattr(out, k))

        print(
            f"\nteacher: {teacher_desc}, {args.dtype}; {S} sequences x {L} ({tokens:,} real tokens), "
            f"batch {args.batch_size}, CPU; medians of {args.repeats} round(s), stages interleaved per batch"
        )
        print(f"torch threads: {torch.get_num_threads()}\n")
        (base, base_cpu) = timings["bare forward"]
        print(
            f"{'stage':<40}{'seconds':>9}{'tokens/s':>10}{'x bare':>8}{'extraction x bare':>19}{'(CPU time)':>12}"
        )
        for name, (sec, cpu) in timings.items():
            extra = f"{(sec - base) / base:>19.2f}{(cpu - base_cpu) / base_cpu:>12.2f}" if sec != base else ""
            print(f"{name:<40}{sec:>9.2f}{tokens / sec:>10,.0f}{sec / base:>8.2f}{extra}")
        print(
            "(kd precompute: the loop's seconds with masking and store writes; its CPU time includes setup)"
        )

        # 4) bytes/token for several k, with and without hidden, from the pass at kmax
        full = store.read(0, 0, S)
        sig = {k: np.concatenate(v) for k, v in sig.items()}
        base_meta = store.meta.as_dict()
        print(f"\n{'k':>5}{'hidden':>8}{'bytes/token':>13}{'uncompressed':>14}{'GB per 1B tokens':>18}")
        for k in ks:
            for hidden in (False, True):
                m = dict(base_meta, top_k=k, hidden=hidden)
                url = str(tmp / f"k{k}-h{int(hidden)}.zarr")
                st = SignalStore.create(url, StoreMeta.from_dict(m), overwrite=True)
                for shard in range(st.meta.num_shards):
                    a = shard * st.meta.shard_sequences
                    b = min(a + st.meta.shard_sequences, S)
                    st.write_inputs(shard, full["input_ids"][a:b], full["lengths"][a:b])
                    d = {
                        "masked_input_ids": full["masked_input_ids"][a:b],
                        "mlm_mask": full["mlm_mask"][a:b],
                        "topk_ids": sig["topk_ids"][a:b, :, :k],
                        "topk_logits": sig["topk_logits"][a:b, :, :k],
                        "lse": sig["lse"][a:b],
                        "hidden": sig["hidden"][a:b],
                    }
                    st.write_view(shard, 0, d)
                    st.mark_committed(shard)
                bpt = st.nbytes_stored() / tokens
                raw = estimate_bytes_per_token(
                    k, 1, 2, store.meta.hidden_size if hidden else None, t.vocab_size
                )
                print(f"{k:>5}{'yes' if hidden else 'no':>8}{bpt:>13,.0f}{raw:>14,}{bpt:>18,.0f}")
        print(
            "(bytes/token: all arrays on disk / real tokens, one view; uncompressed = the dry-run estimate)"
        )


if __name__ == "__main__":
    main()
