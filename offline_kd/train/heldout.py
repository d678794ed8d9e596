"""Held-out evaluation during training (``--eval-corpus SOURCE --eval-every N``).

SOURCE is either held-out text (a text/jsonl/parquet file, e.g. the ``--holdout-file`` of
``kd precompute``) or a signal store precomputed from held-out text:

- text: masked the way ``kd eval`` masks it (fixed seed, 15%, 80/10/10), scored for masked
  accuracy and masked perplexity. Raw text carries no teacher signal, and running the teacher
  during training is what offline distillation avoids, so there is no agreement figure;
- a store: its own stored masking (view 0), and also the agreement of the student's top-1 with the
  teacher's stored top-1 at the masked positions.

The batches are built once. Every rank scores its share (batches ``rank, rank + world, ...``) with
the engine's module in eval mode, every rank running the same number of forward passes (ZeRO-3
gathers the partitioned parameters collectively; a rank short of batches repeats one, uncounted),
and the sums are reduced over ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from offline_kd.runtime.distributed import accelerator_device
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.settings import HeldOutConfig

# Summed over ranks: sequences, masked tokens, correct top-1, negative log-likelihood, agreeing top-1.
_SEQ, _TOK, _TOP1, _NLL, _AGREE = range(5)


def _is_store(source: str, storage_options: dict | None) -> bool:
    if "://" in source and not source.startswith("file://"):
        return source.rstrip("/").endswith(".zarr")
    return (Path(source.removeprefix("file://")) / "zarr.json").is_file()


def _text_batches(source: str, tokenizer, max_length: int, max_sequences: int | None, batch: int) -> list:
    from offline_kd.publish.evaluate import masked_eval_batches
    from offline_kd.runtime.settings import EvalConfig

    cfg = EvalConfig(
        model="", corpus=[source], max_length=max_length, batch_size=batch, max_sequences=max_sequences
    )
    return [
        {"input_ids": m, "attention_mask": a, "labels": y} for m, a, y in masked_eval_batches(cfg, tokenizer)
    ]


def _store_batches(
    source: str, storage_options: dict | None, tokenizer_sha256: str, max_sequences: int | None, batch: int
) -> list:
    from offline_kd.store.signal_store import open_store

    store = open_store(source, storage_options)
    meta = store.meta
    if meta.tokenizer_sha256 != tokenizer_sha256:
        raise UsageError(f"--eval-corpus {source}: a store with another tokenizer than the training store's")
    n = meta.num_sequences if max_sequences is None else min(meta.num_sequences, max_sequences)
    fields = ["lengths", "masked_input_ids", "input_ids", "mlm_mask"] + (["topk_ids"] if meta.top_k else [])
    out = []
    for start in range(0, n, batch):
        rows = store.read(0, start, min(start + batch, n), fields)
        lengths = rows["lengths"].astype(np.int64)
        ids = rows["input_ids"].astype(np.int64)
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        b = {
            "input_ids": torch.from_numpy(rows["masked_input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(np.where(rows["mlm_mask"], ids, -100)),
        }
        if "topk_ids" in rows:
            b["teacher_top1"] = torch.from_numpy(rows["topk_ids"][..., 0].astype(np.int64))
        out.append(b)
    return out


class HeldOutEval:
    """The held-out batches of one rank, and their scoring."""

    def __init__(
        self,
        source: str,
        tokenizer,
        *,
        max_length: int,
        tokenizer_sha256: str,
        max_sequences: int | None,
        batch_size: int,
        rank: int,
        world: int,
        storage_options: dict | None = None,
    ):
        self.source, self.rank, self.world = source, rank, world
        if _is_store(source, storage_options):
            batches = _store_batches(source, storage_options, tokenizer_sha256, max_sequences, batch_size)
        else:
            batches = _text_batches(source, tokenizer, max_length, max_sequences, batch_size)
        if not batches:
            raise UsageError(f"--eval-corpus {source}: no evaluation sequences could be built")
        mine = batches[rank::world]
        rounds = math.ceil(len(batches) / world)
        # (batch, counted): equal forward passes on every rank, the padding ones not counted
        self.batches = [(b, True) for b in mine] + [(batches[0], False)] * (rounds - len(mine))
        self.has_teacher = "teacher_top1" in batches[0]

    @torch.no_grad()
    def run(self, engine, vocab_size: int | None, device: torch.device) -> dict:
        """Score the student inside `engine` (every rank calls this); returns the metrics dict."""
        sums = torch.zeros(5, dtype=torch.float64)
        student = engine.module.student
        engine.eval()
        try:
            for batch, counted in self.batches:
                logits = student(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                if counted:
                    sums += _score(logits, batch, vocab_size, device)
        finally:
            engine.train()
        if self.world > 1:
            on_device = sums.to(device)
            dist.all_reduce(on_device)
            sums = on_device.cpu()
        tokens = max(float(sums[_TOK]), 1.0)
        return {
            "sequences": int(sums[_SEQ]),
            "masked_tokens": int(sums[_TOK]),
            "accuracy": float(sums[_TOP1]) / tokens,
            "masked_perplexity": math.exp(float(sums[_NLL]) / tokens),
            "teacher_agreement": float(sums[_AGREE]) / tokens if self.has_teacher else None,
        }


def _score(logits: torch.Tensor, batch: dict, vocab_size: int | None, device: torch.device) -> torch.Tensor:
    labels = batch["labels"].to(device)
    sel = labels != -100
    picked = logits[sel].float()
    if vocab_size is not None:
        picked = picked[:, :vocab_size]  # the student's padded vocabulary rows are no tokens
    target = labels[sel]
    logp = torch.log_softmax(picked, dim=-1)
    top1 = picked.argmax(-1)
    agree = 0.0
    if "teacher_top1" in batch:
        agree = float((top1 == batch["teacher_top1"].to(device)[sel]).sum())
    return torch.tensor(
        [
            batch["input_ids"].shape[0],
            target.numel(),
            float((top1 == target).sum()),
            float(-logp.gather(1, target[:, None]).sum()),
            agree,
        ],
        dtype=torch.float64,
    )


class HeldOutEvaluator:
    """Scores ``--eval-corpus`` every ``eval_every`` optimizer steps and once at the end; the loop only
    reports its steps. Without an eval corpus it does nothing."""

    def __init__(self, cfg: HeldOutConfig, tokenizer, meta, *, batch_size: int, rank: int, world: int,
                 storage_options: dict | None = None):  # fmt: skip
        self.cfg = cfg
        self.last: tuple[int, dict] | None = None  # (step, result) of the newest evaluation
        self.heldout = None
        if cfg.eval_corpus:  # built once, before step 0: a bad corpus fails before any training
            self.heldout = HeldOutEval(
                cfg.eval_corpus, tokenizer, max_length=int(meta.max_length),
                tokenizer_sha256=meta.tokenizer_sha256, max_sequences=cfg.eval_max_sequences,
                batch_size=batch_size, rank=rank, world=world, storage_options=storage_options,
            )  # fmt: skip

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether `evaluate` would score `step`: every ``eval_every`` steps, and the last one unless just
        scored."""
        if self.heldout is None:
            return False
        if last_step:
            return self.last is None or self.last[0] != step
        return bool(self.cfg.eval_every) and step % self.cfg.eval_every == 0

    def evaluate(self, engine, step: int, logger, vocab_size: int | None, last_step: bool = False) -> None:
        """Every rank scores its share when `step` is due; rank 0 logs."""
        if self.due(step, last_step):
            result = self.heldout.run(engine, vocab_size, accelerator_device())
            logger.log_eval(step, result)
            self.last = (step, result)

    @property
    def result(self) -> dict | None:
        """The newest evaluation's metrics, for the model card."""
        return self.last and self.last[1]
