"""Triton: T²·KL(softmax(t/T) ‖ softmax(s/T)) against a dense teacher, fused with the MLM cross-entropy at
T = 1, with the gradient of the weighted sum written in the same launch.

One program per row, two passes over it:

1. statistics: one online loop over the student row `s` and the teacher row `t` keeping, per warp, the
   student's running max (one max serves every temperature: max(s/T) = max(s)/T) and the teacher's, and
   per-lane sums of exponentials rescaled when a max moves; warps and lanes are combined once per row;
2. KL and gradient: a second loop over the same row (mostly an L2 hit) computing log2 q and log2 p centred
   on the final maxima, accumulating Σ p·(log p − log q) and writing `a·(q − p) + c·σ` (q = softmax(s/T),
   p = softmax(t/T), σ = softmax(s)); then, after a barrier, the label position once more with the one-hot
   term. Without a gradient to write (evaluation) the loop runs for the KL only.

Exponentials are `exp2` with log2(e)/T folded into a fused multiply-add against a scaled max (`ex2.approx.ftz`,
one SFU instruction each). At T = 1 the CE reuses the KL's exponential, at T = 2 it is its square; any other
T needs a second one. Each loop is an unmasked body over whole blocks plus one masked tail block, so when the
row strides are multiples of 16 the body compiles to 128-bit vector loads and stores. Row offsets are int64.

Rows that count for neither loss are not read (their gradient row is written as zeros); rows that only carry a
label do not read the teacher. A label >= V is never dereferenced: its CE is NaN (the callers reject such
labels before launching; this keeps the kernel memory-safe regardless). Math: docs/kernels-dense.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import LOG2E
from .triton_helpers import (
    LN2_C,
    LOG2E_C,
    device_guard,
    load_row,
    rescale,
    scale_grad_,  # noqa: F401  (the dense backend's in-place upstream scaling, looked up as dense_kl.scale_grad_)
    scaled,
    two_sum,
    zero_row,
)


def t_mode(temperature: float) -> int:
    """1 when T = 1 (the CE reuses the KL's exponential), 2 when T = 2 (its square), else 0."""
    return 1 if temperature == 1.0 else 2 if temperature == 2.0 else 0


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _stats_block(
    s_row, t_row, offs, V, m_s, m_t, d_t, d_1, d_p, k_t,
    KL: tl.constexpr, CE: tl.constexpr, T_MODE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # One [warps, E] block of pass 1; each warp keeps its own running maxima m_s, m_t ([warps]) so the max
    # is a warp shuffle reduction (no shared memory, no barrier), and per-lane sums d_* ([warps, E]).
    # Exponentials are exp2(fma(x, k, -fl(m k))) against the scaled max, rescaled with the same rounded
    # values, so the sums stay consistent with it.
    s = load_row(s_row, offs, V, MASKED)
    m_new = tl.maximum(m_s, tl.max(s, 1))
    mk_new = scaled(m_new, k_t)
    e = tl.exp2(tl.fma(s, k_t, -mk_new[:, None]))
    alpha = rescale(m_s, k_t, mk_new)[:, None]
    d_t = d_t * alpha + e
    if CE:
        if T_MODE == 2:  # exp(s - m) = exp((s - m)/2)^2: a multiply instead of a second exponential
            d_1 = d_1 * (alpha * alpha) + e * e
        elif T_MODE == 0:
            m1_new = scaled(m_new, LOG2E_C)
            d_1 = d_1 * rescale(m_s, LOG2E_C, m1_new)[:, None]
            d_1 += tl.exp2(tl.fma(s, LOG2E_C, -m1_new[:, None]))
    if KL:
        t = load_row(t_row, offs, V, MASKED)
        mt_new = tl.maximum(m_t, tl.max(t, 1))
        mtk_new = scaled(mt_new, k_t)
        d_p = d_p * rescale(m_t, k_t, mtk_new)[:, None] + tl.exp2(tl.fma(t, k_t, -mtk_new[:, None]))
        m_t = mt_new
    return m_new, m_t, d_t, d_1, d_p


@triton.jit
def _combine(m, k_t, sums):
    # the row's max M of the per-warp maxima m, and sum_w 2^(fl(m_w k) - fl(M k)) * sums_w
    mx = tl.max(m, 0)
    return mx, tl.sum(tl.sum(sums, 1) * rescale(m, k_t, scaled(mx, k_t)), 0)


@triton.jit
def _pass1(
    s_row, t_row, V, k_t,
    KL: tl.constexpr, CE: tl.constexpr, T_MODE: tl.constexpr, BLOCK_V: tl.constexpr, NUM_W: tl.constexpr,
):  # fmt: skip
    # Pass 1 over a row, viewing each block as [NUM_W, E] (warp w reads its own contiguous E logits).
    # Returns the row's max of s, log2 sum 2^(fma(s, k, -fl(max k))), the same for t, and for the CE the
    # offset m1 and log2 sum at T = 1.
    E: tl.constexpr = BLOCK_V // NUM_W
    lanes = tl.arange(0, NUM_W)[:, None] * E + tl.arange(0, E)[None, :]
    m_w = tl.full([NUM_W], float("-inf"), tl.float32)
    m_t = m_w
    zero = tl.zeros([NUM_W, E], dtype=tl.float32)
    d_t = zero
    d_1 = zero
    d_p = zero
    v_main = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_main, BLOCK_V):
        m_w, m_t, d_t, d_1, d_p = _stats_block(
            s_row, t_row, start + lanes, V, m_w, m_t, d_t, d_1, d_p, k_t, KL, CE, T_MODE, False
        )
    if v_main < V:
        m_w, m_t, d_t, d_1, d_p = _stats_block(
            s_row, t_row, v_main + lanes, V, m_w, m_t, d_t, d_1, d_p, k_t, KL, CE, T_MODE, True
        )
    m_s, sum_t = _combine(m_w, k_t, d_t)
    lg_t = tl.log2(sum_t)
    lg_p = 0.0
    if KL:
        m_t, sum_p = _combine(m_t, k_t, d_p)
        lg_p = tl.log2(sum_p)
    m1 = 0.0
    lg_1 = 0.0
    if CE:
        if T_MODE == 1:
            m1 = scaled(m_s, k_t)
            lg_1 = lg_t
        elif T_MODE == 2:
            m1 = 2.0 * scaled(m_s, k_t)
            lg_1 = tl.log2(_combine(m_w, LOG2E_C, d_1)[1])
        else:
            m1 = scaled(m_s, LOG2E_C)
            lg_1 = tl.log2(_combine(m_w, LOG2E_C, d_1)[1])
    return m_s, lg_t, m_t, lg_p, m1, lg_1


@triton.jit
def _grad_terms(
    s, t, k_t, cq, cp, c1, aq, ap, cs, KL: tl.constexpr, CE: tl.constexpr, T_MODE: tl.constexpr,
):  # fmt: skip
    # The gradient a*(q - p) + c*sigma from e_q = 2^(fma(s, k, -cq)), e_p = 2^(fma(t, k, -cp)), with the
    # scalar factors folded into aq (on e_q, the CE's too at T = 1), ap (on e_p) and cs (on sigma's
    # exponential: e_q^2 at T = 2, its own at other T). Also returns the two exponents and e_p (for the KL).
    lq = tl.fma(s, k_t, -cq)
    e_q = tl.exp2(lq)
    g = aq * e_q
    if CE:
        if T_MODE == 2:
            g = e_q * (aq + cs * e_q)
        elif T_MODE == 0:
            g += cs * tl.exp2(tl.fma(s, LOG2E_C, -c1))
    lp = lq
    e_p = e_q
    if KL:
        lp = tl.fma(t, k_t, -cp)
        e_p = tl.exp2(lp)
        g -= ap * e_p
    return g, lq, lp, e_p


@triton.jit
def _grad_block(
    s_row, t_row, g_row, offs, V, k_t, cq, cp, c1, aq, ap, cs, kl_acc,
    KL: tl.constexpr, CE: tl.constexpr, T_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # One block of pass 2: the gradient, and e_p * (log2 p - log2 q) up to the scalar offsets, both
    # exponents centred on the final maxima (well conditioned: no difference of two large log-sum-exps).
    s = load_row(s_row, offs, V, MASKED)
    t = s
    if KL:
        t = load_row(t_row, offs, V, MASKED)
    g, lq, lp, e_p = _grad_terms(s, t, k_t, cq, cp, c1, aq, ap, cs, KL, CE, T_MODE)
    if KL:
        if MASKED:  # past the end of the row both are -inf: p = 0 times 0, not NaN
            kl_acc += e_p * (tl.where(offs < V, lp, 0.0) - tl.where(offs < V, lq, 0.0))
        else:
            kl_acc += e_p * (lp - lq)
    if WRITE_GRAD:
        if MASKED:
            tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
        else:
            tl.store(g_row + offs, g.to(g_row.dtype.element_ty))
    return kl_acc


@triton.jit
def _row(
    s_row, t_row, g_row, row, KL_ptr, CE_ptr, lab, a, c, V, k_t,
    KL: tl.constexpr, CE: tl.constexpr, T_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_W: tl.constexpr,
):  # fmt: skip
    # One row that counts for the KL and/or carries a label (a kernel body, kept whole: its helpers are
    # inlined and splitting it further would move loads ahead of the loops, costing registers): pass 1, the
    # per-row constants and the CE, then pass 2 (the KL sum and the gradient; without a gradient to write it runs for the KL alone) and the
    # label's one-hot term.
    m_s, lg_t, m_t, lg_p, m1, lg_1 = _pass1(s_row, t_row, V, k_t, KL, CE, T_MODE, BLOCK_V, NUM_W)
    cq, cq_lo = two_sum(scaled(m_s, k_t), lg_t)  # q = 2^(fma(s, k, -cq) - cq_lo)
    cp, cp_lo = 0.0, 0.0
    aq, ap, cs, c1 = 0.0, 0.0, 0.0, 0.0
    if KL:
        cp, cp_lo = two_sum(scaled(m_t, k_t), lg_p)
        aq = a * tl.exp2(-cq_lo)
        ap = a * tl.exp2(-cp_lo)
    ok = lab < V
    lab_safe = tl.where(ok, lab, 0)
    # The label's logits are read before pass 2, which may overwrite them: the gradient may be written over
    # the student's (or the teacher's) row (the fused head does), and the one-hot fix-up below needs both.
    s_lab = 0.0
    t_lab = 0.0
    if CE:
        # CE = (m - s_label) + ln sum exp(s - m), with the exact residual of the offset m1 ~ m log2 e
        s_lab = tl.load(s_row + lab_safe).to(tl.float32)
        if KL:
            t_lab = tl.load(t_row + lab_safe).to(tl.float32)
        ce = (m_s - s_lab) + (lg_1 - tl.fma(m_s, LOG2E_C, -m1)) * LN2_C
        tl.store(CE_ptr + row, tl.where(ok, ce, float("nan")))
        if T_MODE == 1:  # sigma = q
            aq += c * tl.exp2(-cq_lo)
        elif T_MODE == 2:  # sigma = q^2 * sum_T^2 / sum_1
            cs = c * tl.exp2(2.0 * (lg_t - cq_lo) - lg_1)
        else:
            c1, c1_lo = two_sum(m1, lg_1)
            cs = c * tl.exp2(-c1_lo)
    if KL or WRITE_GRAD:
        v_main = (V // BLOCK_V) * BLOCK_V
        kl_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, v_main, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            kl_acc = _grad_block(
                s_row,
                t_row,
                g_row,
                offs,
                V,
                k_t,
                cq,
                cp,
                c1,
                aq,
                ap,
                cs,
                kl_acc,
                KL,
                CE,
                T_MODE,
                WRITE_GRAD,
                False,
            )
        if v_main < V:
            offs = v_main + tl.arange(0, BLOCK_V)
            kl_acc = _grad_block(
                s_row,
                t_row,
                g_row,
                offs,
                V,
                k_t,
                cq,
                cp,
                c1,
                aq,
                ap,
                cs,
                kl_acc,
                KL,
                CE,
                T_MODE,
                WRITE_GRAD,
                True,
            )
        if KL:  # sum p (log p - log q) = 2^-cp_lo * sum e_p (lp - lq) + (cq_lo - cp_lo), in log2 units
            kl = tl.exp2(-cp_lo) * tl.sum(kl_acc, 0) + (cq_lo - cp_lo)
            tl.store(KL_ptr + row, kl * LN2_C)
    if not KL:
        tl.store(KL_ptr + row, 0.0)
    if WRITE_GRAD and CE:
        # the one-hot term: rewrite the label's entry (other threads of this program wrote it above)
        tl.debug_barrier()
        y = s_lab
        if KL:
            y = t_lab
        gl = _grad_terms(s_lab, y, k_t, cq, cp, c1, aq, ap, cs, KL, CE, T_MODE)[0] - c
        tl.store(g_row + lab_safe, gl.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def _dense_kl_ce_kernel(
    S_ptr, s_stride, T_ptr, t_stride, G_ptr, g_stride, SEL_ptr, LAB_ptr, COEF_ptr, KL_ptr, CE_ptr, V, k_t,
    HAS_CE: tl.constexpr, T_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_W: tl.constexpr,
):  # fmt: skip
    # Per row: which of the KL / CE it counts for, then the matching specialisation of `_row`.
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * s_stride
    t_row = T_ptr + row * t_stride
    g_row = G_ptr + row * g_stride
    do_kl = tl.load(SEL_ptr + row) != 0
    a = tl.load(COEF_ptr)
    lab = -1
    c = 0.0
    if HAS_CE:
        lab = tl.load(LAB_ptr + row)
        c = tl.load(COEF_ptr + 1)
    # fmt: off
    if lab >= 0:
        if do_kl:
            _row(s_row, t_row, g_row, row, KL_ptr, CE_ptr, lab, a, c, V, k_t, True, True, T_MODE, WRITE_GRAD, BLOCK_V, NUM_W)
        else:
            _row(s_row, t_row, g_row, row, KL_ptr, CE_ptr, lab, a, c, V, k_t, False, True, T_MODE, WRITE_GRAD, BLOCK_V, NUM_W)
    else:
        if HAS_CE:
            tl.store(CE_ptr + row, 0.0)
        if do_kl:
            _row(s_row, t_row, g_row, row, KL_ptr, CE_ptr, lab, a, c, V, k_t, True, False, T_MODE, WRITE_GRAD, BLOCK_V, NUM_W)
        else:
            tl.store(KL_ptr + row, 0.0)
            if WRITE_GRAD:
                zero_row(g_row, V, BLOCK_V)
    # fmt: on


# ------------------------------------------------------------------------------------------- launchers
def block_config(V: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Pass 1 views a block as [num_warps, E] with E = 32 threads x one 16-byte vector
    of student logits, so that each warp's row is exactly what the compiler's coalesced layout gives one warp
    (8 bf16 per thread: 2048 logits per block with 8 warps); wider E would split a warp's row across warps
    and bring back shared-memory reductions. Small V gets smaller blocks."""
    vec = 16 // elem_bytes
    num_warps = 8 if V >= 8 * 32 * vec else 4
    e = min(32 * vec, max(4, triton.next_power_of_2(triton.cdiv(V, num_warps))))
    return e * num_warps, num_warps


def launch_args(
    s: torch.Tensor,
    t: torch.Tensor,
    sel: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    temperature: float,
    grad: torch.Tensor | None,
    kl_rows: torch.Tensor,
    ce_rows: torch.Tensor | None,
) -> tuple[tuple, dict]:
    """(positional arguments, constexprs and launch options) of `_dense_kl_ce_kernel` for these tensors: the
    launch below and the ahead-of-time compile check both build from this."""
    V = s.shape[1]
    block_v, num_warps = block_config(V, s.element_size())
    has_ce = labels is not None
    args = (
        s, s.stride(0), t, t.stride(0),
        grad if grad is not None else s, grad.stride(0) if grad is not None else 0,
        sel, labels if has_ce else sel, coef, kl_rows, ce_rows if has_ce else kl_rows, V, LOG2E / temperature,
    )  # fmt: skip
    consts = dict(
        HAS_CE=has_ce,
        T_MODE=t_mode(temperature),
        WRITE_GRAD=grad is not None,
        BLOCK_V=block_v,
        NUM_W=num_warps,
    )
    return args, dict(consts, num_warps=num_warps)


def dense_kl_ce_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    sel: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    temperature: float,
    grad: torch.Tensor | None,
    kl_rows: torch.Tensor,
    ce_rows: torch.Tensor | None,
) -> None:
    """Fill kl_rows [n] (KL(p‖q) per selected row, 0 elsewhere), ce_rows [n] (CE per labelled row) and, when
    given, grad [n, V] = coef[0]·(q − p) on selected rows + coef[1]·(σ − onehot) on labelled rows.

    s, t, grad: [n, V] with unit last stride (any row stride); grad may be s itself (the gradient written over
    the logits); sel [n] int8; labels [n] int64, -1 = none; coef [2] fp32 on the device."""
    if s.shape[0] == 0:
        return
    args, kwargs = launch_args(s, t, sel, labels, coef, temperature, grad, kl_rows, ce_rows)
    with device_guard(s):
        _dense_kl_ce_kernel[(s.shape[0],)](*args, **kwargs)
