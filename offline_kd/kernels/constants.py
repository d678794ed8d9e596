"""Numeric constants shared by the Triton kernels and the PyTorch references (no Triton import here, so the
reference path keeps working where Triton cannot be imported)."""

from __future__ import annotations

LOG2E = 1.4426950408889634  # log2(e): exp(x) = 2^(x log2 e), so every exponential is one exp2
LN2 = 0.6931471805599453  # ln(2): log-sums kept in base 2 come back to nats through it
# q_tail is clamped to at least this (fp32 normal range; log(TINY) ~ -69).
TINY = 1e-30
