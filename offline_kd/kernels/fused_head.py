"""The student's output layer fused into the distillation losses: `logits = hidden @ weight.T + bias` computed
chunk by chunk of rows and fed straight into the loss kernels, so no [N, V] tensor of either model exists
beyond one chunk (Liger-Kernel's fused linear cross-entropy, with a teacher).

Per row chunk, in the forward: the student's logits; the teacher's (the exact source: its head on the stored
hidden states, `teacher_logits(a, b)`; the top-k source: nothing, the stored top-k is k-wide); the kernel
writing the per-row losses and the gradient of the weighted total over the student's logits; that gradient
folded into the gradients of hidden (the chunk's rows), weight and bias (accumulated in fp32 whatever the
compute dtype). The backward only multiplies the three by the upstream gradient. Hence:

* autocast: the matmuls run in the autocast dtype when autocast is on at the call (a bf16 hidden state
  with fp32 weights works); the gradients come back in each input's own dtype;
* ZeRO-3: the backward never reads the weight, so releasing its gathered copy after the forward (what ZeRO-3
  does to a partitioned parameter) is safe. The weight must be whole during the forward: the trainer
  registers it as an external parameter of the module whose forward calls this;
* memory: one [c, W] logits chunk in the compute dtype (the gradient is written over it) and, for the exact
  source, the teacher's [c, V] fp32 chunk: at most 2·c·V·4 bytes, besides the gradients of the inputs.

Rows are taken as given: the caller passes only rows that count for a loss (the trainer drops padding
before the head, so no padding row goes through either model's head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from . import dense, reference
from ._common import ForwardGrad, LossParts, Prepared, RowStats, loss_coefficients, prepare, reduce_rows
from .dispatch import backend_for

# Student logits per chunk: 2^23 (256 rows at V = 30,528, 15 MiB in bf16, with the exact source's 30 MiB of
# fp32 teacher logits about a GPU's L2), in multiples of 64 rows for the matmuls' tiles.
CHUNK_ELEMS = 1 << 23
CHUNK_MULTIPLE = 64


def default_chunk_rows(V: int, n: int) -> int:
    """Rows per chunk: about CHUNK_ELEMS logits, a multiple of 64 rows (at least 64), at most n."""
    rows = max(CHUNK_MULTIPLE, (CHUNK_ELEMS // max(V, 1)) // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    return max(1, min(n, rows))


class _TopkRows:
    """The top-k source's per-row losses, chunk by chunk (the sparse kernels' gradient-in-forward pass)."""

    def __init__(self, prep: Prepared, weights: tuple[float, float], backend: str):
        self.prep, self.vocab = prep, prep.vocab
        self.coef = loss_coefficients(prep, weights)
        self.forward_grad: ForwardGrad = (
            _triton_forward_grad() if backend == "triton" else reference.reference_forward_grad
        )
        self.stats = RowStats.allocate(prep.sel.shape[0], prep.sel.device, prep.labels is not None)
        self.weights = weights

    def write(self, sl: slice, logits: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.stats.write_rows(sl, self.forward_grad(self.prep.rows(sl, logits), self.coef, grad))

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kl, ce = reduce_rows(self.stats, self.prep)
        return self.weights[0] * kl + self.weights[1] * ce, kl, ce


def _triton_forward_grad() -> ForwardGrad:
    from . import kl

    return kl.kl_ce_forward_grad


class _ExactRows:
    """The exact source's per-row losses: the teacher's logits of the chunk, then the dense kernels."""

    def __init__(self, rows: dense.DenseRows, teacher_logits: Callable[[int, int], torch.Tensor]):
        self.rows, self.teacher_logits, self.vocab = rows, teacher_logits, rows.vocab

    def write(self, sl: slice, logits: torch.Tensor, grad: torch.Tensor | None) -> None:
        t = self.teacher_logits(sl.start, sl.stop)
        if t.dim() != 2 or t.shape[0] != sl.stop - sl.start or t.shape[1] < self.vocab:
            raise ValueError(f"teacher_logits gives {tuple(t.shape)} for rows {sl.start}:{sl.stop}")
        self.rows.write(sl, logits, t, grad)
        del t

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows.totals()


# Rows of the weight gradient updated at a time where the update needs an fp32 copy of its inputs (a CPU):
# the copy of the chunk's gradient is then at most [ACC_ROWS, c], not [V, c].
ACC_ROWS = 4096


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly half precision: the product accumulated in fp32, and no
    temporary as large as acc (which is the size of the weight)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        try:  # half-precision inputs, accumulated into the fp32 acc by the matmul itself (beta = 1)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    b32 = b.float()
    for start in range(0, a.shape[0], ACC_ROWS):
        acc[start : start + ACC_ROWS].addmm_(a[start : start + ACC_ROWS].float(), b32)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for hidden's device, else the promoted input dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _Grads:
    """The gradients of hidden, weight and bias as the chunks fill them (weight and bias in fp32)."""

    def __init__(self, hidden, weight, bias, needs: tuple[bool, bool, bool]):
        need_h, need_w, need_b = needs
        self.h = torch.empty_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        self.b = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None

    def add_chunk(self, sl: slice, g: torch.Tensor, h_c: torch.Tensor, w_c: torch.Tensor) -> None:
        if self.h is not None:
            self.h[sl] = g @ w_c
        if self.w is not None:
            _addmm_fp32_(self.w, g.t(), h_c)
        if self.b is not None:
            self.b += g.sum(0, dtype=torch.float32)

    def as_inputs(self, weight, bias) -> tuple:
        w = self.w.to(weight.dtype) if self.w is not None else None
        b = self.b.to(bias.dtype) if self.b is not None else None
        return self.h, w, b


class FusedLinearLoss(torch.autograd.Function):
    """Applied as `apply(hidden, weight, bias, rows, chunk, needs)`: `rows` writes a chunk's per-row losses and
    gradient (`_TopkRows`, `_ExactRows`) and gives the totals; `needs` says which of hidden, weight and bias
    want a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, chunk: int, needs):
        dtype = compute_dtype(hidden, weight)
        grads = _Grads(hidden, weight, bias, needs)
        w_c = weight.to(dtype)
        b_c = bias.to(dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                sl = slice(start, min(start + chunk, hidden.shape[0]))
                h_c = hidden[sl].to(dtype)
                logits = torch.addmm(b_c, h_c, w_c.t()) if b_c is not None else h_c @ w_c.t()
                g = logits if any(needs) else None  # the gradient overwrites the chunk's logits
                if g is not None and rows.vocab < logits.shape[1]:
                    g[:, rows.vocab :].zero_()  # padding rows of the weight: outside the softmax
                rows.write(sl, logits, g)
                if g is not None:
                    grads.add_chunk(sl, g, h_c, w_c)
                del logits, g
        ctx.grads = grads.as_inputs(weight, bias)
        total, kl, ce = rows.totals()
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, *_unused):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "the fused head's gradients were computed in its forward and serve one backward only"
            )
        scaled = tuple(None if x is None else x.mul_(g_total.to(x.dtype)) for x in grads)
        return (*scaled, None, None, None)


