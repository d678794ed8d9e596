"""Ahead-of-time compilation of the Triton kernels for an H100 (sm_90) target, down to a cubin.

The interpreter (how tests/test_kernels.py runs the kernels without a GPU) executes the kernel bodies with
numpy and accepts some code the compiler rejects; this compiles the real thing, no GPU needed (the Triton
wheel ships ptxas). The interpreter patches triton.language process-wide, so the compilation runs in a
fresh interpreter without TRITON_INTERPRET, with an empty Triton cache (it really compiles every time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# (logits dtype, ids dtype, TAIL, HAS_CE)
KL_CASES = [("bf16", "i32", True, True), ("fp32", "i64", False, False), ("fp16", "i64", True, False)]


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover
        return False


def compile_all() -> list[str]:
    """Compile every kernel variant in KL_CASES and the cosine kernels; returns one line per kernel."""
    import triton
    from offline_kd.kernels import cosine, kl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)

    def signature(fn, types, consts):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = types.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name == "inv_T" else "i32"
        return sig

    def build(fn, types, consts, num_warps=8):
        src = ASTSource(fn, signature(fn, types, consts), consts)
        compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
        assert len(compiled.asm["cubin"]) > 0
        return f"{fn.__name__} {types} {consts}: cubin {len(compiled.asm['cubin'])} bytes"

    lines = []
    for sdt, idt, tail, has_ce in KL_CASES:
        types = {"S_ptr": "*" + sdt, "G_ptr": "*" + sdt, "IDS_ptr": "*" + idt, "LAB_ptr": "*i64"}
        fwd = dict(TINY_C=1e-30, TAIL=tail, HAS_CE=has_ce, BLOCK_V=4096, BLOCK_K=64)
        lines.append(build(kl._kl_ce_fwd_kernel, types, fwd))
        bwd = dict(TAIL=tail, HAS_CE=has_ce, BLOCK_V=4096, BLOCK_K=64)
        lines.append(build(kl._kl_ce_bwd_kernel, types, bwd))
    types = {"S_ptr": "*bf16", "G_ptr": "*bf16", "T_ptr": "*fp16"}
    lines.append(build(cosine._cos_fwd_kernel, types, dict(EPS_C=1e-12, BLOCK_H=1024), num_warps=4))
    lines.append(build(cosine._cos_bwd_kernel, types, dict(BLOCK_H=1024), num_warps=4))
    return lines


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without the NVIDIA backend")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [line for line in res.stdout.splitlines() if "cubin" in line]
    assert len(lines) == 2 * len(KL_CASES) + 2, res.stdout


if __name__ == "__main__":
    for line in compile_all():
        print(line)
