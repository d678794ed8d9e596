"""Teacher signals from a block of logits: top-k ids and values, and log-sum-exp at every temperature.

One pass over the logits in their own dtype (bf16 in practice), fp32 accumulation, and no fp32 copy of the
whole [N, V] block:

* top-k: `torch.topk` on the logits as they are. bf16 -> fp32 is exact, so the stored values equal a top-k
  of the fp32-cast logits; on CPU the ids and their order among ties are the same too.
* log-sum-exp: on CUDA (or with OFFLINE_KD_KERNELS=triton) a Triton kernel (`kernels/signals.py`); elsewhere
  rows in chunks of 4 MB of fp32 per thread (at most 32 MB), with the row maximum from the top-1 value.

Every row's values depend only on that row, not on the batch around it, so the same input gives
bit-identical signals. A row holding a NaN or an infinite logit is reported in `nonfinite`; rows outside
``row_mask`` are zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# fp32 elements per CPU chunk and torch thread (4 MB), at most 32 MB a chunk. Each elementwise op over a
# chunk is one parallel region, and on a busy machine the threads' synchronisation between many small ops
# costs more than cache misses. Measured on [2048, 30522] bf16 logits at a load of 12 on 2 cores: chunks of
# 2**18 elements ran 6x slower than 2**22 with 2 threads, while with 1 thread 2**18 was 1.5x faster.
CHUNK_ELEMENTS_PER_THREAD = 1 << 20
MAX_CHUNK_ELEMENTS = 1 << 23


@dataclass
class LogitSignals:
    topk_ids: torch.Tensor  # [N, K] int64
    topk_logits: torch.Tensor  # [N, K] float32, descending
    lse: torch.Tensor  # [N, nT] float32, logsumexp(logits / T)
    nonfinite: torch.Tensor  # [N] bool, a NaN/inf logit in a masked-in row


def _use_triton(logits: torch.Tensor) -> bool:
    from offline_kd.kernels import backend_for

    return backend_for(logits) == "triton"


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``rows`` rows; a last range of one row joins the one before it: torch sums a
    lone output element with a multi-thread two-pass reduction (another summation order) on long rows."""
    bounds = [(s, min(s + rows, n)) for s in range(0, n, rows)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def chunk_rows(vocab: int) -> int:
    """Rows per CPU chunk for rows of ``vocab`` logits (at least 2, see _chunks)."""
    elements = min(MAX_CHUNK_ELEMENTS, CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads())
    return max(2, elements // max(vocab, 1))


def chunked_lse(
    logits: torch.Tensor, row_max: torch.Tensor, temperatures: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp(logits / T) per row for each T in fp32, and each row's minimum minus its maximum (-inf or
    NaN when the row holds a -inf or NaN).

    ``row_max`` [N] is each row's maximum (max(x / T) = max(x) / T, so one serves every T). Rows go
    through two fp32 buffers of ``chunk_rows(V)`` rows each, whatever N.
    """
    n, v = logits.shape
    if n == 1:  # see _chunks: two copies of the row keep its summation order
        lse, shifted_min = chunked_lse(logits.expand(2, v), row_max.expand(2), temperatures)
        return lse[:1], shifted_min[:1]
    rows = chunk_rows(v)
    lse = torch.empty(n, len(temperatures), dtype=torch.float32, device=logits.device)
    shifted_min = torch.empty(n, dtype=torch.float32, device=logits.device)
    shifted = torch.empty(min(rows + 1, n), v, dtype=torch.float32, device=logits.device)
    scratch = torch.empty_like(shifted)
    for a, b in _chunks(n, rows):
        x, e, m = shifted[: b - a], scratch[: b - a], row_max[a:b, None]
        x.copy_(logits[a:b]).sub_(m)  # faster than a mixed-dtype torch.sub(logits, m, out=x)
        torch.amin(x, dim=-1, out=shifted_min[a:b])
        for j, t in enumerate(float(t) for t in temperatures):
            # One path for every T (x * 1.0 is exact). With an out-of-place exp into `e` at T = 1, about one
            # 2-rank CPU precompute in five stored other lse bits at T = 1 for one batch (4 of 17 runs; the
            # cause was not found); with this path, 0 of 12.
            torch.mul(x, 1.0 / t, out=e).exp_()
            lse[a:b, j] = torch.log(e.sum(dim=-1)).add_(m[:, 0] / t)
    return lse, shifted_min


def extract_signals(
    logits: torch.Tensor, row_mask: torch.Tensor, top_k: int, temperatures: Sequence[float]
) -> LogitSignals:
    """Top-k (descending) and log-sum-exp at each temperature of [N, V] logits; zeros where not ``row_mask``.

    No host synchronisation: on CUDA every result stays on the device until the caller copies it.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    vals, ids = logits.topk(top_k, dim=-1, largest=True, sorted=True)
    vals = vals.float()
    if _use_triton(logits):
        from offline_kd.kernels.signals import triton_lse_temperatures

        lse, nonfinite = triton_lse_temperatures(logits, row_mask, temperatures)
    else:
        lse, shifted_min = chunked_lse(logits, vals[:, 0], temperatures)
        # topk ranks NaN first, so the top-1 is NaN or +inf when the row holds one; the minimum catches -inf
        nonfinite = ~(torch.isfinite(vals[:, 0]) & torch.isfinite(shifted_min))
    keep = row_mask.to(device=logits.device, dtype=torch.bool)
    return LogitSignals(
        topk_ids=ids.masked_fill(~keep[:, None], 0),
        topk_logits=vals.masked_fill(~keep[:, None], 0.0),
        lse=lse.masked_fill(~keep[:, None], 0.0),
        nonfinite=nonfinite & keep,
    )
