"""Pure-PyTorch dense-teacher KL + MLM CE with the gradient written in the forward: the CPU path and the
test oracle's twin of `dense_kl.py` (same contract as `dense_kl.dense_kl_ce_rows`, same math).

Chunked over rows: at most `chunk_rows(V)` rows (about `CHUNK_ELEMS` logits) are converted to fp32 at a time,
into four reused buffers, so no fp32 [n, V] copy of either input ever exists. Only rows that count (selected
for the KL or carrying a label) are read; rows that only carry a label never read the teacher row.
"""

from __future__ import annotations

import math

import torch

# fp32 elements per buffer (1 MiB): the chunk stays cache-resident across its elementwise passes.
CHUNK_ELEMS = 1 << 18


def chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _row_chunks(active: torch.Tensor, V: int):
    """Index tensors of the active rows, at most chunk_rows(V) per chunk (CPU: nonzero costs no sync)."""
    idx = active.nonzero().flatten()
    step = chunk_rows(V)
    for start in range(0, idx.numel(), step):
        yield idx[start : start + step]


def _centred_softmax_(x: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
    """x -= its row max (in place); out = softmax(x * scale); returns log sum exp(scale * x) per row."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.mul(x, scale, out=out).exp_()
    d = out.sum(-1, keepdim=True)
    out.div_(d)
    return d.log_()


def dense_kl_ce_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    sel: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    temperature: float,
    grad: torch.Tensor | None,
    kl_rows: torch.Tensor,
    ce_rows: torch.Tensor | None,
) -> None:
    """Same contract as `dense_kl.dense_kl_ce_rows`: per-row KL(p‖q) / CE into kl_rows / ce_rows and
    grad = coef[0]·(q − p) on selected rows + coef[1]·(σ − onehot) on labelled rows (zeros elsewhere); grad
    may be s itself."""
    n, V = s.shape
    has_lab = labels >= 0 if labels is not None else torch.zeros(n, dtype=torch.bool, device=s.device)
    do_kl = sel != 0
    kl_rows.zero_()
    if ce_rows is not None:
        ce_rows.zero_()
    r = min(chunk_rows(V), max(n, 1))
    x, y, q, p = (torch.empty(r, V, device=s.device, dtype=torch.float32) for _ in range(4))
    a, c = coef[0], coef[1]
    for rows in _row_chunks(do_kl | has_lab, V):
        k = rows.numel()
        xs, ys, qs, ps = x[:k], y[:k], q[:k], p[:k]
        kl_sel = do_kl[rows]
        xs.copy_(s[rows])
        lg = _centred_softmax_(xs, qs, 1.0 / temperature)
        # teacher rows of label-only rows are not read: zeros give a finite p that a zero coefficient drops
        ys.zero_()
        kl_idx = kl_sel.nonzero().flatten()
        ys[kl_idx] = t[rows[kl_idx]].float()
        lgt = _centred_softmax_(ys, ps, 1.0 / temperature)
        # log p - log q = ((t - max t) - (s - max s)) / T - lse_p + lse_q: centred, no large differences
        ys.sub_(xs).mul_(1.0 / temperature).add_(lg - lgt)
        kl_rows[rows] = torch.where(kl_sel, (ps * ys).sum(-1), 0.0)
        g = qs.sub_(ps).mul_(torch.where(kl_sel, a, 0.0)[:, None])
        if labels is not None:
            _ce_chunk(xs, ys, g, labels[rows], has_lab[rows], c, ce_rows, rows)
        if grad is not None:
            grad[rows] = g.to(grad.dtype)
    if grad is not None:  # zeroed last, not first: grad may be s itself, whose rows are read above
        idle = (~(do_kl | has_lab)).nonzero().flatten()
        grad[idle] = 0


def _ce_chunk(xs, buf, g, lab, has, c, ce_rows, rows) -> None:
    """CE of the chunk's labelled rows into ce_rows (xs: the student rows minus their max); g += c·(σ −
    onehot) on them. A label >= V (callers reject those first) is never dereferenced and gives a NaN CE, as
    in the Triton kernel."""
    V = xs.shape[1]
    ok = lab < V
    safe = torch.where(has & ok, lab, 0)
    lg1 = _centred_softmax_(xs, buf, 1.0)
    ce = (lg1 - xs.gather(1, safe[:, None])).squeeze(1)
    ce_rows[rows] = torch.where(has, torch.where(ok, ce, math.nan), 0.0)
    cc = torch.where(has, c, 0.0)[:, None]
    g.add_(buf.mul_(cc))
    g.scatter_add_(1, safe[:, None], torch.where(ok[:, None], -cc, 0.0))


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """grad *= upstream in place; skipped when upstream is 1 (a free check for CPU tensors)."""
    if upstream.device.type != "cpu" or float(upstream) != 1.0:
        grad.mul_(upstream.to(grad.device))
    return grad
