"""Benchmark the distillation-loss kernels (sparse top-k, dense teacher, exact, cosine, fused head) against eager
PyTorch, side by side in one process.

For each table, every variant is first run once for its peak memory, then all variants are timed interleaved
(round-robin, median of --repeats forward + backward passes), so background load hits them alike. Each
variant's inputs are made before the timed call (a fresh copy of the logits where the variant overwrites
them), so neither time nor memory counts them.
Peak extra memory: CUDA, max_memory_allocated above the allocation before the call; CPU, the RSS high-water
mark (reset through /proc/self/clear_refs) above the RSS before the call, with glibc told to serve large
blocks by mmap and give them back on free, so RSS follows live memory.

    python benchmarks/loss_kernels.py --head-chunk 128                  # CPU defaults, a few minutes
    python benchmarks/loss_kernels.py --tables dense --exact-chunk 64   # the dense-teacher table only
    python benchmarks/loss_kernels.py --device cuda --n 16384 --dtype bf16 --width 30528 --tail
                                                                   # GPU, the trainer's shapes: + Triton, copy BW

Tables (--tables, comma-separated; default all): logits, cosine, head, dense.

Logit-loss variants (KL at T + MLM CE at 1, with gradient):
  naive              log_softmax over the full vocabulary in fp32 + gather + KL, F.cross_entropy in fp32
  compiled           the same under torch.compile (--compile; its one-off compilation is not timed)
  reference          offline_kd.kernels, chunked PyTorch path (OFFLINE_KD_KERNELS=reference),
                     distillation_logit_losses (upstream gradients apart: the backward reads the logits again)
  reference-inplace  the same path, distillation_losses with the weights, gradient written over the logits
  triton             offline_kd.kernels, Triton path (CUDA only; the interpreter is far too slow to time)
  triton-inplace     the trainer's call: Triton, weights up front, gradient over the logits in the forward
With --width > --v the logits are padded to that many columns (a student vocabulary padded to a multiple of
64) and the kernels get vocab_size=--v. LM-head table: the same after `hidden @ W.T + b` (logits
materialised), plus
  fused              fused_linear_distillation_losses: chunked matmul + losses, logits never materialised
Dense-teacher table (the teacher's full distribution; Triton on CUDA, the chunked reference elsewhere):
  naive              fp32 log_softmax / softmax over [N, V] and F.cross_entropy, autograd
  dense              dense_distillation_losses
  naive-head         teacher logits = head(hidden) for all rows, then naive (the baseline of `exact`)
  exact              exact_distillation_losses: the teacher head per chunk of --exact-chunk rows
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from _common import markdown_table, memory_probe, mmap_large_blocks, timed

os.environ.pop("TRITON_INTERPRET", None)  # time compiled kernels, never the interpreter

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BACKEND_OF = {
    "reference": "reference",
    "reference-inplace": "reference",
    "triton": "triton",
    "triton-inplace": "triton",
    "fused": "auto",
    "naive": "auto",
    "compiled": "auto",
    "dense": "auto",
    "naive-head": "auto",
    "exact": "auto",
}
TABLES = ("logits", "cosine", "head", "dense")


# --------------------------------------------------------------------------------------------------- inputs
def _make_inputs(torch, n, v, k, dtype, device, T, width=None, seed=0):
    """Built chunk by chunk: no fp32 [N, V] temporary. With `width` > v the logits have `width` columns,
    the padding far below every logit."""
    g = torch.Generator().manual_seed(seed)
    student = torch.full((n, width or v), -1e4, dtype=dtype, device=device)
    ids = torch.empty(n, k, dtype=torch.int32)
    tz = torch.empty(n, k)
    lse = torch.empty(n)
    step = max(1, (1 << 20) // v)
    for i in range(0, n, step):
        t = torch.randn(min(step, n - i), v, generator=g) * 3
        s = 0.6 * t + torch.randn(t.shape, generator=g) * 3
        student[i : i + step, :v] = s.to(dtype)
        top = t.topk(k, dim=-1)
        ids[i : i + step] = top.indices.int()
        tz[i : i + step] = top.values
        lse[i : i + step] = torch.logsumexp(t / T, dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > 0.15] = -100  # 15% of the rows carry an MLM label
    return student, ids.to(device), tz.to(device), lse.to(device), labels.to(device)


def _naive_logit_losses(torch, s, ids, tz, lse, labels, T, tail):
    x = s.float()
    logq = torch.log_softmax(x / T, dim=-1)
    lq = logq.gather(1, ids.long())
    z = tz.float() / T
    if tail:
        lp = z - lse[:, None]
        p = lp.exp()
        pt = (1 - p.sum(-1)).clamp(min=0)
        qt = (1 - lq.exp().sum(-1)).clamp(min=1e-30)
        rows = (p * (lp - lq)).sum(-1) + pt * (pt.clamp(min=1e-30).log() - qt.log())
    else:
        lp = torch.log_softmax(z, dim=-1)
        rows = (lp.exp() * (lp - lq)).sum(-1)
    kl = rows.mean() * T * T
    ce = torch.nn.functional.cross_entropy(x, labels, ignore_index=-100)
    return kl, ce


def _logit_step(torch, K, args, s0, ids, tz, lse, labels):
    """make(variant) -> (prepare(rows) -> inputs, run(inputs) -> gradient) for the logit-loss table."""
    T, V = args.temperature, args.v
    padded = s0.shape[1] > V

    def naive_losses(s, i, z, e, lab):
        return _naive_logit_losses(torch, s[:, :V], i, z, e, lab, T, args.tail)

    compiled = torch.compile(naive_losses, dynamic=False) if args.compile else None

    def make(variant):
        in_place = variant.endswith("-inplace")

        def prepare(rows=slice(None)):
            x = s0[rows].detach()
            return (x.clone() if in_place else x).requires_grad_(True), rows

        def run(inputs):
            s, rows = inputs
            i, z, e, lab = ids[rows], tz[rows], lse[rows] if args.tail else None, labels[rows]
            if variant in ("naive", "compiled"):  # eager, or the same math through torch.compile
                kl, ce = (naive_losses if variant == "naive" else compiled)(s, i, z, e, lab)
                (0.5 * kl + 0.5 * ce).backward()
            elif in_place:  # the logits are a leaf here: its gradient is its own storage
                kw = {"vocab_size": V} if padded else {}
                parts = K.distillation_losses(s, i, z, T, None, e, lab, (0.5, 0.5), in_place=True, **kw)
                parts.total.backward()
            else:
                kw = {"vocab_size": V} if padded else {}
                kl, ce = K.distillation_logit_losses(s, i, z, T, None, e, lab, **kw)
                (0.5 * kl + 0.5 * ce).backward()
            return s.grad

        return prepare, run

    return make


def _head_step(torch, K, args, ids, tz, lse, labels, dtype, device):
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
    w0 = (torch.randn(args.v, args.hidden, generator=g) / args.hidden**0.5).to(device=device, dtype=dtype)
    b0 = torch.zeros(args.v, device=device, dtype=dtype)
    T = args.temperature

    def make(variant):
        def prepare(rows=slice(None)):
            leaves = [x.detach().requires_grad_(True) for x in (h0[rows], w0, b0)]
            return leaves, rows

        def run(inputs):
            (h, w, bias), rows = inputs
            i, z, e, lab = ids[rows], tz[rows], lse[rows] if args.tail else None, labels[rows]
            if variant == "fused":
                parts = K.fused_linear_distillation_losses(
                    h, w, bias, i, z, T, None, e, lab, weights=(0.5, 0.5), chunk_rows=args.head_chunk
                )
                parts.total.backward()
                return h.grad
            if variant == "naive":
                kl, ce = _naive_logit_losses(torch, h @ w.t() + bias, i, z, e, lab, T, args.tail)
            else:
                kl, ce = K.distillation_logit_losses(h @ w.t() + bias, i, z, T, None, e, lab)
            (0.5 * kl + 0.5 * ce).backward()
            return h.grad

        return prepare, run

    return make


def _cosine_step(torch, K, args, dtype, device):
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
    t0 = torch.randn(args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
    ones = torch.ones(args.n, device=device)

    def make(variant):
        def prepare(rows=slice(None)):
            return s0[rows].detach().requires_grad_(True), rows

        def run(inputs):
            s, rows = inputs
            if variant == "naive":
                loss = torch.nn.CosineEmbeddingLoss()(s.float(), t0[rows].float(), ones[rows])
            else:
                loss = K.cosine_loss(s, t0[rows])
            loss.backward()
            return s.grad

        return prepare, run

    return make, 3 * args.n * args.hidden * s0.element_size()  # read s and t, write the gradient


def _dense_step(torch, K, args, dtype, device):
    """The dense-teacher table: a BERT MLM head as the teacher's, its logits for `dense`, per chunk for
    `exact`; returns make(variant) and the floor bytes (read s and t once, write the gradient once)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.v, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=12)
    head = BertForMaskedLM(cfg).cls.eval().to(device)
    hidden = torch.randn(args.n, args.hidden, device=device).half()
    with torch.no_grad():
        teacher = head(hidden.float())
    s0 = (0.6 * teacher + torch.randn_like(teacher)).to(dtype)
    labels = torch.randint(0, args.v, (args.n,), device=device)
    labels[torch.rand(args.n, device=device) > 0.15] = -100
    T, w = args.temperature, (5.0, 2.0)

    def naive(s, t, lab):
        x = s.float()
        lp = torch.log_softmax(t.float() / T, -1)
        kl = (lp.exp() * (lp - torch.log_softmax(x / T, -1))).sum(-1).mean() * T * T
        (w[0] * kl + w[1] * torch.nn.functional.cross_entropy(x, lab)).backward()

    def make(variant):
        def prepare(rows=slice(None)):
            return s0[rows].detach().clone().requires_grad_(True), rows

        def run(inputs):
            s, rows = inputs
            t, h, lab = teacher[rows], hidden[rows], labels[rows]
            if variant == "naive":
                naive(s, t, lab)
            elif variant == "naive-head":
                with torch.no_grad():
                    t = head(h.float())
                naive(s, t, lab)
            elif variant == "dense":
                K.dense_distillation_losses(s, t, T, None, lab, w).total.backward()
            else:
                K.exact_distillation_losses(
                    s, h, head, T, None, lab, w, chunk_rows=args.exact_chunk
                ).total.backward()
            return s.grad

        return prepare, run

    return make, (2 * s0.element_size() + teacher.element_size()) * s0.numel()


