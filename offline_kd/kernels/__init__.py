"""Loss kernels.

Public API (see docs/kernels.md for the math):

* `distillation_losses(student_logits, teacher_ids, teacher_logits, temperature, ..., weights=(w_kl, w_mlm))
  -> LossParts(total, kl, mlm)`: the KL and the MLM cross-entropy with the gradient of the weighted total
  written in the forward (two passes over the logits, optionally over the logits themselves: `in_place`)
* `distillation_logit_losses(...) -> (kl, ce)`: the same losses with independent upstream gradients (the
  backward reads the logits again)
* `sparse_kl_loss(...)`: the KL alone
* `cosine_loss(student_hidden, teacher_hidden, row_mask=None)`
* `fused_linear_distillation_losses(hidden, weight, bias, ...) -> LossParts`: the LM head fused in, chunked
  over rows (experimental, not used by the trainer; see fused_head.py)
* `dense_distillation_losses(student_logits, teacher_logits, T, ...)` / `exact_distillation_losses(student_logits,
  teacher_hidden, teacher_head, T, ...)` -> LossParts(total, kl, mlm): the full teacher distribution
  (docs/kernels-dense.md)

Dispatch (`backend_for`, rules in `choose_backend`): the Triton kernels for tensors on an NVIDIA GPU, the
chunked PyTorch reference elsewhere. The environment variable `OFFLINE_KD_KERNELS=triton|reference|auto`
(default auto, read at each call) forces one; forcing `triton` on CPU tensors works under
`TRITON_INTERPRET=1` (that is how the tests exercise the kernels).
"""

from __future__ import annotations

import warnings

import torch

from offline_kd.runtime import env

from ._common import LossParts, prepare, weighted_losses
from .dense import dense_distillation_losses, exact_distillation_losses
from .dense_reference import scale_grad_
from .fused_head import fused_linear_distillation_losses
from .reference import ReferenceDistillLogitLoss, reference_cosine_loss, reference_forward_grad

try:  # any failure, not only ImportError: a broken Triton install must leave the reference path working
    from . import kl as _kl
    from .cosine import triton_cosine_loss

    TRITON_ERROR: str | None = None
    INTERPRETED = _kl.INTERPRETED
except Exception as e:  # pragma: no cover - exercised in a subprocess by the tests
    TRITON_ERROR = f"{type(e).__name__}: {e}"
    INTERPRETED = False

HAS_TRITON = TRITON_ERROR is None
ENV_VAR = env.KERNELS.name
MODES = ("auto", "triton", "reference")

__all__ = [
    "distillation_losses",
    "distillation_logit_losses",
    "sparse_kl_loss",
    "cosine_loss",
    "fused_linear_distillation_losses",
    "dense_distillation_losses",
    "exact_distillation_losses",
    "LossParts",
    "backend_for",
    "backend_for_device",
    "choose_backend",
    "ENV_VAR",
    "HAS_TRITON",
    "TRITON_ERROR",
]


def choose_backend(
    mode: str,
    device_type: str,
    *,
    rocm: bool = False,
    triton_error: str | None = None,
    interpreted: bool = False,
) -> tuple[str, str | None]:
    """(backend, warning or None) for a tensor on `device_type` ('cuda' also for ROCm builds).

    auto: Triton only on NVIDIA GPUs with a working, compiling Triton; otherwise the reference, with a
    warning where a GPU is left without its kernels (Triton not importable, or TRITON_INTERPRET=1 left set,
    which would run the kernels in the CPU interpreter). ROCm is routed to the reference explicitly: the
    kernels are only compiled and checked for NVIDIA. `triton` forces the kernels (an error if they cannot
    be imported); `reference` forces the reference."""
    mode = mode.strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {'|'.join(MODES)}, got {mode!r}")
    if mode == "reference":
        return "reference", None
    if mode == "triton":
        if triton_error is not None:
            raise RuntimeError(f"{ENV_VAR}=triton but the Triton kernels cannot be imported: {triton_error}")
        if interpreted and device_type == "cuda":
            return "triton", "TRITON_INTERPRET=1 is set: the Triton kernels run in the CPU interpreter"
        return "triton", None
    if device_type != "cuda":
        return "reference", None
    if rocm:
        return "reference", None
    if triton_error is not None:
        return "reference", f"Triton cannot be imported ({triton_error}); the GPU uses the PyTorch reference"
    if interpreted:
        return "reference", (
            "TRITON_INTERPRET=1 is set on a GPU host: the Triton kernels were built for the CPU interpreter, "
            "so the GPU uses the PyTorch reference; unset TRITON_INTERPRET for the compiled kernels"
        )
    return "triton", None


def backend_for_device(device_type: str) -> str:
    """'triton' or 'reference' for tensors on `device_type`, by `choose_backend` with this process's state
    (OFFLINE_KD_KERNELS, the build, Triton's import and interpreter state); warns where it falls back."""
    backend, warning = choose_backend(
        env.KERNELS.get(),
        device_type,
        rocm=torch.version.hip is not None,
        triton_error=TRITON_ERROR,
        interpreted=INTERPRETED,
    )
    if warning:
        warnings.warn(f"offline_kd.kernels: {warning}", RuntimeWarning, stacklevel=4)
    return backend


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'reference' for a tensor (see `backend_for_device`)."""
    return backend_for_device(t.device.type)


def _backend_functions(backend: str):
    """(logit-loss Function, forward_grad, scale_grad_) of a backend."""
    if backend == "triton":
        return _kl.TritonDistillLogitLoss, _kl.kl_ce_forward_grad, _kl.scale_grad_
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


def sparse_kl_loss(
    student_logits, teacher_ids, teacher_logits, temperature, row_mask=None, teacher_lse=None, vocab_size=None
) -> torch.Tensor:
    """T^2 * mean over selected rows of KL(teacher top-k || student softmax(s/T)); scalar fp32."""
    return distillation_logit_losses(
        student_logits, teacher_ids, teacher_logits, temperature, row_mask, teacher_lse, vocab_size=vocab_size
    )[0]


def cosine_loss(student_hidden, teacher_hidden, row_mask=None):
    """mean over selected rows of 1 - cos(student, teacher) (CosineEmbeddingLoss, target 1); student grad only."""
    fn = triton_cosine_loss if backend_for(student_hidden) == "triton" else reference_cosine_loss
    return fn(student_hidden, teacher_hidden, row_mask)
