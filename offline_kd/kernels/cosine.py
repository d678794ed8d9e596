"""Triton: cosine embedding loss between student and (possibly half-precision) teacher hidden states.

loss = mean over selected rows of 1 - cos(s, t), cos = s.t / sqrt((|s|^2 + eps)(|t|^2 + eps)), eps = 1e-12
(torch.nn.CosineEmbeddingLoss with target 1). Gradient to the student only:
d loss / d s = -(w / N_sel) * (t / sqrt(ab) - cos * s / a), a = |s|^2 + eps, b = |t|^2 + eps.

Layering: kernels; launchers `cosine_forward` / `cosine_backward`; `TritonCosineLoss`; `triton_cosine_loss`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import cosine_rows_mask
from .triton_helpers import device_guard

EPS = 1e-12


@triton.jit
def _cos_fwd_kernel(
    S_ptr, s_stride, T_ptr, t_stride, COS_ptr, A_ptr, B_ptr, H, EPS_C: tl.constexpr, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    ss = tl.zeros([BLOCK_H], dtype=tl.float32)
    tt = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        s = tl.load(S_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T_ptr + row * t_stride + offs, mask=mask, other=0.0).to(tl.float32)
        dot += s * t
        ss += s * s
        tt += t * t
    a = tl.sum(ss, 0) + EPS_C
    b = tl.sum(tt, 0) + EPS_C
    cos = tl.sum(dot, 0) / (tl.sqrt(a) * tl.sqrt(b))
    tl.store(COS_ptr + row, cos)
    tl.store(A_ptr + row, a)
    tl.store(B_ptr + row, b)


@triton.jit
def _cos_bwd_kernel(
    S_ptr, s_stride, T_ptr, t_stride, G_ptr, g_stride, COS_ptr, A_ptr, B_ptr, W_ptr, H, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(W_ptr + row)
    cos = tl.load(COS_ptr + row)
    a = tl.load(A_ptr + row)
    b = tl.load(B_ptr + row)
    ct = w / (tl.sqrt(a) * tl.sqrt(b))
    cs = w * cos / a
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        s = tl.load(S_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T_ptr + row * t_stride + offs, mask=mask, other=0.0).to(tl.float32)
        g = cs * s - ct * t
        tl.store(G_ptr + row * g_stride + offs, g.to(G_ptr.dtype.element_ty), mask=mask)


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 1)), 4096)


def cosine_forward(s: torch.Tensor, t: torch.Tensor):
    """Per-row (cos, a, b), fp32 [N]."""
    N, H = s.shape
    cos, a, b = (torch.empty(N, device=s.device, dtype=torch.float32) for _ in range(3))
    if N > 0:
        with device_guard(s):
            _cos_fwd_kernel[(N,)](
                s, s.stride(0), t, t.stride(0), cos, a, b, H, EPS_C=EPS, BLOCK_H=_block_h(H)
            )
    return cos, a, b


def cosine_backward(s, t, cos, a, b, w):
    """Gradient w.r.t. s for per-row weights w (= upstream grad * row_mask / N_sel)."""
    N, H = s.shape
    grad = torch.empty_like(s)
    if N > 0:
        with device_guard(s):
            _cos_bwd_kernel[(N,)](
                s, s.stride(0), t, t.stride(0), grad, grad.stride(0), cos, a, b, w, H, BLOCK_H=_block_h(H)
            )
    return grad


class TritonCosineLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, sel):
        cos, a, b = cosine_forward(s, t)
        ctx.save_for_backward(s, t, sel, cos, a, b)
        return ((1.0 - cos) * sel).sum() / sel.sum().clamp(min=1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, t, sel, cos, a, b = ctx.saved_tensors
        w = (sel * (g.float() / sel.sum().clamp(min=1.0))).contiguous()
        return cosine_backward(s, t, cos, a, b, w), None, None


def triton_cosine_loss(student_hidden, teacher_hidden, row_mask=None):
    H = student_hidden.shape[-1]
    s = student_hidden.reshape(-1, H)
    if s.stride(-1) != 1:
        s = s.contiguous()
    t = teacher_hidden.reshape(-1, H).detach().to(s.device)
    if t.shape != s.shape:
        raise ValueError(f"teacher_hidden shape {tuple(t.shape)} != student_hidden shape {tuple(s.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    sel = cosine_rows_mask(s.shape[0], row_mask, s.device)
    return TritonCosineLoss.apply(s, t, sel)
