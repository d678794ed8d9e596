"""Triton: sparse temperature KL against a cached teacher top-k (renormalised or tail-aware), fused with the
MLM cross-entropy at T = 1.

Layering (Liger-style): the `@triton.jit` kernels; the launchers `kl_ce_forward(prep) -> RowStats` and
`kl_ce_backward(prep, stats, a, c) -> gradient` (the backend protocol of `_common.py`); the
`torch.autograd.Function` `TritonDistillLogitLoss` built from them. The public entry points are in
`__init__.py`.

Memory traffic per active row of V student logits: the forward reads it once (online log-sum-exp at T and at 1
in the same loop, then k + 1 gathered reads); the backward reads it once more and writes the gradient once
(plus k + 1 fix-up writes). Rows that neither count for the KL nor carry a label are never read; their
gradient rows are written as zeros. Besides the gradient only O(N) and O(N*k) buffers are allocated.
The math is in docs/kernels.md; `reference.py` is the same algorithm in chunked PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TINY, Prepared, RowStats, logit_loss_function

MAX_BLOCK_V = 4096


# Each kernel is split into @triton.jit helpers, one per phase of the row. The compiler inlines them: the
# sm_90 SASS is instruction for instruction that of the kernels written as one function. The helpers take
# `row` and base pointers and load what they read themselves, so loads and address arithmetic stay where
# they are used (computed before the backward's dense loop instead, they cost it 8 more registers).
@triton.jit
def _row_softmax_stats(s_row, V, inv_T, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over the row: online (max, sum of exp) of s/T, and of s when the CE is on."""
    m_t = float("-inf")
    d_t = 0.0
    m_1 = float("-inf")
    d_1 = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        xt = x * inv_T
        mt_new = tl.maximum(m_t, tl.max(xt, 0))
        d_t = d_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(xt - mt_new), 0)
        m_t = mt_new
        if HAS_CE:
            m1_new = tl.maximum(m_1, tl.max(x, 0))
            d_1 = d_1 * tl.exp(m_1 - m1_new) + tl.sum(tl.exp(x - m1_new), 0)
            m_1 = m1_new
    return m_t, d_t, m_1, d_1


