"""Static report of the loss kernels as compiled for an H100 (sm_90): no GPU needed.

Each public loss entry point is called on small CPU tensors with every Triton kernel replaced by a recorder,
so the launchers run exactly as on a GPU and hand over their real arguments. Each recorded launch is then
specialised the way Triton's runtime does it (argument types, 16-divisibility hints of pointers and integers,
constexprs, launch options) and compiled to a cubin (the Triton wheel ships ptxas and nvdisasm). Per kernel:

* SASS instructions per logit element in each loop over the row (loop body / logits per thread per trip);
* the widths of the loop's global loads and stores (128 = 16-byte vectors, 16 = one bf16 scalar);
* MUFU.EX2 (exponentials) per element;
* registers and spills (local-memory bytes);
* bytes of logits moved per token: each loop that loads the row reads V elements, each that stores writes V.

    python benchmarks/kernel_report.py                       # the kernels of this checkout
    python benchmarks/kernel_report.py --kernels-dir DIR     # another copy of kernels/ (e.g. an older commit)

Cases: the trainer's (bf16 logits, V = 30,522, top-k 32, T = 2, tail-aware KL + MLM CE) with the row stride of
an unpadded vocabulary (30,522) and of one padded to a multiple of 64 (30,528); `--variants` adds other dtypes,
KL variants and temperatures (tests/test_kernels_compile.py compiles them all); `--json` prints the figures
as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels; the interpreter patches triton.language
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default

V, K, T, N = 30522, 32, 2.0, 4


# ------------------------------------------------------------------------------------------ recording launches
@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    entry: str  # which public call launched it


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn, sink: list, entry: list):
        self.fn, self.sink, self.entry = fn, sink, entry

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.fn, args, kwargs, self.entry[0]))

    def __getattr__(self, name):
        return getattr(self.fn, name)


def load_kernels(kernels_dir: str | None):
    """`offline_kd.kernels`, from this checkout or from `kernels_dir` (loaded under the same package name)."""
    if kernels_dir:
        import offline_kd

        path = Path(kernels_dir).resolve()
        spec = importlib.util.spec_from_file_location(
            "offline_kd.kernels", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["offline_kd.kernels"] = mod
        offline_kd.kernels = mod
        spec.loader.exec_module(mod)
    import offline_kd.kernels as kernels

    return kernels


@contextlib.contextmanager
def _recording(sink: list, entry: list):
    """Every `*_kernel` JITFunction of the kernel modules replaced by a recorder while inside."""
    from triton.runtime.jit import JITFunction

    patched = []
    for name in list(sys.modules):
        if name.startswith("offline_kd.kernels."):
            mod = sys.modules[name]
            for attr, val in vars(mod).copy().items():
                if isinstance(val, JITFunction) and attr.endswith("_kernel"):
                    patched.append((mod, attr, val))
                    setattr(mod, attr, _Recorder(val, sink, entry))
    try:
        yield
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


@dataclass(frozen=True)
class Case:
    """One runtime specialisation: the logits' dtype and row stride (V = unpadded, a multiple of 64 =
    padded vocabulary), the ids' dtype, the KL variant, whether MLM labels come along, the temperature."""

    stride: int = V
    dtype: str = "bfloat16"
    ids: str = "int32"
    tail: bool = True
    ce: bool = True
    temperature: float = T
    cosine: bool = True  # also the cosine kernels (independent of the KL/CE variant)

    def title(self) -> str:
        kl = "tail-aware KL" if self.tail else "renormalised KL"
        return (
            f"row stride {self.stride} (V = {V}), {self.dtype}, {self.ids} ids, k = {K}, T = {self.temperature}, "
            f"{kl}{' + CE' if self.ce else ''}"
        )


# the trainer's configuration, without and with a padded vocabulary
REPORT_CASES = [Case(), Case(stride=(V + 63) // 64 * 64)]


def _inputs(torch, case: Case):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g).to(getattr(torch, case.dtype))
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]).to(getattr(torch, case.ids))
    tz = torch.randn(N, K, generator=g).sort(-1, descending=True).values
    lse = torch.logsumexp(tz / case.temperature, -1) + 1.0 if case.tail else None
    labels = torch.randint(0, V, (N,), generator=g) if case.ce else None
    return s, ids, tz, lse, labels


