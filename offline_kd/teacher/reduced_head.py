"""The stored teacher head as training runs it: reduced-precision inputs, fp32 accumulation, padded rows.

The exact KL recomputes the teacher's full-vocabulary logits from the stored hidden states at every step, so
the head's decoder ([V, H] per token: 47 MFLOP at bert-base) is part of every step's cost. In fp32 on a GPU
(no tensor cores) it would cost more than the whole bf16 teacher forward that offline KD saves. Here:

* **precision**: both matmuls take fp16 (default) or bf16 inputs and accumulate in fp32, returning fp32
  logits (tensor cores on a GPU; on a CPU the same rounding of the inputs, then an fp32 product, so the
  numbers are the GPU's up to summation order). The activation and the LayerNorm run in fp32. fp16 keeps
  3 more mantissa bits than bf16 and the head's inputs (LayerNorm outputs, weights of order 0.05, stored
  fp16 hidden states) sit well inside its range; `float32` keeps the fp32 head. The cost to fidelity is
  measured in docs/results.md ("Reduced-precision teacher head").
* **padding**: the decoder's rows are padded with zeros to a multiple of 64, so each logits row starts on
  a 256-byte boundary and the loss kernels load 128-bit vectors; the loss reads the first V columns only.
* **rows**: `features` runs the transform once per micro-batch on the rows given (the trainer gives the
  rows that count for a loss only: padding never goes through the head), `logits` the decoder per chunk.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

HEAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROW_MULTIPLE = 64


def padded_rows(n: int, multiple: int = ROW_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class ReducedPrecisionHead:
    """``logits = decoder(layer_norm(act(dense(hidden))))`` of an :class:`~offline_kd.teacher.head.MLMHead`
    with the matmuls' inputs in ``dtype``, fp32 accumulation and output, and the decoder padded to a
    multiple of 64 rows. Callable on ``[n, H]`` hidden states (``[n, V_padded]`` fp32 logits), or in two
    steps: ``logits(features(hidden))``. A constant: no gradients."""

    def __init__(self, head: nn.Module, dtype: torch.dtype = torch.float16, device=None):
        device = torch.device(device) if device is not None else head.decoder.weight.device
        self.dtype, self.device = dtype, device
        self.vocab_size = int(head.decoder.out_features)
        self.act, self.eps = head.act, float(head.layer_norm.eps)
        with torch.no_grad():
            self.dense_w = self._matmul_weight(head.dense.weight, device)
            self.dense_b = head.dense.bias.detach().float().to(device)
            self.ln_w = head.layer_norm.weight.detach().float().to(device)
            self.ln_b = head.layer_norm.bias.detach().float().to(device)
            vp = padded_rows(self.vocab_size)
            dec_w = torch.zeros(vp, head.decoder.in_features, dtype=torch.float32, device=device)
            dec_w[: self.vocab_size] = head.decoder.weight.detach().float()
            self.dec_w = self._matmul_weight(dec_w, device)
            self.dec_b = torch.zeros(vp, dtype=torch.float32, device=device)
            self.dec_b[: self.vocab_size] = head.decoder.bias.detach().float()

    def _matmul_weight(self, w: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The weight as the matmuls read it: in ``dtype`` on a GPU; on a CPU, which has no fp32-output
        half-precision matmul, its ``dtype``-rounded values held in fp32 (rounded once, not per call)."""
        rounded = w.detach().to(device=device, dtype=self.dtype)
        return rounded if device.type == "cuda" else rounded.float()

    @property
    def padded_vocab_size(self) -> int:
        return int(self.dec_w.shape[0])

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """fp32 ``x @ w.T + b`` from ``dtype``-rounded inputs, accumulated in fp32."""
        x = x.to(self.dtype)
        if w.dtype == torch.float32:  # CPU (or the fp32 head): the rounded inputs, an fp32 product
            return torch.addmm(b, x.float(), w.t())
        try:  # tensor cores: half-precision inputs, fp32 accumulation and output
            return torch.mm(x, w.t(), out_dtype=torch.float32).add_(b)
        except (RuntimeError, TypeError, NotImplementedError) as e:  # a torch without mm's out_dtype
            warnings.warn(
                f"the teacher head's {self.dtype} matmul with fp32 output is unavailable ({e}); it runs in fp32",
                RuntimeWarning,
                stacklevel=2,
            )
            decoder = w is self.dec_w
            self.dense_w, self.dec_w = self.dense_w.float(), self.dec_w.float()  # once: the same values
            return torch.addmm(b, x.float(), (self.dec_w if decoder else self.dense_w).t())

    @torch.no_grad()
    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's input for ``hidden [n, H]``: ``layer_norm(act(dense(hidden)))`` [n, H'], rounded
        once to ``dtype`` here rather than in every chunk's matmul."""
        with torch.autocast(hidden.device.type, enabled=False):
            x = self.act(self._linear(hidden.to(self.device), self.dense_w, self.dense_b))
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], self.ln_w, self.ln_b, self.eps)
            return x.to(self.dtype)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """fp32 ``[n, V_padded]`` logits of ``features`` (from :meth:`features`); columns >= V are bias 0."""
        with torch.autocast(features.device.type, enabled=False):
            return self._linear(features, self.dec_w, self.dec_b)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(hidden))

    def parameters(self):
        """The head's tensors (what `offline_kd.kernels.dense.head_dtype` and device queries look at)."""
        yield from (self.dense_w, self.dense_b, self.ln_w, self.ln_b, self.dec_w, self.dec_b)
