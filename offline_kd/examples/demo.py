"""The embedded end-to-end demo (`kd demo`, `make demo`): everything offline, on the shipped sample.

1. teacher: the pip-shipped MiniLM-L6 encoder with an MLM head fitted on the sample corpus;
2. `kd precompute`: the teacher runs once over the sample (10% of documents held out);
3. `deepspeed cli/train.py` equivalent: a half-depth DistilBERT student trains from the store;
4. export: `OUTPUT/student/final` (save_pretrained, model card, configuration);
5. `kd eval`: teacher and student on the held-out documents, and a comparison table.

`budget="tiny"` runs the same stages at toy sizes (about a minute); CI runs it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class DemoBudget:
    fit_head_steps: int
    fit_steps: int
    fit_batch: int
    max_length: int
    documents: int | None  # None: the whole sample
    train_steps: int
    micro_batch: int
    eval_sequences: int | None
    teacher_dtype: str  # precompute dtype: bf16 roughly halves the CPU teacher pass
    finetune_steps: int | None = None  # the downstream row (None: 3 epochs of the shipped task)


BUDGETS = {
    "full": DemoBudget(60, 240, 16, 128, 500, 150, 16, None, "bfloat16"),
    "tiny": DemoBudget(2, 4, 4, 64, 60, 6, 4, 16, "float32", finetune_steps=2),
}


def sample_corpus() -> Path:
    """The embedded corpus: public-domain Austen paragraphs and KJV chapters, one document a line."""
    return Path(str(resources.files("offline_kd") / "data" / "sample_corpus.txt"))


def demo_ds_config(micro_batch: int, lr: float = 2e-4) -> dict:
    """A single-process CPU/GPU DeepSpeed config: ZeRO-0, AdamW, warm-up then linear decay."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 5.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": "auto",
                "total_num_steps": "auto",
            },
        },
    }


def plot_losses(metrics_csv: Path, png: Path) -> None:
    """Loss components against step, from the trainer's CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offline_kd.train.metrics import read_csv

    rows = read_csv(metrics_csv)
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total"), ("kl", "KL (T²-scaled)"), ("mlm", "MLM CE"), ("cos", "1 - cos")):
        ax.plot(steps, [float(r[key]) for r in rows], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("student training from the signal store")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _demo_corpus(out: Path, b: DemoBudget) -> Path:
    """The embedded sample corpus, or its first documents for a toy budget."""
    from offline_kd.data.corpus import load_documents, write_documents

    if b.documents is None:
        return sample_corpus()
    corpus = out / "corpus.txt"
    write_documents(load_documents(str(sample_corpus())).select(range(b.documents)), corpus)
    return corpus


def _fit_teacher(out: Path, corpus: Path, b: DemoBudget, log) -> Path:
    from offline_kd.examples.minilm import MiniLMFitConfig, fit_minilm_teacher

    return fit_minilm_teacher(
        MiniLMFitConfig(
            corpus=[str(corpus)], holdout_fraction=0.1, head_steps=b.fit_head_steps, steps=b.fit_steps,
            batch_size=b.fit_batch, seq_len=b.max_length, output=str(out / "teacher"),
        ),
        log=log,
    )  # fmt: skip


def _precompute(out: Path, teacher: Path, corpus: Path, b: DemoBudget):
    from offline_kd.precompute.run import PrecomputeConfig, precompute

    return precompute(
        PrecomputeConfig(
            teacher=str(teacher), corpus=[str(corpus)], output=str(out / "store.zarr"), max_length=b.max_length,
            top_k=64, temperatures=[1.0, 2.0], views=2, hidden=True, holdout=0.1,
            holdout_file=str(out / "heldout.txt"), batch_size=16, shard_size=64, dtype=b.teacher_dtype,
        )
    )  # fmt: skip


def _train_student(out: Path, teacher: Path, b: DemoBudget):
    from offline_kd.runtime.options import from_fields
    from offline_kd.train.loop import TrainConfig, train

    return train(
        from_fields(
            TrainConfig, store=str(out / "store.zarr"), student="distil", output=str(out / "student"),
            teacher=str(teacher), deepspeed_config=demo_ds_config(b.micro_batch), epochs=100,
            max_steps=b.train_steps, schedule_steps=b.train_steps, save_every=max(1, b.train_steps // 2),
            eval_corpus=str(out / "heldout.txt"), eval_max_sequences=b.eval_sequences,
        )
    )  # fmt: skip


def _evaluate(out: Path, teacher: Path, student: Path, b: DemoBudget) -> dict:
    from offline_kd.publish.evaluate import EvalConfig, evaluate

    ev = dict(
        corpus=[str(out / "heldout.txt")], max_length=b.max_length, max_sequences=b.eval_sequences, seed=0
    )
    return {
        "teacher (MiniLM-L6)": evaluate(EvalConfig(model=str(teacher), **ev)),
        "student (distil, 3 layers)": evaluate(EvalConfig(model=str(student), teacher=str(teacher), **ev)),
    }


def run_demo(output: str | Path, budget: str = "full", log=print) -> dict:
    """The pipeline end to end on the embedded sample; each stage timed; a summary and the tables."""
    from offline_kd.runtime.log_noise import drop_expected_deepspeed_warnings
    from offline_kd.runtime.progress import quiet_library_bars

    drop_expected_deepspeed_warnings(cpu_expected=not _has_accelerator())
    quiet_library_bars()  # in a log file: no bars of datasets / transformers
    b, out, timings = BUDGETS[budget], Path(output), {}
    out.mkdir(parents=True, exist_ok=True)
    corpus = _demo_corpus(out, b)

    t = time.time()
    log("[1/5] teacher: MiniLM-L6 encoder + MLM head fitted on the sample corpus")
    teacher = _fit_teacher(out, corpus, b, log)
    timings["teacher fit"], t = time.time() - t, time.time()
    log("[2/5] precompute: the teacher reads the corpus once")
    pre = _precompute(out, teacher, corpus, b)
    timings["precompute"], t = time.time() - t, time.time()
    log(
        f"      {pre.num_sequences} sequences, {pre.tokens} tokens in {timings['precompute']:.0f}s -> {out / 'store.zarr'}"
    )
    log("[3/5] train: a DistilBERT student (half the teacher's layers) with DeepSpeed, from the store only")
    result = _train_student(out, teacher, b)
    timings["train"], t, student = time.time() - t, time.time(), Path(result.final_dir)
    plot_losses(out / "student" / "logs" / "metrics.csv", out / "loss_curve.png")
    log("[4/5] export: " + str(student))
    log("[5/5] evaluate teacher and student on held-out documents")
    rows = _evaluate(out, teacher, student, b)
    timings["eval"], t = time.time() - t, time.time()
    log(
        "then: teacher and student fine-tuned on a shipped task (which division of the Bible a KJV chapter is from)"
    )
    downstream = _downstream(out, teacher, student, b)
    timings["downstream"] = time.time() - t
    summary = _report(out, out / "store.zarr", student, pre.num_sequences, result.steps, rows, timings, log)
    return _downstream_row(out, summary, downstream, log)


def demo_task() -> Path:
    """The shipped downstream task: KJV chapters (their first 300 characters) labelled with their division
    of the Bible (offline_kd/data/downstream/README.md)."""
    return Path(str(resources.files("offline_kd") / "data" / "downstream" / "kjv_division"))


def _downstream(out: Path, teacher: Path, student: Path, b: DemoBudget) -> dict:
    """`kd finetune` of teacher and student on the shipped task; the student's card records the result."""
    from offline_kd.downstream.run import finetune
    from offline_kd.runtime.settings import FinetuneConfig

    toy = b.finetune_steps is not None  # the tiny budget: a smoke run of the same stage
    return finetune(
        FinetuneConfig(
            model=[f"student={student}"], teacher=f"teacher={teacher}", task=[str(demo_task())], text_fields="text",
            output=str(out / "downstream"), max_length=64, batch_size=16, lr=5e-5, max_steps=b.finetune_steps,
            latency_samples=4 if toy else 32, max_eval_samples=24 if toy else None, update_card=True,
        ),
        log=lambda msg: None,
    )  # fmt: skip


