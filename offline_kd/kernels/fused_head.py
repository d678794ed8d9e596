"""Fused LM head + distillation losses: `logits = hidden @ weight.T + bias` computed chunk by chunk of rows and
fed straight into the KL/CE kernels, so the full [N, V] logits (and their gradient) never exist.

Experimental: the trainer does not use it (the student's own head runs inside the model).

The loss weights are known up front, so everything happens in the forward, chunk by chunk: the chunk's
logits, the kernels' gradient-in-forward pass writing the logit gradient over them, and that gradient folded
into the gradients of hidden (the chunk's rows), weight and bias (accumulated in fp32 whatever the compute
dtype). The backward only multiplies the three by the upstream gradient. Hence:

* autocast: the matmuls run in the autocast dtype when autocast is on at the call (a bf16 hidden state
  with fp32 weights works); the gradients come back in each input's own dtype;
* ZeRO-3: the backward never reads the weight, so releasing its gathered copy after the forward (what ZeRO-3
  does to a partitioned parameter) is safe. The weight must be whole during the forward: call this inside
  the forward of the module that owns it, or register it as an external parameter of the calling module;
* memory: one [c, V] logits chunk in the compute dtype besides the three gradients (fp32 [V, H] for the
  weight while the forward runs).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import reference
from ._common import (
    ForwardGrad,
    LossParts,
    Prepared,
    RowStats,
    loss_coefficients,
    prepare,
    reduce_rows,
)
from .dispatch import backend_for


def _forward_grad(name: str) -> ForwardGrad:
    if name == "triton":
        from . import kl

        return kl.kl_ce_forward_grad
    return reference.reference_forward_grad


def default_chunk_rows(V: int, n: int) -> int:
    """About 2^24 logits per chunk (32 MiB in bf16: 549 rows at V = 30,522), at least 64 rows so the matmuls
    stay efficient."""
    return max(1, min(n, max(64, (1 << 24) // max(V, 1))))


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly half precision: the product rounded once, to fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:  # CUDA: half-precision inputs, fp32 output, no fp32 copies of the inputs
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    except (RuntimeError, TypeError, NotImplementedError):
        acc.addmm_(a.float(), b.float())


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for hidden's device, else the promoted input dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class FusedLinearDistillLoss(torch.autograd.Function):
    """Applied as `apply(hidden, weight, bias, prep, weights, chunk, backend, needs)`, `prep` from `prepare`
    on a stand-in for the logits (its per-row tensors are used chunk by chunk with the chunk's logits in
    place of the stand-in); `needs` says which of hidden, weight and bias want a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, prep: Prepared, weights, chunk: int, backend: str, needs):
        dtype = compute_dtype(hidden, weight)
        forward_grad = _forward_grad(backend)
        coef = loss_coefficients(prep, weights)
        n, V = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = needs
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_b else None
        stats = RowStats.allocate(n, hidden.device, prep.labels is not None)
        w_c = weight.to(dtype)
        b_c = bias.to(dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for sl in _row_chunks(n, chunk):
                h_c = hidden[sl].to(dtype)
                logits = torch.addmm(b_c, h_c, w_c.t()) if b_c is not None else h_c @ w_c.t()
                g = logits if any(needs) else None  # the gradient overwrites the chunk's logits
                if g is not None and prep.vocab < V:
                    g[:, prep.vocab :].zero_()  # padding rows of the weight: outside the softmax
                stats.write_rows(sl, forward_grad(prep.rows(sl, logits), coef, g))
                if need_h:
                    grad_h[sl] = g @ w_c
                if need_w:
                    _addmm_fp32_(grad_w, g.t(), h_c)
                if need_b:
                    grad_b += g.sum(0, dtype=torch.float32)
                del logits, g
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        kl, ce = reduce_rows(stats, prep)
        ctx.mark_non_differentiable(kl, ce)
        return weights[0] * kl + weights[1] * ce, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, *_unused):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "the fused head's gradients were computed in its forward and serve one backward only"
            )
        scaled = tuple(None if x is None else x.mul_(g_total.to(x.dtype)) for x in grads)
        return (*scaled, None, None, None, None, None)


def fused_linear_distillation_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    backend: str | None = None,
    vocab_size: int | None = None,
) -> LossParts:
    """`distillation_losses(hidden @ weight.T + bias, ...)` without materialising the logits.

    hidden [N, H] (or [..., H]), weight [V, H], bias [V] or None. `backend` 'triton'|'reference', default from
    the dispatch rules (`offline_kd.kernels.backend_for(hidden)`)."""
    if backend is None:
        backend = backend_for(hidden)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {H}")
    # `prepare` only needs the logits' shape and device: a stand-in with strides (0, 1), never materialised.
    stand_in = torch.empty(V, device=h.device, dtype=h.dtype).expand(h.shape[0], V)
    prep = prepare(
        stand_in, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse, mlm_labels, ignore_index,
        vocab_size,
    )  # fmt: skip
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (h, weight, bias))
    chunk = chunk_rows or default_chunk_rows(V, h.shape[0])
    w = tuple(float(x) for x in weights)
    return LossParts(*FusedLinearDistillLoss.apply(h, weight, bias, prep, w, chunk, backend, needs))
