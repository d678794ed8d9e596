"""Triton: sparse temperature KL against a cached teacher top-k (renormalised or tail-aware), fused with the
MLM cross-entropy at T = 1.

Layering (Liger-style): the `@triton.jit` kernels, built from inlined per-phase helpers; the launchers (the
backend protocol of `_common.py`); the autograd Functions are built in `_common.py` from the launchers.

One program per row. The phases of a row that counts (selected for the KL or carrying a label):

1. statistics, one pass over the V logits: the row max and the sums of exponentials at T and at 1. A block
   is loaded flat and viewed as [R, NUM_W, L] (warp w holds its own L-logit slices), so each warp keeps its
   own running max with shuffles only (no shared memory, no barrier per block, under Triton 3.6 and 3.9);
   the sums stay per lane and are combined once per row. One max serves both temperatures (max(s/T) = max(s)/T). Exponentials are `exp2` with
   log2(e)/T folded into one fused multiply-add against the scaled max (one SFU instruction each); the
   T = 1 sum reuses the KL's exponential at T = 1, squares it at T = 2 and squares it twice at T = 4;
   other temperatures take a second exponential.
2. the top-k ids and the label are gathered: the KL of the row, the teacher mass m and 1/q_tail.
3. (gradient) one more pass writing the dense part of the gradient, then, after a barrier, the k top-k
   entries and the label entry (only when it is not among them: one store per entry).

Every loop is an unmasked body over whole blocks plus one masked tail block, so when the row stride is a
multiple of 16 elements (a vocabulary padded to a multiple of 64) loads and stores are 128-bit vectors.

Kernels: `_kl_ce_fused_kernel` (phases 1-3, with the loss weights known: the gradient is written in the
forward, possibly over the logits themselves), `_kl_ce_fwd_kernel` (phases 1-2, saving the row statistics)
and `_kl_ce_bwd_kernel` (phase 3 from them, for independent upstream gradients of the KL and the CE).

Ids and labels outside [0, V) are never dereferenced (`_common.prepare` turns them into a NaN loss on the
device, or an error for CPU tensors). Row offsets are int64. Math: docs/kernels.md; `reference.py` is the
same algorithm in chunked PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ._common import Prepared, RowStats, logit_loss_function, temperature_power
from .constants import LOG2E, TINY
from .triton_helpers import (
    LN2_C,
    LOG2E_C,
    device_guard,
    int_pow,
    load_row,
    rescale,
    residual,
    scale_grad_,  # noqa: F401  (the backend's in-place upstream scaling, looked up as kl.scale_grad_)
    scaled,
    two_sum,
    zero_row,
)

MAX_BLOCK_V = 4096


# ------------------------------------------------------------------------------------------ phase 1: stats
@triton.jit
def _stats_block(
    s_row, offs, V, m_w, d_t, d_1, k_t, CE: tl.constexpr, POW: tl.constexpr, MASKED: tl.constexpr
):
    # One [R, NUM_W, L] block: per-warp running max m_w ([NUM_W]), per-lane sums d_t (at T) and d_1 (at 1)
    # relative to 2^fl(m_w k). Rescaled with the same rounded offsets as the exponentials. The block is loaded
    # flat (offs is 1-D) and reshaped: a flat load gets the same layout from Triton 3.6 and 3.9 (each thread's
    # vectors, then 32 lanes, then the warps), whose reshape is exactly [R, NUM_W, L] with a warp per middle
    # index. Loading through a 3-D pointer tensor instead let Triton 3.6 spread the warps over R too, and
    # every per-warp max then went through shared memory (3 barriers, 32 shared stores per trip).
    s = tl.reshape(load_row(s_row, offs, V, MASKED), d_t.shape)
    m_new = tl.maximum(m_w, tl.max(tl.max(s, 0), 1))  # in-thread over R first, then across the warp's lanes
    mk_new = scaled(m_new, k_t)
    e = tl.exp2(tl.fma(s, k_t, -mk_new[None, :, None]))
    alpha = rescale(m_w, k_t, mk_new)
    d_t = d_t * alpha[None, :, None] + e
    if CE:
        if POW == 0:
            m1_new = scaled(m_new, LOG2E_C)
            d_1 = d_1 * rescale(m_w, LOG2E_C, m1_new)[None, :, None]
            d_1 += tl.exp2(tl.fma(s, LOG2E_C, -m1_new[None, :, None]))
        elif POW > 1:  # exp(s - m) = exp((s - m)/T)^T: multiplies instead of a second exponential
            d_1 = d_1 * int_pow(alpha, POW)[None, :, None] + int_pow(e, POW)
    return m_new, d_t, d_1


@triton.jit
def _combine(m_w, k, sums):
    # the row max M of the per-warp maxima, and sum_w 2^(fl(m_w k) - fl(M k)) * (sum of warp w's lanes)
    mx = tl.max(m_w, 0)
    return mx, tl.sum(tl.sum(tl.sum(sums, 0), 1) * rescale(m_w, k, scaled(mx, k)), 0)


@triton.jit
def _row_stats(
    s_row, V, k_t, CE: tl.constexpr, POW: tl.constexpr, BLOCK_V: tl.constexpr, NUM_W: tl.constexpr,
    L: tl.constexpr,
):  # fmt: skip
    """(M, lg_t, lg_1): the row max of s and, in log2 units, log2 sum 2^(s k - fl(M k)) at k = log2(e)/T
    and (with the CE) at k = log2(e).

    A block is viewed as [R, NUM_W, L]: warp w holds, for each r, the L logits at r*NUM_W*L + w*L (L = 32
    lanes times the vector width), so the maxima need shuffles within a warp only (no shared memory, no
    barrier per block) whatever the row alignment; the sums stay per lane and are combined once per row."""
    R: tl.constexpr = BLOCK_V // (NUM_W * L)
    lanes = tl.arange(0, BLOCK_V)
    m_w = tl.full([NUM_W], float("-inf"), tl.float32)
    d_t = tl.zeros([R, NUM_W, L], dtype=tl.float32)
    d_1 = d_t
    v_main = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_main, BLOCK_V):
        m_w, d_t, d_1 = _stats_block(s_row, start + lanes, V, m_w, d_t, d_1, k_t, CE, POW, False)
    if v_main < V:
        m_w, d_t, d_1 = _stats_block(s_row, v_main + lanes, V, m_w, d_t, d_1, k_t, CE, POW, True)
    mx, sum_t = _combine(m_w, k_t, d_t)
    lg_t = tl.log2(sum_t)
    lg_1 = lg_t
    if CE:
        if POW == 0:
            lg_1 = tl.log2(_combine(m_w, LOG2E_C, d_1)[1])
        elif POW > 1:  # POW * k_t is log2(e) exactly (T a power of two)
            lg_1 = tl.log2(_combine(m_w, k_t * POW, d_1)[1])
    return mx, lg_t, lg_1


# ----------------------------------------------------------------------------------- phase 2: top-k, label
@triton.jit
def _gather_topk(s_row, row, IDS_ptr, ids_stride, P_ptr, pk_stride, V, K, BLOCK_K: tl.constexpr):
    """The row's top-k ids (padded to BLOCK_K), which lanes hold an id inside [0, V), the logits there
    (fp32; 0 elsewhere) and the teacher probabilities."""
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    ids = tl.load(IDS_ptr + row * ids_stride + koffs, mask=kmask, other=-1)
    valid = kmask & (ids >= 0) & (ids < V)
    sid = tl.where(valid, ids, 0)
    xk = tl.load(s_row + sid, mask=valid, other=0.0).to(tl.float32)
    p = tl.load(P_ptr + row * pk_stride + koffs, mask=kmask, other=0.0)
    return koffs, ids, valid, sid, xk, p


@triton.jit
def _topk_kl(
    xk, valid, p, row, koffs, K, LOGP_ptr, pk_stride, PTAIL_ptr, mk, lg_t, k_t,
    TINY_C: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """(KL of the row, teacher mass m, 1/q_tail) from the gathered logits; log q_j = ln2 * (s_j k - fl(M k)
    - lg_t), q_tail = 1 - sum_j q_j."""
    lq2 = tl.where(valid, tl.fma(xk, k_t, -mk) - lg_t, 0.0)
    logp = tl.load(LOGP_ptr + row * pk_stride + koffs, mask=koffs < K, other=0.0)
    kl = tl.sum(tl.where(p != 0, p * (logp - lq2 * LN2_C), 0.0), 0)
    m = tl.sum(p, 0)
    r = 0.0
    if TAIL:
        ptail = tl.load(PTAIL_ptr + row)
        m = m + ptail
        qtail = tl.maximum(1.0 - tl.sum(tl.where(valid, tl.exp2(lq2), 0.0), 0), TINY_C)
        kl += tl.where(ptail != 0, ptail * (tl.log(tl.maximum(ptail, TINY_C)) - tl.log(qtail)), 0.0)
        r = 1.0 / qtail
    return kl, m, r


@triton.jit
def _row_ce(mx, s_lab, lg_1, ok):
    # CE = (M - s_label) + ln sum exp(s - M), with the exact residual of the offset fl(M log2 e); NaN for a
    # label outside the vocabulary (never dereferenced)
    ce = (mx - s_lab) + (lg_1 - residual(mx, LOG2E_C)) * LN2_C
    return tl.where(ok, ce, float("nan"))


# ---------------------------------------------------------------------------------------- phase 3: gradient
@triton.jit
def _grad_coefs(mx, lg_t, lg_1, a, c, mass, ptail, r, k_t, CE: tl.constexpr, POW: tl.constexpr):
    """Scalars of the gradient a*(m q - p_tail min(q/q_tail, 1)) + c*sigma written as functions of
    e_q = 2^(s k - cq): q = e_q 2^-cq_lo, sigma = e_q^POW * 2^(POW (lg_t - cq_lo) - lg_1) (or its own
    exponential e_1 = 2^(s log2 e - c1) when POW = 0)."""
    cq, cq_lo = two_sum(scaled(mx, k_t), lg_t)
    f = tl.exp2(-cq_lo)
    aq = a * mass * f
    apt = a * ptail
    rq = r * f
    cs = 0.0
    c1 = 0.0
    if CE:
        if POW == 1:  # sigma = q
            aq += c * f
        elif POW > 1:
            cs = c * tl.exp2(POW * (lg_t - cq_lo) - lg_1)
        else:
            c1, c1_lo = two_sum(scaled(mx, LOG2E_C), lg_1)
            cs = c * tl.exp2(-c1_lo)
    return cq, aq, apt, rq, cs, c1


@triton.jit
def _grad_values(s, k_t, cq, aq, cs, c1, CE: tl.constexpr, POW: tl.constexpr):
    # (a*m*q + c*sigma, e_q) at logits s
    e_q = tl.exp2(tl.fma(s, k_t, -cq))
    g = aq * e_q
    if CE:
        if POW > 1:
            g = tl.fma(cs * int_pow(e_q, POW // 2), int_pow(e_q, POW // 2), g)
        elif POW == 0:
            g += cs * tl.exp2(tl.fma(s, LOG2E_C, -c1))
    return g, e_q


@triton.jit
def _dense_block(
    s_row, g_row, offs, V, k_t, cq, aq, apt, rq, cs, c1,
    CLAMP: tl.constexpr, CE: tl.constexpr, POW: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    s = load_row(s_row, offs, V, MASKED)
    g, e_q = _grad_values(s, k_t, cq, aq, cs, c1, CE, POW)
    if CLAMP:
        g -= apt * tl.minimum(e_q * rq, 1.0)
    if MASKED:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
    else:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty))


@triton.jit
def _dense_loop(
    s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1,
    CLAMP: tl.constexpr, CE: tl.constexpr, POW: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # unmasked body, masked tail
    v_main = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_main, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        _dense_block(s_row, g_row, offs, V, k_t, cq, aq, apt, rq, cs, c1, CLAMP, CE, POW, False)
    if v_main < V:
        offs = v_main + tl.arange(0, BLOCK_V)
        _dense_block(s_row, g_row, offs, V, k_t, cq, aq, apt, rq, cs, c1, CLAMP, CE, POW, True)


@triton.jit
def _dense_grad(
    s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1, r,
    TAIL: tl.constexpr, CE: tl.constexpr, POW: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """The off-top-k gradient over the whole row. The tail term p_tail*min(q/q_tail, 1) needs its clamp only
    where q_tail, computed as 1 - Q, may be inaccurate (q_i/q_tail <= 1 exactly for i off the top-k): with
    q_tail >= 2^-10 its relative error is below 1e-4, the clamp changes nothing a bf16 gradient can show,
    and the term folds into the coefficient of q (a multiply per logit instead of three operations)."""
    if TAIL:
        if r > 1024.0:
            _dense_loop(s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1, True, CE, POW, BLOCK_V)
        else:
            _dense_loop(s_row, g_row, V, k_t, cq, aq - apt * rq, 0.0, 0.0, cs, c1, False, CE, POW, BLOCK_V)
    else:
        _dense_loop(s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1, False, CE, POW, BLOCK_V)


@triton.jit
def _sparse_grad(
    g_row, xk, valid, sid, ids, p, label, x_lab, a, c, k_t, cq, aq, apt, rq, cs, c1, V,
    TAIL: tl.constexpr, CE: tl.constexpr, POW: tl.constexpr,
):  # fmt: skip
    """Overwrite the top-k entries with a*(m q_j - p_j) + c*(sigma_j - [id_j = label]), then the label's
    entry when it is not among the top-k (each entry is stored by one thread). Reads only values gathered
    before the dense pass, so the gradient may overwrite the logits."""
    gk = _grad_values(xk, k_t, cq, aq, cs, c1, CE, POW)[0] - a * p
    hit = valid & (ids == label)
    if CE:
        gk -= tl.where(hit, c, 0.0)
    tl.store(g_row + sid, gk.to(g_row.dtype.element_ty), mask=valid)
    if CE:
        ok = (label >= 0) & (label < V)
        gl, e_l = _grad_values(x_lab, k_t, cq, aq, cs, c1, CE, POW)
        in_k = tl.sum(tl.where(hit, 1, 0), 0) > 0
        off_k = 0.0
        if TAIL:
            off_k = apt * tl.minimum(e_l * rq, 1.0)
        gl -= off_k + c
        # a label inside the top-k was written by its top-k lane above, with the same value: a second store
        # from another thread, with no barrier between, would race (which rounding lands is undefined)
        tl.store(g_row + tl.where(ok, label, 0), gl.to(g_row.dtype.element_ty), mask=ok & ~in_k)


@triton.jit
def _row_label(s_row, LAB_ptr, row, V, HAS_CE: tl.constexpr):
    # (label, whether the row carries one, whether it lies in the vocabulary, the logit there)
    label = -1
    if HAS_CE:
        label = tl.load(LAB_ptr + row)
    ok = (label >= 0) & (label < V)
    x_lab = 0.0
    if HAS_CE:
        x_lab = tl.load(s_row + tl.where(ok, label, 0)).to(tl.float32)
    return label, label >= 0, ok, x_lab


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _kl_ce_fused_kernel(
    S_ptr, s_stride, G_ptr, g_stride, IDS_ptr, ids_stride, P_ptr, LOGP_ptr, pk_stride, PTAIL_ptr, SEL_ptr,
    LAB_ptr, COEF_ptr, KL_ptr, CE_ptr, V, K, k_t,
    TINY_C: tl.constexpr, TAIL: tl.constexpr, HAS_CE: tl.constexpr, POW: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_W: tl.constexpr, LANES: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Losses and gradient of COEF[0]*T^2*mean KL + COEF[1]*mean CE in one launch: per row a = COEF[0] if
    # the row is selected, c = COEF[1] if it carries a label (COEF already divided by the row counts).
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    g_row = G_ptr + row * g_stride
    sel = tl.load(SEL_ptr + row)
    label, has, ok, x_lab = _row_label(s_row, LAB_ptr, row, V, HAS_CE)
    if (sel > 0) | has:
        mx, lg_t, lg_1 = _row_stats(s_row, V, k_t, HAS_CE, POW, BLOCK_V, NUM_W, LANES)
        koffs, ids, valid, sid, xk, p = _gather_topk(
            s_row, row, IDS_ptr, ids_stride, P_ptr, pk_stride, V, K, BLOCK_K
        )
        kl, m, r = _topk_kl(
            xk, valid, p, row, koffs, K, LOGP_ptr, pk_stride, PTAIL_ptr, scaled(mx, k_t), lg_t, k_t, TINY_C,
            TAIL
        )  # fmt: skip
        tl.store(KL_ptr + row, tl.where(sel > 0, kl, 0.0))
        c = 0.0
        if HAS_CE:
            tl.store(CE_ptr + row, tl.where(has, _row_ce(mx, x_lab, lg_1, ok), 0.0))
            c = tl.where(has, tl.load(COEF_ptr + 1), 0.0)
        a = tl.where(sel > 0, tl.load(COEF_ptr), 0.0)
        ptail = 0.0
        if TAIL:
            ptail = tl.load(PTAIL_ptr + row)
        cq, aq, apt, rq, cs, c1 = _grad_coefs(mx, lg_t, lg_1, a, c, m, ptail, r, k_t, HAS_CE, POW)
        tl.debug_barrier()  # every gather above is done before the gradient may overwrite the logits
        _dense_grad(s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1, r, TAIL, HAS_CE, POW, BLOCK_V)
        tl.debug_barrier()  # the fix-ups overwrite entries other threads wrote
        _sparse_grad(
            g_row, xk, valid, sid, ids, p, label, x_lab, a, c, k_t, cq, aq, apt, rq, cs, c1, V, TAIL, HAS_CE,
            POW
        )  # fmt: skip
    else:
        tl.store(KL_ptr + row, 0.0)
        if HAS_CE:
            tl.store(CE_ptr + row, 0.0)
        zero_row(g_row, V, BLOCK_V)


@triton.jit
def _kl_ce_fwd_kernel(
    S_ptr, s_stride, IDS_ptr, ids_stride, P_ptr, LOGP_ptr, pk_stride, PTAIL_ptr, SEL_ptr, LAB_ptr,
    KL_ptr, CE_ptr, MAX_ptr, LGT_ptr, LG1_ptr, M_ptr, R_ptr, V, K, k_t,
    TINY_C: tl.constexpr, TAIL: tl.constexpr, HAS_CE: tl.constexpr, POW: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_W: tl.constexpr, LANES: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Phases 1-2: the per-row losses and the statistics `_kl_ce_bwd_kernel` reads (RowStats: the log-sums
    # relative to the exact max, not to its rounded scaled offset).
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    sel = tl.load(SEL_ptr + row)
    label, has, ok, x_lab = _row_label(s_row, LAB_ptr, row, V, HAS_CE)
    kl = 0.0
    mx = 0.0
    lg_t = 0.0
    lg_1 = 0.0
    m = 0.0
    r = 0.0
    if (sel > 0) | has:
        mx, lg_t, lg_1 = _row_stats(s_row, V, k_t, HAS_CE, POW, BLOCK_V, NUM_W, LANES)
        koffs, ids, valid, sid, xk, p = _gather_topk(
            s_row, row, IDS_ptr, ids_stride, P_ptr, pk_stride, V, K, BLOCK_K
        )
        kl, m, r = _topk_kl(
            xk, valid, p, row, koffs, K, LOGP_ptr, pk_stride, PTAIL_ptr, scaled(mx, k_t), lg_t, k_t, TINY_C,
            TAIL
        )  # fmt: skip
        if HAS_CE:
            tl.store(CE_ptr + row, tl.where(has, _row_ce(mx, x_lab, lg_1, ok), 0.0))
            tl.store(LG1_ptr + row, lg_1 - residual(mx, LOG2E_C))
        lg_t -= residual(mx, k_t)
    elif HAS_CE:
        tl.store(CE_ptr + row, 0.0)
        tl.store(LG1_ptr + row, 0.0)
    tl.store(KL_ptr + row, tl.where(sel > 0, kl, 0.0))
    tl.store(MAX_ptr + row, mx)
    tl.store(LGT_ptr + row, lg_t)
    tl.store(M_ptr + row, m)
    tl.store(R_ptr + row, r)


@triton.jit
def _kl_ce_bwd_kernel(
    S_ptr, s_stride, G_ptr, g_stride, IDS_ptr, ids_stride, P_ptr, pk_stride, PTAIL_ptr, LAB_ptr,
    MAX_ptr, LGT_ptr, LG1_ptr, M_ptr, R_ptr, A_ptr, C_ptr, V, K, k_t,
    TINY_C: tl.constexpr, TAIL: tl.constexpr, HAS_CE: tl.constexpr, POW: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_W: tl.constexpr, LANES: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Phase 3 from the saved statistics, for per-row coefficients a (KL) and c (CE).
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    g_row = G_ptr + row * g_stride
    a = tl.load(A_ptr + row)
    c = 0.0
    if HAS_CE:
        c = tl.load(C_ptr + row)
    if (a != 0) | (c != 0):
        label, has, ok, x_lab = _row_label(s_row, LAB_ptr, row, V, HAS_CE)
        mx = tl.load(MAX_ptr + row)
        lg_t = tl.load(LGT_ptr + row) + residual(mx, k_t)
        lg_1 = 0.0
        if HAS_CE:
            lg_1 = tl.load(LG1_ptr + row) + residual(mx, LOG2E_C)
        ptail = 0.0
        r = 0.0
        if TAIL:
            ptail = tl.load(PTAIL_ptr + row)
            r = tl.load(R_ptr + row)
        cq, aq, apt, rq, cs, c1 = _grad_coefs(
            mx, lg_t, lg_1, a, c, tl.load(M_ptr + row), ptail, r, k_t, HAS_CE, POW
        )
        koffs, ids, valid, sid, xk, p = _gather_topk(
            s_row, row, IDS_ptr, ids_stride, P_ptr, pk_stride, V, K, BLOCK_K
        )
        _dense_grad(s_row, g_row, V, k_t, cq, aq, apt, rq, cs, c1, r, TAIL, HAS_CE, POW, BLOCK_V)
        tl.debug_barrier()  # the fix-ups overwrite entries other threads wrote
        _sparse_grad(
            g_row, xk, valid, sid, ids, p, label, x_lab, a, c, k_t, cq, aq, apt, rq, cs, c1, V, TAIL, HAS_CE,
            POW
        )  # fmt: skip
    else:
        zero_row(g_row, V, BLOCK_V)


# True when triton.jit built interpreter functions (TRITON_INTERPRET=1 at import): see `backend_for`
INTERPRETED = not isinstance(_kl_ce_fused_kernel, JITFunction)


# --------------------------------------------------------------------------------------------- launchers
def block_config(V: int, elem_bytes: int, vector: bool) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, L): blocks of num_warps x L lanes (L = 32 threads x the vector width: 16 bytes
    when the rows are 16-byte aligned, one element otherwise) repeated to two 16-byte vectors per thread per
    loop trip (16 bf16), or 16 scalar elements. Small V gets smaller blocks.

    Scalar rows take 16 elements per trip, not 8: the per-trip cost (loop control, the warp's max shuffles,
    the rescale) is then spread over twice the logits, 10.0 instead of 11.9-12.2 SASS per logit in the
    statistics loop (Triton 3.6 and 3.9), for 80 registers instead of 40-47, which keeps as many bytes in
    flight per SM (half the warps, twice the loads each)."""
    vec = 16 // elem_bytes if vector else 1
    per_thread = 2 * vec if vector else 16
    num_warps = 8 if V >= 8 * 32 * per_thread else 4
    lanes = 32 * vec
    block = min(32 * per_thread * num_warps, triton.next_power_of_2(V))
    return max(block, lanes * num_warps), num_warps, lanes


