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

from dataclasses import dataclass

import torch
from torch import nn

from offline_kd.kernels import (
    cosine_loss,
    distillation_losses,
    exact_distillation_losses,
    fused_linear_distillation_losses,
    fused_linear_exact_losses,
)
from offline_kd.runtime.settings import LossConfig

__all__ = ["COMPONENTS", "FusedHead", "LossConfig", "distillation_loss", "loss_rows"]

COMPONENTS = ("loss", "kl", "mlm", "cos")


@dataclass
class FusedHead:
    """The student's output layer applied inside the loss (`offline_kd.kernels.fused_head`): the logits
    passed to `distillation_loss` are then the layer's input features, and no [N, V] logits exist."""

    weight: torch.Tensor  # [W, H'] (W: the padded vocabulary)
    bias: torch.Tensor | None
    chunk_rows: int | None = None  # rows per chunk (None: about 2^23 logits)


def distillation_loss(
    cfg: LossConfig,
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    projection: nn.Module | None = None,
    vocab_size: int | None = None,
    consume_logits: bool = False,
    expected_upstream: float = 1.0,
    teacher_head=None,
    fused: FusedHead | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (total loss, detached components) for one micro-batch.

    `student_logits` [B, L, W] (with `fused`: the output layer's input [B, L, H']), `student_hidden`
    [B, L, Hs]; `batch` as produced by `offline_kd.train.reader`: attention_mask, mlm_mask, labels [B, L],
    topk_ids / topk_logits [B, L, K] (kl_source topk), optional lse [B, L] (at cfg.temperature) and hidden
    [B, L, H]. `vocab_size`: the vocabulary when the logits are wider (a student whose embeddings are padded
    to a multiple of 64); the padding gets no probability. `consume_logits`: the gradient is written over
    the logits in the forward (the trainer, which does not read them afterwards: no second [B·L, W]
    buffer). `expected_upstream`: the gradient the backward will bring for the total (DeepSpeed: 1 /
    gradient accumulation steps), folded into the logits' gradient in the forward so the backward makes no
    further pass over it (unfused top-k KL; the others scale their gradients in the backward).
    `teacher_head` (kl_source exact): the teacher's MLM head, [c, H] → [c, >= V]
    (`offline_kd.teacher.reduced_head.ReducedPrecisionHead`; the fused path needs its two steps).

    Unfused, every row goes to the kernels as one [B·L, W] view with a row mask (pad tokens count for
    nothing and get zero gradient rows). Fused, only the rows that count for a loss reach either model's
    head.
    """
    keep = batch["attention_mask"].reshape(-1).bool()
    row_mask = keep & batch["mlm_mask"].reshape(-1).bool() if cfg.restrict_kl_to_mask else keep
    zero = student_logits.new_zeros((), dtype=torch.float32)
    logit_total, kl, mlm = zero, zero, zero
    if cfg.alpha_kl > 0 or cfg.alpha_mlm > 0:
        labels = batch["labels"].reshape(-1).masked_fill(~keep, -100) if cfg.alpha_mlm > 0 else None
        exact = cfg.kl_source == "exact" or (cfg.kl_source == "auto" and teacher_head is not None)
        if exact and (teacher_head is None or "hidden" not in batch):
            raise ValueError("kl_source 'exact' needs the store's hidden states and the teacher's MLM head")
        inputs = _LogitInputs(cfg, batch, row_mask, labels, vocab_size, teacher_head if exact else None)
        if fused is not None:
            logit_total, kl, mlm = _fused_kl_mlm(inputs, student_logits, fused)
        else:
            logit_total, kl, mlm = _kl_mlm(inputs, student_logits, consume_logits, expected_upstream)
    cos = _hidden_cosine(student_hidden, batch, projection, row_mask) if cfg.alpha_cos > 0 else zero
    total = logit_total + cfg.alpha_cos * cos
    parts = {name: v.detach().float() for name, v in zip(COMPONENTS, (total, kl, mlm, cos), strict=True)}
    return total, parts


@dataclass
class _LogitInputs:
    """What the KL and MLM losses read besides the student's logits."""

    cfg: LossConfig
    batch: dict[str, torch.Tensor]
    row_mask: torch.Tensor  # [N] rows of the KL
    labels: torch.Tensor | None  # [N] MLM labels, -100 = none
    vocab_size: int | None
    teacher_head: object | None  # the exact source's head, else None (top-k)

    @property
    def weights(self) -> tuple[float, float]:
        return (self.cfg.alpha_kl, self.cfg.alpha_mlm)

    def flat(self, name: str) -> torch.Tensor:
        x = self.batch[name]
        return x.reshape(-1, x.shape[-1])