def _flat_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {H}")
    return hidden.reshape(-1, H)


def _stand_in(h: torch.Tensor, V: int) -> torch.Tensor:
    """What the losses' input checks need of the logits, their shape and device: strides (0, 1), no memory."""
    return torch.empty(V, device=h.device, dtype=h.dtype).expand(h.shape[0], V)


def _apply(h, weight, bias, rows, chunk_rows) -> LossParts:
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (h, weight, bias))
    chunk = chunk_rows or default_chunk_rows(weight.shape[0], h.shape[0])
    return LossParts(*FusedLinearLoss.apply(h, weight, bias, rows, max(1, chunk), needs))


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
    """`distillation_losses(hidden @ weight.T + bias, ...)` (the stored top-k) without materialising the
    logits. hidden [N, H] (or [..., H]), weight [W, H], bias [W] or None. `backend` 'triton'|'reference',
    default from the dispatch rules (`offline_kd.kernels.backend_for(hidden)`)."""
    h = _flat_hidden(hidden, weight)
    prep = prepare(
        _stand_in(h, weight.shape[0]), teacher_ids, teacher_logits, temperature, row_mask, teacher_lse,
        mlm_labels, ignore_index, vocab_size,
    )  # fmt: skip
    rows = _TopkRows(prep, tuple(float(x) for x in weights), backend or backend_for(h))
    return _apply(h, weight, bias, rows, chunk_rows)


def fused_linear_exact_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: Callable[[int, int], torch.Tensor],
    temperature: float,
    row_mask: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    vocab_size: int | None = None,
) -> LossParts:
    """`dense_distillation_losses(hidden @ weight.T + bias, teacher, ...)` with the teacher's logits of rows
    a:b given by `teacher_logits(a, b)` ([b − a, >= vocab] fp32, e.g. the stored head on the stored hidden
    states), neither model's [N, V] logits ever materialised. Backend by `backend_for(hidden)`."""
    h = _flat_hidden(hidden, weight)
    inp = dense.prepare_inputs(
        _stand_in(h, weight.shape[0]), temperature, row_mask, mlm_labels, ignore_index, weights, vocab_size
    )
    return _apply(h, weight, bias, _ExactRows(dense.DenseRows(inp), teacher_logits), chunk_rows)
