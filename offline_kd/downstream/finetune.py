"""``kd finetune``: fine-tune models on downstream tasks with transformers' `Trainer`, one cell at a time.

A *cell* is one (model, task, seed): an `AutoModelForSequenceClassification` built from the model's
checkpoint (a masked-LM student's encoder with a new head), trained with the run_glue recipe and
scored on the task's eval splits. Each finished cell is written to
``OUTPUT/cells/MODEL/TASK/seedN.json`` with a fingerprint of everything it depends on: a rerun skips
the cells whose file matches, so an interrupted run resumes where it stopped. Every input is checked
(`check_inputs`) before the first cell trains.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from offline_kd.downstream import metrics
from offline_kd.downstream.tasks import REGRESSION, LoadedTask, LocalTaskOptions, expand_tasks, load_task
from offline_kd.runtime.errors import UsageError

if TYPE_CHECKING:
    from offline_kd.runtime.progress import Progress
    from offline_kd.runtime.settings import FinetuneConfig

# The settings a cell's result depends on (the rest: where results go, what is reported).
RECIPE = ("max_length", "batch_size", "lr", "epochs", "warmup", "weight_decay", "max_steps",
          "max_train_samples", "max_eval_samples", "precision")  # fmt: skip


# A saved tokenizer has one of these (transformers 5 would otherwise build an empty one from the config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")  # fmt: skip


@dataclass(frozen=True)
class ModelRef:
    """A model of the run: its name in the report, where it loads from, whether it is the teacher."""

    name: str
    path: str
    teacher: bool = False


def parse_model(value: str, teacher: bool = False) -> ModelRef:
    """``PATH``, ``HUB_NAME`` or ``NAME=PATH``."""
    name, sep, path = value.partition("=")
    if not sep or Path(value).exists():
        name, path = _default_name(value), value
    return ModelRef(name=name, path=path, teacher=teacher)


def _default_name(path: str) -> str:
    p = Path(path)
    if p.name == "final" and p.parent.name:  # an exported student: runs/NAME/final
        return p.parent.name
    return p.name or path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def check_model(ref: ModelRef, flag: str):
    """The model's config and tokenizer, or one line naming what is wrong with it."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(ref.path)
    if ref.path.startswith((".", "/", "~")) and not path.is_dir():
        raise UsageError(f"{flag} {ref.path}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(ref.path)
    except Exception as e:
        raise UsageError(
            f"{flag} {ref.path}: not a model directory or hub model ({_first_line(e)})"
        ) from None
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(
            f"{flag} {ref.path}: no tokenizer in the directory (save it beside the model: "
            "tokenizer.save_pretrained(DIR))"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path)
    except Exception as e:
        raise UsageError(
            f"{flag} {ref.path}: no tokenizer (save it beside the model: tokenizer.save_pretrained) "
            f"({_first_line(e)})"
        ) from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise UsageError(f"{flag} {ref.path}: no tokenizer (save it beside the model)")
    return config, tokenizer


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def check_head(ref: ModelRef, config, task: LoadedTask) -> None:
    """A model that already has a sequence-classification head must fit the task's labels and kind."""
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return  # a masked LM or an encoder: the head is new
    spec = task.spec
    if config.num_labels != spec.head_size:
        raise UsageError(
            f"--model {ref.path}: its classification head has {config.num_labels} outputs, {spec.name} "
            f"needs {spec.head_size} ({spec.kind})"
        )
    regression = getattr(config, "problem_type", None) == "regression"
    if regression != (spec.kind == REGRESSION) and getattr(config, "problem_type", None):
        raise UsageError(
            f"--model {ref.path}: its head is {config.problem_type}, {spec.name} is {spec.kind} (--task-type)"
        )


@dataclass
class Plan:
    """Everything a run needs, checked: models (teacher first), their tokenizers, the loaded tasks."""

    models: list[ModelRef]
    tokenizers: dict[str, object]
    tasks: list[LoadedTask]


def check_inputs(cfg: FinetuneConfig) -> Plan:
    """Every model, tokenizer and task loaded and checked; nothing trains before this returns."""
    if cfg.seeds < 1:
        raise UsageError(f"--seeds {cfg.seeds}: at least 1")
    refs = ([parse_model(cfg.teacher, teacher=True)] if cfg.teacher else []) + [
        parse_model(m) for m in cfg.model
    ]
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise UsageError(f"--model: two models are named {_dup(names)!r}; name them with NAME=PATH")
    opts = LocalTaskOptions(
        text_fields=tuple(f.strip() for f in (cfg.text_fields or "").split(",") if f.strip()),
        label_field=cfg.label_field, train_split=cfg.train_split, eval_split=cfg.eval_split,
        task_type=cfg.task_type, glue_source=cfg.glue_source,
    )  # fmt: skip
    tasks = [load_task(t, opts) for t in expand_tasks(cfg.task)]
    configs, tokenizers = {}, {}
    for ref in refs:
        configs[ref.name], tokenizers[ref.name] = check_model(ref, "--teacher" if ref.teacher else "--model")
    for ref in refs:
        for task in tasks:
            check_head(ref, configs[ref.name], task)
    return Plan(refs, tokenizers, [_subset(t, cfg) for t in tasks])


def _dup(names: list[str]) -> str:
    return next(n for n in names if names.count(n) > 1)


def _subset(task: LoadedTask, cfg: FinetuneConfig) -> LoadedTask:
    def head(ds, n):
        return ds.select(range(min(n, len(ds)))) if n else ds

    evals = {s: head(d, cfg.max_eval_samples) for s, d in task.evals.items()}
    return LoadedTask(task.spec, head(task.train, cfg.max_train_samples), evals, task.source)


def cell_path(cfg: FinetuneConfig, ref: ModelRef, task: LoadedTask, seed: int) -> Path:
    return Path(cfg.output) / "cells" / slug(ref.name) / slug(task.spec.name) / f"seed{seed}.json"


def fingerprint(cfg: FinetuneConfig, ref: ModelRef, task: LoadedTask, seed: int) -> str:
    """What a cell's result depends on: the model, the task, its sizes, the recipe and the seed."""
    spec = asdict(task.spec)
    sizes = [len(task.train), *(len(d) for d in task.evals.values())]
    recipe = {k: getattr(cfg, k) for k in RECIPE}
    blob = json.dumps([_model_identity(ref.path), spec, sizes, recipe, seed], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_identity(path: str) -> list:
    """A hub name, or a directory and the size and time of its weight files: a model retrained in the same
    directory makes its cells run again."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    weights = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    return [str(p.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights]


def finished_cell(path: Path, fp: str) -> dict | None:
    """A cell's saved result when it was made with the same inputs, else None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    return saved if saved.get("fingerprint") == fp else None


def train_steps(task: LoadedTask, cfg: FinetuneConfig, world_size: int = 1) -> int:
    """The optimizer steps of one cell (for the ETA)."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(len(task.train) / (cfg.batch_size * max(1, world_size)))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a crash leaves the previous file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def score_cell(task: LoadedTask, logits_by_split: dict, labels_by_split: dict) -> dict[str, float]:
    """The task's metrics on each eval split (MNLI: ``accuracy_matched``, ``accuracy_mismatched``)."""
    out: dict[str, float] = {}
    regression = task.spec.kind == REGRESSION
    for split, logits in logits_by_split.items():
        preds = metrics.predictions_from_logits(logits, regression)
        suffix = metrics.split_suffix(split, len(logits_by_split))
        for m in task.spec.metrics:
            out[m + suffix] = metrics.compute(m, preds, labels_by_split[split])
    return out


def run_cell(cfg: FinetuneConfig, ref: ModelRef, tokenizer, task: LoadedTask, seed: int,
             progress: Progress | None = None) -> dict:  # fmt: skip
    """Fine-tune one model on one task with one seed; its metrics on every eval split."""
    from offline_kd.downstream.trainer import train_and_predict

    logits, labels, log = train_and_predict(cfg, ref.path, tokenizer, task, seed, progress, ref.name)
    values = score_cell(task, logits, labels)
    return {"model": ref.name, "path": ref.path, "task": task.spec.name, "seed": seed, "metrics": values,
            "score": metrics.task_score(values), "train_examples": len(task.train),
            "eval_examples": {s: len(d) for s, d in task.evals.items()}, **log}  # fmt: skip
