"""Pure-PyTorch reference of the distillation losses: the test oracle's twin of the Triton kernels and the
fallback where they do not run.

Chunked over rows: at most `chunk_rows(V, device)` rows (about `chunk_elems(device)` elements) are converted
to fp32 at a time, into a few reused buffers, so no fp32 [N, V] copy ever exists; the only [N, V]
allocation is the gradient itself (in the logits' dtype; none when it overwrites the logits). Chunks are
small on CPU (cache-resident) and large on an accelerator (few launches). Only rows that count (selected for
the KL or carrying an MLM label) are read at all. Same math, the same statistics (`RowStats`) and the same
backend protocol (`_common.py`) as `kl.py`; see docs/kernels.md.
"""

from __future__ import annotations

import torch

from ._common import (
    Prepared,
    RowStats,
    cosine_rows_mask,
    logit_loss_function,
)
from .constants import LN2, LOG2E, TINY

# fp32 elements per chunk buffer on CPU (1 MiB: a chunk stays cache-resident across the several elementwise
# passes) and on an accelerator (64 MiB: 549 rows at V = 30,522, so a 16k-token batch is 30 chunks, not 2,000).
CHUNK_ELEMS = 1 << 18
DEVICE_CHUNK_ELEMS = 1 << 24


def chunk_rows(V: int, device: torch.device | str = "cpu") -> int:
    elems = CHUNK_ELEMS if torch.device(device).type == "cpu" else DEVICE_CHUNK_ELEMS
    return max(1, elems // max(V, 1))


def _chunks(active: torch.Tensor, V: int):
    """Yield the rows of each chunk of active rows: a slice when they are consecutive (no gather copy)."""
    idx = active.nonzero().flatten()
    step = chunk_rows(V, active.device)
    n = idx.numel()
    if n == 0:
        return
    if int(idx[-1]) - int(idx[0]) + 1 == n:  # sorted and unique (nonzero), hence consecutive
        first = int(idx[0])
        for start in range(0, n, step):
            yield slice(first + start, first + min(start + step, n))
    else:
        for start in range(0, n, step):
            yield idx[start : start + step]


def _nrows(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _Buffers:
    """fp32 [chunk_rows, V] work buffers, allocated once per call and reused by every chunk."""

    def __init__(self, n: int, V: int, device, count: int):
        r = min(chunk_rows(V, device), max(n, 1))
        self.bufs = [torch.empty(r, V, device=device, dtype=torch.float32) for _ in range(count)]

    def take(self, c: int):
        return [b[:c] for b in self.bufs]


def _active(prep: Prepared) -> torch.Tensor:
    active = prep.sel > 0
    return active | (prep.labels >= 0) if prep.labels is not None else active


# ----------------------------------------------------------------------------------------------- forward
def _log2_sum(x: torch.Tensor, mx: torch.Tensor, k: float, out: torch.Tensor) -> torch.Tensor:
    """log2 sum_i 2^((x_i - M) k) per row."""
    return torch.sub(x, mx[:, None], out=out).mul_(k).exp2_().sum(-1).log2_()


def _chunk_forward(prep: Prepared, rows, x: torch.Tensor, e: torch.Tensor) -> RowStats:
    """Statistics and losses of one chunk (x: its logits in fp32)."""
    T, V = prep.temperature, prep.vocab
    k_t = LOG2E / T
    mx = x.amax(-1)
    lg_t = _log2_sum(x, mx, k_t, e)
    ce = lg_1 = None
    if prep.labels is not None:
        lab = prep.labels[rows]
        ok = (lab >= 0) & (lab < V)
        lg_1 = lg_t if T == 1.0 else _log2_sum(x, mx, LOG2E, e)
        s_lab = x.gather(1, torch.where(ok, lab, 0)[:, None]).squeeze(1)
        ce = torch.where(lab >= 0, torch.where(ok, (mx - s_lab) + lg_1 * LN2, float("nan")), 0.0)
    cid = prep.ids[rows]
    valid = cid >= 0
    xk = x.gather(1, cid.clamp(min=0).long())
    lq2 = torch.where(valid, (xk - mx[:, None]) * k_t - lg_t[:, None], 0.0)  # log2 q_j
    pc, ptc = prep.p[rows], prep.ptail[rows]
    kl = torch.where(pc != 0, pc * (prep.logp[rows] - lq2 * LN2), 0.0).sum(-1)
    m = pc.sum(-1) + ptc
    r = torch.zeros_like(m)
    if prep.tail:
        qtail = (1.0 - torch.where(valid, lq2.exp2(), 0.0).sum(-1)).clamp(min=TINY)
        kl = kl + torch.where(ptc != 0, ptc * (ptc.clamp(min=TINY).log() - qtail.log()), 0.0)
        r = 1.0 / qtail
    return RowStats(torch.where(prep.sel[rows] > 0, kl, 0.0), ce, mx, lg_t, lg_1, m, r)


def reference_forward(prep: Prepared) -> RowStats:
    """Per-row losses and statistics (see `RowStats`), zeros on rows that count for neither loss."""
    s, V = prep.student, prep.vocab
    stats = RowStats.allocate(s.shape[0], s.device, prep.labels is not None)
    active = _active(prep)
    bufs = _Buffers(int(active.sum()), V, s.device, 2)
    for rows in _chunks(active, V):
        x, e = bufs.take(_nrows(rows))
        x.copy_(s[rows, :V])
        st = _chunk_forward(prep, rows, x, e)
        for dst, src in zip(stats, st, strict=True):
            if dst is not None:
                dst[rows] = src
    return stats


# ---------------------------------------------------------------------------------------------- backward
def _chunk_grad(prep: Prepared, rows, st: RowStats, x, q, e, a, c) -> torch.Tensor:
    """Gradient of one chunk into q (x: its logits in fp32): a*(m q_i - p_tail min(q_i/q_tail, 1)) +
    c*sigma_i off the top-k, fixed up at the top-k ids (a*(m q_j - p_j)) and at the label (-c)."""
    T = prep.temperature
    ac = a[:, None]
    torch.sub(x, st.max[:, None], out=q).mul_(LOG2E / T).sub_(st.lg_t[:, None]).exp2_()  # q
    cid = prep.ids[rows]
    sid = cid.clamp(min=0).long()
    qk = q.gather(1, sid)  # before q is scaled in place
    ptc = prep.ptail[rows][:, None]
    rc = st.inv_qtail[:, None]
    if prep.tail:
        tailk = ptc * (qk * rc).clamp(max=1.0)
        torch.mul(q, rc, out=e).clamp_(max=1.0).mul_(ac * ptc)
    g = q.mul_(ac * st.mass[:, None])
    if prep.tail:
        g.sub_(e)
    if c is not None:
        cc = c[:, None]
        torch.sub(x, st.max[:, None], out=e).mul_(LOG2E).sub_(st.lg_1[:, None]).exp2_().mul_(cc)
        g.add_(e)
    # top-k fix-up: the dense value holds a*(q*m - ptail*min(q*r, 1)); the wanted one a*(q*m - p)
    delta = torch.where(cid >= 0, ac * ((tailk if prep.tail else 0.0) - prep.p[rows]), 0.0)
    g.scatter_add_(1, sid, delta)
    if c is not None:
        lab = prep.labels[rows]
        ok = (lab >= 0) & (lab < prep.vocab)
        g.scatter_add_(1, torch.where(ok, lab, 0)[:, None], torch.where(ok, -c, 0.0)[:, None])
    return g


def _write_rows(grad: torch.Tensor, rows, g: torch.Tensor) -> None:
    V = g.shape[1]
    if isinstance(rows, slice):
        grad[rows, :V].copy_(g)
    else:
        grad[:, :V].index_copy_(0, rows, g.to(grad.dtype))


def reference_backward(
    prep: Prepared, stats: RowStats, a: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """The gradient w.r.t. the logits (in their dtype) for per-row coefficients a (KL) and c (CE); rows with
    a = c = 0 (and padding columns) get zeros without being read."""
    s, V = prep.student, prep.vocab
    grad = torch.zeros(s.shape, device=s.device, dtype=s.dtype)
    active = a != 0
    if c is not None:
        active = active | (c != 0)
    bufs = _Buffers(int(active.sum()), V, s.device, 3)
    for rows in _chunks(active, V):
        x, q, e = bufs.take(_nrows(rows))
        x.copy_(s[rows, :V])
        g = _chunk_grad(prep, rows, stats.rows(rows), x, q, e, a[rows], None if c is None else c[rows])
        _write_rows(grad, rows, g)
    return grad


def reference_forward_grad(prep: Prepared, coef: torch.Tensor, grad: torch.Tensor | None) -> RowStats:
    """Per-row KL and CE and, into `grad` (possibly the logits themselves), the gradient of
    coef[0]*sum_selected KL*T + coef[1]*sum_labelled CE, chunk by chunk: each chunk is copied to fp32 before
    its gradient rows are written. Rows that count for nothing get zero gradient rows."""
    if grad is None:
        st = reference_forward(prep)
        return RowStats(st.kl, st.ce, *(None,) * 5)
    s, V = prep.student, prep.vocab
    n = s.shape[0]
    kl = torch.zeros(n, device=s.device, dtype=torch.float32)
    ce = torch.zeros_like(kl) if prep.labels is not None else None
    active = _active(prep)
    a_all = torch.where(prep.sel > 0, coef[0], 0.0)
    c_all = torch.where(prep.labels >= 0, coef[1], 0.0) if prep.labels is not None else None
    grad[:, :V].masked_fill_(~active[:, None], 0.0)
    bufs = _Buffers(int(active.sum()), V, s.device, 3)
    for rows in _chunks(active, V):
        x, q, e = bufs.take(_nrows(rows))
        x.copy_(s[rows, :V])
        st = _chunk_forward(prep, rows, x, e)
        kl[rows] = st.kl
        if ce is not None:
            ce[rows] = st.ce
        g = _chunk_grad(prep, rows, st, x, q, e, a_all[rows], None if c_all is None else c_all[rows])
        _write_rows(grad, rows, g)
    return RowStats(kl, ce, *(None,) * 5)


# ------------------------------------------------------------------------------------------ autograd.Function
# Looked up at call time, so the module-level functions stay the single point to patch or profile.
ReferenceDistillLogitLoss = logit_loss_function(
    "ReferenceDistillLogitLoss",
    lambda prep: reference_forward(prep),
    lambda prep, stats, a, c: reference_backward(prep, stats, a, c),
)


def reference_cosine_loss(student_hidden, teacher_hidden, row_mask=None):
    """mean over selected rows of 1 - cos(s, t), with torch.nn.CosineEmbeddingLoss's eps (1e-12 on squares)."""
    H = student_hidden.shape[-1]
    s = student_hidden.reshape(-1, H)
    t = teacher_hidden.reshape(-1, H).detach().to(device=s.device, dtype=torch.float32)
    w = cosine_rows_mask(s.shape[0], row_mask, s.device)
    sf = s.float()
    dot = (sf * t).sum(-1)
    a = (sf * sf).sum(-1) + 1e-12
    b = (t * t).sum(-1) + 1e-12
    cos = dot / (a * b).sqrt()
    return ((1.0 - cos) * w).sum() / w.sum().clamp(min=1.0)
