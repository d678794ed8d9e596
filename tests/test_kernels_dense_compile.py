"""Ahead-of-time compilation of the dense-teacher KL kernel for an H100 (sm_90), as the runtime specialises it.

The signature and divisibility hints come from the launcher's own argument list (`dense_kl.launch_args`) run
through Triton's runtime specialisation (`native_specialize_impl`), so a row stride that is a multiple of 16
compiles with the 16-divisibility hint exactly as a launch would. The PTX must then show 128-bit vector loads
in the loops and `ex2.approx.ftz` exponentials only (no `ex2.approx.f32` of `tl.exp`, no libdevice call).
Runs in a fresh interpreter without TRITON_INTERPRET (the interpreter patches triton.language process-wide)
and with an empty Triton cache. `python tests/test_kernels_dense_compile.py` prints per-variant figures:
PTX loads/stores by width, exponentials, and SASS instructions per logit in each loop (nvdisasm)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"

# (name, student dtype, teacher dtype, row stride padded to a multiple of 64, labels, temperature)
CASES = [
    ("bf16-fp32t-pad-ce-T2", "bfloat16", "float32", True, True, 2.0),
    ("bf16-bf16t-pad-ce-T2", "bfloat16", "bfloat16", True, True, 2.0),
    ("bf16-fp32t-pad-ce-T1", "bfloat16", "float32", True, True, 1.0),
    ("bf16-fp32t-pad-ce-T3.7", "bfloat16", "float32", True, True, 3.7),
    ("bf16-fp32t-pad-noce-T2", "bfloat16", "float32", True, False, 2.0),
    ("bf16-fp32t-V30522-ce-T2", "bfloat16", "float32", False, True, 2.0),
    ("fp16-fp16t-pad-ce-T2", "float16", "float16", True, True, 2.0),
    ("fp32-fp32t-pad-ce-T2", "float32", "float32", True, True, 2.0),
]
V = 30522


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover
        return False


def _launch_tensors(sdt: str, tdt: str, pad: bool, ce: bool, T: float):
    import torch

    from offline_kd.kernels import dense_kl

    n, stride = 4, (V + 63) // 64 * 64 if pad else V
    s = torch.empty(n, stride, dtype=getattr(torch, sdt))[:, :V]
    t = torch.empty(n, stride, dtype=getattr(torch, tdt))[:, :V]
    g = torch.empty(n, stride, dtype=s.dtype)[:, :V]
    lab = torch.zeros(n, dtype=torch.int64) if ce else None
    rows = torch.empty(n)
    return dense_kl.launch_args(s, t, torch.ones(n, dtype=torch.int8), lab, torch.ones(2), T, g, rows, rows)


@functools.cache
def _report():
    """benchmarks/kernel_report.py, the one SASS parser (imported in the compile subprocess only: it unsets
    TRITON_INTERPRET for the process that imports it)."""
    spec = importlib.util.spec_from_file_location("kernel_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _loops(sass: str) -> list[dict]:
    """kernel_report's SASS loops that touch global memory, as dicts: instruction count, SFU exponentials,
    global loads (count, 128-bit count, bytes), stores, barriers, shared-memory stores."""
    return [
        dict(n=lp.n, ex2=lp.ex2, ldg=len(lp.ldg), ldg128=lp.ldg.count(128), load_bytes=lp.load_bytes,
             stg=len(lp.stg), bar=lp.bar, sts=lp.sts)
        for lp in _report().sass_loops(sass)
    ]  # fmt: skip


# the row specialisations in the kernel's code order, and whether each reads the teacher row
LOOP_KINDS = {
    True: [("kl+ce", "stats", 1), ("kl+ce", "grad", 1), ("ce", "stats", 0), ("ce", "grad", 0),
           ("kl", "stats", 1), ("kl", "grad", 1), ("-", "zero", 0)],
    False: [("kl", "stats", 1), ("kl", "grad", 1), ("-", "zero", 0)],
}  # fmt: skip


def _label(loops: list[dict], ce: bool, s_bytes: int, t_bytes: int) -> list[dict]:
    """Name each loop and add its logits per iteration (per thread) and instructions per logit."""
    kinds = LOOP_KINDS[ce]
    assert len(loops) == len(kinds), (loops, kinds)
    for lp, (rows, pass_, reads_t) in zip(loops, kinds, strict=True):
        per = s_bytes + reads_t * t_bytes
        elems = lp["load_bytes"] / per if lp["ldg"] else None
        lp.update(rows=rows, pass_=pass_, elems=elems, per_elem=round(lp["n"] / elems, 2) if elems else None)
    return loops


def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _build(case):
    """Compile one case with the signature, constants and 16-divisibility hints a launch would use."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    from offline_kd.kernels import dense_kl

    fn = dense_kl._dense_kl_ce_kernel
    args, kw = _launch_tensors(*case[1:])
    num_warps = kw.pop("num_warps")
    sig, attrs, consts = {}, {}, dict(kw)
    params = [p for p in fn.arg_names if p not in kw]
    for i, (pname, a) in enumerate(zip(params, args, strict=True)):
        ty, spec = native_specialize_impl(BaseBackend, a, False, True, True)
        sig[pname] = ty
        if ty == "constexpr":
            consts[pname] = spec
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    sig.update({k: "constexpr" for k in kw})
    src = ASTSource(fn, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    hinted = [params[i] for (i,) in attrs]
    return compiled, hinted, kw["BLOCK_V"] // (32 * num_warps)


def compile_dense() -> list[dict]:
    """Compile every case for sm_90; one dict of PTX / SASS figures per case."""
    tool = _report().tool
    results = []
    for case in CASES:
        compiled, hinted, per_thread = _build(case)
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = tool("nvdisasm", f.name)
            res = re.search(
                r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", tool("cuobjdump", "-res-usage", f.name)
            )
        count = lambda pat, ptx=ptx: len(re.findall(pat, ptx))
        results.append(
            dict(
                name=case[0], hinted=hinted, per_thread=per_thread,
                ptx_ld_v4=count(r"ld\.global(?:\.\w+)*\.v4"), ptx_ld_v2=count(r"ld\.global(?:\.\w+)*\.v2"),
                ptx_ld_scalar=count(r"ld\.global(?:\.\w+)*\.[buf](?:16|32|64)\s"),
                ptx_st_v4=count(r"st\.global(?:\.\w+)*\.v4"), ptx_st_v2=count(r"st\.global(?:\.\w+)*\.v2"),
                ptx_ex2_ftz=count(r"ex2\.approx\.ftz\.f32"), ptx_ex2_nonftz=count(r"ex2\.approx\.f32"),
                ptx_calls=len(re.findall(r"^\s*call", ptx, re.MULTILINE)),
                regs=int(res.group(1)), stack=int(res.group(2)), local=int(res.group(3)),
                loops=_label(_loops(sass), case[4], *(_bytes(x) for x in case[1:3])),
            )
        )  # fmt: skip
    return results


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without the NVIDIA backend")
def test_dense_kernel_compiles_for_sm90_with_vector_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    figures = {r["name"]: r for r in json.loads(res.stdout.strip().splitlines()[-1])}
    assert set(figures) == {c[0] for c in CASES}
    for name, r in figures.items():
        assert r["local"] == 0, r  # no spills
        assert r["ptx_ex2_ftz"] > 0 and r["ptx_ex2_nonftz"] == 0 and r["ptx_calls"] == 0, r
        stats = [lp for lp in r["loops"] if lp["ex2"] and not lp["stg"]]
        grads = [lp for lp in r["loops"] if lp["ex2"] and lp["stg"]]
        assert stats and grads, r
        if "pad" in name:  # row strides multiples of 16: every load and store of the main loops is 128-bit
            assert set(r["hinted"]) >= {"s_stride", "t_stride", "g_stride"}, r
            for lp in stats + grads:  # and the per-warp maxima need no barrier, no shared-memory round trip
                assert lp["ldg"] == lp["ldg128"] > 0 and lp["bar"] == 0 and lp["sts"] == 0, r
            assert r["ptx_st_v4"] > 0, r
    # V = 30,522 (row strides not multiples of 16): the runtime cannot prove 16-byte alignment
    assert figures["bf16-fp32t-V30522-ce-T2"]["ptx_ld_v4"] == 0


def table(results: list[dict]) -> str:
    """Markdown: per case and loop, SASS instructions per logit, exponentials, load widths, barriers."""
    rows = [
        "| case | regs | rows | pass | SASS / logit | ex2 / logit | loads (128-bit) | barriers | shared stores |",
        "|---" * 9 + "|",
    ]
    for r in results:
        for lp in r["loops"]:
            if lp["elems"]:
                rows.append(
                    f"| {r['name']} | {r['regs']} | {lp['rows']} | {lp['pass_']} | {lp['per_elem']:.2f} | "
                    f"{lp['ex2'] / lp['elems']:.2f} | {lp['ldg']} ({lp['ldg128']}) | {lp['bar']} | {lp['sts']} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    out = compile_dense()
    print(json.dumps(out) if "--json" in sys.argv else table(out))
