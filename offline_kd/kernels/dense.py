"""Distillation against the teacher's full distribution: T²·KL(softmax(t/T) ‖ softmax(s/T)) over the whole
vocabulary plus the MLM cross-entropy, from dense teacher logits or recomputed chunk by chunk from the
teacher's last hidden states through its MLM head ("exact" offline distillation).

* `dense_distillation_losses(student_logits, teacher_logits, T, ...)`: the teacher's logits given.
* `exact_distillation_losses(student_logits, teacher_hidden, teacher_head, T, ...)`: the teacher's logits
  computed per row chunk under no_grad and dropped after that chunk's losses and gradient rows are written.

Both return `LossParts(total, kl, mlm)` with `total = w_kl·kl + w_mlm·mlm` differentiable w.r.t. the student
logits and its gradient written in the forward (`grad_in_forward.GradInForward`). Triton on CUDA
(`dense_kl.py`), the chunked reference elsewhere (`dense_reference.py`), by `backend_for`.
Semantics as the sparse losses (docs/kernels.md): means over the selected / labelled rows, 0.0 when there are
none, only the student gets a gradient, a NaN teacher logit on a selected row makes the KL NaN.
Math, memory and dtypes: docs/kernels-dense.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import dense_reference
from ._common import LossParts
from .dispatch import backend_for
from .grad_in_forward import GradInForward

# Teacher logits per exact-mode chunk: 2^24 (64 MiB in fp32, 549 rows at V = 30,522), at least 64 rows so the
# head's matmuls stay efficient.
EXACT_CHUNK_ELEMS = 1 << 24


@dataclass
class _Inputs:
    s: torch.Tensor  # [N, W], unit last stride; the first `vocab` columns are the vocabulary
    vocab: int
    sel: torch.Tensor  # [N] int8, 1 = the row counts for the KL
    labels: torch.Tensor | None  # [N] int64, -1 = no label
    temperature: float
    weights: tuple[float, float]


def _flat(x: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    if x is not None and x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} elements, expected one per row ({n})")
    return None if x is None else x.reshape(n)


def check_labels(labels: torch.Tensor, V: int) -> None:
    """Labels (-1 = none) must lie in [0, V). CPU: ValueError naming the row. CUDA: a device-side assertion
    (no host sync; it surfaces at the next synchronisation), and the kernel never dereferences the label."""
    bad = (labels < -1) | (labels >= V)
    if labels.device.type == "cpu":
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"mlm_labels[{row}] = {int(labels[row])} is outside the vocabulary [0, {V})")
    else:
        torch._assert_async(~bad.any(), f"mlm_labels outside the vocabulary [0, {V})")


def prepare_inputs(
    student_logits, temperature, row_mask, mlm_labels, ignore_index, weights, vocab_size
) -> _Inputs:
    temperature = float(temperature)
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if student_logits.dim() < 2 or student_logits.shape[-1] < 1 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point [N, V], got {tuple(student_logits.shape)}")
    W = student_logits.shape[-1]
    V = W if vocab_size is None else int(vocab_size)
    if not 0 < V <= W:
        raise ValueError(f"vocab_size must be in [1, {W}] (the logits' width), got {vocab_size}")
    s = student_logits.reshape(-1, W)
    s = s if s.stride(-1) == 1 else s.contiguous()
    N = s.shape[0]
    sel = torch.ones(N, dtype=torch.int8, device=s.device)
    if row_mask is not None:
        sel = _flat(row_mask, N, "row_mask").to(device=s.device, dtype=torch.bool).to(torch.int8)
    labels = None
    if mlm_labels is not None:
        lab = _flat(mlm_labels, N, "mlm_labels").to(device=s.device, dtype=torch.int64)
        labels = torch.where(lab == ignore_index, -1, torch.where(lab < 0, -2, lab)).contiguous()
        check_labels(labels, V)
    w = tuple(float(x) for x in weights)
    if len(w) != 2:
        raise ValueError(f"weights must be (w_kl, w_mlm), got {weights!r}")
    return _Inputs(s, V, sel.contiguous(), labels, temperature, w)


def _width_ok(width: int, inp: _Inputs, vocab_size: int | None) -> bool:
    """The teacher's logits are as wide as the student's, or (padded logits) at least vocab_size wide."""
    return width == inp.s.shape[1] if vocab_size is None else width >= inp.vocab


def _backend(s: torch.Tensor):
    """(rows function, in-place upstream scaling) of the backend that `backend_for` picks for s."""
    if backend_for(s) == "triton":
        from . import dense_kl

        return dense_kl.dense_kl_ce_rows, dense_kl.scale_grad_
    return dense_reference.dense_kl_ce_rows, dense_reference.scale_grad_


class DenseRows:
    """The per-row dense KL and CE of one batch, written chunk by chunk of rows, and their weighted means.

    `write(sl, s, t, grad)` runs the backend's kernel on rows `sl`: student logits `s` and teacher logits
    `t` of those rows ([c, >= vocab], only the first `vocab` columns read), the gradient of the weighted
    total written into `grad` (which may be `s` itself) when given. `totals()` gives (total, kl, mlm)."""

    def __init__(self, inp: _Inputs):
        self.inp, self.vocab = inp, inp.vocab
        self.rows_fn, self.scale_ = _backend(inp.s)
        T, (w_kl, w_mlm) = inp.temperature, inp.weights
        dev, N = inp.s.device, inp.s.shape[0]
        self.n_sel = inp.sel.sum().float().clamp(min=1.0)
        self.n_lab = (inp.labels >= 0).sum().float().clamp(min=1.0) if inp.labels is not None else None
        mlm_coef = (w_mlm / self.n_lab) if self.n_lab is not None else self.n_sel * 0.0
        self.coef = torch.stack([w_kl * T / self.n_sel, mlm_coef])
        self.kl_rows = torch.empty(N, device=dev, dtype=torch.float32)
        self.ce_rows = torch.empty_like(self.kl_rows) if inp.labels is not None else None

    def write(self, sl: slice, s: torch.Tensor, t: torch.Tensor, grad: torch.Tensor | None) -> None:
        inp, V, ce = self.inp, self.vocab, self.ce_rows
        self.rows_fn(
            s[:, :V], t[:, :V], inp.sel[sl], inp.labels[sl] if ce is not None else None, self.coef,
            inp.temperature, grad[:, :V] if grad is not None else None, self.kl_rows[sl],
            ce[sl] if ce is not None else None,
        )  # fmt: skip

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, (w_kl, w_mlm) = self.inp.temperature, self.inp.weights
        kl = self.kl_rows.sum() * (T * T) / self.n_sel
        if self.ce_rows is not None:
            mlm = self.ce_rows.sum() / self.n_lab
        else:
            mlm = torch.zeros((), device=self.kl_rows.device)
        return w_kl * kl + w_mlm * mlm, kl, mlm


def _losses(
    inp: _Inputs, teacher_chunks: Callable[[int, int], torch.Tensor], chunk: int
) -> tuple[Callable, Callable]:
    """The `compute` closure for GradInForward (and the scaling function): per row chunk, the teacher's
    logits, then the kernel writing that chunk's per-row losses and gradient rows."""

    def compute(s: torch.Tensor, need_grad: bool):
        rows = DenseRows(inp)
        grad = torch.empty(s.shape, device=s.device, dtype=s.dtype) if need_grad else None
        if grad is not None and inp.vocab < s.shape[1]:
            grad[:, inp.vocab :].zero_()  # padding columns: outside the softmax
        for start in range(0, s.shape[0], chunk):  # the Triton launcher runs under its own device guard
            sl = slice(start, min(s.shape[0], start + chunk))
            rows.write(sl, s[sl], teacher_chunks(sl.start, sl.stop), grad[sl] if grad is not None else None)
        total, kl, mlm = rows.totals()
        return total, (kl, mlm), grad

    return compute, _backend(inp.s)[1]


