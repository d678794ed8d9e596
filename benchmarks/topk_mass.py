"""How much of the teacher's probability the stored top-k ids hold, at each stored temperature.

Reads a signal store (no teacher needed): mass_k = Σ_{j<k} exp(z_j / T − lse_T), averaged over all
real tokens and over the MLM-masked ones. A store of top-K answers for every k ≤ K.

    python benchmarks/topk_mass.py STORE [--view 0] [--max-sequences 512]
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import markdown_table

from offline_kd.store.signal_store import SignalStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--view", type=int, default=0)
    ap.add_argument("--max-sequences", type=int, default=512)
    args = ap.parse_args()
    store = SignalStore.open(args.store)
    m = store.meta
    n = min(m.num_sequences, args.max_sequences)
    d = store.read(args.view, 0, n, fields=["lengths", "mlm_mask", "topk_logits", "lse"])
    real = np.arange(m.max_length)[None, :] < d["lengths"][:, None]
    masked = d["mlm_mask"] & real
    ks = [k for k in (1, 8, 32, 64, 128, 256) if k <= m.top_k]
    print(f"top-k probability mass ({n} sequences, view {args.view}): all tokens / masked tokens\n")
    rows = []
    for k in ks:
        cells = [str(k)]
        for ti, t in enumerate(m.temperatures):
            p = np.exp(d["topk_logits"][..., :k] / t - d["lse"][..., ti : ti + 1]).sum(-1)
            cells.append(f"{100 * p[real].mean():.0f}% / {100 * p[masked].mean():.0f}%")
        rows.append(cells)
    print(markdown_table(["k"] + [f"T={t:g}" for t in m.temperatures], rows))


if __name__ == "__main__":
    main()
