"""Store layouts: bytes per token, and what each does to the teacher distribution a student trains on.

    python benchmarks/store_layouts.py                    # MiniLM teacher with an MLM head fitted here
    python benchmarks/store_layouts.py --teacher DIR      # any saved masked-LM directory
    python benchmarks/store_layouts.py --teacher bert-base-random   # bert-base shape, random weights

One `kd precompute` per layout over the same corpus (one view, zstd level 1):

    top-k              --top-k 64 --no-hidden              the top-k KL source only
    top-k + hidden     --top-k 64 (fp16 hidden + head)     both KL sources, and the cosine loss
                       (also with bf16 / fp8 hidden states)
    hidden             --top-k 0                           exact KL source (and cosine) only
    hidden bf16 / fp8  --top-k 0 --hidden-dtype ...        the same, hidden states in 2 / 1 bytes

For each store: bytes per real token on disk (signal arrays; the teacher head is a fixed cost,
listed apart) and uncompressed, then the distribution the store gives back on `--sample`
sequences, against the teacher's own full-vocabulary logits from a rerun on the stored masked
inputs: mean KL(teacher ‖ recovered) at T = 1 and 2 and top-1 agreement. Stores with both top-k
and hidden states also get `kd verify --exact`'s figures (recovered vs stored top-k and lse), the
margin behind its tolerance. A hidden layout recovers
`head(stored hidden)`; a top-k layout recovers the top-k probabilities with the stored tail mass
spread uniformly over the other ids (the full distribution closest to what it keeps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import TEACHERS, build_teacher, write_corpus_head

LAYOUTS = (
    ("top-k", dict(top_k=64, hidden=False)),
    ("top-k + hidden", dict(top_k=64, hidden=True)),
    ("top-k + hidden bf16", dict(top_k=64, hidden=True, hidden_dtype="bfloat16")),
    ("top-k + hidden fp8", dict(top_k=64, hidden=True, hidden_dtype="float8_e4m3fn")),
    ("hidden", dict(top_k=0, hidden=True)),
    ("hidden bf16", dict(top_k=0, hidden=True, hidden_dtype="bfloat16")),
    ("hidden fp8", dict(top_k=0, hidden=True, hidden_dtype="float8_e4m3fn")),
)


@torch.no_grad()
def recovered_vs_teacher(store, teacher, head, sample: int) -> dict:
    """Mean KL(teacher ‖ recovered) at T = 1, 2 and top-1 agreement over the first `sample` sequences."""
    from offline_kd.store.hidden_dtype import decode

    m = store.meta
    kl = {1.0: 0.0, 2.0: 0.0}
    top1 = positions = 0
    for i in range(min(sample, m.num_sequences)):
        d = store.read(0, i, i + 1)
        n = int(d["lengths"][0])
        ids = torch.from_numpy(d["masked_input_ids"][:, :n].astype(np.int64))
        z = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
        if head is not None:
            rec = head(decode(d["hidden"][0, :n], m.hidden_dtype).float()).double()
            logq = {T: (rec / T).log_softmax(-1) for T in kl}
            arg = rec.argmax(-1)
        else:
            logq = {T: _topk_uniform_tail(d, n, T, m, z.shape[-1]) for T in kl}
            arg = torch.from_numpy(d["topk_ids"][0, :n, 0].astype(np.int64))
        for T in kl:
            logp = (z / T).log_softmax(-1)
            kl[T] += float((logp.exp() * (logp - logq[T])).sum())
        top1 += int((z.argmax(-1) == arg).sum())
        positions += n
    return {"kl1": kl[1.0] / positions, "kl2": kl[2.0] / positions, "top1": top1 / positions}


def _topk_uniform_tail(d: dict, n: int, T: float, m, V: int) -> torch.Tensor:
    """log q [n, V]: the stored top-k probabilities at T, the stored tail mass spread over the rest."""
    t = m.temperatures.index(T)
    ids = torch.from_numpy(d["topk_ids"][0, :n].astype(np.int64))
    logp_k = (
        torch.from_numpy(d["topk_logits"][0, :n]).double() / T
        - torch.from_numpy(d["lse"][0, :n, t]).double()[:, None]
    )
    tail = (1 - logp_k.exp().sum(-1)).clamp_min(1e-30)
    logq = (tail / (V - ids.shape[1])).log()[:, None].expand(n, V).clone()
    logq.scatter_(1, ids, logp_k)
    return logq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--teacher", default="minilm-fitted", help=f"{' | '.join(TEACHERS)} | a masked-LM directory"
    )
    ap.add_argument("--corpus", default=None, help="one document a line (default: the embedded sample)")
    ap.add_argument("--documents", type=int, default=100, help="first N documents of the corpus")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="teacher compute dtype (float32, bfloat16)")
    ap.add_argument("--sample", type=int, default=24, help="sequences compared with the teacher's own logits")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--layouts", default="all", help="comma-separated layout names (default: all)")
    args = ap.parse_args()
    wanted = [name for name, _ in LAYOUTS] if args.layouts == "all" else args.layouts.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    from offline_kd.precompute.run import PrecomputeConfig, precompute
    from offline_kd.precompute.verify import inspect_store, verify_store
    from offline_kd.runtime.settings import VerifyConfig
    from offline_kd.store.signal_store import SignalStore, estimate_bytes_per_token
    from offline_kd.teacher.head import load_head
    from offline_kd.teacher.model import load_teacher

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        corpus = write_corpus_head(tmp / "corpus.txt", args.documents, args.corpus)
        teacher_dir, desc = build_teacher(args.teacher, tmp, args.corpus)
        teacher = load_teacher(teacher_dir, device="cpu", dtype=args.dtype).model
        rows = []
        for name, layout in (layout for layout in LAYOUTS if layout[0] in wanted):
            t0 = time.monotonic()
            out = tmp / f"{len(rows)}.zarr"
            cfg = PrecomputeConfig(
                teacher=teacher_dir, corpus=[str(corpus)], output=str(out), max_length=args.max_length,
                views=1, batch_size=16, device="cpu", dtype=args.dtype, progress=False, **layout,
            )  # fmt: skip
            precompute(cfg)
            info = inspect_store(str(out))
            store = SignalStore.open(str(out))
            m = store.meta
            head = load_head(store) if m.has_head else None
            fid = recovered_vs_teacher(store, teacher, head, args.sample)
            raw = estimate_bytes_per_token(
                m.top_k,
                1,
                len(m.temperatures),
                m.hidden_size if m.hidden else None,
                m.vocab_size,
                m.hidden_dtype,
            )
            exact = None
            if m.has_head and m.top_k > 0:
                exact = verify_store(str(out), VerifyConfig(sample=args.sample, exact=True)).exact
            rows.append((name, info, raw, fid, m.teacher_head.get("check"), exact))
            print(f"  {name}: {time.monotonic() - t0:.0f}s", file=sys.stderr)

    tokens = rows[0][1]["tokens"]
    print(f"\nteacher: {desc}, {args.dtype}; {tokens:,} real tokens ({args.documents} documents × "
          f"{args.max_length}); fidelity on {args.sample} sequences\n")  # fmt: skip
    print("| layout | bytes/token | uncompressed | GB per 1B tokens | head MB | KL T=1 | KL T=2 | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, info, raw, fid, _check, _exact in rows:
        bpt = info["bytes_per_token"]
        print(
            f"| {name} | {bpt:,.0f} | {raw:,} | {bpt:,.0f} | {info['head_bytes'] / 1e6:.1f} | "
            f"{fid['kl1']:.2e} | {fid['kl2']:.2e} | {fid['top1']:.4f} |"
        )
    print("\nprecompute's head check (first batch, teacher's own logits vs head(stored hidden)):")
    for name, _info, _raw, _fid, check, _exact in rows:
        if check:
            print(
                f"  {name}: max |dz| {check['max_abs_logit_diff']:.3g}, top-1 {check['top1_agreement']:.4f}, "
                f"top-{check['k']} {check['topk_agreement']:.4f}, KL(T=1) {check['kl_t1_mean']:.2e}"
            )
    print(
        "\nkd verify --exact (recovered vs stored top-k and lse; tolerance: KL 0.01, logit error 0.1·scale):"
    )
    for name, _info, _raw, _fid, _check, exact in rows:
        if exact:
            kl = ", ".join(f"T={float(T):g} {v:.2e}" for T, v in exact["mean_kl"].items())
            print(
                f"  {name}: top-1 {exact['top1_agreement']:.4f}, top-k {exact['topk_agreement']:.4f}, "
                f"max logit error {exact['max_logit_error']:.3g}, max lse error {exact['max_lse_error']:.3g}, "
                f"worst relative error {exact['worst_relative_error']:.3g}, mean KL {kl}, "
                f"worst sequence KL {exact['worst_sequence_kl']:.2e}"
            )


if __name__ == "__main__":
    main()
