"""The report of a ``kd finetune`` run: per task, the teacher, each model, retention; a macro average;
size and speed ratios. Written as ``report.json``, ``report.md`` and ``report.png``, and, on request,
into each local model's card (``model-index`` entries and a section, `offline_kd.publish.model_card`).

Each (model, task) is the median over seeds of the task's score (the mean of its metrics), with the
spread (max − min over seeds); retention is the model's median over the teacher's (none where the
teacher's score is not positive), and the macro retention is the macro average over the teacher's, as
DistilBERT's 97% (77.0 / 79.5) is.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from offline_kd.downstream.metrics import METRIC_NAMES


def _median_metrics(cells: list[dict]) -> dict[str, float]:
    keys = cells[0]["metrics"]
    return {k: statistics.median(c["metrics"][k] for c in cells) for k in keys}


def aggregate(cells: list[dict], models: list[str], tasks: list[str], teacher: str | None,
              speed: dict | None = None) -> dict:  # fmt: skip
    """The report as a dict: ``tasks`` → model → median/spread/retention, ``macro``, ``speed``."""
    out: dict = {"teacher": teacher, "models": models, "tasks": {}, "macro": {}, "speed": speed or {}}
    for task in tasks:
        rows = {}
        for model in models:
            mine = [c for c in cells if c["model"] == model and c["task"] == task]
            if not mine:
                continue
            scores = [c["score"] for c in mine]
            rows[model] = {"score": statistics.median(scores), "spread": max(scores) - min(scores),
                           "seeds": [c["seed"] for c in mine], "scores": scores, "metrics": _median_metrics(mine)}  # fmt: skip
        _retention(rows, teacher)
        out["tasks"][task] = rows
    for model in models:
        scores = [out["tasks"][t][model]["score"] for t in tasks if model in out["tasks"][t]]
        if len(scores) == len(tasks):
            out["macro"][model] = {"score": statistics.fmean(scores)}
    _retention(out["macro"], teacher)
    return out


def _retention(rows: dict, teacher: str | None) -> None:
    base = rows.get(teacher, {}).get("score") if teacher else None
    for row in rows.values():  # a ratio to a score at or below zero (a correlation) means nothing
        row["retention"] = row["score"] / base if base and base > 0 else None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    """A table per task, then the summary: macro average, retention, size and speed against the teacher."""
    lines: list[str] = []
    for task, rows in report["tasks"].items():
        if not rows:
            continue
        keys = list(next(iter(rows.values()))["metrics"])
        n = max(len(r["seeds"]) for r in rows.values())
        lines += [f"### {task}", "", f"Median of {n} seed(s); spread: max − min of the score over seeds; "
                  "metrics × 100.", "",  # fmt: skip
                  "| model | " + " | ".join(_metric_label(k) for k in keys) + " | score | spread | retention |",
                  "|---|" + "---|" * (len(keys) + 3)]  # fmt: skip
        for model, r in rows.items():
            cells = " | ".join(_num(r["metrics"][k]) for k in keys)
            lines.append(f"| {_label(model, report)} | {cells} | {_num(r['score'])} | {_num(r['spread'])} "
                         f"| {_pct(r['retention'])} |")  # fmt: skip
        lines.append("")
    lines += summary_table(report)
    return "\n".join(lines).rstrip() + "\n"


def _metric_label(key: str) -> str:
    for m, name in METRIC_NAMES.items():
        if key.startswith(m):
            return name + key[len(m) :].replace("_", " ")
    return key


def _label(model: str, report: dict) -> str:
    teacher = model == report.get("teacher") and "teacher" not in model.lower()
    return f"{model} (teacher)" if teacher else model


def summary_table(report: dict) -> list[str]:
    tasks = list(report["tasks"])
    speed, ratio = report.get("speed", {}).get("models", {}), report.get("speed", {}).get("ratios", {})
    head = (
        "| model | "
        + " | ".join(tasks)
        + " | macro | retention | params | disk MB | CPU ms (b=1) | CPU speed-up |"
    )
    gpu = any(s.get("gpu_throughput") for s in speed.values())
    head += " GPU ex/s | GPU speed-up |" if gpu else ""
    lines = ["### Summary", "", head, "|---|" + "---|" * (len(tasks) + 6 + 2 * gpu)]
    for model in report["models"]:
        scores = [
            _num(report["tasks"][t][model]["score"]) if model in report["tasks"][t] else "–" for t in tasks
        ]
        macro = report["macro"].get(model, {})
        s, r = speed.get(model), ratio.get(model, {})
        size = (f"{s['parameters'] / 1e6:.2f}M ({_pct(r.get('parameters'))}) | {s['disk_bytes'] / 1e6:.2f} | "
                f"{s['cpu_latency_ms']:.1f} | {_x(r.get('cpu_speedup'))}") if s else "– | – | – | –"  # fmt: skip
        if gpu:
            size += f" | {s.get('gpu_throughput') or 0:.0f} | {_x(r.get('gpu_speedup'))}" if s else " | – | –"
        lines.append(f"| {_label(model, report)} | " + " | ".join(scores)
                     + f" | {_num(macro['score']) if macro else '–'} | {_pct(macro.get('retention'))} | {size} |")  # fmt: skip
    return lines


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def plot(report: dict, png: Path) -> None:
    """Retention per task (and macro) of every model but the teacher, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(report["tasks"])
    models = [m for m in report["models"] if m != report.get("teacher")]
    cols = tasks + ["macro"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cols) * max(1, len(models)) ** 0.5), 4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        vals = [report["tasks"][t].get(model, {}).get("retention") for t in tasks]
        vals.append(report["macro"].get(model, {}).get("retention"))
        ys = [100 * v if v is not None else 0.0 for v in vals]
        ax.bar(np.arange(len(cols)) + i * width, ys, width, label=model)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cols)) + width * (len(models) - 1) / 2, cols)
    ax.set_ylabel("% of the teacher's score" if report.get("teacher") else "score")
    ax.set_title("downstream retention (median over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def card_rows(report: dict, model: str, sources: dict[str, str]) -> list[dict]:
    """What `offline_kd.publish.model_card.update_downstream` records for one model."""
    rows = []
    for task, table in report["tasks"].items():
        r = table.get(model)
        if r:
            rows.append({"task": task, "source": sources.get(task, task), "metrics": r["metrics"],
                         "score": r["score"], "seeds": len(r["seeds"]), "retention": r["retention"],
                         "teacher": report.get("teacher")})  # fmt: skip
    return rows
