"""Pure-PyTorch reference of the distillation losses: the test oracle for the Triton kernels and the CPU fallback.

Chunked over rows: at most `chunk_rows(V)` rows (about `CHUNK_ELEMS` elements) are converted to fp32 at a time,
into a few reused buffers, in the forward and in the manual backward, so no fp32 [N, V] copy ever exists; the
only [N, V] allocation is the gradient itself (in the logits' dtype). Only rows that count (selected for the
KL or carrying an MLM label) are read at all. Same math and the same backend protocol (`_common.py`) as
`kl.py`; see docs/kernels.md.
"""

from __future__ import annotations

import torch

from ._common import TINY, Prepared, RowStats, cosine_rows_mask, logit_loss_function

# fp32 elements per chunk buffer (1 MiB: a chunk stays cache-resident across the several elementwise passes);
# three such buffers are reused for every chunk, so the working set is bounded and independent of N.
CHUNK_ELEMS = 1 << 18


def chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _active_rows(active: torch.Tensor) -> torch.Tensor:
    return active.nonzero().flatten()


def _chunks(idx: torch.Tensor, V: int):
    """Yield (rows, start) per chunk: rows is a slice when the chunk's rows are consecutive (no gather copy)."""
    step = chunk_rows(V)
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


def _nrows(rows, V) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _Buffers:
    """fp32 [chunk_rows, V] work buffers, allocated once per call and reused by every chunk."""

    def __init__(self, n: int, V: int, device, count: int):
        r = min(chunk_rows(V), max(n, 1))
        self.bufs = [torch.empty(r, V, device=device, dtype=torch.float32) for _ in range(count)]

    def take(self, c: int):
        return [b[:c] for b in self.bufs]


# ----------------------------------------------------------------------------------------------- forward
def reference_forward(prep: Prepared) -> RowStats:
    """Per-row losses and statistics (see `RowStats`), zeros on rows that count for neither loss."""
    s, ids, labels, T = prep.student, prep.ids, prep.labels, prep.temperature
    N, V = s.shape
    stats = RowStats.allocate(N, s.device, labels is not None)
    active = prep.sel > 0
    if labels is not None:
        active = active | (labels >= 0)
    idx_all = _active_rows(active)
    bufs = _Buffers(idx_all.numel(), V, s.device, 2)
    for rows in _chunks(idx_all, V):
        x, e = bufs.take(_nrows(rows, V))
        x.copy_(s[rows])
        if labels is not None:
            lab = labels[rows]
            m1 = x.amax(-1)
            lg_1 = torch.sub(x, m1[:, None], out=e).exp_().sum(-1).log_()
            sl = x.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            stats.ce[rows] = torch.where(lab >= 0, (m1 - sl) + lg_1, 0.0)
            stats.max_1[rows], stats.logsum_1[rows] = m1, lg_1
        xt = x.mul_(1.0 / T) if T != 1.0 else x
        mt = xt.amax(-1)
        dt = torch.sub(xt, mt[:, None], out=e).exp_().sum(-1)
        lg_t = dt.log()
        cid = ids[rows]
        valid = cid >= 0
        sid = cid.clamp(min=0).long()
        xk = xt.gather(1, sid)
        logq = (xk - mt[:, None]) - lg_t[:, None]
        pc, ptc = prep.p[rows], prep.ptail[rows]
        kl = torch.where(pc != 0, pc * (prep.logp[rows] - logq), 0.0).sum(-1)
        m = pc.sum(-1) + ptc
        if prep.tail:
            sk = torch.where(valid, (xk - mt[:, None]).exp(), 0.0).sum(-1)
            qtail = ((dt - sk) / dt).clamp(min=TINY)
            kl = kl + torch.where(ptc != 0, ptc * (ptc.clamp(min=TINY).log() - qtail.log()), 0.0)
            stats.inv_qtail[rows] = 1.0 / qtail
        stats.kl[rows], stats.mass[rows] = kl, m
        stats.max_t[rows], stats.logsum_t[rows] = mt, lg_t
    return stats


# ---------------------------------------------------------------------------------------------- backward
def reference_backward(
    prep: Prepared, stats: RowStats, a: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """grad[i] = a*(q_i*m - ptail*min(q_i*r, 1)) + c*softmax(s)_i off the top-k; fixed up at the top-k ids
    (a*(q_j*m - p_j)) and at the label (-c). Rows with a = c = 0 get zeros without being read."""
    s, ids, labels, T = prep.student, prep.ids, prep.labels, prep.temperature
    N, V = s.shape
    grad = torch.zeros_like(s)
    active = a != 0
    if c is not None:
        active = active | (c != 0)
    idx_all = _active_rows(active)
    bufs = _Buffers(idx_all.numel(), V, s.device, 3)
    for rows in _chunks(idx_all, V):
        x, q, e = bufs.take(_nrows(rows, V))
        x.copy_(s[rows])
        ac = a[rows][:, None]
        # q = exp((x/T - max_T) - logsum_T)
        torch.mul(x, 1.0 / T, out=q).sub_(stats.max_t[rows][:, None]).sub_(
            stats.logsum_t[rows][:, None]
        ).exp_()
        cid = ids[rows]
        sid = cid.clamp(min=0).long()
        qk = q.gather(1, sid)  # before q is scaled in place
        ptc = prep.ptail[rows][:, None]
        rc = stats.inv_qtail[rows][:, None]
        if prep.tail:
            tailk = ptc * (qk * rc).clamp(max=1.0)
            torch.mul(q, rc, out=e).clamp_(max=1.0).mul_(ac * ptc)
        g = q.mul_(ac * stats.mass[rows][:, None])
        if prep.tail:
            g.sub_(e)
        if c is not None:
            cc = c[rows][:, None]
            torch.sub(x, stats.max_1[rows][:, None], out=e).sub_(stats.logsum_1[rows][:, None]).exp_().mul_(
                cc
            )
            g.add_(e)
        # top-k fix-up: the dense value holds a*(q*m - ptail*min(q*r, 1)); the wanted one a*(q*m - p)
        delta = torch.where(cid >= 0, ac * ((tailk if prep.tail else 0.0) - prep.p[rows]), 0.0)
        g.scatter_add_(1, sid, delta)
        if c is not None:
            lab = labels[rows]
            g.scatter_add_(1, lab.clamp(min=0)[:, None], torch.where(lab >= 0, -cc.squeeze(1), 0.0)[:, None])
        if isinstance(rows, slice):
            grad[rows].copy_(g)
        else:
            grad.index_copy_(0, rows, g.to(s.dtype))
    return grad


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
