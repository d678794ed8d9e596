"""Shared, backend-independent pieces of the distillation losses (everything here is O(N*k), never O(N*V)).

* `prepare` validates and normalises the inputs and does the teacher-side math (teacher probabilities of the
  top-k ids, tail mass, which rows count) in plain PyTorch: it is k-wide, so cheap on any device. Its result,
  a `Prepared`, is what every backend reads.
* `RowStats` is what a backend's forward returns per row: the two losses and the statistics its backward
  reads.
* A backend is three functions (`kl.py`: Triton, `reference.py`: chunked PyTorch):

      forward(prep) -> RowStats
      backward(prep, stats, a, c) -> gradient of prep.student      (a, c: per-row coefficients, `row_scales`)
      forward_grad(prep, coef, grad) -> RowStats (kl, ce only)      (gradient written into `grad`)

  `logit_loss_function` builds the (kl, ce) autograd Function from the first two (independent upstream
  gradients: three passes over the logits); `weighted_losses` runs the third under `GradInForward` (the
  loss weights known up front: the gradient is written in the forward, two passes, optionally over the
  logits themselves).
* `reduce_rows` turns per-row losses into the two scalar losses without a host sync.

Out-of-range inputs: a teacher id or an MLM label outside [0, V) raises a ValueError naming the row for CPU
tensors (checking costs nothing there). On an accelerator the check would be a host synchronisation per
call, so there `prepare` instead turns it into a NaN loss on the device, which the trainer's non-finite-loss
check reports: the row's teacher probabilities become NaN (the id itself is marked absent) and a label
becomes V, which the kernels never dereference and give a NaN cross-entropy. Either way no backend reads or
writes outside the row. See docs/kernels.md for the math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .grad_in_forward import GradInForward


class LossParts(NamedTuple):
    """What every weighted loss of the package returns (sparse, dense, exact, fused head)."""

    total: torch.Tensor  # w_kl·kl + w_mlm·mlm, fp32 0-dim, differentiable w.r.t. the student logits
    kl: torch.Tensor  # T²·mean KL over the selected rows, detached
    mlm: torch.Tensor  # mean CE at T = 1 over the labelled rows, detached


def temperature_power(temperature: float) -> int:
    """T when the T = 1 exponential is that at T raised to a small power (T = 1: the same one, 2: its square,
    4: its square squared; POW * log2(e)/T is then exactly log2(e) in fp32), else 0 (a second exponential)."""
    return int(temperature) if temperature in (1.0, 2.0, 4.0) else 0


@dataclass(frozen=True)
class Prepared:
    """The loss inputs, flattened to rows and checked, with the teacher-side math done."""

    student: torch.Tensor  # [N, W], last dim contiguous; the first `vocab` columns are the vocabulary
    vocab: int  # V <= W: columns >= V (a padded vocabulary) get no probability and a zero gradient
    ids: torch.Tensor  # [N, k] int32/int64, negative = absent
    p: torch.Tensor  # [N, k] fp32 teacher probabilities (0 for absent entries, NaN for out-of-range ids)
    # [N, k] fp32 log of p (0 for absent entries); read by the forward only, so None in the backward
    logp: torch.Tensor | None
    ptail: torch.Tensor  # [N] fp32 teacher tail mass (zeros for the renormalised variant)
    sel: torch.Tensor  # [N] fp32 1.0 where the row counts for the KL
    labels: torch.Tensor | None  # [N] int64 MLM label, -1 where the row has none, V where it is out of range
    temperature: float
    tail: bool  # tail-aware variant (teacher_lse given) rather than the renormalised top-k

    def rows(self, sl: slice, student: torch.Tensor) -> Prepared:
        """Rows `sl` only, with `student` as their logits (the fused LM head computes them chunk by chunk)."""
        return replace(self, student=student, **{f: _rows(getattr(self, f), sl) for f in _ROW_FIELDS})


# Prepared's per-row tensors besides the logits, and those the backward reads (all but logp). Every tensor
# field must be in one of the two, or it would be carried on ctx outside save_for_backward.
_ROW_FIELDS = ("ids", "p", "logp", "ptail", "sel", "labels")
_SAVED_FIELDS = ("student", "ids", "p", "ptail", "sel", "labels")


class RowStats(NamedTuple):
    """What a backend's forward returns per row, each [N] fp32, zeros on rows that count for neither loss.

    The backward reads the statistics after the two losses. The log-sums are relative to the row max, not
    log-sum-exps, for precision: with -1e9 fill logits, max + log(V) would round log(V) away in fp32.
    """

    kl: torch.Tensor  # KL(teacher || student) of the row at T (not yet scaled by T^2)
    ce: torch.Tensor | None  # MLM cross-entropy of the row (None without labels)
    max: torch.Tensor | None  # M, the max of the row's logits s (one max serves every temperature)
    lg_t: torch.Tensor | None  # log2 sum_i 2^((s_i - M) log2(e) / T)
    lg_1: torch.Tensor | None  # the same at T = 1 (None without labels)
    mass: torch.Tensor | None  # m = P + p_tail, the teacher's probability mass (1 unless P > 1)
    inv_qtail: torch.Tensor | None  # 1 / q_tail, the student's tail mass (tail-aware variant; 0 otherwise)

    @classmethod
    def allocate(cls, n: int, device, has_ce: bool, alloc=torch.zeros) -> RowStats:
        """Fresh per-row buffers (`alloc` is torch.zeros or torch.empty); the CE ones only with labels."""

        def vec(wanted: bool = True) -> torch.Tensor | None:
            return alloc(n, device=device, dtype=torch.float32) if wanted else None

        return cls(vec(), vec(has_ce), vec(), vec(), vec(has_ce), vec(), vec())

    def rows(self, sl: slice) -> RowStats:
        return RowStats(*(_rows(x, sl) for x in self))

    def write_rows(self, sl: slice, part: RowStats) -> None:
        """Copy `part`, the statistics of rows `sl`, into these buffers (fields None in either are skipped)."""
        for dst, src in zip(self, part, strict=True):
            if dst is not None and src is not None:
                dst[sl] = src


def _rows(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if x is None else x[sl]


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


def _student_rows(student_logits: torch.Tensor, temperature: float, vocab_size: int | None):
    """(the logits as [N, W] rows with a contiguous last dim, V) after the checks that need only them."""
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if student_logits.dim() < 2:
        raise ValueError("student_logits must be [N, V] (or [..., V])")
    if not student_logits.is_floating_point():
        raise TypeError("student_logits must be floating point")
    W = student_logits.shape[-1]
    V = W if vocab_size is None else int(vocab_size)
    if not 0 < V <= W:
        raise ValueError(f"vocab_size must be in [1, {W}] (the logits' width), got {vocab_size}")
    s = student_logits.reshape(-1, W)
    return (s if s.stride(-1) == 1 else s.contiguous()), V


def host_checks(t: torch.Tensor) -> bool:
    """Whether range checks on `t` may read it on the host: free for CPU tensors, a synchronisation else."""
    return t.device.type == "cpu"


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_ids(ids: torch.Tensor, V: int) -> torch.Tensor:
    """[N, k] bool: ids >= V (negative ids are absent entries). Raises for host-checkable tensors."""
    bad = ids >= V
    if host_checks(ids) and bad.any():
        row, j = _first_bad(bad)
        raise ValueError(
            f"teacher_ids[{row}, {j}] = {int(ids[row, j])} is outside the student's vocabulary [0, {V})"
        )
    return bad


def _check_labels(lab: torch.Tensor, ignore_index: int, V: int) -> torch.Tensor:
    """Labels with -1 for ignore_index and V for anything outside [0, V) (raises for host-checkable ones)."""
    none = lab == ignore_index
    bad = ~none & ((lab < 0) | (lab >= V))
    if host_checks(lab) and bad.any():
        (row,) = _first_bad(bad)
        raise ValueError(
            f"mlm_labels[{row}] = {int(lab[row])} is outside the student's vocabulary [0, {V}) and is not "
            f"ignore_index ({ignore_index})"
        )
    return torch.where(none, -1, torch.where(bad, V, lab)).contiguous()


def _teacher_probs(
    z: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, log p, p_tail) from the teacher's top-k logits over T: renormalised over the k ids without the
    full-vocabulary log-sum-exp `lse`, tail-aware (p_tail = what the k ids leave) with it."""
    zero = torch.zeros((), device=z.device, dtype=torch.float32)
    if lse is None:
        zm = z.masked_fill(~valid, float("-inf"))
        lse_k = torch.logsumexp(zm, dim=-1, keepdim=True)
        logp = torch.where(valid, zm - lse_k, zero)
        p = torch.where(valid, logp.exp(), zero)
        ptail = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
    else:
        logp = torch.where(valid, z - lse[:, None], zero)
        p = torch.where(valid, logp.exp(), zero)
        ptail = (1.0 - p.sum(-1)).clamp(min=0.0)
    return p, logp, ptail


