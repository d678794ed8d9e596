"""One command that checks the GPU path on a CUDA host and writes a dated report (`make gpu-check`).

    python benchmarks/gpu_check.py [--out runs/gpu-check] [--budget 540] [--parts tests,kernels,...]

Parts, each in its own process with its own time limit (one failing or running out of time still leaves the
others' results in the report), within --budget seconds in all (default 9 minutes; the parts' own limits
add up to less, so one device call of 10 minutes holds the whole check):

1. tests: the compiled Triton kernels against the CPU reference (tests/test_kernels_cuda.py, including one
   call with more than 2^31 logits, the dense kernels' CUDA tests), the teacher pass on the device
   (tests/test_precompute_device.py) and a training step's synchronisations (tests/test_train.py);
2. kernels: N = 16k tokens, V = 30,522 (rows padded to 30,528), bf16, tail-aware KL + MLM CE: GB/s, the
   fraction of the measured copy bandwidth, against eager PyTorch and torch.compile, peak extra memory
   (benchmarks/loss_kernels.py);
3. exact: the dense-teacher kernel and the exact path through the teacher's head, same shapes;
4. precompute: `precompute` tokens/s against a bare bf16 forward of a randomly initialised bert-base-shaped
   teacher (12 layers, hidden 768, vocabulary 30,522) at L = 512;
5. train_step: exact vs top-k vs online DeepSpeed step at bert-base shape (6-layer student, 12-layer
   teacher, bf16), ZeRO-0 and torch's AdamW (benchmarks/train_step.py);
6. train_step_shipped: the same with the shipped ds_distilbert's ZeRO-2 and fused AdamW;
7. step_cost: benchmarks/step_cost.py on the GPU: the FLOP and byte model, the online, top-k and exact
   steps fused and unfused (bf16), the loss's extra peak memory;
8. e2e: `kd precompute` then `deepspeed cli/train.py` on tiny fixtures, checking the exported model.

The report, `gpu-check-YYYY-MM-DD.md` in --out, names the GPU, the software versions and each part's
status, time and tables; it is rewritten as each part finishes, so a call cut off at its limit still
returns the parts done. On a host without a CUDA device this prints one line and exits 0. `--smoke` runs
every part on the CPU at toy sizes (to check the plumbing, not the GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_BUDGET = 540  # seconds: a 10-minute device call, less the machine's start and the transfers


@dataclass
class Part:
    name: str
    title: str
    timeout: int  # seconds, cut to what is left of the budget
    argv: list[str]
    env: dict[str, str]


@dataclass
class Result:
    part: Part
    status: str  # ok | failed (rc N) | timed out | skipped
    seconds: float
    output: str


# ------------------------------------------------------------------------------------------------ fixtures
def bert_base_teacher(out: Path, layers: int = 12, hidden: int = 768, vocab: int = 30522) -> Path:
    """A randomly initialised bert-base-shaped BertForMaskedLM (the cost does not depend on the weights) with
    a 30,522-token WordPiece tokenizer: MiniLM's (bert-base-uncased's) when installed, else one trained on
    the sample corpus and filled with [unused] tokens to the full size."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import AutoTokenizer

        from offline_kd.examples.minilm import minilm_encoder_dir

        tok = AutoTokenizer.from_pretrained(minilm_encoder_dir())
    except Exception:  # noqa: BLE001 - any failure: build one
        from tokenizers import BertWordPieceTokenizer

        wp = BertWordPieceTokenizer(lowercase=True)
        corpus = (ROOT / "offline_kd" / "data" / "sample_corpus.txt").read_text(encoding="utf-8").splitlines()
        wp.train_from_iterator(corpus, vocab_size=vocab, min_frequency=1)
        words = list(wp.get_vocab(with_added_tokens=True))
        words = sorted(words, key=wp.get_vocab().get)
        words += [f"[unused{i}]" for i in range(vocab - len(words))]
        (out / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        tok = BertTokenizerFast(str(out / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden, max_position_embeddings=512,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(out)
    return out


def tiny_fixtures(work: Path) -> tuple[Path, Path]:
    """(tiny teacher directory, corpus file), as the test suite builds them."""
    from offline_kd.examples.tiny import build_tiny_teacher, make_documents

    docs = make_documents(400)
    corpus = work / "tiny_corpus.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return build_tiny_teacher(work / "tiny_teacher", docs, hidden=64, layers=4), corpus


# ------------------------------------------------------------------------------------------ in-process parts
def run_precompute_part(work: Path, device: str, smoke: bool) -> None:
    """`precompute` tokens/s against a bare forward of the same teacher over the same masked sequences."""
    import numpy as np
    import torch

    from offline_kd.precompute.run import PrecomputeConfig, precompute
    from offline_kd.store.signal_store import SignalStore
    from offline_kd.teacher.model import load_teacher

    teacher = work / ("tiny_teacher" if smoke else "bert_base")
    L, repeat, batch = (64, 1, 16) if smoke else (512, 4, 64)
    text = (ROOT / "offline_kd" / "data" / "sample_corpus.txt").read_text(encoding="utf-8")
    if smoke:
        text = "\n".join(text.splitlines()[:40]) + "\n"
    corpus = work / "precompute_corpus.txt"
    corpus.write_text(text * repeat, encoding="utf-8")
    dtype = "float32" if smoke else "bfloat16"
    common = dict(
        teacher=str(teacher), corpus=[str(corpus)], max_length=L, top_k=64, temperatures=[1.0, 2.0], views=1,
        hidden=True, batch_size=batch, shard_size=4 * batch, device=device, dtype=dtype, progress=False,
    )  # fmt: skip
    precompute(PrecomputeConfig(output=str(work / "warm.zarr"), **common))  # warm-up (and the inputs)
    res = precompute(PrecomputeConfig(output=str(work / "timed.zarr"), **common))
    store = SignalStore.open(str(work / "timed.zarr"))
    data = store.read(0, 0, store.meta.num_sequences, fields=["masked_input_ids", "lengths"])
    S = store.meta.num_sequences
    attn = torch.from_numpy((np.arange(L)[None] < data["lengths"][:, None]).astype(np.int64))
    ids = torch.from_numpy(data["masked_input_ids"].astype(np.int64))
    t = load_teacher(str(teacher), device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def bare() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, S, batch):
                t.model(
                    input_ids=ids[s : s + batch].to(device), attention_mask=attn[s : s + batch].to(device)
                )
        sync()
        return time.perf_counter() - start

    bare()
    bare_s = min(bare(), bare())
    tokens = int(attn.sum())
    pre_tps, bare_tps = res.tokens / res.loop_seconds, tokens / bare_s
    print(f"teacher {teacher.name}, {S} sequences x {L} ({tokens:,} real tokens), batch {batch}, {dtype}\n")
    print("| measurement | tokens/s | ratio |\n|---|---|---|")
    print(f"| bare teacher forward | {bare_tps:,.0f} | |")
    print(
        f"| precompute (masking, forward, signals, store writes) | {pre_tps:,.0f} | {bare_tps / pre_tps:.2f}x bare time |"
    )


def run_e2e_part(work: Path, device: str, smoke: bool) -> None:
    """`kd precompute` then `deepspeed cli/train.py` on the tiny fixtures; the exported model is checked."""
    teacher, corpus = work / "tiny_teacher", work / "tiny_corpus.txt"
    store, run = work / "e2e_store.zarr", work / "e2e_run"
    kd = shutil.which("kd") or str(Path(PY).with_name("kd"))
    _run([kd, "precompute", "--teacher", str(teacher), "--corpus", str(corpus), "--output", str(store),
          "--max-length", "64", "--batch-size", "32", "--shard-size", "64", "--device", device,
          "--no-progress"])  # fmt: skip
    ds = work / "ds_e2e.json"
    ds.write_text(json.dumps(e2e_ds_config(bf16=not smoke)))
    launcher = [shutil.which("deepspeed") or str(Path(PY).with_name("deepspeed")), "--num_gpus", "1"]
    launcher += ["--master_port", str(_free_port())]
    _run(launcher + [str(ROOT / "cli" / "train.py"), "--store", str(store), "--student", "distil",
                     "--output", str(run), "--deepspeed_config", str(ds), "--epochs", "2", "--no-progress"])  # fmt: skip
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from offline_kd.train.metrics import read_csv

    rows = read_csv(run / "logs" / "metrics.csv")
    model = AutoModelForMaskedLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size == len(tok), (model.config.vocab_size, len(tok))
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    print("| measurement | value |\n|---|---|")
    print(f"| optimizer steps | {len(rows)} |\n| loss, first step -> last | {first:.3f} -> {last:.3f} |")
    print(f"| exported vocabulary | {model.config.vocab_size} (tokenizer {len(tok)}) |")
    assert last < first, "the loss did not fall"


def e2e_ds_config(bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2 if bf16 else 0},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto",
                                                           "warmup_num_steps": 2, "total_num_steps": "auto"}},
    }  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )


# -------------------------------------------------------------------------------------------------- plan
def plan(work: Path, smoke: bool) -> list[Part]:
    compiled = {"TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    me = [PY, str(Path(__file__).resolve()), "--work", str(work)] + (["--smoke"] if smoke else [])
    n, repeats = ("256", "1") if smoke else ("16384", "5")
    kernel_bench = [PY, str(ROOT / "benchmarks" / "loss_kernels.py"), "--n", n, "--v", "30522", "--dtype", "bf16",
                    "--tail", "--repeats", repeats, "--tables", "logits,cosine,head"]  # fmt: skip
    if not smoke:
        kernel_bench += ["--device", "cuda"]
    step = [PY, str(ROOT / "benchmarks" / "train_step.py"), "--repeats", repeats, "--workers", "0"]
    step += (["--teacher-dir", str(work / "tiny_teacher"), "--batch", "8", "--seq-len", "64", "--sequences", "32"]
             if smoke else
             ["--teacher-dir", str(work / "bert_base"), "--batch", "8", "--seq-len", "512", "--sequences", "64",
              "--bf16"])  # fmt: skip
    tests = [PY, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_kernels_cuda.py")]
    if not smoke:
        tests += [
            str(ROOT / "tests" / t)
            for t in ("test_kernels_dense.py", "test_precompute_device.py", "test_train.py")
        ]
        tests += ["-k", "cuda or device or compiled_teacher or fp16_teacher"]
    exact = [
        PY,
        str(ROOT / "benchmarks" / "loss_kernels.py"),
        "--tables",
        "dense",
        "--n",
        n,
        "--v",
        "30522",
        "--dtype",
        "bf16",
        "--repeats",
        repeats,
    ] + ([] if smoke else ["--device", "cuda", "--width", "30528"])
    step_cost = [PY, str(ROOT / "benchmarks" / "step_cost.py"), "--parts", "model,steps,memory"]
    step_cost += (
        [
            "--repeats",
            "1",
            "--batch",
            "1",
            "--seq-len",
            "64",
            "--teacher-layers",
            "2",
            "--student-layers",
            "1",
            "--memory-batch",
            "1",
            "--memory-seq-len",
            "128",
        ]
        if smoke
        else [
            "--device",
            "cuda",
            "--repeats",
            "5",
            "--batch",
            "16",
            "--seq-len",
            "512",
            "--memory-batch",
            "32",
        ]
    )
    parts = [
        Part("tests", "CUDA tests: compiled kernels against the CPU reference (incl. N*V > 2^31), the teacher pass "
             "on the device, a step's synchronisations", 100, tests, compiled),
        Part("kernels", "Kernel benchmark: KL + MLM CE at N = 16k, V = 30,522 padded to 30,528, bf16, against eager "
             "and torch.compile", 70, kernel_bench + ["--width", "30528", "--compile"], compiled),
        Part("exact", "Exact KL: the dense-teacher kernel and the teacher head per chunk, same shapes", 50, exact,
             compiled),
        Part("precompute", "Teacher pass: precompute vs a bare bf16 forward, bert-base shape, L = 512", 70,
             me + ["--part", "precompute"], compiled),
        Part("train_step", "Exact vs top-k vs online DeepSpeed step, bert-base shape (6-layer student, 12-layer "
             "teacher), bf16, ZeRO-0", 80, step, compiled),
        Part("train_step_shipped", "The same step with ds_distilbert's ZeRO-2 and fused AdamW", 40,
             step + ["--ds-config", "ds_distilbert"], compiled),
        Part("step_cost", "Step cost: the FLOP/byte model, online / top-k / exact steps fused and unfused, loss "
             "memory, bert-base shape, bf16", 60, step_cost, compiled),
        Part("e2e", "End to end: kd precompute -> deepspeed cli/train.py on tiny fixtures", 60,
             me + ["--part", "e2e"], compiled),
    ]  # fmt: skip
    if smoke:  # a CPU is far slower than the GPU the limits are set for
        for part in parts:
            part.timeout *= 5
    return parts


def run_parts(
    parts: list[Part], deadline: float, skip: dict[str, str], on_result=lambda results: None
) -> list[Result]:
    """Each part in turn, within what is left before `deadline`; `on_result(results so far)` after each."""
    results = []
    for part in parts:
        left = int(deadline - time.monotonic())
        if part.name in skip or left < 10:
            reason = skip.get(part.name, "no time left in the budget")
            results.append(Result(part, "skipped", 0.0, reason))
            on_result(results)
            continue
        start = time.monotonic()
        env = {**os.environ, **part.env}
        try:
            proc = subprocess.run(
                part.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(part.timeout, left)
            )
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
            out = proc.stdout + ("\n" + proc.stderr if proc.returncode else "")
        except subprocess.TimeoutExpired as e:
            status, out = "timed out", _text(e.stdout) + "\n" + _text(e.stderr)
        results.append(Result(part, status, time.monotonic() - start, out))
        print(f"gpu-check: {part.name}: {status} ({results[-1].seconds:.0f} s)", flush=True)
        on_result(results)
    return results


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# ------------------------------------------------------------------------------------------------- report
def environment(smoke: bool) -> list[str]:
    import torch

    lines = [f"- host: {platform.node()}, Python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines[-1] += f", triton {triton.__version__}"
    except Exception as e:  # noqa: BLE001
        lines[-1] += f", triton not importable ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, compute capability "
            f"{p.major}.{p.minor}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True)  # fmt: skip
            lines.append(f"- nvidia-smi (driver, max SM clock, power limit): {q.stdout.strip()}")
    elif smoke:
        lines.append("- no GPU: --smoke ran every part on the CPU at toy sizes")
    return lines


def write_report(out_dir: Path, results: list[Result], smoke: bool, wall: float) -> Path:
    today = datetime.date.today().isoformat()
    path = out_dir / f"gpu-check-{today}{'-smoke' if smoke else ''}.md"
    lines = [f"# GPU check, {today}", "", *environment(smoke), f"- wall time: {wall:.0f} s", ""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {r.part.title} | {r.status} | {r.seconds:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r.part.title}", "", f"Status: {r.status}, {r.seconds:.0f} s. Command:", "",
                  "    " + " ".join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in r.part.argv),
                  "", _report_body(r)]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _report_body(r: Result) -> str:
    """The part's tables as they printed (markdown), else the tail of its output in a code block."""
    text = r.output.strip()
    if r.status == "ok" and "|" in text:
        keep = [
            ln
            for ln in text.splitlines()
            if ln.startswith(("|", "#", "teacher", "Training")) or not ln.strip()
        ]
        return "\n".join(keep).strip()
    tail = "\n".join(text.splitlines()[-60:])
    return "```\n" + tail + "\n```"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="folder for the dated report")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="seconds for all parts together")
    ap.add_argument("--parts", default=None, help="comma-separated parts to run (default: all)")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes")
    ap.add_argument("--part", choices=["precompute", "e2e"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    wanted = None
    if args.parts:  # checked before anything is built
        wanted = {p.strip() for p in args.parts.split(",") if p.strip()}
        known = [p.name for p in plan(Path("."), args.smoke)]
        if wanted - set(known):
            ap.error(
                f"--parts: unknown {', '.join(sorted(wanted - set(known)))} (choose from {', '.join(known)})"
            )
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.part:
        fn = run_precompute_part if args.part == "precompute" else run_e2e_part
        fn(Path(args.work), device, args.smoke)
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing to check.")
        return 0
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kd-gpu-check-"))
    skip: dict[str, str] = {}
    try:
        tiny_fixtures(work)
    except Exception as e:  # noqa: BLE001 - reported, the other parts still run
        skip.update(e2e=f"tiny fixtures failed: {e!r}", train_step=f"tiny fixtures failed: {e!r}")
    if not args.smoke:
        try:
            bert_base_teacher(work / "bert_base")
        except Exception as e:  # noqa: BLE001
            skip.update(
                precompute=f"bert-base teacher failed: {e!r}", train_step=f"bert-base teacher failed: {e!r}"
            )
    parts = plan(work, args.smoke)
    if args.parts:
        wanted = {p.strip() for p in args.parts.split(",") if p.strip()}
        unknown = wanted - {p.name for p in parts}
        if unknown:
            ap.error(
                f"--parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(p.name for p in parts)})"
            )
        parts = [p for p in parts if p.name in wanted]

    def report_so_far(results: list[Result]) -> Path:
        return write_report(Path(args.out), results, args.smoke, time.monotonic() - start)

    results = run_parts(parts, start + args.budget, skip, report_so_far)
    report = report_so_far(results)
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check: report written to {report}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