def _build(torch, K, args, kernel: str, variants: list[str]):
    """{variant: (prepare, run)} and the floor bytes (0 where no bandwidth figure applies)."""
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    if kernel in ("logits", "head"):
        s0, ids, tz, lse, labels = _make_inputs(
            torch, args.n, args.v, args.k, dtype, device, args.temperature, args.width
        )
    if kernel == "logits":
        make = _logit_step(torch, K, args, s0, ids, tz, lse, labels)
        floor = 2 * args.n * args.v * s0.element_size()  # read the logits once + write their gradient once
    elif kernel == "head":
        del s0
        make, floor = _head_step(torch, K, args, ids, tz, lse, labels, dtype, device), 0  # matmul-bound
    elif kernel == "dense":
        make, floor = _dense_step(torch, K, args, dtype, device)
    else:
        make, floor = _cosine_step(torch, K, args, dtype, device)

    def with_backend(variant, pair):
        prepare, run = pair

        def run_on_backend(inputs):
            os.environ[K.ENV_VAR] = BACKEND_OF[variant]
            return run(inputs)

        return prepare, run_on_backend

    return {v: with_backend(v, make(v)) for v in variants}, floor


def _measure(torch, steps: dict, floor: int, args) -> list[dict]:
    out = {v: {"variant": v} for v in steps}
    for prepare, run in steps.values():
        run(prepare(slice(0, 4)))  # warm-up: compile, load code paths and thread pools
    reset, peak = memory_probe(args.device)
    for v, (prepare, run) in steps.items():  # peak memory, one variant at a time
        inputs = prepare()
        reset()
        grad = run(inputs)
        out[v]["peak_mb"] = peak() / 2**20
        out[v]["finite"] = bool(torch.isfinite(grad).all())
        del grad, inputs
    times = {v: [] for v in steps}
    for _ in range(args.repeats):  # interleaved timing
        for v, (prepare, run) in steps.items():
            inputs = prepare()
            times[v].append(timed(lambda run=run, inputs=inputs: run(inputs), args.device))
            del inputs
    for v in steps:
        ts = sorted(times[v])
        out[v]["ms"] = 1e3 * ts[len(ts) // 2]
        out[v]["gbps"] = floor / (out[v]["ms"] / 1e3) / 1e9 if floor else 0.0
    return list(out.values())


def _copy_bandwidth(torch, args) -> float:
    """Device-to-device copy GB/s (bytes read + written) of an [N, V] tensor in the benchmark dtype."""
    dtype = getattr(torch, DTYPES[args.dtype])
    a = torch.empty(args.n, args.v, dtype=dtype, device=args.device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    return 2 * a.numel() * a.element_size() / dt / 1e9


def _table(title: str, rows: list[dict], copy_gbps: float | None) -> str:
    """Markdown: each variant against its naive baseline (`naive`; `naive-head` for the exact mode)."""
    by = {r["variant"]: r for r in rows}
    header = ["variant", "fwd+bwd ms", "GB/s (floor bytes)", "peak extra MiB"]
    header += ["speed-up vs naive", "memory / naive"]
    if copy_gbps:
        header.append("% of copy BW")
    cells = []
    for r in rows:
        naive = by.get("naive-head" if r["variant"] in ("naive-head", "exact") else "naive")
        tr = f"{naive['ms'] / r['ms']:.2f}x" if naive else "-"
        mr = f"{r['peak_mb'] / naive['peak_mb']:.2f}x" if naive and naive["peak_mb"] > 0 else "-"
        bw = f"{r['gbps']:.3g}" if r["gbps"] else "-"
        row = [r["variant"], f"{r['ms']:.1f}", bw, f"{r['peak_mb']:.0f}", tr, mr]
        if copy_gbps:
            row.append(f"{100 * r['gbps'] / copy_gbps:.0f}%" if r["gbps"] else "-")
        if not r["finite"]:
            row.append("NON-FINITE GRADIENT")
        cells.append(row)
    return f"### {title}\n\n" + markdown_table(header, cells)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=30522, help="vocabulary size")
    ap.add_argument("--width", type=int, default=None, help="logits' columns (> --v: a padded vocabulary)")
    ap.add_argument("--k", type=int, default=32, help="teacher top-k")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--tail", action="store_true", help="tail-aware variant (teacher lse given)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (cosine loss and LM head)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: steadier ratios on a shared machine; 0: torch's default)",
    )
    ap.add_argument(
        "--tables", default=",".join(TABLES), help=f"which tables, comma-separated: {', '.join(TABLES)}"
    )
    ap.add_argument(
        "--head-chunk", type=int, default=None, help="rows per chunk of the fused LM head (default: its own)"
    )
    ap.add_argument(
        "--exact-chunk", type=int, default=None, help="rows per chunk of exact mode (default: its own)"
    )
    ap.add_argument(
        "--compile", action="store_true", help="add the eager loss under torch.compile to the logits table"
    )
    return ap


