"""Fused LM head + distillation losses: `logits = hidden @ weight.T + bias` computed chunk by chunk of rows and
fed straight into the KL/CE kernels, so the full [N, V] logits (and their gradient) never exist.

Experimental: the trainer does not use it, and it has known limits. Under autocast with a bf16 hidden state
and fp32 weights the backward, which recomputes the logits outside autocast, fails on a dtype mismatch; a
bf16 weight's gradient is accumulated in bf16; and the backward needs the whole weight again, so it is not
safe under ZeRO-3 weight partitioning.

Forward: per chunk, the logits chunk [c, V] is computed, reduced to per-row statistics by the loss forward
(Triton on CUDA, the reference elsewhere) and dropped. Backward: per chunk, the logits are recomputed (one
extra matmul: the price of supporting independent upstream gradients for the KL and the CE, which rules out
Liger's gradient-in-the-forward), the loss backward writes the chunk's logit gradient, and it is folded into
the gradients of hidden, weight (accumulated in place in its dtype) and bias (fp32 accumulation).

Peak extra memory: two [c, V] chunks (the logits and their gradient) besides the gradients themselves.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    BackwardGrad,
    ForwardRows,
    Prepared,
    RowStats,
    prepare,
    reduce_rows,
    row_scales,
    save_for_backward,
    saved_for_backward,
)


def _backend_fns(name: str) -> tuple[ForwardRows, BackwardGrad]:
    if name == "triton":
        from . import kl

        return kl.kl_ce_forward, kl.kl_ce_backward
    return reference.reference_forward, reference.reference_backward


def default_chunk_rows(V: int, n: int) -> int:
    """About 2^24 logits per chunk (32 MiB in bf16: 549 rows at V = 30,522), at least 64 rows so the matmuls
    stay efficient."""
    return max(1, min(n, max(64, (1 << 24) // max(V, 1))))


def _logits(h, weight, bias):
    out = h @ weight.t()
    if bias is not None:
        out += bias
    return out


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


class FusedLinearDistillLoss(torch.autograd.Function):
    """Applied as `apply(hidden, weight, bias, prep, chunk, backend)`, `prep` from `prepare` on a stand-in for
    the logits: its per-row tensors are used chunk by chunk with the chunk's logits in place of the stand-in."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, prep: Prepared, chunk: int, backend: str):
        forward_rows, _ = _backend_fns(backend)
        stats = RowStats.allocate(hidden.shape[0], hidden.device, prep.labels is not None)
        with torch.no_grad():
            for sl in _row_chunks(hidden.shape[0], chunk):
                logits = _logits(hidden[sl], weight, bias)
                stats.write_rows(sl, forward_rows(prep.rows(sl, logits)))
                del logits
        save_for_backward(ctx, prep, stats, hidden, weight, bias)
        ctx.chunk, ctx.backend = chunk, backend
        ctx.set_materialize_grads(False)
        return reduce_rows(stats, prep)

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        if g_kl is None and g_ce is None:
            return (None,) * 6
        (hidden, weight, bias), prep, stats = saved_for_backward(ctx)
        _, backward_grad = _backend_fns(ctx.backend)
        a, c = row_scales(g_kl, g_ce, prep)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # weight gradient accumulated in place in the weight's dtype (addmm: no [V, H] temporaries), as Liger does
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
        with torch.no_grad():
            for sl in _row_chunks(hidden.shape[0], ctx.chunk):
                logits = _logits(hidden[sl], weight, bias)
                g = backward_grad(prep.rows(sl, logits), stats.rows(sl), a[sl], None if c is None else c[sl])
                del logits
                if need_h:
                    grad_h[sl] = g @ weight
                if need_w:
                    grad_w.addmm_(g.t(), hidden[sl])
                if need_b:
                    grad_b += g.float().sum(0)
                del g
        grad_b = grad_b.to(bias.dtype) if need_b and bias is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def fused_linear_distillation_losses(
    hidden,
    weight,
    bias,
    teacher_ids,
    teacher_logits,
    temperature,
    row_mask=None,
    teacher_lse=None,
    mlm_labels=None,
    ignore_index=-100,
    chunk_rows: int | None = None,
    backend: str | None = None,
):
    """(kl, ce) of `distillation_logit_losses(hidden @ weight.T + bias, ...)` without materialising the logits.

    hidden [N, H] (or [..., H]), weight [V, H], bias [V] or None. `backend` 'triton'|'reference', default from
    the dispatch rules (`offline_kd.kernels.backend_for(hidden)`)."""
    if backend is None:
        from . import backend_for

        backend = backend_for(hidden)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {H}")
    # `prepare` only needs the logits' shape and device: a stand-in with strides (0, 1), never materialised.
    stand_in = torch.empty(V, device=h.device, dtype=h.dtype).expand(h.shape[0], V)
    prep = prepare(
        stand_in, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse, mlm_labels, ignore_index
    )
    chunk = chunk_rows or default_chunk_rows(V, h.shape[0])
    return FusedLinearDistillLoss.apply(h, weight, bias, prep, chunk, backend)