def record(kernels, case: Case) -> list[Launch]:
    """Every kernel launch of the public entry points on one case."""
    import torch

    os.environ[kernels.ENV_VAR] = "triton"
    sink: list[Launch] = []
    entry = [""]
    with _recording(sink, entry):
        _exercise(kernels, torch, case, entry)
    return sink


def _logits(kernels, torch, s, stride: int, fn: str):
    """(logits argument, extra keyword arguments) for a row stride: the padded logits with the true
    vocabulary size where the entry point takes one, else the first V columns of the padded buffer."""
    leaf = torch.zeros(N, stride, dtype=s.dtype)
    leaf[:, :V] = s
    leaf.requires_grad_(True)
    if stride != V and "vocab_size" in inspect.signature(getattr(kernels, fn)).parameters:
        return leaf * 1.0, {"vocab_size": V}
    return leaf[:, :V] * 1.0 if stride != V else leaf * 1.0, {}


def _exercise(kernels, torch, case: Case, entry: list) -> None:
    s, ids, tz, lse, labels = _inputs(torch, case)
    T_ = case.temperature
    entry[0] = "kl+ce, upstream gradients apart"
    x, kw = _logits(kernels, torch, s, case.stride, "distillation_logit_losses")
    kl, ce = kernels.distillation_logit_losses(x, ids, tz, T_, None, lse, labels, **kw)
    (kl + ce).backward()
    if hasattr(kernels, "distillation_losses"):
        entry[0] = "kl+ce, weighted, in place (the trainer's call)"
        x, kw = _logits(kernels, torch, s, case.stride, "distillation_losses")
        parts = kernels.distillation_losses(
            x, ids, tz, T_, teacher_lse=lse, mlm_labels=labels, weights=(5.0, 2.0), in_place=True, **kw
        )
        parts.total.backward()
    if not case.cosine:
        return
    entry[0] = "cosine"
    h = torch.randn(N, 768).to(s.dtype).requires_grad_(True)
    kernels.cosine_loss(h, torch.randn(N, 768).half()).backward()


