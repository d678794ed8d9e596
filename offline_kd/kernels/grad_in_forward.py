"""The autograd pattern of losses whose gradient is computed in the forward (as Liger-Kernel does).

A weighted sum of losses with weights known at forward time has one gradient per input; writing it in the
same pass that computes the losses saves the backward's second read of the logits and leaves one [N, V]
buffer, the gradient, as the only large allocation. The backward then only multiplies it by the upstream
scalar, in place, and on the device (no host sync to test whether that scalar is 1).

`GradInForward.apply(student, compute, scale_)`:

* `compute(student, need_grad) -> (total, parts, grad)`: the weighted total (0-dim fp32), a tuple of detached
  components for logging, and d total / d student (None when `need_grad` is False). Everything else the
  losses read (teacher tensors, labels, weights) lives in the closure: constants to autograd.
* `scale_(grad, upstream) -> grad`: multiplies in place by the upstream gradient of `total`.

Returns `(total, *parts)`; only `total` is differentiable. The buffer is handed to the first backward and
dropped: a second backward through the same graph raises instead of reusing a scaled buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

Compute = Callable[[torch.Tensor, bool], tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]]
Scale = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, compute: Compute, scale_: Scale):
        total, parts, grad = compute(student, ctx.needs_input_grad[0])
        ctx.grad, ctx.scale_ = grad, scale_
        ctx.mark_non_differentiable(*parts)
        return (total, *parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total: torch.Tensor, *unused: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "this loss's gradient was computed in its forward and serves one backward only; "
                "run the loss again instead of retain_graph=True"
            )
        return ctx.scale_(grad, g_total), None, None
