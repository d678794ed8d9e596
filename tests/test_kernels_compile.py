"""Ahead-of-time compilation of the Triton kernels for an H100 (sm_90) target, down to a cubin.

The interpreter (how tests/test_kernels.py runs the kernels without a GPU) executes the kernel bodies with
numpy and accepts some code the compiler rejects; this compiles the real thing, no GPU needed (the Triton
wheel ships ptxas)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from offline_kd.kernels import cosine, kl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton without the NVIDIA backend")


def _signature(fn, types: dict[str, str], consts: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name == "inv_T" else "i32"
    return sig


def _jit(fn):
    """Under TRITON_INTERPRET=1 the decorator returned an InterpretedFunction: rebuild the JITFunction."""
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _compile(fn, types, consts, num_warps=8):
    fn = _jit(fn)
    src = ASTSource(fn, _signature(fn, types, consts), consts)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    return compiled


@pytest.mark.parametrize(
    "sdt,idt,tail,has_ce",
    [("bf16", "i32", True, True), ("fp32", "i64", False, False), ("fp16", "i64", True, False)],
)
def test_kl_kernels_compile(sdt, idt, tail, has_ce):
    types = {"S_ptr": "*" + sdt, "G_ptr": "*" + sdt, "IDS_ptr": "*" + idt, "LAB_ptr": "*i64"}
    fwd = dict(TINY_C=1e-30, TAIL=tail, HAS_CE=has_ce, BLOCK_V=4096, BLOCK_K=64)
    _compile(kl._kl_ce_fwd_kernel, types, fwd)
    bwd = dict(TAIL=tail, HAS_CE=has_ce, BLOCK_V=4096, BLOCK_K=64)
    _compile(kl._kl_ce_bwd_kernel, types, bwd)


def test_cosine_kernels_compile():
    types = {"S_ptr": "*bf16", "G_ptr": "*bf16", "T_ptr": "*fp16"}
    _compile(cosine._cos_fwd_kernel, types, dict(EPS_C=1e-12, BLOCK_H=1024), num_warps=4)
    _compile(cosine._cos_bwd_kernel, types, dict(BLOCK_H=1024), num_warps=4)