def _downstream_row(out: Path, summary: dict, report: dict, log) -> dict:
    """The downstream row: accuracy of teacher and student, retention, size and CPU speed-up."""
    row = report["tasks"]["kjv_division"]
    ratios = report["speed"]["ratios"]["student"]
    summary["downstream"] = {"task": "kjv_division", "teacher": row["teacher"]["metrics"],
                             "student": row["student"]["metrics"], "retention": row["student"]["retention"],
                             "speed": report["speed"]}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    retention = row["student"]["retention"]
    log(
        "\n| downstream: KJV chapter -> division (6 classes) | accuracy | macro F1 | retention | params | CPU speed-up |"
    )
    log("|---|---|---|---|---|---|")
    for name in ("teacher", "student"):
        m, r = row[name]["metrics"], report["speed"]["ratios"][name]
        kept = "–" if retention is None else f"{100 * (1.0 if name == 'teacher' else retention):.0f}%"
        log(f"| {name} | {100 * m['accuracy']:.1f}% | {100 * m['macro_f1']:.1f} | {kept} | "
            f"{100 * r['parameters']:.0f}% | {r['cpu_speedup']:.2f}x |")  # fmt: skip
    log(f"downstream report: {out / 'downstream' / 'report.md'}; the student's model card records it "
        f"(params {100 * ratios['parameters']:.0f}% of the teacher's)")  # fmt: skip
    return summary


def _report(out, store, student, sequences, steps, rows, timings, log) -> dict:
    """Write summary.json and print the comparison table, the retained accuracy and the timings."""
    from offline_kd.publish.evaluate import format_table

    summary = {
        "output": str(out),
        "store": str(store),
        "student": str(student),
        "store_sequences": sequences,
        "train_steps": steps,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "eval": {k: v.as_dict() for k, v in rows.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    retained = rows["student (distil, 3 layers)"].accuracy / max(rows["teacher (MiniLM-L6)"].accuracy, 1e-9)
    log("\n" + format_table(rows))
    log(f"\nstudent keeps {100 * retained:.0f}% of the teacher's masked accuracy with half its layers")
    log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    log(f"artifacts in {out}: store.zarr, student/final (model, tokenizer, README.md model card), "
        "student/logs (metrics.csv, TensorBoard), loss_curve.png, summary.json")  # fmt: skip
    return summary
