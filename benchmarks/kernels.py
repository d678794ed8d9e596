"""Benchmark the distillation-loss kernels against eager dense PyTorch.

Each variant runs in a fresh subprocess (so peak memory is its own): forward + backward time (median of
--repeats), effective bandwidth over the floor traffic (read the logits once, write their gradient once) and
peak extra memory (CUDA: max_memory_allocated above the inputs; CPU: ru_maxrss high-water mark above the RSS
with the inputs built).

    python benchmarks/kernels.py                       # CPU defaults: reference vs naive, ~1 minute
    python benchmarks/kernels.py --device cuda --n 16384 --dtype bf16   # GPU: + Triton and copy bandwidth

Variants for the logit losses (KL at T + MLM CE at 1, both with gradient):
  naive      log_softmax over the full vocabulary in fp32 + gather + KL, F.cross_entropy in fp32
  reference  offline_kd.kernels, chunked PyTorch path (OFFLINE_KD_KERNELS=reference)
  triton     offline_kd.kernels, Triton path (CUDA only; under TRITON_INTERPRET it is far too slow to time)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------------ worker side
def _make_inputs(torch, n, v, k, dtype, device, T, seed=0):
    """Built chunk by chunk so that no fp32 [N, V] temporary raises the baseline high-water mark."""
    g = torch.Generator().manual_seed(seed)
    student = torch.empty(n, v, dtype=dtype, device=device)
    ids = torch.empty(n, k, dtype=torch.int32)
    tz = torch.empty(n, k)
    lse = torch.empty(n)
    step = max(1, (1 << 20) // v)
    for i in range(0, n, step):
        t = torch.randn(min(step, n - i), v, generator=g) * 3
        s = 0.6 * t + torch.randn(t.shape, generator=g) * 3
        student[i : i + step] = s.to(dtype)
        top = t.topk(k, dim=-1)
        ids[i : i + step] = top.indices.int()
        tz[i : i + step] = top.values
        lse[i : i + step] = torch.logsumexp(t / T, dim=-1)
        del t, s, top
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > 0.15] = -100
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


def _worker(args) -> dict:
    import torch

    if args.variant in ("reference", "triton"):
        os.environ["OFFLINE_KD_KERNELS"] = args.variant
    from offline_kd import kernels as K

    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    cuda = device.type == "cuda"
    torch.set_num_threads(max(1, args.threads))
    out: dict = {"variant": args.variant, "kernel": args.kernel}
    if args.kernel == "logits":
        s0, ids, tz, lse, labels = _make_inputs(torch, args.n, args.v, args.k, dtype, device, args.T)
        tail_lse = lse if args.tail else None

        def step(rows=slice(None)):
            s = s0[rows].detach().requires_grad_(True)
            i, z, e, lab = ids[rows], tz[rows], lse[rows], labels[rows]
            if args.variant == "naive":
                kl, ce = _naive_logit_losses(torch, s, i, z, e, lab, args.T, args.tail)
            else:
                kl, ce = K.distillation_logit_losses(
                    s, i, z, args.T, None, None if tail_lse is None else e, lab
                )
            (0.5 * kl + 0.5 * ce).backward()
            return s.grad

        floor_bytes = 2 * args.n * args.v * s0.element_size()  # read logits once + write gradient once
    else:
        g = torch.Generator().manual_seed(0)
        s0 = torch.randn(args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
        t0 = torch.randn(args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
        ones = torch.ones(args.n, device=device)

        def step(rows=slice(None)):
            s = s0[rows].detach().requires_grad_(True)
            if args.variant == "naive":
                loss = torch.nn.CosineEmbeddingLoss()(s.float(), t0[rows].float(), ones[rows])
            else:
                loss = K.cosine_loss(s, t0[rows])
            loss.backward()
            return s.grad

        floor_bytes = 3 * args.n * args.hidden * s0.element_size()  # read s and t, write the gradient

    step(slice(0, 4))  # tiny warm-up: loads code paths and thread pools before the memory baseline
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_rss = (
            _current_rss_kib()
        )  # the current RSS, not the high-water mark (input set-up had transients)
    g0 = step()  # first call: compile / warm-up, and the memory peak
    if cuda:
        torch.cuda.synchronize()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    out["finite"] = bool(torch.isfinite(g0).all())
    del g0
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    out["ms"] = 1e3 * times[len(times) // 2]
    out["gbps"] = floor_bytes / (out["ms"] / 1e3) / 1e9
    return out


def _current_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _copy_bandwidth(args) -> float:
    """Device-to-device copy GB/s (bytes read + written) of an [N, V] tensor in the benchmark dtype."""
    import torch

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


# ------------------------------------------------------------------------------------------------ driver side
def _run_variant(args, kernel: str, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--kernel", kernel, "--variant", variant]
    for name in ("n", "v", "k", "dtype", "device", "T", "repeats", "hidden", "threads"):
        cmd += [f"--{name}", str(getattr(args, name))]
    if args.tail:
        cmd.append("--tail")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # large blocks straight from mmap and back on free: RSS then follows live memory, so the ru_maxrss
    # growth is the variant's own peak (glibc would otherwise reuse freed heap without growing RSS)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"variant": variant, "kernel": kernel, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _table(title: str, rows: list[dict], copy_gbps: float | None) -> str:
    naive = next((r for r in rows if r["variant"] == "naive" and "ms" in r), None)
    head = "| variant | fwd+bwd ms | GB/s (floor bytes) | peak extra MiB | time / naive | memory / naive |"
    if copy_gbps:
        head += " % of copy BW |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |")
            continue
        tr = f"{r['ms'] / naive['ms']:.2f}x" if naive else "-"
        mr = f"{r['peak_mb'] / naive['peak_mb']:.2f}x" if naive and naive["peak_mb"] > 0 else "-"
        line = f"| {r['variant']} | {r['ms']:.1f} | {r['gbps']:.3g} | {r['peak_mb']:.0f} | {tr} | {mr} |" + (
            "" if r["finite"] else " NON-FINITE |"
        )
        if copy_gbps:
            line += f" {100 * r['gbps'] / copy_gbps:.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=30522, help="vocabulary size")
    ap.add_argument("--k", type=int, default=32, help="teacher top-k")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=float, default=2.0)
    ap.add_argument("--tail", action="store_true", help="tail-aware variant (teacher lse given)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size for the cosine loss")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch_threads_default())
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", default="logits", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    cuda = args.device.startswith("cuda")
    variants = ["naive", "reference"] + (["triton"] if cuda else [])
    copy_gbps = None
    if cuda:
        copy_gbps = _copy_bandwidth(args)
    print(
        f"# device={args.device} n={args.n} V={args.v} k={args.k} dtype={args.dtype} T={args.T} "
        f"tail={args.tail} hidden={args.hidden} repeats={args.repeats} threads={args.threads}"
    )
    if copy_gbps:
        print(f"# measured device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    floor_kb = 2 * args.v * {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype] / 1000
    print(f"# floor traffic: {floor_kb:.0f} KB/token (logits read once + gradient written once)\n")
    rows = [_run_variant(args, "logits", v) for v in variants]
    print(_table("distillation_logit_losses (KL at T + CE at 1), forward + backward", rows, copy_gbps))
    print()
    rows = [_run_variant(args, "cosine", v) for v in variants]
    print(_table(f"cosine_loss [n={args.n}, H={args.hidden}], forward + backward", rows, copy_gbps))


def torch_threads_default() -> int:
    return max(1, min(4, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
