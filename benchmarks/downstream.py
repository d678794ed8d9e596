"""Downstream benchmark: does the offline-KD student keep the teacher's downstream quality?

Fine-tunes the teacher and the fidelity students (benchmarks/fidelity.py: exact KD, top-k KD, online
KD, MLM only, random init with the same architecture, all at the same step budget) with `kd finetune`
on two tasks whose labels the shipped text defines (offline_kd.downstream.shipped):

    austen-novel   which of Austen's six novels a paragraph (30-150 words) comes from   6 classes
    kjv-division   which division of the Bible a KJV chapter belongs to (its first 2,000 characters;
                   law, history, wisdom, prophets, gospels and Acts, epistles and Revelation)  6 classes

Both corpora are public domain and ship in benchmarks/corpora. It prints retention per task (student
score / teacher score, median over seeds) and answers two questions: does offline KD keep more than
MLM only and random init, and is exact offline KD as good downstream as online KD?

Run the fidelity students first (they are saved under WORK/students), then this:

    python benchmarks/fidelity.py --teacher-fit quick --work runs/fidelity-downstream \
        --docs-dir runs/fidelity-downstream --steps 60 --batch-size 8 --train-docs 300 --eval-sequences 32 \
        --step-time-repeats 0 --only "offline KD, exact" --only "offline KD" --only "online KD" \
        --only "MLM only" --only "offline KD, random init"
    python benchmarks/downstream.py --fidelity-work runs/fidelity-downstream

Writes WORK/report.{json,md,png} (default WORK: runs/downstream) and prints the tables. Cells are
resumable: a rerun of the same command trains only what is missing.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

from _common import REPO

SHIPPED = REPO / "benchmarks" / "corpora"
# fidelity.py's student names → their folders under WORK/students, in the order of the table.
STUDENTS = {
    "exact KD": "offline_KD_exact",
    "top-k KD": "offline_KD",
    "online KD": "online_KD",
    "MLM only": "MLM_only",
    "random init": "offline_KD_random_init",
}


def read_lines(name: str, corpora: Path) -> list[str]:
    plain = corpora / name
    if plain.is_file():
        return plain.read_text(encoding="utf-8").splitlines()
    with lzma.open(corpora / f"{name}.xz", "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def build_tasks(work: Path, corpora: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    from offline_kd.downstream.shipped import austen_novels, kjv_divisions, write_task

    rows = {
        "austen-novel": austen_novels(read_lines("austen.txt", corpora)),
        "kjv-division": kjv_divisions(read_lines("kjv_chapters.txt", corpora)),
    }
    return {name: write_task(r, work / "tasks" / name, n_train, n_eval, seed) for name, r in rows.items()}


def teacher_dir(fidelity_work: Path, recipe: str) -> Path:
    """The teacher fidelity.py fitted (its cached fit, recomputed only if the cache is gone)."""
    from fidelity import corpus_dir, fit_teacher

    corpora = corpus_dir(SHIPPED, fidelity_work)
    return fit_teacher(corpora, recipe, print)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fidelity-work", default=str(REPO / "runs" / "fidelity-downstream"))
    p.add_argument("--teacher", help="default: the teacher fidelity.py fitted (--teacher-fit)")
    p.add_argument("--teacher-fit", choices=("quick", "full"), default="quick", help="fidelity.py's recipe")
    p.add_argument("--work", default=str(REPO / "runs" / "downstream"))
    p.add_argument("--corpora", default=str(SHIPPED))
    p.add_argument("--train", type=int, default=400, help="training examples per task")
    p.add_argument("--eval", type=int, default=200, help="evaluation examples per task")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--latency-samples", type=int, default=32)
    p.add_argument(
        "--tasks",
        default="austen-novel,kjv-division",
        help="comma-separated; several processes can split them",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--write-demo-task",
        metavar="DIR",
        help="only write the demo's task (kjv-division, 400 / 100 chapters, first 300 characters) to DIR "
        "(offline_kd/data/downstream/kjv_division) and exit",
    )
    return p.parse_args()


def verdict(report: dict) -> list[str]:
    """The two questions, answered from the macro scores (median over seeds per task, then the mean)."""
    macro = {m: 100 * r["score"] for m, r in report["macro"].items()}
    spread = {m: max(100 * report["tasks"][t][m]["spread"] for t in report["tasks"]) for m in macro}
    lines = ["macro score (largest per-task spread over seeds):"]
    lines += [f"  {m:<22} {v:5.1f}  (±{spread[m]:.1f})" for m, v in macro.items()]
    if {"exact KD", "top-k KD", "MLM only", "random init"} <= macro.keys():
        lines.append(
            f"offline KD - MLM only: exact {macro['exact KD'] - macro['MLM only']:+.1f}, top-k "
            f"{macro['top-k KD'] - macro['MLM only']:+.1f} points; offline KD - random init: exact "
            f"{macro['exact KD'] - macro['random init']:+.1f} points"
        )
    if {"exact KD", "online KD"} <= macro.keys():
        lines.append(f"exact offline KD - online KD: {macro['exact KD'] - macro['online KD']:+.1f} points")
    return lines


def main() -> None:
    args = parse_args()
    from offline_kd.downstream.report import markdown
    from offline_kd.downstream.run import finetune
    from offline_kd.runtime.settings import FinetuneConfig

    if args.write_demo_task:
        from offline_kd.downstream.shipped import kjv_divisions, write_task

        rows = kjv_divisions(read_lines("kjv_chapters.txt", Path(args.corpora)), max_chars=300)
        print(write_task(rows, Path(args.write_demo_task), 400, 100, seed=0))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    work, fw = Path(args.work), Path(args.fidelity_work)
    tasks = build_tasks(work, Path(args.corpora), args.train, args.eval, seed=0)
    tasks = {name: tasks[name] for name in args.tasks.split(",")}
    teacher = Path(args.teacher) if args.teacher else teacher_dir(fw, args.teacher_fit)
    models = [f"{name}={fw / 'students' / folder}" for name, folder in STUDENTS.items()
              if (fw / "students" / folder / "config.json").is_file()]  # fmt: skip
    if not models:
        sys.exit(
            f"no fidelity students under {fw / 'students'}: run benchmarks/fidelity.py first (see --help)"
        )
    cfg = FinetuneConfig(
        model=models, task=[str(p) for p in tasks.values()], teacher=f"teacher (MiniLM-L6)={teacher}",
        output=str(work), text_fields="text", seeds=args.seeds, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, latency_samples=args.latency_samples,
    )  # fmt: skip
    report = finetune(cfg)
    print(f"\nDownstream ({args.train} train / {args.eval} eval examples a task, {args.seeds} seed(s), "
          f"{args.epochs:g} epochs, lr {args.lr:g}, batch {args.batch_size}; {time.time() - t0:.0f}s)\n")  # fmt: skip
    print(markdown(report))
    print("\n".join(verdict(report)))


if __name__ == "__main__":
    main()
