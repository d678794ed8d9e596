"""The student's output layer handed to the fused loss instead of applied by the model.

A masked LM ends with its output layer (`get_output_embeddings()`: DistilBERT's ``vocab_projector``, BERT's
``cls.predictions.decoder``, RoBERTa's ``lm_head.decoder``), a Linear from the head's features to the
(padded) vocabulary. The fused loss (`offline_kd.kernels.fused_head`) applies that Linear itself, chunk by
chunk of rows, so the model must return the Linear's *input*: within `features_instead_of_logits`, the
layer's forward is the identity. The module tree is untouched, so DeepSpeed, the checkpoints and the export
see the same model as ever. `fusable` checks, once before training, that the model's logits really are that
Linear applied to what it reads last (a model that post-processes its logits cannot be fused).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain Linear (the only kind the fused loss applies), else None."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return layer if type(layer) is nn.Linear else None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def features_instead_of_logits(layer: nn.Linear):
    """Within: `layer` returns its input, so the model's ``logits`` are the output layer's features. Its hooks
    still run (ZeRO-3 gathers and releases its parameters as usual)."""
    layer.forward = _identity
    try:
        yield layer
    finally:
        del layer.forward


@torch.no_grad()
def fusable(model: nn.Module, vocab_size: int, tokens: int = 8) -> str | None:
    """None when the model's logits are its output layer applied to the features it returns within
    `features_instead_of_logits`, on a probe input; else why not."""
    layer = output_layer(model)
    if layer is None:
        found = (
            type(model.get_output_embeddings()).__name__ if hasattr(model, "get_output_embeddings") else None
        )
        return f"its output layer is a {found}, not a Linear"
    was_training = model.training
    model.eval()
    try:
        ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        ids = ids.to(layer.weight.device)
        mask = torch.ones_like(ids)
        want = model(input_ids=ids, attention_mask=mask, return_dict=True).logits.float()
        with features_instead_of_logits(layer):
            feats = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
        got = layer(feats).float() if feats.shape[-1] == layer.in_features else None
    finally:
        model.train(was_training)
    if got is None or got.shape != want.shape:
        return "its logits are not its output layer applied to the features before it"
    diff = float((got - want).abs().max())
    if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
        return f"its logits differ from its output layer on its features by {diff:.3g}"
    return None
