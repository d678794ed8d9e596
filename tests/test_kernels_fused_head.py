"""The fused LM head (`fused_linear_distillation_losses`): against the unfused dense formulas, under autocast,
with its weight gradient accumulated in fp32, and with a backward that never reads the weight (what ZeRO-3
needs: the gathered weight is released after the forward)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels import BACKENDS, dense_losses, make_case, small_chunks  # noqa: E402

import offline_kd.kernels as K  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, request.param)
    return request.param


def _head(N, H, V, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    return h, W, b


def _dense_grads(h, W, b, ids, tz, T, mask, lse, labels, weights):
    """The unfused oracle in fp32: logits materialised, dense formulas."""
    leaves = [x.float().requires_grad_(True) for x in (h, W, b)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    kl, ce = dense_losses(logits, ids, tz, T, mask, lse, labels)
    total = weights[0] * kl + weights[1] * ce
    return kl, ce, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
def test_fused_linear_matches_unfused(backend, monkeypatch, dtype, tail):
    N, H, V, k, T = 13, 16, 1001, 8, 2.0
    small_chunks(monkeypatch, V)
    h, W, b = _head(N, H, V, dtype)
    _, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=6)
    lse_arg = lse if tail else None
    leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
    parts = K.fused_linear_distillation_losses(
        *leaves, ids, tz, T, mask, lse_arg, labels, weights=(0.3, 0.9), chunk_rows=4
    )
    grads = torch.autograd.grad(2.0 * parts.total, leaves)
    for x, leaf in zip(grads, leaves, strict=True):
        assert x.dtype == dtype and x.shape == leaf.shape
    kl_d, ce_d, grads_d = _dense_grads(h, W, b, ids, tz, T, mask, lse_arg, labels, (0.3, 0.9))
    # bf16: the logits themselves are a bf16 matmul, so compare loosely
    ltol = 2e-5 if dtype == torch.float32 else 2e-2
    gtol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(parts.kl, kl_d.detach(), rtol=ltol, atol=1e-5)
    torch.testing.assert_close(parts.mlm, ce_d.detach(), rtol=ltol, atol=1e-5)
    for x, y in zip(grads, grads_d, strict=True):
        torch.testing.assert_close(x.float(), 2.0 * y, rtol=gtol, atol=gtol * float(y.abs().max()) * 2)


def test_fused_linear_without_bias_and_only_hidden_grad(backend):
    N, H, V, k, T = 6, 8, 300, 4, 1.0
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 3, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g)
    _, ids, tz, _, _, labels = make_case(N, V, k, torch.float32, T, seed=8)
    parts = K.fused_linear_distillation_losses(h, W, None, ids, tz, T, mlm_labels=labels, chunk_rows=5)
    (gh,) = torch.autograd.grad(parts.total, h)
    hf = h.detach().reshape(N, H).requires_grad_(True)
    kl_d, ce_d = dense_losses(hf @ W.t(), ids, tz, T, None, None, labels)
    (gh_d,) = torch.autograd.grad(kl_d + ce_d, hf)
    torch.testing.assert_close(parts.kl, kl_d.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gh.reshape(N, H), gh_d, rtol=1e-4, atol=1e-6)


def test_fused_head_under_autocast_with_fp32_weights(backend):
    """A bf16 hidden state (what autocast hands the head) with fp32 weights and bias: the losses match the
    unfused head under the same autocast, and each gradient comes back in its input's dtype."""
    N, H, V, k, T = 24, 32, 500, 8, 2.0
    h, W, b = _head(N, H, V, torch.float32, seed=9)
    h = h.bfloat16()
    _, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=9)
    leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = K.fused_linear_distillation_losses(
            *leaves, ids, tz, T, mask, lse, labels, weights=(5.0, 2.0), chunk_rows=7
        )
    grads = torch.autograd.grad(parts.total, leaves)
    assert [x.dtype for x in grads] == [torch.bfloat16, torch.float32, torch.float32]
    ref = [x.clone().requires_grad_(True) for x in (h, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(*ref)
    assert logits.dtype == torch.bfloat16
    kl_r, ce_r = dense_losses(logits.float(), ids, tz, T, mask, lse, labels)
    grads_r = torch.autograd.grad(5.0 * kl_r + 2.0 * ce_r, ref)
    torch.testing.assert_close(parts.kl, kl_r.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts.mlm, ce_r.detach(), rtol=1e-4, atol=1e-5)
    for x, y in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2 * float(y.abs().max()))


def test_fused_head_weight_gradient_is_accumulated_in_fp32(monkeypatch):
    """64 chunks of bf16 products summed into the weight gradient: accumulated in fp32 and rounded to bf16
    once, it is within bf16 rounding of the exact gradient; a bf16 running sum (checked here to be measurably
    worse, so the bound can fail) is not. The accumulation is the head's own code, whatever the backend: the
    reference runs it (the interpreter would take minutes over 64 chunks)."""
    monkeypatch.setenv(K.ENV_VAR, "reference")
    N, H, V, k, T = 512, 16, 64, 4, 1.0
    h, W, b = _head(N, H, V, torch.bfloat16, seed=11)
    _, ids, tz, _, _, labels = make_case(N, V, k, torch.float32, T, seed=11)
    leaves = [x.clone().requires_grad_(True) for x in (h, W)]
    parts = K.fused_linear_distillation_losses(*leaves, None, ids, tz, T, mlm_labels=labels, chunk_rows=8)
    gw = torch.autograd.grad(parts.total, leaves)[1]
    assert gw.dtype == torch.bfloat16
    # exact: the bf16 logit gradient the kernels write for the same bf16 logits, products and sum in fp64
    logits = torch.cat([h[i : i + 8] @ W.t() for i in range(0, N, 8)]).requires_grad_(True)
    (g_logits,) = torch.autograd.grad(
        K.distillation_losses(logits, ids, tz, T, mlm_labels=labels).total, logits
    )
    exact = g_logits.double().t() @ h.double()
    err = float((gw.double() - exact).abs().max() / exact.abs().max())
    running = torch.zeros(V, H, dtype=torch.bfloat16)
    for i in range(0, N, 8):
        running += g_logits[i : i + 8].t() @ h[i : i + 8]
    err_bf16 = float((running.double() - exact).abs().max() / exact.abs().max())
    assert err < 2**-8, (err, err_bf16)
    assert err_bf16 > 2 * err, (err, err_bf16)


def test_fused_head_backward_never_reads_the_weight(backend):
    """ZeRO-3 releases a gathered weight after the forward (its .data becomes an empty tensor): the fused
    head's backward must still give the gradients of a normal run."""
    N, H, V, k, T = 10, 8, 200, 4, 2.0
    h, W, b = _head(N, H, V, torch.float32, seed=12)
    _, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=12)
    runs = []
    for release in (False, True):
        leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
        parts = K.fused_linear_distillation_losses(*leaves, ids, tz, T, mask, lse, labels, chunk_rows=3)
        if release:
            leaves[1].data = torch.empty(0)
        runs.append(torch.autograd.grad(0.5 * parts.total, leaves))
    for x, y in zip(*runs, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_fused_head_without_grad_computes_the_losses_only(backend):
    N, H, V, k, T = 6, 8, 100, 4, 2.0
    h, W, b = _head(N, H, V, torch.float32, seed=13)
    _, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=13)
    with torch.no_grad():
        parts = K.fused_linear_distillation_losses(
            h.requires_grad_(True), W, b, ids, tz, T, mask, lse, labels, chunk_rows=4
        )
    kl_d, ce_d = dense_losses(h.detach() @ W.t() + b, ids, tz, T, mask, lse, labels)
    torch.testing.assert_close(parts.kl, kl_d, rtol=2e-5, atol=1e-6)
    assert not parts.total.requires_grad
