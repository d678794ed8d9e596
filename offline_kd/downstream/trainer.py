"""One cell's training and prediction with transformers' `Trainer` (bf16 and multi-GPU as it provides)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from offline_kd.downstream.tasks import REGRESSION, LoadedTask
from offline_kd.runtime.hub_kernels import load_kwargs

if TYPE_CHECKING:
    from offline_kd.runtime.progress import Progress
    from offline_kd.runtime.settings import FinetuneConfig


def tokenize(task: LoadedTask, tokenizer, max_length: int) -> tuple:
    """The train split and the eval splits as token ids (padding is the collator's, per batch)."""
    fields = task.spec.text_fields

    def encode(batch):
        return tokenizer(*[batch[f] for f in fields], truncation=True, max_length=max_length)

    def prep(ds):
        keep = {"label"}
        return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])

    return prep(task.train), {s: prep(d) for s, d in task.evals.items()}


def load_classifier(path: str, task: LoadedTask, hub_kernels: bool = False):
    """An `AutoModelForSequenceClassification` from a checkpoint: a masked LM's encoder with a new head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    spec = task.spec
    kwargs = {"problem_type": "regression" if spec.kind == REGRESSION else "single_label_classification"}
    if spec.label_names:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point of fine-tuning
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.head_size, **kwargs, **load_kwargs(hub_kernels)
        )
    finally:
        hf_logging.set_verbosity(level)


def _gpu(cfg: FinetuneConfig) -> bool:
    import torch

    return torch.cuda.is_available() and not cfg.cpu


def _precision(cfg: FinetuneConfig) -> dict:
    import torch

    gpu = _gpu(cfg)
    if cfg.precision == "auto":
        return {"bf16": bool(gpu and torch.cuda.is_bf16_supported())}
    return {"bf16": cfg.precision == "bf16", "fp16": cfg.precision == "fp16"}


def training_args(cfg: FinetuneConfig, out_dir: Path, seed: int):
    """The run_glue recipe as `TrainingArguments`; nothing saved but the result."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear", seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
        logging_strategy="steps", logging_steps=10, report_to="none", disable_tqdm=True,
        use_cpu=cfg.cpu, optim="adamw_torch", dataloader_pin_memory=_gpu(cfg), **_precision(cfg),
    )  # fmt: skip


def _progress_callback(progress: Progress | None, label: str):
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None and state.is_world_process_zero:
                progress.update(1, fields={"cell": label})

    return StepProgress()


def train_and_predict(cfg: FinetuneConfig, path: str, tokenizer, task: LoadedTask, seed: int,
                      progress: Progress | None = None, name: str | None = None) -> tuple[dict, dict, dict]:  # fmt: skip
    """Train, then predict every eval split: (logits by split, labels by split, a log of the run)."""
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, set_seed

    set_seed(seed)
    train_ds, eval_ds = tokenize(task, tokenizer, cfg.max_length)
    model = load_classifier(path, task, cfg.hub_kernels)
    trainer = Trainer(
        model=model, args=training_args(cfg, Path(cfg.output) / "trainer", seed), train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        callbacks=[_progress_callback(progress, f"{name or Path(path).name}/{task.spec.name}/seed{seed}")],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its printed dicts
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0
    logits, labels = {}, {}
    for split, ds in eval_ds.items():
        pred = trainer.predict(ds)
        raw = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        logits[split], labels[split] = np.asarray(raw, dtype=np.float64), np.asarray(pred.label_ids)
    log = {"train_seconds": round(seconds, 2), "train_steps": int(out.global_step),
           "train_loss": float(out.training_loss), "world_process_zero": trainer.is_world_process_zero()}  # fmt: skip
    return logits, labels, log
