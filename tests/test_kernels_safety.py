"""Memory safety and autograd contracts of the loss kernels, on both backends: out-of-range teacher ids and MLM
labels, padded vocabularies, the gradient written over the logits, once-differentiable Functions."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels import BACKENDS, dense_losses, make_case  # noqa: E402

import offline_kd.kernels as K  # noqa: E402
from offline_kd.kernels import _common  # noqa: E402

V, N, k, T = 200, 6, 4, 2.0


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, request.param)
    return request.param


def _both_apis(s, ids, tz, lse, labels, **kw):
    """(kl, ce, gradient) from each entry point."""
    out = []
    leaf = s.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(leaf, ids, tz, T, None, lse, labels, **kw)
    (g,) = torch.autograd.grad(kl + ce, leaf)
    out.append((kl.detach(), ce.detach(), g))
    leaf = s.clone().requires_grad_(True)
    parts = K.distillation_losses(leaf * 1.0, ids, tz, T, None, lse, labels, in_place=True, **kw)
    (g,) = torch.autograd.grad(parts.total, leaf)
    out.append((parts.kl, parts.mlm, g))
    return out


# ------------------------------------------------------------------------------------ out-of-range inputs
@pytest.mark.parametrize("bad", ["id=V", "id=V+100", "label=V", "label=-5"])
def test_out_of_range_inputs_raise_the_same_error_on_both_backends(backend, bad):
    """CPU tensors (a free check): a ValueError naming the row, before any kernel runs."""
    s, ids, tz, lse, _, labels = make_case(N, V, k, torch.float32, T, seed=1)
    ids, labels = ids.clone(), labels.clone()
    if bad.startswith("id"):
        ids[3, 1] = V if bad == "id=V" else V + 100
        match = r"teacher_ids\[3, 1\] = \d+ is outside the student's vocabulary \[0, 200\)"
    else:
        labels[5] = V if bad == "label=V" else -5
        match = r"mlm_labels\[5\] = -?\d+ is outside the student's vocabulary \[0, 200\)"
    for call in (K.distillation_logit_losses, K.distillation_losses):
        with pytest.raises(ValueError, match=match):
            call(s.clone().requires_grad_(True), ids, tz, T, None, lse, labels)


def test_out_of_range_inputs_on_an_accelerator_give_nan_and_touch_nothing_outside_the_row(monkeypatch):
    """Where checking would cost a host synchronisation (an accelerator, simulated here by turning the host
    check off), an out-of-range id makes its row's KL NaN and a label >= V its row's CE NaN; neither backend
    reads or writes outside the row (the logits are a view into a wider buffer whose extra columns would be
    hit), and both give the same losses and gradients."""
    monkeypatch.setattr(_common, "host_checks", lambda t: False)
    s, ids, tz, lse, _, labels = make_case(N, V, k, torch.float32, T, seed=2)
    ids, labels = ids.clone(), labels.clone()
    ids[1, 0] = V  # next to the row's end: the old kernels read and wrote column V, the next row's first
    labels[3] = V + 1
    labels[5] = -5
    results = {}
    for b in BACKENDS:
        monkeypatch.setenv(K.ENV_VAR, b)
        wide = torch.full((N, V + 8), 7.0)
        wide[:, :V] = s
        leaf = wide.clone().requires_grad_(True)
        kl, ce = K.distillation_logit_losses(leaf[:, :V], ids, tz, T, None, lse, labels)
        (g,) = torch.autograd.grad(kl + ce, leaf)
        assert (g[:, V:] == 0).all(), b
        leaf2 = wide.clone().requires_grad_(True)
        x = leaf2 * 1.0
        parts = K.distillation_losses(x[:, :V], ids, tz, T, None, lse, labels, in_place=True)
        assert (x.detach()[:, V:] == 7.0).all(), b
        (g2,) = torch.autograd.grad(parts.total, leaf2)
        assert (g2[:, V:] == 0).all(), b
        assert torch.isnan(kl) and torch.isnan(ce) and torch.isnan(parts.kl) and torch.isnan(parts.mlm), b
        assert torch.isnan(g[1, :V]).all() and torch.isfinite(g[[0, 2, 3, 4, 5]]).all(), b
        results[b] = (g, g2)
    for x, y in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, equal_nan=True)


# ---------------------------------------------------------------------------------------- padded vocabulary
@pytest.mark.parametrize("entry", ["logit_losses", "losses"])
def test_padded_vocabulary_columns_get_no_probability_and_no_gradient(backend, entry):
    """Logits padded to a multiple of 64 (a student whose embeddings were resized): with vocab_size the
    padding columns, whatever their values, change neither the losses nor the vocabulary's gradient, and
    receive a zero gradient."""
    Vp = 256
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.bfloat16, T, seed=3)
    wide = torch.full((N, Vp), 50.0, dtype=torch.bfloat16)  # far above every real logit
    wide[:, :V] = s
    leaf = wide.clone().requires_grad_(True)
    if entry == "logit_losses":
        kl, ce = K.distillation_logit_losses(leaf, ids, tz, T, mask, lse, labels, vocab_size=V)
        (g,) = torch.autograd.grad(kl + 0.5 * ce, leaf)
    else:
        parts = K.distillation_losses(leaf * 1.0, ids, tz, T, mask, lse, labels, (1.0, 0.5), vocab_size=V)
        kl, ce = parts.kl, parts.mlm
        (g,) = torch.autograd.grad(parts.total, leaf)
    assert (g[:, V:] == 0).all()
    sf = s.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, mask, lse, labels)
    (g_d,) = torch.autograd.grad(kl_d + 0.5 * ce_d, sf)
    torch.testing.assert_close(kl.detach(), kl_d.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(ce.detach(), ce_d.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(g[:, :V].float(), g_d, rtol=1e-2, atol=1e-3 * float(g_d.abs().max()))
    with pytest.raises(ValueError, match="vocab_size"):
        K.distillation_logit_losses(leaf, ids, tz, T, vocab_size=Vp + 1)


# ------------------------------------------------------------------------------- gradient in the forward
def test_in_place_gradient_overwrites_the_logits_and_refuses_their_other_users(backend):
    """in_place: the logits' storage holds the gradient afterwards (no second [N, V] buffer), and anything
    else that saved the logits for its backward refuses to run instead of reading the gradient."""
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=4)
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1.0
    parts = K.distillation_losses(logits, ids, tz, T, mask, lse, labels, weights=(2.0, 1.0), in_place=True)
    (g,) = torch.autograd.grad(parts.total, leaf)
    assert torch.equal(logits.detach(), g)  # d(leaf * 1)/d leaf = 1: the logits now hold their gradient
    sf = s.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, mask, lse, labels)
    (g_d,) = torch.autograd.grad(2.0 * kl_d + ce_d, sf)
    torch.testing.assert_close(g, g_d, rtol=1e-4, atol=1e-6)

    logits = leaf * 1.0
    squared = (logits * logits).sum()  # saves `logits` itself for its backward
    K.distillation_losses(logits, ids, tz, T, mask, lse, labels, in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(squared, leaf)


def test_without_grad_nothing_is_written(backend):
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=5)
    logits = s.clone().requires_grad_(True)
    with torch.no_grad():
        parts = K.distillation_losses(logits, ids, tz, T, mask, lse, labels, in_place=True)
    assert torch.equal(logits.detach(), s)
    kl_d, ce_d = dense_losses(s, ids, tz, T, mask, lse, labels)
    torch.testing.assert_close(parts.kl, kl_d, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(parts.mlm, ce_d, rtol=2e-5, atol=1e-5)
    frozen = s.clone()
    K.distillation_losses(frozen, ids, tz, T, mask, lse, labels, in_place=True)  # requires no grad
    assert torch.equal(frozen, s)


def test_gradient_in_the_forward_serves_one_backward(backend):
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=6)
    leaf = s.clone().requires_grad_(True)
    parts = K.distillation_losses(leaf, ids, tz, T, mask, lse, labels)
    torch.autograd.grad(parts.total, leaf, retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward only"):
        torch.autograd.grad(parts.total, leaf)


# ------------------------------------------------------------------------------------- once differentiable
def test_functions_are_once_differentiable(backend):
    """The backward is not itself differentiable: a double backward raises instead of silently giving a
    wrong second derivative."""
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=7)
    w = torch.tensor(1.5, requires_grad=True)  # an upstream gradient that itself requires grad
    leaf = s.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(leaf, ids, tz, T, mask, lse, labels)
    (g,) = torch.autograd.grad(w * (kl + ce), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    if backend == "triton":  # the reference cosine is plain autograd, differentiable twice for real
        h = torch.randn(N, 16, requires_grad=True)
        (gh,) = torch.autograd.grad(w * K.cosine_loss(h, torch.randn(N, 16)), h, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gh.sum().backward()


@pytest.mark.parametrize("upstream", [0.25, 0.5])
def test_expected_upstream_is_folded_into_the_forward(backend, upstream):
    """DeepSpeed backpropagates 1 / accumulation steps into the loss: told so, the forward writes the
    gradient already scaled; an upstream other than the expected one is still applied exactly."""
    s, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=8)
    leaf = s.clone().requires_grad_(True)
    parts = K.distillation_losses(
        leaf * 1.0, ids, tz, T, mask, lse, labels, (2.0, 1.0), expected_upstream=0.25
    )
    (g,) = torch.autograd.grad(parts.total * upstream, leaf)
    sf = s.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, mask, lse, labels)
    (g_d,) = torch.autograd.grad(2.0 * kl_d + ce_d, sf)
    torch.testing.assert_close(parts.kl, kl_d.detach(), rtol=2e-5, atol=1e-5)  # the losses are not scaled
    torch.testing.assert_close(g, upstream * g_d, rtol=1e-4, atol=1e-7)
