"""The DistilBERT triple loss, ``alpha_kl·KL + alpha_mlm·MLM + alpha_cos·cosine``, from stored teacher signals.

All the loss math lives in `offline_kd.kernels`; this module selects the rows, picks the stored
temperature and weighs the components.

* KL: ``T²·KL(teacher_T ‖ student_T)`` on the teacher's top-k ids. Tail-aware by default: the
  stored full-vocabulary ``lse`` at ``T`` gives the teacher's exact top-k probabilities and its
  tail mass; ``kl_tail=False`` renormalises the top-k instead.
* MLM: cross-entropy at ``T = 1`` against ``input_ids`` at the masked positions.
* cosine: ``1 - cos`` between the student's last hidden state (through the optional learned
  projection) and the teacher's stored one.

KL and cosine run over every non-pad token (as DistilBERT does), or only over the masked ones
with ``restrict_kl_to_mask``.
"""

from __future__ import annotations

import torch
from torch import nn

from offline_kd.kernels import cosine_loss, distillation_logit_losses
from offline_kd.settings import LossConfig

__all__ = ["COMPONENTS", "LossConfig", "distillation_loss"]

COMPONENTS = ("loss", "kl", "mlm", "cos")


def distillation_loss(
    cfg: LossConfig,
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    projection: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (total loss, detached components) for one micro-batch.

    `student_logits` [B, L, V], `student_hidden` [B, L, Hs]; `batch` as produced by
    `offline_kd.reader`: attention_mask, mlm_mask, labels [B, L], topk_ids / topk_logits [B, L, K],
    optional lse [B, L] (at cfg.temperature) and hidden [B, L, H].
    """
    keep = batch["attention_mask"].reshape(-1).bool()
    idx = keep.nonzero(as_tuple=True)[0]
    logits = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, idx)
    k = batch["topk_ids"].shape[-1]
    t_ids = batch["topk_ids"].reshape(-1, k).index_select(0, idx)
    t_logits = batch["topk_logits"].reshape(-1, k).index_select(0, idx)
    labels = batch["labels"].reshape(-1).index_select(0, idx)
    row_mask = batch["mlm_mask"].reshape(-1).index_select(0, idx).bool() if cfg.restrict_kl_to_mask else None
    lse = None
    if cfg.kl_tail:
        lse = batch["lse"].reshape(-1).index_select(0, idx)
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if cfg.alpha_kl > 0 or cfg.alpha_mlm > 0:
        # The kernels' second output is the MLM cross-entropy at T = 1 (None without labels).
        kl, mlm = distillation_logit_losses(
            logits,
            t_ids,
            t_logits,
            cfg.temperature,
            row_mask=row_mask,
            teacher_lse=lse,
            mlm_labels=labels if cfg.alpha_mlm > 0 else None,
        )
        if mlm is None:
            mlm = zero
    else:
        kl, mlm = zero, zero
    cos = zero
    if cfg.alpha_cos > 0:
        if student_hidden is None or "hidden" not in batch:
            raise ValueError("alpha_cos > 0 needs the store's hidden states (precompute with --hidden)")
        s_h = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
        if projection is not None:
            s_h = projection(s_h)
        t_h = batch["hidden"].reshape(-1, batch["hidden"].shape[-1]).index_select(0, idx).to(s_h.dtype)
        cos = cosine_loss(s_h, t_h, row_mask=row_mask)
    total = cfg.alpha_kl * kl + cfg.alpha_mlm * mlm + cfg.alpha_cos * cos
    parts = {name: v.detach().float() for name, v in zip(COMPONENTS, (total, kl, mlm, cos), strict=True)}
    return total, parts
