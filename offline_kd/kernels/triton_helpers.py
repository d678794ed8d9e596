"""Triton helpers every kernel of the package shares: row loads, exponent offsets and their rescaling, TwoSum,
row zeroing, the in-place upstream scaling kernel, and the device guard every launch runs under.

Exponent offsets. The kernels keep sums of 2^(x k - o) against an offset o = fl(m k) (m a running max,
k = log2(e)/T). A factor that moves such a sum from one offset to another must use exactly the rounded offsets
the exponentials used: with |m k| ~ 1.4e9 (-1e9 fill logits) one fp32 ulp of the offset is 128, so an
exponent computed from the exact product m k (what an FMA contraction of `m * k - o` gives) is off by up to
2^64 and overflows. `scaled` and `rescale` put a select between the product and the subtraction, which no
compiler contracts. `tests/test_kernels_numerics.py` runs the kernels with every contractible multiply-add
fused to catch a regression on CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .constants import LN2, LOG2E

# the constants as compile-time values inside @triton.jit functions
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's device, whatever the current device is: Triton launches on the current
    device, so without this a rank whose tensors live on cuda:r would launch on cuda:0.
    `tests/test_kernels_launch.py` checks that every launch in the package sits inside one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def load_row(row_ptr, offs, V, MASKED: tl.constexpr):
    # fp32 logits at offs; past V (MASKED) -inf, which no max or sum of exponentials notices
    if MASKED:
        return tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    else:
        return tl.load(row_ptr + offs).to(tl.float32)


@triton.jit
def scaled(m, k):
    # fl(m * k) as an exponent offset; 0 where m = -inf (nothing seen yet), which keeps -inf - -inf out of
    # the exponentials (their inputs are then -inf, giving 0)
    return tl.where(m > float("-inf"), m * k, 0.0)


@triton.jit
def rescale(m_old, k, mk_new):
    # 2^(fl(m_old k) - mk_new), 0 where m_old = -inf. The product is rounded on its own (a select sits
    # between it and the subtraction, so it cannot be contracted into an fma): see the module docstring.
    return tl.exp2(tl.where(m_old > float("-inf"), scaled(m_old, k) - mk_new, float("-inf")))


@triton.jit
def residual(m, k):
    # m k - fl(m k), exact (0 where m = -inf): converts sums relative to 2^fl(m k) to sums relative to 2^(m k)
    return tl.where(m > float("-inf"), tl.fma(m, k, -(m * k)), 0.0)


@triton.jit
def two_sum(a, b):
    # a + b = hi + lo exactly (Knuth): an exponent offset fl(M k) + lg would round lg away when |M k| is huge
    # (-1e9 fills); lo goes into a scalar factor 2^-lo instead
    hi = a + b
    bb = hi - a
    return hi, (a - (hi - bb)) + (b - bb)


@triton.jit
def int_pow(x, POW: tl.constexpr):
    # x^POW for POW in {1, 2, 4}: exp(s - m) = exp((s - m)/T)^T at T = 2, 4 (multiplies, not an exponential)
    if POW == 2:
        x = x * x
    elif POW == 4:
        x = x * x
        x = x * x
    return x


@triton.jit
def zero_row(g_row, V, BLOCK_V: tl.constexpr):
    # the gradient row of a row that counts for no loss; unmasked body, masked tail
    v_main = (V // BLOCK_V) * BLOCK_V
    zero = tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty)
    for start in range(0, v_main, BLOCK_V):
        tl.store(g_row + start + tl.arange(0, BLOCK_V), zero)
    offs = v_main + tl.arange(0, BLOCK_V)
    tl.store(g_row + offs, zero, mask=offs < V)


SCALE_BLOCK = 4096


@triton.jit
def _scale_kernel(G_ptr, n, SCALE_ptr, BLOCK: tl.constexpr):
    # grad *= upstream, skipped on the device when upstream == 1 (no host sync to find out)
    g = tl.load(SCALE_ptr)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(G_ptr + offs, mask=offs < n)
        tl.store(G_ptr + offs, (x.to(tl.float32) * g).to(G_ptr.dtype.element_ty), mask=offs < n)


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """grad *= upstream in place, on the gradient's device. For a contiguous gradient a kernel that decides on
    the device that upstream == 1 needs nothing (no host sync); the sparse and dense backends share it."""
    if not grad.is_contiguous():
        return grad.mul_(upstream.to(grad.device))
    n = grad.numel()
    if n:
        with device_guard(grad):
            scale = upstream.detach().reshape(1).to(device=grad.device, dtype=torch.float32)
            _scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](grad, n, scale, BLOCK=SCALE_BLOCK, num_warps=4)
    return grad


def _interpreter_scalar_index() -> None:
    """Make the CPU interpreter of Triton < 3.7 run `range(0, n, BLOCK)` over a runtime n with NumPy 2.

    That interpreter holds scalar arguments as 1-element arrays and converts them with `int(array)`, which
    NumPy >= 2.3 refuses for arrays with a dimension (later Triton squeezes first). Patched the way the newer
    interpreter does it, and only while the interpreter is in use: compiled kernels are not affected."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "offline_kd_squeezed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.offline_kd_squeezed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_scalar_index()
