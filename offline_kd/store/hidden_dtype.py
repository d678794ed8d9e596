"""The stored dtypes of the teacher's hidden states: float16, bfloat16 and float8 (e4m3).

NumPy and zarr have no bfloat16 or float8, so those are stored as their raw bits (``uint16`` /
``uint8``); the store's ``hidden_dtype`` attribute says how to read them. float8_e4m3fn has 3
mantissa bits and a range of ±448: values beyond it are refused, never saturated silently.
"""

from __future__ import annotations

import numpy as np
import torch

from offline_kd.store.signal_store import HIDDEN_STORAGE

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# What a batch carries: float8 widens to bfloat16 (exactly) so every consumer can cast it.
BATCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.bfloat16}


def _check_name(name: str) -> None:
    if name not in TORCH_DTYPES:
        raise ValueError(f"hidden dtype must be one of {sorted(TORCH_DTYPES)}, got {name!r}")


def range_error(hidden: torch.Tensor, name: str, seq_offset: int = 0) -> str | None:
    """Why ``hidden [B, L, H]`` cannot be stored as ``name`` (a value beyond float8's range, naming
    the sequence ``seq_offset`` + row), or None."""
    if name != "float8_e4m3fn":
        return None
    bad = (hidden.abs() > FLOAT8_MAX).flatten(1).any(dim=1)
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    return (
        f"the teacher's hidden state for sequence {seq_offset + row} reaches {float(hidden[row].abs().max()):.4g}, "
        f"beyond {name}'s range of ±{FLOAT8_MAX:g}; use --hidden-dtype bfloat16"
    )


def encode(hidden: torch.Tensor, name: str) -> np.ndarray:
    """``hidden`` (any float dtype, any device) as the stored numpy array: its dtype's bits."""
    _check_name(name)
    t = hidden.to(TORCH_DTYPES[name]).cpu()
    if name == "float16":
        return t.numpy()
    return t.view(torch.uint16 if name == "bfloat16" else torch.uint8).numpy()


def decode(stored: np.ndarray, name: str) -> torch.Tensor:
    """A stored array back as a torch tensor of its dtype (no copy where the dtypes allow)."""
    _check_name(name)
    want = np.dtype(HIDDEN_STORAGE[name])
    if stored.dtype != want:
        raise ValueError(f"hidden states stored as {name} must be {want} arrays, got {stored.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(stored))
    return t if name == "float16" else t.view(TORCH_DTYPES[name])


def to_batch(stored: np.ndarray, name: str) -> torch.Tensor:
    """A stored array as a batch carries it (float8 widened to bfloat16, exactly)."""
    return decode(stored, name).to(BATCH_DTYPES[name])


def as_stored(hidden: torch.Tensor, name: str) -> torch.Tensor:
    """``hidden`` rounded to the stored dtype and back to its own dtype: what a reader gets."""
    _check_name(name)
    return hidden.to(TORCH_DTYPES[name]).to(hidden.dtype)