def _kl_mlm(inp: _LogitInputs, student_logits, consume_logits: bool, expected_upstream: float):
    """The unfused losses: the student's [N, W] logits as the model computed them."""
    cfg, logits = inp.cfg, student_logits.reshape(-1, student_logits.shape[-1])
    if inp.teacher_head is not None:
        return exact_distillation_losses(
            logits, inp.flat("hidden"), inp.teacher_head, cfg.temperature, row_mask=inp.row_mask,
            mlm_labels=inp.labels, weights=inp.weights, vocab_size=inp.vocab_size,
        )  # fmt: skip
    return distillation_losses(
        logits, inp.flat("topk_ids"), inp.flat("topk_logits"), cfg.temperature, row_mask=inp.row_mask,
        teacher_lse=inp.batch["lse"].reshape(-1) if cfg.kl_tail else None, mlm_labels=inp.labels,
        weights=inp.weights, vocab_size=inp.vocab_size, in_place=consume_logits,
        expected_upstream=expected_upstream,
    )  # fmt: skip


def rows_that_count(cfg: LossConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B·L] bool: the rows of a micro-batch that count for the KL or carry an MLM label."""
    keep = batch["attention_mask"].reshape(-1).bool()
    rows = keep & batch["mlm_mask"].reshape(-1).bool() if cfg.restrict_kl_to_mask else keep
    if cfg.alpha_mlm > 0:
        rows = rows | (keep & (batch["labels"].reshape(-1) != -100))
    return rows


def loss_rows(cfg: LossConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The indices of `rows_that_count`: what the fused loss runs on. The trainer computes them on the host
    from the reader's batch (free there) and sends them with it as ``batch["loss_rows"]``, so that the
    device never has to tell the host how many rows there are (a synchronisation per micro-batch)."""
    return rows_that_count(cfg, batch).nonzero().squeeze(1)


def _fused_kl_mlm(inp: _LogitInputs, features: torch.Tensor, fused: FusedHead):
    """The fused losses on the rows that count for one of them only: padding (and, with the KL restricted to
    the masked tokens, unmasked rows) never reaches either head."""
    cfg = inp.cfg
    rows = inp.batch.get("loss_rows")
    if rows is None:  # found here: on a GPU a host synchronisation
        rows = loss_rows(cfg, inp.batch)
    x = features.reshape(-1, features.shape[-1]).index_select(0, rows)
    sel = inp.row_mask.index_select(0, rows)
    labels = inp.labels.index_select(0, rows) if inp.labels is not None else None
    common = dict(
        mlm_labels=labels, weights=inp.weights, chunk_rows=fused.chunk_rows, vocab_size=inp.vocab_size
    )
    if inp.teacher_head is not None:
        head = inp.teacher_head
        t_features = head.features(inp.flat("hidden").index_select(0, rows))
        return fused_linear_exact_losses(
            x, fused.weight, fused.bias, lambda a, b: head.logits(t_features[a:b]), cfg.temperature, sel,
            **common,
        )  # fmt: skip
    lse = inp.batch["lse"].reshape(-1).index_select(0, rows) if cfg.kl_tail else None
    return fused_linear_distillation_losses(
        x, fused.weight, fused.bias, inp.flat("topk_ids").index_select(0, rows),
        inp.flat("topk_logits").index_select(0, rows), cfg.temperature, sel, lse, **common,
    )  # fmt: skip


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
