"""The DistilBERT triple loss, ``alpha_kl·KL + alpha_mlm·MLM + alpha_cos·cosine``, from stored teacher signals.

All the loss math lives in `offline_kd.kernels`; this module selects the rows, picks the stored
temperature and weighs the components.

* KL: ``T²·KL(teacher_T ‖ student_T)``, by ``kl_source``:
  - ``topk``: on the teacher's stored top-k ids. Tail-aware by default: the stored
    full-vocabulary ``lse`` at ``T`` gives the teacher's exact top-k probabilities and its tail
    mass; ``kl_tail=False`` renormalises the top-k instead.
  - ``exact``: over the full vocabulary, the teacher's logits recomputed chunk by chunk from the
    stored hidden states through the teacher's MLM head (no gradient, never more than one chunk
    of teacher logits at once), at any ``T``.
  - ``auto`` (the trainer resolves it from the store before step 0): ``exact`` when a teacher head is
    given, else ``topk``.
* MLM: cross-entropy at ``T = 1`` against ``input_ids`` at the masked positions.
* cosine: ``1 - cos`` between the student's last hidden state (through the optional learned
  projection) and the teacher's stored one.

KL and cosine run over every non-pad token (as DistilBERT does), or only over the masked ones
with ``restrict_kl_to_mask``. The KL and MLM weights go to the kernels with the logits, which write the
gradient of their weighted sum in the forward (docs/kernels.md).
"""

from __future__ import annotations

import torch
from torch import nn

from offline_kd.kernels import cosine_loss, distillation_losses, exact_distillation_losses
from offline_kd.runtime.settings import LossConfig

__all__ = ["COMPONENTS", "LossConfig", "distillation_loss"]

COMPONENTS = ("loss", "kl", "mlm", "cos")


def distillation_loss(
    cfg: LossConfig,
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    projection: nn.Module | None = None,
    vocab_size: int | None = None,
    consume_logits: bool = False,
    expected_upstream: float = 1.0,
    teacher_head: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (total loss, detached components) for one micro-batch.

    `student_logits` [B, L, W], `student_hidden` [B, L, Hs]; `batch` as produced by
    `offline_kd.train.reader`: attention_mask, mlm_mask, labels [B, L], topk_ids / topk_logits [B, L, K]
    (kl_source topk), optional lse [B, L] (at cfg.temperature) and hidden [B, L, H]. `vocab_size`: the
    vocabulary when the logits are wider (a student whose embeddings are padded to a multiple of 64); the
    padding gets no probability. `consume_logits`: the gradient is written over the logits in the forward
    (the trainer, which does not read them afterwards: no second [B·L, W] buffer). `expected_upstream`:
    the gradient the backward will bring for the total (DeepSpeed: 1 / gradient accumulation steps),
    folded into the logits' gradient in the forward so the backward makes no further pass over it (top-k
    KL; the exact KL scales its gradient in the backward). `teacher_head` (kl_source exact): the
    teacher's MLM head, [c, H] → [c, V].

    Every row goes to the kernels as one [B·L, W] view with a row mask (pad tokens count for nothing and
    get zero gradient rows): no copy of the logits, no host synchronisation to find the non-pad rows.
    """
    keep = batch["attention_mask"].reshape(-1).bool()
    row_mask = keep & batch["mlm_mask"].reshape(-1).bool() if cfg.restrict_kl_to_mask else keep
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    zero = student_logits.new_zeros((), dtype=torch.float32)
    logit_total, kl, mlm = zero, zero, zero
    if cfg.alpha_kl > 0 or cfg.alpha_mlm > 0:
        labels = batch["labels"].reshape(-1).masked_fill(~keep, -100) if cfg.alpha_mlm > 0 else None
        if cfg.kl_source == "exact" or (cfg.kl_source == "auto" and teacher_head is not None):
            logit_total, kl, mlm = _exact_kl_mlm(
                cfg, logits, batch, teacher_head, row_mask, labels, vocab_size
            )
        else:
            k = batch["topk_ids"].shape[-1]
            logit_total, kl, mlm = distillation_losses(
                logits,
                batch["topk_ids"].reshape(-1, k),
                batch["topk_logits"].reshape(-1, k),
                cfg.temperature,
                row_mask=row_mask,
                teacher_lse=batch["lse"].reshape(-1) if cfg.kl_tail else None,
                mlm_labels=labels,
                weights=(cfg.alpha_kl, cfg.alpha_mlm),
                vocab_size=vocab_size,
                in_place=consume_logits,
                expected_upstream=expected_upstream,
            )
    cos = _hidden_cosine(student_hidden, batch, projection, row_mask) if cfg.alpha_cos > 0 else zero
    total = logit_total + cfg.alpha_cos * cos
    parts = {name: v.detach().float() for name, v in zip(COMPONENTS, (total, kl, mlm, cos), strict=True)}
    return total, parts


def _hidden_cosine(
    student_hidden: torch.Tensor | None, batch: dict, projection: nn.Module | None, row_mask: torch.Tensor
) -> torch.Tensor:
    """The cosine loss between the student's last hidden states (projected to the teacher's width) and
    the stored ones."""
    if student_hidden is None or "hidden" not in batch:
        raise ValueError("alpha_cos > 0 needs the store's hidden states (precompute with --hidden)")
    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    if projection is not None:
        s_h = projection(s_h)
    t_h = batch["hidden"].reshape(-1, batch["hidden"].shape[-1]).to(s_h.dtype)
    return cosine_loss(s_h, t_h, row_mask=row_mask)


def _exact_kl_mlm(cfg, logits, batch, teacher_head, row_mask, labels, vocab_size):
    """LossParts against the full distribution the teacher's head recomputes from the stored hidden states
    (pad rows are masked out: their teacher logits are computed with their chunk but never read)."""
    if teacher_head is None or "hidden" not in batch:
        raise ValueError("kl_source 'exact' needs the store's hidden states and the teacher's MLM head")
    return exact_distillation_losses(
        logits, batch["hidden"].reshape(-1, batch["hidden"].shape[-1]), teacher_head, cfg.temperature,
        row_mask=row_mask, mlm_labels=labels, weights=(cfg.alpha_kl, cfg.alpha_mlm), vocab_size=vocab_size,
    )  # fmt: skip