def prepare(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> Prepared:
    temperature = float(temperature)
    s, V = _student_rows(student_logits, temperature, vocab_size)
    N = s.shape[0]
    k = teacher_ids.shape[-1]
    ids = _ids_dtype(teacher_ids.reshape(-1, k))
    if ids.shape[0] != N:
        raise ValueError(f"teacher_ids has {ids.shape[0]} rows, student_logits has {N}")
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if t.shape != ids.shape:
        raise ValueError(f"teacher_logits shape {tuple(t.shape)} != teacher_ids shape {tuple(ids.shape)}")
    ids = ids.to(s.device)
    out_of_range = _check_ids(ids, V)
    valid = (ids >= 0) & ~out_of_range
    ids = torch.where(out_of_range, -1, ids).contiguous()
    z = t.to(device=s.device, dtype=torch.float32) / temperature
    lse = _flat(teacher_lse, N, "teacher_lse")
    lse = None if lse is None else lse.to(device=s.device, dtype=torch.float32)
    p, logp, ptail = _teacher_probs(z, valid, lse)
    sel = (ids >= 0).any(-1) | out_of_range.any(-1)
    if row_mask is not None:
        sel = sel & _flat(row_mask, N, "row_mask").to(s.device).bool()
    # an out-of-range id on a selected row: a NaN KL (and gradient) instead of a read outside the row
    p = torch.where(out_of_range & sel[:, None], float("nan"), p)
    labels = None
    if mlm_labels is not None:
        labels = _check_labels(_flat(mlm_labels, N, "mlm_labels").to(s.device).long(), ignore_index, V)
    return Prepared(
        student=s,
        vocab=V,
        ids=ids,
        p=p.contiguous(),
        logp=logp.contiguous(),
        ptail=ptail.contiguous(),
        sel=sel.float().contiguous(),
        labels=labels,
        temperature=temperature,
        tail=teacher_lse is not None,
    )


def reduce_rows(stats: RowStats, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 * mean of the KL rows over selected rows, mean of the CE rows over labelled rows); 0 when none."""
    T, sel, labels = prep.temperature, prep.sel, prep.labels
    kl = (stats.kl * sel).sum() * (T * T) / sel.sum().clamp(min=1.0)
    if stats.ce is None or labels is None:
        ce = torch.zeros((), device=kl.device, dtype=torch.float32)
    else:
        lab = (labels >= 0).float()
        ce = (stats.ce * lab).sum() / lab.sum().clamp(min=1.0)
    return kl, ce


def row_scales(
    g_kl: torch.Tensor | None, g_ce: torch.Tensor | None, prep: Prepared
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row coefficients: a = g_kl * T / N_sel on selected rows, c = g_ce / N_lab on labelled rows.

    d(T^2 * mean KL)/ds = (T^2 / N_sel) * (1/T) * (...) = (T / N_sel) * (...), see docs/kernels.md.
    """
    T, sel, labels = prep.temperature, prep.sel, prep.labels
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


def loss_coefficients(prep: Prepared, weights: tuple[float, float]) -> torch.Tensor:
    """[2] fp32 on the device: (w_kl * T / N_sel, w_mlm / N_lab), the coefficients of a selected row's KL
    gradient and a labelled row's CE gradient in that of w_kl * kl + w_mlm * ce (no host sync)."""
    w_kl, w_ce = weights
    n_sel = prep.sel.sum().clamp(min=1.0)
    coef_kl = (w_kl * prep.temperature) / n_sel
    if prep.labels is None:
        return torch.stack([coef_kl, torch.zeros_like(coef_kl)]).contiguous()
    n_lab = (prep.labels >= 0).sum().float().clamp(min=1.0)
    return torch.stack([coef_kl, w_ce / n_lab]).contiguous()


def cosine_rows_mask(n: int, row_mask: torch.Tensor | None, device) -> torch.Tensor:
    if row_mask is None:
        return torch.ones(n, device=device, dtype=torch.float32)
    return _flat(row_mask, n, "row_mask").to(device).bool().float()


# ------------------------------------------------------------------------------ autograd.Function plumbing
def save_for_backward(ctx, prep: Prepared, stats: RowStats, *others: torch.Tensor | None) -> None:
    """Save `others`, the tensors of `prep` the backward reads and `stats` through ctx.save_for_backward (so
    autograd checks them for in-place changes and frees them with the graph); the rest of `prep` rides on
    ctx. `saved_for_backward` gives them back."""
    ctx.save_for_backward(*others, *(getattr(prep, f) for f in _SAVED_FIELDS), *stats)
    ctx.prepared_rest = replace(prep, **dict.fromkeys(_SAVED_FIELDS + ("logp",)))
    ctx.n_others = len(others)


def saved_for_backward(ctx) -> tuple[tuple[torch.Tensor | None, ...], Prepared, RowStats]:
    """(others, prep, stats) as `save_for_backward` saved them; prep.logp is None."""
    saved = ctx.saved_tensors
    n, n_prep = ctx.n_others, len(_SAVED_FIELDS)
    prep = replace(ctx.prepared_rest, **dict(zip(_SAVED_FIELDS, saved[n : n + n_prep], strict=True)))
    return saved[:n], prep, RowStats(*saved[n + n_prep :])


ForwardRows = Callable[[Prepared], RowStats]
BackwardGrad = Callable[[Prepared, RowStats, torch.Tensor, torch.Tensor | None], torch.Tensor]
ForwardGrad = Callable[[Prepared, torch.Tensor, torch.Tensor | None], RowStats]
ScaleGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logit_loss_function(name: str, forward_rows: ForwardRows, backward_grad: BackwardGrad) -> type:
    """The (kl, ce) autograd Function around a backend's forward and backward (see the module docstring).

    Applied as `Function.apply(prep.student, prep)`: the logits are the one tensor input autograd tracks
    (only the student receives a gradient); the rest of `prep` is carried along as a plain object.
    """

    class _LogitLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student: torch.Tensor, prep: Prepared):
            prep = replace(prep, student=student)  # the tensor autograd was handed, whatever wraps it
            stats = forward_rows(prep)
            save_for_backward(ctx, prep, stats)
            ctx.set_materialize_grads(False)
            return reduce_rows(stats, prep)

        @staticmethod
        @once_differentiable
        def backward(ctx, g_kl, g_ce):
            if g_kl is None and g_ce is None:
                return None, None
            _, prep, stats = saved_for_backward(ctx)
            a, c = row_scales(g_kl, g_ce, prep)
            return backward_grad(prep, stats, a, c), None

    _LogitLoss.__name__ = _LogitLoss.__qualname__ = name
    return _LogitLoss