def aligned_rows(*tensors: torch.Tensor) -> bool:
    """Whether Triton's runtime will know every row starts on a 16-byte boundary: it specialises a pointer
    or an integer argument as 16-divisible only when it is, so the row stride must be a multiple of 16
    elements (a vocabulary padded to a multiple of 64 is) for the loops to compile to vector loads."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


def _launch(kernel, prep: Prepared, *args) -> None:
    """One program per row of `prep.student`; `args` are the kernel's arguments before V."""
    N = prep.student.shape[0]
    if N == 0:
        return
    V, K = prep.vocab, prep.ids.shape[1]
    s = prep.student
    block_v, num_warps, lanes = block_config(V, s.element_size(), aligned_rows(s))
    with device_guard(prep.student):
        kernel[(N,)](
            *args,
            V,
            K,
            LOG2E / prep.temperature,
            TINY_C=TINY,
            TAIL=prep.tail,
            HAS_CE=prep.labels is not None,
            POW=temperature_power(prep.temperature),
            BLOCK_V=block_v,
            NUM_W=num_warps,
            LANES=lanes,
            BLOCK_K=triton.next_power_of_2(max(K, 1)),
            num_warps=num_warps,
        )


def _teacher_args(prep: Prepared, *, logp: bool = True) -> tuple:
    ids, p = prep.ids, prep.p
    head = (ids, ids.stride(0), p) + ((prep.logp,) if logp else ())
    return head + (p.stride(0), prep.ptail)


