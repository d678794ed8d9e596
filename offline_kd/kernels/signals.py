"""Triton: the full-vocabulary log-sum-exp of teacher logits at several temperatures, in one read of the row.

Each program reads one row of V logits in their own dtype (bf16 in practice) and keeps, in fp32, one running
maximum (max(x / T) = max(x) / T, so it is shared by every temperature) and one running sum of exponentials
per temperature, with log2(e) / T folded into a single scale so each element costs one FMA and one `exp2`
per temperature. Rows outside the mask are never read. A count of non-finite logits per row comes out too,
so the caller can reject NaN/inf without another pass.

The top-k stays with `torch.topk` on the bf16 logits: it is a radix select that reads the row a few times
from L2, and a Triton top-k for k up to 128 would need a per-block sort and a merge to save little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .constants import LOG2E
from .triton_helpers import LN2_C, device_guard

MAX_TEMPERATURES = 4  # per launch; more temperatures take more launches
BLOCK_V = 4096


@triton.jit
def _block_update(x, m, d0, d1, d2, d3, c0, c1, c2, c3, NUM_T: tl.constexpr):
    """Fold one block of fp32 logits into the running max and the per-temperature sums (base 2)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    d0 = d0 * tl.exp2((m - m_new) * c0) + tl.sum(tl.exp2(x * c0 - m_new * c0), 0)
    if NUM_T > 1:
        d1 = d1 * tl.exp2((m - m_new) * c1) + tl.sum(tl.exp2(x * c1 - m_new * c1), 0)
    if NUM_T > 2:
        d2 = d2 * tl.exp2((m - m_new) * c2) + tl.sum(tl.exp2(x * c2 - m_new * c2), 0)
    if NUM_T > 3:
        d3 = d3 * tl.exp2((m - m_new) * c3) + tl.sum(tl.exp2(x * c3 - m_new * c3), 0)
    return m_new, d0, d1, d2, d3


@triton.jit
def _lse_temperatures_kernel(
    X_ptr,
    x_stride,
    ACT_ptr,
    OUT_ptr,
    out_stride,
    BAD_ptr,
    V,
    c0,
    c1,
    c2,
    c3,
    NUM_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * x_stride
    o_row = OUT_ptr + row * out_stride
    if tl.load(ACT_ptr + row) != 0:
        m = float("-inf")
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        d3 = 0.0
        bad = 0
        n_full = V // BLOCK
        # unmasked body, then one masked tail
        for b in range(0, n_full):
            x = tl.load(x_row + b * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            bad += tl.sum((tl.abs(x) < float("inf")).to(tl.int32) ^ 1, 0)
            m, d0, d1, d2, d3 = _block_update(x, m, d0, d1, d2, d3, c0, c1, c2, c3, NUM_T)
        if n_full * BLOCK < V:
            offs = n_full * BLOCK + tl.arange(0, BLOCK)
            inb = offs < V
            x = tl.load(x_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            bad += tl.sum((inb & ~(tl.abs(x) < float("inf"))).to(tl.int32), 0)
            m, d0, d1, d2, d3 = _block_update(x, m, d0, d1, d2, d3, c0, c1, c2, c3, NUM_T)
        # lse_T = m / T + ln(d_T), with c = log2(e) / T: (m * c + log2(d)) * ln(2)
        tl.store(o_row, (m * c0 + tl.log2(d0)) * LN2_C)
        if NUM_T > 1:
            tl.store(o_row + 1, (m * c1 + tl.log2(d1)) * LN2_C)
        if NUM_T > 2:
            tl.store(o_row + 2, (m * c2 + tl.log2(d2)) * LN2_C)
        if NUM_T > 3:
            tl.store(o_row + 3, (m * c3 + tl.log2(d3)) * LN2_C)
        tl.store(BAD_ptr + row, bad)
    else:
        for t in tl.static_range(NUM_T):
            tl.store(o_row + t, 0.0)
        tl.store(BAD_ptr + row, 0)


def triton_lse_temperatures(
    logits: torch.Tensor, row_mask: torch.Tensor, temperatures: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp(logits / T) over the last dim for each T, in fp32, and the rows holding a NaN/inf logit.

    ``logits`` is [N, V] with a unit stride in V (any float dtype); ``row_mask`` is [N] bool. Returns
    ``lse`` [N, len(temperatures)] fp32 and ``nonfinite`` [N] bool, both zero/False outside the mask.
    No host synchronisation.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [N, V] with a unit stride along V")
    n, v = logits.shape
    nt = len(temperatures)
    lse = torch.empty(n, nt, device=logits.device, dtype=torch.float32)
    bad = torch.empty(n, device=logits.device, dtype=torch.int32)
    act = row_mask.to(device=logits.device, dtype=torch.int8).contiguous()
    if n == 0:
        return lse, bad.bool()
    for g in range(0, nt, MAX_TEMPERATURES):
        group = [float(t) for t in temperatures[g : g + MAX_TEMPERATURES]]
        scales = [LOG2E / t for t in group] + [LOG2E] * (MAX_TEMPERATURES - len(group))
        with device_guard(logits):  # rank r's logits live on cuda:r, whatever the current device is
            _lse_temperatures_kernel[(n,)](
                logits, logits.stride(0), act, lse[:, g:], lse.stride(0), bad, v, *scales,
                NUM_T=len(group), BLOCK=min(BLOCK_V, triton.next_power_of_2(v)), num_warps=8,
            )  # fmt: skip
    return lse, bad != 0