def _run(inp: _Inputs, teacher_chunks: Callable[[int, int], torch.Tensor], chunk: int) -> LossParts:
    compute, scale_ = _losses(inp, teacher_chunks, chunk)
    return LossParts(*GradInForward.apply(inp.s, compute, scale_))


def dense_distillation_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> LossParts:
    """LossParts(w_kl·kl + w_mlm·mlm, kl, mlm) with kl = T²·mean over rows where row_mask (default all) of
    KL(softmax(t/T) ‖ softmax(s/T)) over the full vocabulary, mlm = mean CE at T = 1 over rows whose label
    != ignore_index. student_logits / teacher_logits [..., V], any float dtypes; the teacher is a constant.
    `vocab_size` < the logits' width: only the first vocab_size columns are the vocabulary (padded logits,
    whose padding never gets probability and gets a zero gradient)."""
    inp = prepare_inputs(student_logits, temperature, row_mask, mlm_labels, ignore_index, weights, vocab_size)
    N = inp.s.shape[0]
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    if t.shape[0] != N or not t.is_floating_point() or not _width_ok(t.shape[1], inp, vocab_size):
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} do not match student_logits {tuple(inp.s.shape)}"
        )
    t = t.to(inp.s.device)
    t = t if t.stride(-1) == 1 else t.contiguous()
    return _run(inp, lambda a, b: t[a:b], max(inp.s.shape[0], 1))


def head_dtype(head: nn.Module) -> torch.dtype:
    """The dtype the teacher's logits are computed in: the head's parameters' (fp32 unless it was cast)."""
    p = next(head.parameters(), None)
    return p.dtype if p is not None else torch.float32


def exact_chunk_rows(V: int) -> int:
    return max(64, EXACT_CHUNK_ELEMS // max(V, 1))


def exact_distillation_losses(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    chunk_rows: int | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> LossParts:
    """`dense_distillation_losses(student_logits, teacher_head(teacher_hidden), ...)` without ever holding
    more than `chunk_rows` rows of teacher logits (default `exact_chunk_rows(V)`).

    teacher_hidden [..., H] (e.g. the stored fp16 last hidden states) is cast to the head's parameter dtype
    and run through the head with autocast off and no gradient, chunk by chunk. With `vocab_size`, the
    student's and the head's logits may be wider than the vocabulary (padded to a multiple of 64 for aligned
    rows); only the first vocab_size columns count."""
    inp = prepare_inputs(student_logits, temperature, row_mask, mlm_labels, ignore_index, weights, vocab_size)
    N, V = inp.s.shape[0], inp.vocab
    h = _flat_rows(teacher_hidden, N).detach()
    dtype = head_dtype(teacher_head)

    def teacher_chunk(a: int, b: int) -> torch.Tensor:
        x = h[a:b].to(device=inp.s.device, dtype=dtype)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            t = teacher_head(x)
        if t.dim() != 2 or t.shape[0] != b - a or not _width_ok(t.shape[1], inp, vocab_size):
            raise ValueError(
                f"teacher_head gives {t.shape[-1]} logits per row; the student has {inp.s.shape[1]}"
            )
        return t if t.stride(-1) == 1 else t.contiguous()

    return _run(inp, teacher_chunk, chunk_rows or exact_chunk_rows(V))


def _flat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] != n:
        raise ValueError(f"teacher_hidden has {flat.shape[0]} rows, student_logits has {n}")
    return flat
