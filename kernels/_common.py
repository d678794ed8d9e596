"""Shared, backend-independent pieces of the distillation losses (everything here is O(N*k), never O(N*V)).

* `prepare` validates and normalises the inputs and does the teacher-side math (teacher probabilities of the
  top-k ids, tail mass, which rows count) in plain PyTorch: it is k-wide, so cheap on any device.
* `reduce_rows` turns per-row losses into the two scalar losses without a host sync.
* `row_scales` turns the two upstream gradients into per-row coefficients for the backward pass.

See docs/kernels.md for the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# q_tail is clamped to at least this (fp32 normal range; log(TINY) ~ -69).
TINY = 1e-30


@dataclass
class Prepared:
    student: torch.Tensor  # [N, V], last dim contiguous
    ids: torch.Tensor  # [N, k] int32/int64, negative = absent
    p: torch.Tensor  # [N, k] fp32 teacher probabilities (0 for absent entries)
    logp: torch.Tensor  # [N, k] fp32 log of p (0 for absent entries)
    ptail: torch.Tensor  # [N] fp32 teacher tail mass (zeros for the renormalised variant)
    sel: torch.Tensor  # [N] fp32 1.0 where the row counts for the KL
    labels: torch.Tensor | None  # [N] int64 MLM label, -1 where the row has none
    temperature: float
    tail: bool
    orig_shape: torch.Size


def _flat(x: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    if x is None:
        return None
    if x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} elements, expected one per row ({n})")
    return x.reshape(n)


def _ids_dtype(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype in (torch.int32, torch.int64):
        return ids
    if ids.dtype in (torch.uint8, torch.int8, torch.int16, torch.uint16):
        return ids.to(torch.int32)
    if ids.dtype in (torch.uint32,):
        return ids.to(torch.int64)
    raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")


def prepare(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> Prepared:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() < 2:
        raise ValueError("student_logits must be [N, V] (or [..., V])")
    if not student_logits.is_floating_point():
        raise TypeError("student_logits must be floating point")
    orig_shape = student_logits.shape
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    if s.stride(-1) != 1:
        s = s.contiguous()
    N = s.shape[0]
    k = teacher_ids.shape[-1]
    ids = _ids_dtype(teacher_ids.reshape(-1, k))
    if ids.shape[0] != N:
        raise ValueError(f"teacher_ids has {ids.shape[0]} rows, student_logits has {N}")
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if t.shape != ids.shape:
        raise ValueError(f"teacher_logits shape {tuple(t.shape)} != teacher_ids shape {tuple(ids.shape)}")
    ids = ids.to(s.device).contiguous()
    valid = ids >= 0
    z = t.to(device=s.device, dtype=torch.float32) / temperature
    zero = torch.zeros((), device=s.device, dtype=torch.float32)
    if teacher_lse is None:
        zm = z.masked_fill(~valid, float("-inf"))
        lse_k = torch.logsumexp(zm, dim=-1, keepdim=True)
        logp = torch.where(valid, zm - lse_k, zero)
        p = torch.where(valid, logp.exp(), zero)
        ptail = torch.zeros(N, device=s.device, dtype=torch.float32)
    else:
        lse = _flat(teacher_lse, N, "teacher_lse").to(device=s.device, dtype=torch.float32)
        logp = torch.where(valid, z - lse[:, None], zero)
        p = torch.where(valid, logp.exp(), zero)
        ptail = (1.0 - p.sum(-1)).clamp(min=0.0)
    sel = valid.any(-1)
    if row_mask is not None:
        sel = sel & _flat(row_mask, N, "row_mask").to(s.device).bool()
    labels = None
    if mlm_labels is not None:
        lab = _flat(mlm_labels, N, "mlm_labels").to(s.device).long()
        labels = torch.where(lab != ignore_index, lab, torch.full_like(lab, -1)).contiguous()
    return Prepared(
        student=s,
        ids=ids,
        p=p.contiguous(),
        logp=logp.contiguous(),
        ptail=ptail.contiguous(),
        sel=sel.float().contiguous(),
        labels=labels,
        temperature=temperature,
        tail=teacher_lse is not None,
        orig_shape=orig_shape,
    )


def reduce_rows(
    kl_rows: torch.Tensor,
    ce_rows: torch.Tensor | None,
    sel: torch.Tensor,
    labels: torch.Tensor | None,
    T: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 * mean of kl_rows over selected rows, mean of ce_rows over labelled rows); 0 when none."""
    kl = (kl_rows * sel).sum() * (T * T) / sel.sum().clamp(min=1.0)
    if ce_rows is None or labels is None:
        ce = torch.zeros((), device=kl.device, dtype=torch.float32)
    else:
        lab = (labels >= 0).float()
        ce = (ce_rows * lab).sum() / lab.sum().clamp(min=1.0)
    return kl, ce


def row_scales(
    g_kl: torch.Tensor | None,
    g_ce: torch.Tensor | None,
    sel: torch.Tensor,
    labels: torch.Tensor | None,
    T: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row coefficients: a = g_kl * T / N_sel on selected rows, c = g_ce / N_lab on labelled rows.

    d(T^2 * mean KL)/ds = (T^2 / N_sel) * (1/T) * (...) = (T / N_sel) * (...), see docs/kernels.md.
    """
    if g_kl is None:
        a = torch.zeros_like(sel)
    else:
        a = sel * (g_kl.float() * T / sel.sum().clamp(min=1.0))
    c = None
    if labels is not None:
        lab = (labels >= 0).float()
        if g_ce is None:
            c = torch.zeros_like(lab)
        else:
            c = lab * (g_ce.float() / lab.sum().clamp(min=1.0))
    return a.contiguous(), (c.contiguous() if c is not None else None)


def cosine_rows_mask(n: int, row_mask: torch.Tensor | None, device) -> torch.Tensor:
    if row_mask is None:
        return torch.ones(n, device=device, dtype=torch.float32)
    return _flat(row_mask, n, "row_mask").to(device).bool().float()


def logit_loss_function(name: str, forward_rows, backward_grad) -> type[torch.autograd.Function]:
    """The (kl, ce) autograd Function around a backend's per-row forward and its gradient pass.

    `forward_rows(s, ids, p, logp, ptail, sel, labels, T, tail)` returns (kl_rows, ce_rows, stat_t,
    stat_1, m, r); `backward_grad(s, ids, p, ptail, labels, stat_t, stat_1, m, r, a, c, T, tail)` returns
    the gradient of the student logits. Triton and the reference differ only in these two functions.
    """

    class _LogitLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, ids, p, logp, ptail, sel, labels, T, tail):
            kl_rows, ce_rows, stat_t, stat_1, m, r = forward_rows(
                s, ids, p, logp, ptail, sel, labels, T, tail
            )
            ctx.save_for_backward(s, ids, p, ptail, sel, labels, stat_t, stat_1, m, r)
            ctx.T, ctx.tail = T, tail
            ctx.set_materialize_grads(False)
            return reduce_rows(kl_rows, ce_rows, sel, labels, T)

        @staticmethod
        def backward(ctx, g_kl, g_ce):
            s, ids, p, ptail, sel, labels, stat_t, stat_1, m, r = ctx.saved_tensors
            if g_kl is None and g_ce is None:
                return (None,) * 9
            a, c = row_scales(g_kl, g_ce, sel, labels, ctx.T)
            grad = backward_grad(s, ids, p, ptail, labels, stat_t, stat_1, m, r, a, c, ctx.T, ctx.tail)
            return (grad,) + (None,) * 8

    _LogitLoss.__name__ = _LogitLoss.__qualname__ = name
    return _LogitLoss
