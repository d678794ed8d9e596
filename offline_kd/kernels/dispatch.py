"""Which backend runs a loss: the Triton kernels or the chunked PyTorch reference (rules in `choose_backend`).

Kept apart from the package's `__init__` so that the loss modules (dense.py, fused_head.py) can ask for a
backend without importing the package that imports them.
"""

from __future__ import annotations

import warnings

import torch

from offline_kd.runtime import env

try:  # any failure, not only ImportError: a broken Triton install must leave the reference path working
    from . import cosine as _cosine  # noqa: F401  (imported to learn whether it compiles)
    from . import kl as _kl

    TRITON_ERROR: str | None = None
    INTERPRETED = _kl.INTERPRETED
except Exception as e:  # pragma: no cover - exercised in a subprocess by the tests
    TRITON_ERROR = f"{type(e).__name__}: {e}"
    INTERPRETED = False

HAS_TRITON = TRITON_ERROR is None
ENV_VAR = env.KERNELS.name
MODES = ("auto", "triton", "reference")


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
