"""Precompute benchmark: writer overhead vs a bare teacher forward, and store bytes/token vs k and hidden.

    python benchmarks/precompute.py                       # MiniLM-L6-shaped teacher if installed, else tiny
    python benchmarks/precompute.py --teacher tiny        # a tiny BERT (offline_kd.tiny)
    python benchmarks/precompute.py --teacher DIR         # any saved masked-LM directory

The MiniLM-shaped teacher is the pip-shipped all-MiniLM-L6-v2 encoder (bert-base vocabulary,
30,522 logits, 6 layers, hidden 384) loaded into BertForMaskedLM; its MLM head is freshly
initialised, which does not change the cost. Bytes/token for several k come from one teacher pass
at the largest k: the top-k of a sorted top-128 is its first k columns, written to separate stores
exactly as `kd precompute` would write them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import minilm_teacher, tiny_teacher, write_corpus_head


def build_teacher(kind: str, tmp: Path) -> tuple[str, str]:
    if kind not in ("auto", "tiny", "minilm"):
        return kind, kind
    if kind in ("auto", "minilm"):
        try:
            return str(minilm_teacher(tmp / "minilm-mlm")), "MiniLM-L6-H384 (vocab 30,522) + MLM head"
        except Exception as e:  # noqa: BLE001
            if kind == "minilm":
                raise
            print(f"(MiniLM unavailable: {e}; using the tiny teacher)", file=sys.stderr)
    return str(tiny_teacher(tmp / "tiny", hidden=64, layers=4)), "tiny BERT (hidden 64, 4 layers)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="auto", help="auto | tiny | minilm | a masked-LM directory")
    ap.add_argument("--corpus", default=None, help="one document a line (default: the embedded sample)")
    ap.add_argument("--documents", type=int, default=100, help="first N documents of the corpus")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--ks", default="8,32,64,128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offline_kd.precompute import PrecomputeConfig, precompute
    from offline_kd.store import SignalStore, StoreMeta, estimate_bytes_per_token
    from offline_kd.teacher import compute_signals, load_teacher

    ks = [int(k) for k in args.ks.split(",")]
    kmax = max(ks + [args.top_k])
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        teacher_dir, teacher_desc = build_teacher(args.teacher, tmp)
        corpus = write_corpus_head(tmp / "corpus.txt", args.documents, args.corpus)

        common = dict(
            teacher=teacher_dir, corpus=[str(corpus)], max_length=args.max_length, temperatures=[1.0, 2.0],
            views=1, seed=0, batch_size=args.batch_size, shard_size=32, device="cpu", dtype="float32",
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

        t = load_teacher(teacher_dir, device="cpu", dtype="float32")
        # 2) a bare forward on the same batches; 3) forward + top-k/lse/hidden extraction
        timings = {}
        sig = {"topk_ids": [], "topk_logits": [], "lse": [], "hidden": []}
        for name in ("bare forward", f"forward + signals (k={kmax})"):
            start = time.perf_counter()
            for s in range(0, S, args.batch_size):
                e = min(s + args.batch_size, S)
                if name == "bare forward":
                    with torch.inference_mode():
                        t.model(input_ids=ids[s:e], attention_mask=attn[s:e])
                else:
                    out = compute_signals(t.model, ids[s:e], attn[s:e], kmax, [1.0, 2.0], hidden=True)
                    for k in sig:
                        sig[k].append(getattr(out, k))
            timings[name] = time.perf_counter() - start
        # the timed precompute runs after the others (the first run above doubled as warm-up)
        res = precompute(
            PrecomputeConfig(output=str(tmp / "run2.zarr"), top_k=args.top_k, hidden=True, **common)
        )
        timings[f"kd precompute (k={args.top_k}, hidden)"] = res.loop_seconds

        print(
            f"\nteacher: {teacher_desc}; {S} sequences x {L} ({tokens:,} real tokens), batch {args.batch_size}, CPU"
        )
        print(f"torch threads: {torch.get_num_threads()}\n")
        base = timings["bare forward"]
        print(f"{'stage':<36}{'seconds':>9}{'tokens/s':>12}{'x bare':>9}")
        for name, sec in timings.items():
            print(f"{name:<36}{sec:>9.2f}{tokens / sec:>12,.0f}{sec / base:>9.2f}")

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
