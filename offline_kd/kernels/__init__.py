"""Loss kernels.

Public API (see docs/kernels.md for the math):

* `distillation_losses(student_logits, teacher_ids, teacher_logits, temperature, ..., weights=(w_kl, w_mlm))
  -> LossParts(total, kl, mlm)`: the KL and the MLM cross-entropy with the gradient of the weighted total
  written in the forward (two passes over the logits, optionally over the logits themselves: `in_place`)
* `distillation_logit_losses(...) -> (kl, ce)`: the same losses with independent upstream gradients (the
  backward reads the logits again)
* `cosine_loss(student_hidden, teacher_hidden, row_mask=None)`
* `fused_linear_distillation_losses(hidden, weight, bias, ...)` / `fused_linear_exact_losses(hidden, weight,
  bias, teacher_logits, T, ...)` -> LossParts: the student's output layer fused in, chunked over rows, for the
  top-k and the exact source (what the trainer runs; see fused_head.py)
* `dense_distillation_losses(student_logits, teacher_logits, T, ...)` / `exact_distillation_losses(student_logits,
  teacher_hidden, teacher_head, T, ...)` -> LossParts(total, kl, mlm): the full teacher distribution
  (docs/kernels-dense.md)

Dispatch (`dispatch.py`: `backend_for`, rules in `choose_backend`): the Triton kernels for tensors on an NVIDIA GPU, the
chunked PyTorch reference elsewhere. The environment variable `OFFLINE_KD_KERNELS=triton|reference|auto`
(default auto, read at each call) forces one; forcing `triton` on CPU tensors works under
`TRITON_INTERPRET=1` (that is how the tests exercise the kernels).
"""

from __future__ import annotations

import torch

from ._common import LossParts, prepare, weighted_losses
from .dense import dense_distillation_losses, exact_distillation_losses
from .dense_reference import scale_grad_
from .dispatch import (
    ENV_VAR,
    HAS_TRITON,
    INTERPRETED,
    MODES,
    TRITON_ERROR,
    backend_for,
    backend_for_device,
    choose_backend,
)
from .fused_head import fused_linear_distillation_losses, fused_linear_exact_losses
from .reference import ReferenceDistillLogitLoss, reference_cosine_loss, reference_forward_grad

__all__ = [
    "distillation_losses",
    "distillation_logit_losses",
    "cosine_loss",
    "fused_linear_distillation_losses",
    "fused_linear_exact_losses",
    "dense_distillation_losses",
    "exact_distillation_losses",
    "LossParts",
    "backend_for",
    "backend_for_device",
    "choose_backend",
    "ENV_VAR",
    "HAS_TRITON",
    "INTERPRETED",
    "MODES",
    "TRITON_ERROR",
]


def _backend_functions(backend: str):
    """(logit-loss Function, forward_grad, scale_grad_) of a backend."""
    if backend == "triton":
        from . import kl  # importable: `backend_for` picks Triton only then

        return kl.TritonDistillLogitLoss, kl.kl_ce_forward_grad, kl.scale_grad_
    return ReferenceDistillLogitLoss, reference_forward_grad, scale_grad_


def distillation_losses(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    ignore_index: int = -100,
    vocab_size: int | None = None,
    in_place: bool = False,
    expected_upstream: float = 1.0,
) -> LossParts:
    """LossParts(w_kl·kl + w_mlm·mlm, kl, mlm) with kl and mlm as `distillation_logit_losses`; the total is
    differentiable w.r.t. the logits and its gradient is computed in the forward (the backward only scales
    it by the upstream gradient, on the device). `vocab_size` < the logits' width: only the first
    vocab_size columns are the vocabulary (padded logits; the padding gets no probability and a zero
    gradient). `in_place`: the gradient overwrites the logits, which must not be used afterwards.
    `expected_upstream`: the upstream gradient the backward will bring (DeepSpeed: 1 / accumulation steps),
    folded into the gradient in the forward so the backward need not make another pass over it."""
    p = prepare(
        student_logits, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse, mlm_labels,
        ignore_index, vocab_size,
    )  # fmt: skip
    _, forward_grad, scale = _backend_functions(backend_for(student_logits))
    return weighted_losses(p, weights, forward_grad, scale, in_place, expected_upstream)


def distillation_logit_losses(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, ce): kl = T^2 * mean over selected rows of KL(teacher top-k || student softmax(s/T)), ce = MLM
    cross-entropy at T = 1 over rows whose label != ignore_index; each with its own upstream gradient."""
    p = prepare(
        student_logits, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse, mlm_labels,
        ignore_index, vocab_size,
    )  # fmt: skip
    fn = _backend_functions(backend_for(student_logits))[0]
    return fn.apply(p.student, p)


def cosine_loss(student_hidden, teacher_hidden, row_mask=None):
    """mean over selected rows of 1 - cos(student, teacher) (CosineEmbeddingLoss, target 1); student grad only."""
    if backend_for(student_hidden) == "triton":
        from .cosine import triton_cosine_loss

        return triton_cosine_loss(student_hidden, teacher_hidden, row_mask)
    return reference_cosine_loss(student_hidden, teacher_hidden, row_mask)