# --------------------------------------------------------------------------------------------------- compiling
def compile_launch(launch: Launch):
    """Compile a recorded launch for sm_90 as `JITFunction.run` would specialise it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    # the compile options the runtime adds from its knobs; which exist depends on the Triton version
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    hinted = [fn.params[p[0]].name for p, a in attrs.items() if a]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    return compiled, hinted, options.num_warps, {fn.params[p[0]].name: v for p, v in constexprs.items()}


# ------------------------------------------------------------------------------------------------ SASS analysis
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _width(ins: str) -> int:
    m = re.search(r"\b(?:LDG|STG)\S*?\.(128|64|U16|S16|U8|S8)\b", ins)
    return _WIDTH[m.group(1)] if m else 32


@dataclass
class Loop:
    """One SASS loop body: what one trip of one thread executes."""

    n: int  # instructions in the body
    ldg: list[int] = field(default_factory=list)  # widths of the global loads (bits)
    stg: list[int] = field(default_factory=list)
    ex2: int = 0
    bar: int = 0  # barriers (BAR.SYNC): a round trip through shared memory
    sts: int = 0  # shared-memory stores
    lds: int = 0  # shared-memory loads

    @property
    def load_bytes(self) -> float:
        return sum(self.ldg) / 8


def sass_loops(sass: str) -> list[Loop]:
    """The loops in code order (a backward branch to a label: the body runs from the label to the branch)
    that touch global memory."""
    body: list[str] = []
    label_at: dict[str, int] = {}
    loops = []
    for line in sass.splitlines():
        if m := re.match(r"^\.(L_x_\d+):", line):
            label_at[m.group(1)] = len(body)
        elif re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            body.append(line)
            m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
            if m and m.group(1) in label_at:
                ins = body[label_at[m.group(1)] :]
                count = lambda pat, ins=ins: sum(bool(re.search(pat, x)) for x in ins)
                loop = Loop(
                    n=len(ins),
                    ldg=[_width(x) for x in ins if re.search(r"\bLDG", x)],
                    stg=[_width(x) for x in ins if re.search(r"\bSTG", x)],
                    ex2=count(r"MUFU\.EX2"),
                    bar=count(r"\bBAR\b"),
                    sts=count(r"\bSTS\b"),
                    lds=count(r"\bLDS\b"),
                )
                if loop.ldg or loop.stg:
                    loops.append(loop)
    return loops


def tool(name: str, *args: str) -> str:
    """stdout of one of the CUDA tools the Triton wheel ships (nvdisasm, cuobjdump)."""
    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout


@dataclass
class KernelFigures:
    entry: str
    kernel: str
    hinted: list[str]
    regs: int
    spill_bytes: int
    elem_bytes: int  # bytes loaded per element (of every row a loop walks side by side)
    loops: list[Loop]
    sass: str


def analyse(launch: Launch, elem_bytes: int) -> KernelFigures:
    compiled, hinted, _, _ = compile_launch(launch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = tool("nvdisasm", f.name)
        res = tool("cuobjdump", "-res-usage", f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    return KernelFigures(
        entry=launch.entry,
        kernel=launch.fn.__name__,
        hinted=hinted,
        regs=int(m.group(1)),
        spill_bytes=int(m.group(2)) + int(m.group(3)),
        elem_bytes=elem_bytes,
        loops=sass_loops(sass),
        sass=sass,
    )


# ----------------------------------------------------------------------------------------------------- report
def _widths(ws: list[int]) -> str:
    return "/".join(str(w) for w in sorted(set(ws), reverse=True)) if ws else "-"


def elems(lp: Loop, fig: KernelFigures) -> float:
    """Elements per thread per trip of a loop that loads the row, from the bytes it loads (robust to the
    compiler unrolling the loop)."""
    return sum(lp.ldg) / 8 / fig.elem_bytes


def _per_elem(loops: list[Loop], fig: KernelFigures) -> str:
    """Instructions per element of the loops, the cheapest first ('a / b' when the kernel has two variants
    of the pass, e.g. with and without the q_tail clamp)."""
    return " / ".join(f"{x:.1f}" for x in sorted({lp.n / elems(lp, fig) for lp in loops})) if loops else "-"


def _passes(fig: KernelFigures) -> tuple[list[Loop], list[Loop]]:
    """(statistics loops: load the row, store nothing; gradient loops: load and store). Loops that only
    store zero-fill rows that count for nothing."""
    return [lp for lp in fig.loops if lp.ldg and not lp.stg], [lp for lp in fig.loops if lp.ldg and lp.stg]


def dram_bytes(fig: KernelFigures, row_bytes: int) -> tuple[int, int, int]:
    """(row reads, row writes, DRAM bytes per token): one read per statistics pass, one read and one write
    per gradient pass, less the gradient pass's read where it follows the statistics pass in the same
    program (the fused kernel: the row, 61 KB in bf16, was read moments before and comes from L2)."""
    stats, grads = _passes(fig)
    reads, writes = int(bool(stats)) + int(bool(grads)), int(bool(grads))
    return reads, writes, (reads + writes - int(bool(stats) and bool(grads))) * row_bytes


def summary(fig: KernelFigures, row_bytes: int) -> dict:
    stats, grads = _passes(fig)
    reads, writes, dram = dram_bytes(fig, row_bytes)
    return dict(
        entry=fig.entry, kernel=fig.kernel, hinted=fig.hinted, regs=fig.regs, spill_bytes=fig.spill_bytes,
        stats_per_elem=sorted(lp.n / elems(lp, fig) for lp in stats),
        grad_per_elem=sorted(lp.n / elems(lp, fig) for lp in grads),
        ex2_per_elem=max((lp.ex2 / elems(lp, fig) for lp in stats + grads), default=0.0),
        load_bits=sorted({w for lp in stats + grads for w in lp.ldg}),
        store_bits=sorted({w for lp in grads for w in lp.stg}), reads=reads, writes=writes, dram_bytes=dram,
        # per trip of the busiest loop: barriers and shared-memory stores (0 = no shared-memory round trip)
        loop_bar=max((lp.bar for lp in stats + grads), default=0),
        loop_sts=max((lp.sts for lp in stats + grads), default=0),
    )  # fmt: skip


def row_for(fig: KernelFigures, row_bytes: int) -> str:
    """One markdown row per kernel."""
    stats, grads = _passes(fig)
    sm = summary(fig, row_bytes)
    return (
        f"| {fig.entry} | `{fig.kernel}` | {_per_elem(stats, fig)} | {_per_elem(grads, fig)} | "
        f"{sm['ex2_per_elem']:.2f} | {_widths([w for lp in stats + grads for w in lp.ldg])} | "
        f"{_widths([w for lp in grads for w in lp.stg])} | {sm['loop_bar']} / {sm['loop_sts']} | {fig.regs} | "
        f"{fig.spill_bytes} | {sm['reads']}/{sm['writes']} | {sm['dram_bytes'] / 1000:.0f} |"
    )


HEADER = (
    "| entry point | kernel | SASS instr / elem, statistics loop | SASS instr / elem, gradient loop | "
    "EX2 / elem (max) | load bits | store bits | barriers / shared stores per trip (max) | regs | spill B | "
    "row reads / writes | DRAM KB / token |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def figures(kernels, case: Case, sass_dir: str | None = None) -> list[tuple[KernelFigures, int]]:
    """(figures, bytes of the row it walks) per distinct (entry point, kernel) of one case."""
    out, seen = [], set()
    for launch in record(kernels, case):
        key = (launch.entry, launch.fn.__name__)
        if key in seen or launch.fn.__name__ == "_scale_kernel":  # the upstream scaling: not a loss kernel
            continue
        seen.add(key)
        cosine = launch.entry == "cosine"
        # the cosine loops read the student row and the fp16 teacher row side by side
        fig = analyse(launch, _BYTES[case.dtype] + (2 if cosine else 0))
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            Path(sass_dir, f"{fig.kernel}-{case.stride}-{case.dtype}.sass").write_text(fig.sass)
        out.append((fig, (768 if cosine else V) * _BYTES[case.dtype]))
    return out


def triton_version() -> str:
    import triton

    return triton.__version__


def report(kernels, cases: list[Case], sass_dir: str | None = None) -> str:
    parts = [f"Triton {triton_version()}, sm_90"]
    for case in cases:
        rows = [row_for(fig, nbytes) for fig, nbytes in figures(kernels, case, sass_dir)]
        parts.append(f"### {case.title()}\n\n" + "\n".join([HEADER, *rows]))
    return "\n\n".join(parts)


# compile coverage beyond the report's cases: other dtypes, ids, KL variants, temperatures (POW 0, 1, 4)
VARIANT_CASES = [
    Case(stride=30528, dtype="float32", ids="int64", tail=False, ce=False, temperature=1.0, cosine=False),
    Case(stride=30528, dtype="float16", ids="int64", tail=True, ce=False, temperature=3.0, cosine=False),
    Case(stride=30528, dtype="bfloat16", ids="int32", tail=True, ce=True, temperature=3.0, cosine=False),
    Case(stride=30528, dtype="bfloat16", ids="int32", tail=False, ce=True, temperature=4.0, cosine=False),
    Case(stride=30528, dtype="bfloat16", ids="int64", tail=True, ce=True, temperature=1.0, cosine=False),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels-dir", help="a kernels/ folder to report on instead of this checkout's")
    ap.add_argument("--sass", help="also write each kernel's SASS into this folder")
    ap.add_argument("--json", action="store_true", help="figures as one JSON line per case, not markdown")
    ap.add_argument(
        "--variants", action="store_true", help="also the other dtypes, KL variants and temperatures"
    )
    args = ap.parse_args(argv)
    kernels = load_kernels(args.kernels_dir)
    cases = REPORT_CASES + (VARIANT_CASES if args.variants else [])
    if args.json:
        for case in cases:
            figs = [summary(fig, nbytes) for fig, nbytes in figures(kernels, case, args.sass)]
            print(json.dumps({"triton": triton_version(), "case": asdict(case), "kernels": figs}))
    else:
        print(report(kernels, cases, args.sass))


if __name__ == "__main__":
    main()
