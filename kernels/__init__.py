"""Loss kernels (installed as `offline_kd.kernels`).

Public API (see docs/kernels.md for the math):

* `sparse_kl_loss(student_logits, teacher_ids, teacher_logits, temperature, row_mask=None, teacher_lse=None)`
* `distillation_logit_losses(..., mlm_labels=None, ignore_index=-100) -> (kl, ce)`, one pass over the logits
* `cosine_loss(student_hidden, teacher_hidden, row_mask=None)`
* `fused_linear_distillation_losses(hidden, weight, bias, ...)`: the LM head fused in, chunked over rows
  (experimental, not used by the trainer; see fused_head.py)
* `dense_distillation_losses(student_logits, teacher_logits, T, ...)` / `exact_distillation_losses(student_logits,
  teacher_hidden, teacher_head, T, ...)` -> LossParts(total, kl, mlm): the full teacher distribution
  (docs/kernels-dense.md)

Dispatch: Triton for CUDA tensors, the chunked PyTorch reference elsewhere. The environment variable
`OFFLINE_KD_KERNELS=triton|reference|auto` (default auto, read at each call) forces one; forcing `triton` on CPU
tensors works under `TRITON_INTERPRET=1` (that is how the tests exercise the kernels).
"""

from __future__ import annotations

import os

import torch

from ._common import prepare
from .dense import LossParts, dense_distillation_losses, exact_distillation_losses
from .fused_head import fused_linear_distillation_losses
from .reference import ReferenceDistillLogitLoss, reference_cosine_loss

try:  # triton is a Linux-only dependency
    from .cosine import triton_cosine_loss
    from .kl import TritonDistillLogitLoss

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

ENV_VAR = "OFFLINE_KD_KERNELS"

__all__ = [
    "sparse_kl_loss",
    "distillation_logit_losses",
    "cosine_loss",
    "fused_linear_distillation_losses",
    "dense_distillation_losses",
    "exact_distillation_losses",
    "LossParts",
    "backend_for",
    "ENV_VAR",
    "HAS_TRITON",
]


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'reference' for a tensor, honouring OFFLINE_KD_KERNELS."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "reference"):
        raise ValueError(f"{ENV_VAR} must be one of auto|triton|reference, got {mode!r}")
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not importable")
        return "triton"
    if mode == "reference":
        return "reference"
    return "triton" if (HAS_TRITON and t.is_cuda) else "reference"


def sparse_kl_loss(student_logits, teacher_ids, teacher_logits, temperature, row_mask=None, teacher_lse=None):
    """T^2 * mean over selected rows of KL(teacher top-k || student softmax(s/T)); scalar fp32."""
    return distillation_logit_losses(
        student_logits, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse
    )[0]


def distillation_logit_losses(
    student_logits,
    teacher_ids,
    teacher_logits,
    temperature,
    row_mask=None,
    teacher_lse=None,
    mlm_labels=None,
    ignore_index=-100,
):
    """(kl, ce): kl as `sparse_kl_loss`, ce = MLM cross-entropy at T = 1 over rows whose label != ignore_index."""
    p = prepare(
        student_logits,
        teacher_ids,
        teacher_logits,
        temperature,
        row_mask,
        teacher_lse,
        mlm_labels,
        ignore_index,
    )
    fn = TritonDistillLogitLoss if backend_for(student_logits) == "triton" else ReferenceDistillLogitLoss
    return fn.apply(p.student, p)


def cosine_loss(student_hidden, teacher_hidden, row_mask=None):
    """mean over selected rows of 1 - cos(student, teacher) (CosineEmbeddingLoss, target 1); student grad only."""
    fn = triton_cosine_loss if backend_for(student_hidden) == "triton" else reference_cosine_loss
    return fn(student_hidden, teacher_hidden, row_mask)