@triton.jit
def _gather_topk(s_row, row, IDS_ptr, ids_stride, K, BLOCK_K: tl.constexpr):
    """The row's top-k ids (padded to BLOCK_K), which lanes hold one, their clamped indices and the logits
    there (fp32; 0 on lanes without an id)."""
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    ids = tl.load(IDS_ptr + row * ids_stride + koffs, mask=kmask, other=-1)
    valid = kmask & (ids >= 0)
    sid = tl.where(valid, ids, 0)
    return koffs, kmask, ids, valid, sid, tl.load(s_row + sid, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _topk_kl(
    s_row,
    row,
    IDS_ptr,
    ids_stride,
    P_ptr,
    LOGP_ptr,
    pk_stride,
    PTAIL_ptr,
    m_t,
    d_t,
    lg_t,
    K,
    inv_T,
    TINY_C: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(KL of the row, teacher mass m, 1/q_tail) from the k gathered logits."""
    koffs, kmask, ids, valid, sid, xk = _gather_topk(s_row, row, IDS_ptr, ids_stride, K, BLOCK_K)
    # absent entries read as the row max: every lane stays finite (they are masked out below)
    xk = tl.where(valid, xk * inv_T, m_t)
    p = tl.load(P_ptr + row * pk_stride + koffs, mask=kmask, other=0.0)
    logp = tl.load(LOGP_ptr + row * pk_stride + koffs, mask=kmask, other=0.0)
    logq = (xk - m_t) - lg_t
    kl = tl.sum(tl.where(p != 0, p * (logp - logq), 0.0), 0)
    m = tl.sum(p, 0)
    r = 0.0
    if TAIL:
        ptail = tl.load(PTAIL_ptr + row)
        m = m + ptail
        sk = tl.sum(tl.where(valid, tl.exp(xk - m_t), 0.0), 0)
        qtail = tl.maximum((d_t - sk) / d_t, TINY_C)
        kl += tl.where(ptail != 0, ptail * (tl.log(tl.maximum(ptail, TINY_C)) - tl.log(qtail)), 0.0)
        r = 1.0 / qtail
    return kl, m, r


@triton.jit
def _kl_ce_fwd_kernel(
    S_ptr,
    s_stride,
    IDS_ptr,
    ids_stride,
    P_ptr,
    LOGP_ptr,
    pk_stride,
    PTAIL_ptr,
    SEL_ptr,
    LAB_ptr,
    KL_ptr,
    CE_ptr,
    MXT_ptr,
    LGT_ptr,
    MX1_ptr,
    LG1_ptr,
    M_ptr,
    R_ptr,
    V,
    K,
    inv_T,
    TINY_C: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    sel = tl.load(SEL_ptr + row)
    if HAS_CE:
        label = tl.load(LAB_ptr + row)
        active = (sel > 0) | (label >= 0)
    else:
        active = sel > 0
    if active:
        m_t, d_t, m_1, d_1 = _row_softmax_stats(s_row, V, inv_T, HAS_CE, BLOCK_V)
        # keep max and log-sum apart: m + log(d) would round log(d) away when |m| is huge (-1e9 fills)
        lg_t = tl.log(d_t)
        kl, m, r = _topk_kl(
            s_row,
            row,
            IDS_ptr,
            ids_stride,
            P_ptr,
            LOGP_ptr,
            pk_stride,
            PTAIL_ptr,
            m_t,
            d_t,
            lg_t,
            K,
            inv_T,
            TINY_C,
            TAIL,
            BLOCK_K,
        )
        tl.store(KL_ptr + row, kl)
        tl.store(MXT_ptr + row, m_t)
        tl.store(LGT_ptr + row, lg_t)
        tl.store(M_ptr + row, m)
        tl.store(R_ptr + row, r)
        if HAS_CE:
            lg_1 = tl.log(d_1)
            has = label >= 0
            sl = tl.load(s_row + tl.where(has, label, 0)).to(tl.float32)
            tl.store(CE_ptr + row, tl.where(has, (m_1 - sl) + lg_1, 0.0))
            tl.store(MX1_ptr + row, m_1)
            tl.store(LG1_ptr + row, lg_1)
    else:
        tl.store(KL_ptr + row, 0.0)
        tl.store(MXT_ptr + row, 0.0)
        tl.store(LGT_ptr + row, 0.0)
        tl.store(M_ptr + row, 0.0)
        tl.store(R_ptr + row, 0.0)
        if HAS_CE:
            tl.store(CE_ptr + row, 0.0)
            tl.store(MX1_ptr + row, 0.0)
            tl.store(LG1_ptr + row, 0.0)


@triton.jit
def _dense_grad(
    s_row,
    g_row,
    V,
    inv_T,
    mx_t,
    lg_t,
    am,
    apt,
    r,
    c,
    mx_1,
    lg_1,
    TAIL: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One pass over the row writing the off-top-k gradient everywhere; apt and r are read only with TAIL,
    c, mx_1 and lg_1 only with HAS_CE."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        vmask = offs < V
        x = tl.load(s_row + offs, mask=vmask, other=float("-inf")).to(tl.float32)
        q = tl.exp((x * inv_T - mx_t) - lg_t)
        g = am * q
        if TAIL:
            g -= apt * tl.minimum(q * r, 1.0)
        if HAS_CE:
            g += c * tl.exp((x - mx_1) - lg_1)
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=vmask)


@triton.jit
def _sparse_grad(
    s_row,
    g_row,
    row,
    IDS_ptr,
    ids_stride,
    P_ptr,
    pk_stride,
    LAB_ptr,
    K,
    inv_T,
    mx_t,
    lg_t,
    a,
    am,
    apt,
    r,
    c,
    mx_1,
    lg_1,
    TAIL: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Overwrite the top-k positions with a*(q_j*m - p_j) (+ the CE part), then the label position."""
    koffs, kmask, ids, valid, sid, xk = _gather_topk(s_row, row, IDS_ptr, ids_stride, K, BLOCK_K)
    # absent entries read as the row max: every lane stays finite (they are not stored)
    xk = tl.where(valid, xk, mx_t / inv_T)
    p = tl.load(P_ptr + row * pk_stride + koffs, mask=kmask, other=0.0)
    qk = tl.exp((xk * inv_T - mx_t) - lg_t)
    gk = am * qk - a * p
    if HAS_CE:
        label = tl.load(LAB_ptr + row)
        gk += c * (tl.exp((xk - mx_1) - lg_1) - tl.where(valid & (ids == label), 1.0, 0.0))
    tl.store(g_row + sid, gk.to(g_row.dtype.element_ty), mask=valid)
    if HAS_CE:
        # ---- the label position (same value as above when the label is among the top-k)
        has = label >= 0
        sl = tl.where(has, label, 0)
        xl = tl.load(s_row + sl).to(tl.float32)
        ql = tl.exp((xl * inv_T - mx_t) - lg_t)
        hit = valid & (ids == label)
        in_k = tl.sum(tl.where(hit, 1, 0), 0) > 0
        pl = tl.sum(tl.where(hit, p, 0.0), 0)
        kl_off = am * ql
        if TAIL:
            kl_off -= apt * tl.minimum(ql * r, 1.0)
        gl = tl.where(in_k, am * ql - a * pl, kl_off) + c * (tl.exp((xl - mx_1) - lg_1) - 1.0)
        tl.store(g_row + sl, gl.to(g_row.dtype.element_ty), mask=has)


@triton.jit
def _kl_ce_bwd_kernel(
    S_ptr,
    s_stride,
    G_ptr,
    g_stride,
    IDS_ptr,
    ids_stride,
    P_ptr,
    pk_stride,
    PTAIL_ptr,
    LAB_ptr,
    MXT_ptr,
    LGT_ptr,
    MX1_ptr,
    LG1_ptr,
    M_ptr,
    R_ptr,
    A_ptr,
    C_ptr,
    V,
    K,
    inv_T,
    TAIL: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    g_row = G_ptr + row * g_stride
    a = tl.load(A_ptr + row)
    if HAS_CE:
        c = tl.load(C_ptr + row)
        active = (a != 0) | (c != 0)
    else:
        c = 0.0
        active = a != 0
    if active:
        mx_t = tl.load(MXT_ptr + row)
        lg_t = tl.load(LGT_ptr + row)
        am = a * tl.load(M_ptr + row)
        apt = 0.0
        r = 0.0
        if TAIL:
            apt = a * tl.load(PTAIL_ptr + row)
            r = tl.load(R_ptr + row)
        mx_1 = 0.0
        lg_1 = 0.0
        if HAS_CE:
            mx_1 = tl.load(MX1_ptr + row)
            lg_1 = tl.load(LG1_ptr + row)
        _dense_grad(s_row, g_row, V, inv_T, mx_t, lg_t, am, apt, r, c, mx_1, lg_1, TAIL, HAS_CE, BLOCK_V)
        # the fix-ups overwrite values the dense pass wrote (possibly from other threads)
        tl.debug_barrier()
        _sparse_grad(
            s_row,
            g_row,
            row,
            IDS_ptr,
            ids_stride,
            P_ptr,
            pk_stride,
            LAB_ptr,
            K,
            inv_T,
            mx_t,
            lg_t,
            a,
            am,
            apt,
            r,
            c,
            mx_1,
            lg_1,
            TAIL,
            HAS_CE,
            BLOCK_K,
        )
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=G_ptr.dtype.element_ty), mask=offs < V)


# --------------------------------------------------------------------------------------------- launchers
def _launch(kernel, prep: Prepared, *pointers, **constexprs) -> None:
    """One program per row of `prep.student`; `pointers` are the kernel's arguments before V."""
    N, V = prep.student.shape
    K = prep.ids.shape[1]
    if N == 0:
        return
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    kernel[(N,)](
        *pointers,
        V,
        K,
        1.0 / prep.temperature,
        TAIL=prep.tail,
        HAS_CE=prep.labels is not None,
        BLOCK_V=block_v,
        BLOCK_K=triton.next_power_of_2(max(K, 1)),
        num_warps=8 if block_v >= 2048 else 4,
        **constexprs,
    )


def _stat_args(st: RowStats) -> tuple[torch.Tensor, ...]:
    """The kernels' MXT, LGT, MX1, LG1, M and R arguments. Without the CE the MX1 and LG1 buffers are never
    dereferenced (HAS_CE=False), so the statistics at T stand in for them."""
    has_ce = st.max_1 is not None
    max_1, logsum_1 = (st.max_1, st.logsum_1) if has_ce else (st.max_t, st.logsum_t)
    return st.max_t, st.logsum_t, max_1, logsum_1, st.mass, st.inv_qtail


def kl_ce_forward(prep: Prepared) -> RowStats:
    """Per-row losses and statistics (see `RowStats`), zeros on rows that count for neither loss."""
    s, ids, p = prep.student, prep.ids, prep.p
    has_ce = prep.labels is not None
    st = RowStats.allocate(s.shape[0], s.device, has_ce, alloc=torch.empty)
    _launch(
        _kl_ce_fwd_kernel,
        prep,
        s,
        s.stride(0),
        ids,
        ids.stride(0),
        p,
        prep.logp,
        p.stride(0),
        prep.ptail,
        prep.sel,
        prep.labels if has_ce else prep.sel,  # without the CE never dereferenced, like CE_ptr
        st.kl,
        st.ce if has_ce else st.kl,
        *_stat_args(st),
        TINY_C=TINY,
    )
    return st


def kl_ce_backward(prep: Prepared, st: RowStats, a: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The gradient w.r.t. the logits (in their dtype) for per-row coefficients a (KL) and c (CE)."""
    s, ids, p = prep.student, prep.ids, prep.p
    has_ce = prep.labels is not None
    grad = torch.empty_like(s)
    _launch(
        _kl_ce_bwd_kernel,
        prep,
        s,
        s.stride(0),
        grad,
        grad.stride(0),
        ids,
        ids.stride(0),
        p,
        p.stride(0),
        prep.ptail,
        prep.labels if has_ce else a,  # without the CE never dereferenced, like C_ptr
        *_stat_args(st),
        a,
        c if has_ce else a,
    )
    return grad


# ------------------------------------------------------------------------------------------ autograd.Function
# Looked up at call time, so the module-level functions stay the single point to patch or profile.
TritonDistillLogitLoss = logit_loss_function(
    "TritonDistillLogitLoss",
    lambda prep: kl_ce_forward(prep),
    lambda prep, stats, a, c: kl_ce_backward(prep, stats, a, c),
)