def _labels_or(prep: Prepared, stand_in: torch.Tensor) -> torch.Tensor:
    # without the CE the label pointer is never dereferenced (HAS_CE=False)
    return prep.labels if prep.labels is not None else stand_in


def kl_ce_forward(prep: Prepared) -> RowStats:
    """Per-row losses and statistics (see `RowStats`), zeros on rows that count for neither loss."""
    s = prep.student
    st = RowStats.allocate(s.shape[0], s.device, prep.labels is not None, alloc=torch.empty)
    lg_1 = st.lg_1 if st.lg_1 is not None else st.lg_t
    _launch(
        _kl_ce_fwd_kernel, prep, s, s.stride(0), *_teacher_args(prep), prep.sel, _labels_or(prep, prep.sel),
        st.kl, st.ce if st.ce is not None else st.kl, st.max, st.lg_t, lg_1, st.mass, st.inv_qtail,
    )  # fmt: skip
    return st


def kl_ce_backward(prep: Prepared, st: RowStats, a: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The gradient w.r.t. the logits (in their dtype) for per-row coefficients a (KL) and c (CE)."""
    s = prep.student
    grad = torch.empty_strided(s.shape, s.stride(), device=s.device, dtype=s.dtype)
    if prep.vocab < s.shape[1]:
        grad[:, prep.vocab :].zero_()  # padding columns: outside the softmax
    lg_1 = st.lg_1 if st.lg_1 is not None else st.lg_t
    _launch(
        _kl_ce_bwd_kernel, prep, s, s.stride(0), grad, grad.stride(0), *_teacher_args(prep, logp=False),
        _labels_or(prep, a), st.max, st.lg_t, lg_1, st.mass, st.inv_qtail, a, c if c is not None else a,
    )  # fmt: skip
    return grad


def kl_ce_forward_grad(prep: Prepared, coef: torch.Tensor, grad: torch.Tensor | None) -> RowStats:
    """Per-row KL and CE (the other RowStats fields None) and, into `grad` ([N, >= V], unit last stride,
    possibly the logits themselves), the gradient of coef[0]*sum_selected KL*T + coef[1]*sum_labelled CE
    (see `_common.loss_coefficients`). Without `grad` the statistics kernel runs instead."""
    if grad is None:
        st = kl_ce_forward(prep)
        return RowStats(st.kl, st.ce, *(None,) * 5)
    s = prep.student
    n = s.shape[0]
    kl = torch.empty(n, device=s.device, dtype=torch.float32)
    ce = torch.empty_like(kl) if prep.labels is not None else None
    _launch(
        _kl_ce_fused_kernel, prep, s, s.stride(0), grad, grad.stride(0), *_teacher_args(prep), prep.sel,
        _labels_or(prep, prep.sel), coef, kl, ce if ce is not None else kl,
    )  # fmt: skip
    return RowStats(kl, ce, *(None,) * 5)


# ------------------------------------------------------------------------------------------ autograd.Function
# Looked up at call time, so the module-level functions stay the single point to patch or profile.
TritonDistillLogitLoss = logit_loss_function(
    "TritonDistillLogitLoss",
    lambda prep: kl_ce_forward(prep),
    lambda prep, stats, a, c: kl_ce_backward(prep, stats, a, c),
)
