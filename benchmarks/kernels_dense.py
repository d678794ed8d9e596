"""Benchmark the dense-teacher KL + MLM CE and exact mode against eager dense PyTorch, in one process.

Every variant runs once for its peak extra memory, then all are timed interleaved (round-robin, median of
--repeats forward + backward passes). Peak extra memory: CUDA, max_memory_allocated above the allocation
before the call; CPU, the RSS high-water mark (reset through /proc/self/clear_refs) above the RSS before the
call, with glibc told to unmap large blocks on free. The student logits' clone is included in every variant.

    python benchmarks/kernels_dense.py                                     # CPU, about a minute
    python benchmarks/kernels_dense.py --device cuda --n 16384             # GPU: + the Triton kernel

Variants (KL at T + MLM CE at T = 1, 15% of rows labelled, forward + backward):
  naive         fp32 log_softmax / softmax over [N, V] and F.cross_entropy, autograd
  dense         dense_distillation_losses (Triton on CUDA, the chunked reference on CPU)
  naive-head    teacher logits = head(hidden) for all rows, then naive
  exact         exact_distillation_losses: the head per chunk of rows, then the dense kernel
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import markdown_table, memory_probe, mmap_large_blocks, timed

os.environ.pop("TRITON_INTERPRET", None)  # time compiled kernels, never the interpreter


def _inputs(args):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.v, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=12)
    head = BertForMaskedLM(cfg).cls.eval().to(args.device)
    hidden = torch.randn(args.n, args.hidden, device=args.device).half()
    with torch.no_grad():
        teacher = head(hidden.float())
    student = (0.6 * teacher + torch.randn_like(teacher)).to(getattr(torch, args.dtype))
    labels = torch.randint(0, args.v, (args.n,), device=args.device)
    labels[torch.rand(args.n, device=args.device) > 0.15] = -100
    return head, hidden, teacher, student, labels


def _variants(args):
    import torch

    from offline_kd.kernels.dense import dense_distillation_losses, exact_distillation_losses

    head, hidden, teacher, student, labels = _inputs(args)
    T, w = args.temperature, (5.0, 2.0)

    def naive(t):
        s = student.clone().requires_grad_(True)
        x = s.float()
        lp = torch.log_softmax(t.float() / T, -1)
        kl = (lp.exp() * (lp - torch.log_softmax(x / T, -1))).sum(-1).mean() * T * T
        (w[0] * kl + w[1] * torch.nn.functional.cross_entropy(x, labels)).backward()

    def naive_head():
        with torch.no_grad():
            t = head(hidden.float())
        naive(t)

    def dense():
        s = student.clone().requires_grad_(True)
        dense_distillation_losses(s, teacher, T, None, labels, w).total.backward()

    def exact():
        s = student.clone().requires_grad_(True)
        exact_distillation_losses(s, hidden, head, T, None, labels, w, chunk_rows=args.chunk).total.backward()

    return {"naive": lambda: naive(teacher), "dense": dense, "naive-head": naive_head, "exact": exact}


def _measure(args) -> list[dict]:
    steps = _variants(args)
    if args.device != "cuda":
        # Set after the inputs exist, as for the figures in docs/kernels-dense.md.
        mmap_large_blocks()
    reset, peak = memory_probe(args.device)
    rows = {}
    for name, step in steps.items():
        step()  # warm-up (compilation, allocator)
        reset()
        step()
        rows[name] = {"variant": name, "peak": peak(), "times": []}
    for _ in range(args.repeats):
        for name, step in steps.items():
            rows[name]["times"].append(timed(step, args.device))
    return list(rows.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--v", type=int, default=30522)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = _measure(args)
    print(
        f"n={args.n} V={args.v} H={args.hidden} {args.dtype} T={args.temperature} chunk={args.chunk} {args.device}"
    )
    cells = []
    for r in rows:
        base = rows[0] if r["variant"] in ("naive", "dense") else rows[2]
        ms = statistics.median(r["times"]) * 1e3
        ms0 = statistics.median(base["times"]) * 1e3
        cells.append(
            [
                r["variant"],
                f"{ms:.1f}",
                f"{r['peak'] / 2**20:.0f}",
                f"{ms / ms0:.2f}x",
                f"{r['peak'] / base['peak']:.2f}x",
            ]
        )
    header = ["variant", "fwd+bwd ms (median)", "peak extra MiB", "time / naive", "memory / naive"]
    print(markdown_table(header, cells))


if __name__ == "__main__":
    main()