def weighted_losses(
    prep: Prepared,
    weights: tuple[float, float],
    forward_grad: ForwardGrad,
    scale_grad_: ScaleGrad,
    in_place: bool = False,
    expected_upstream: float = 1.0,
) -> LossParts:
    """LossParts(w_kl·kl + w_mlm·ce, kl, ce) with the gradient of the total written in the forward.

    `in_place`: the gradient overwrites the logits (no second [N, W] buffer); their autograd version is
    bumped, so anything else that saved them for its backward refuses to run. Without a gradient to compute
    (no grad mode, or logits that do not require it) only the losses are computed and nothing is written.
    `expected_upstream`: the gradient the backward will receive for the total (DeepSpeed sends 1 / the
    gradient accumulation steps): the forward writes the gradient already scaled by it, and the backward's
    in-place scaling by upstream / expected_upstream finds 1 on the device and skips its pass.
    """
    w = tuple(float(x) for x in weights)
    if len(w) != 2:
        raise ValueError(f"weights must be (w_kl, w_mlm), got {weights!r}")
    u0 = float(expected_upstream)
    if not u0 > 0:
        raise ValueError(f"expected_upstream must be positive, got {expected_upstream}")
    need_grad = torch.is_grad_enabled() and prep.student.requires_grad
    coef = loss_coefficients(prep, (w[0] * u0, w[1] * u0))
    V = prep.vocab

    def compute(s: torch.Tensor, _needs_input_grad: bool):
        grad = None
        if need_grad:
            grad = (
                s.detach()
                if in_place
                else torch.empty_strided(s.shape, s.stride(), device=s.device, dtype=s.dtype)
            )
            if V < s.shape[1]:
                grad[:, V:].zero_()  # padding columns: outside the softmax
        stats = forward_grad(replace(prep, student=s.detach()), coef, grad)
        if need_grad and in_place:
            torch.autograd.graph.increment_version(s)
        kl, ce = reduce_rows(stats, prep)
        return w[0] * kl + w[1] * ce, (kl, ce), grad

    def scale(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        return scale_grad_(grad, upstream if u0 == 1.0 else upstream / u0)

    return LossParts(*GradInForward.apply(prep.student, compute, scale))