def _tables(args, variants: list[str]) -> dict[str, tuple[list[str], str]]:
    """{table: (variants, title)} for the tables --tables names, in its order."""
    plain = [v for v in variants if not v.endswith("-inplace")]
    head = f"LM head [n={args.n}, H={args.hidden}, V={args.v}] + KL + CE, fused chunk={args.head_chunk or 'default'}, fwd + bwd"
    dense = f"dense teacher, KL at T + CE at 1, exact chunk={args.exact_chunk or 'default'}, fwd + bwd"
    tables = {
        "logits": (variants, "KL at T + CE at 1, forward + backward"),
        "cosine": (plain, f"cosine_loss [n={args.n}, H={args.hidden}], forward + backward"),
        "head": (plain + ["fused"], head),
        "dense": (["naive", "dense", "naive-head", "exact"], dense),
    }
    return {t: tables[t] for t in (x.strip() for x in args.tables.split(",")) if t}


def main(argv=None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    unknown = sorted({t.strip() for t in args.tables.split(",") if t.strip()} - set(TABLES))
    if unknown:
        ap.error(f"--tables: unknown {', '.join(unknown)} (choose from {', '.join(TABLES)})")
    mmap_large_blocks()
    import torch

    from offline_kd import kernels as K

    cuda = args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    variants = ["naive"] + (["compiled"] if args.compile else []) + ["reference", "reference-inplace"]
    variants += ["triton", "triton-inplace"] if cuda else []
    copy_gbps = _copy_bandwidth(torch, args) if cuda else None
    print(
        f"# device={args.device} n={args.n} V={args.v} width={args.width or args.v} k={args.k} dtype={args.dtype} T={args.temperature} "
        f"tail={args.tail} hidden={args.hidden} repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    if copy_gbps:
        print(f"# measured device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    floor_kb = 2 * args.v * {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype] / 1000
    print(f"# floor traffic: {floor_kb:.0f} KB/token (logits read once + gradient written once)\n")

    for kernel, (vs, title) in _tables(args, variants).items():
        steps, floor = _build(torch, K, args, kernel, vs)
        rows = _measure(torch, steps, floor, args)
        del steps
        gc.collect()
        print(_table(title, rows, copy_gbps))
        print()


if __name__ == "__main__":
    main()
