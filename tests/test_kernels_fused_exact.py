"""The fused output layer with the exact source (`fused_linear_exact_losses`) and the teacher head as training
runs it (`ReducedPrecisionHead`): against the unfused textbook formulas over dtypes, temperatures, padded
vocabularies and chunk sizes, for the Triton kernel (interpreted) and the reference; the dense kernels'
gradient written over the logits themselves; the reduced head against the fp32 one."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels_dense import dense_formula  # noqa: E402

import offline_kd.kernels as K  # noqa: E402
from offline_kd.kernels import dense_kl, dense_reference  # noqa: E402
from offline_kd.teacher.head import build_head  # noqa: E402
from offline_kd.teacher.reduced_head import ReducedPrecisionHead  # noqa: E402

BACKENDS = ["triton", "reference"]
H, V_TRUE = 16, 1001


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, request.param)
    monkeypatch.setattr(dense_reference, "CHUNK_ELEMS", 2 * 1024 + 1)  # the reference's chunk loop runs
    return request.param


def _teacher_head(seed=3):
    torch.manual_seed(seed)
    head = build_head(dict(hidden_size=H, vocab_size=V_TRUE, activation="gelu", layer_norm_eps=1e-12))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return head


def _case(N, width, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(width, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(width, generator=g) * 0.1).to(dtype)
    t_hidden = (torch.randn(N, H, generator=g) * 2).half()  # the stored fp16 hidden states
    mask = torch.ones(N, dtype=torch.bool)
    mask[1::4] = False
    labels = torch.randint(0, V_TRUE, (N,), generator=g)
    labels[::3] = -100
    return h, W, b, t_hidden, mask, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1.0, 2.0, 3.7])
@pytest.mark.parametrize("width", [V_TRUE, 1024], ids=["unpadded", "padded"])
def test_fused_exact_matches_unfused(backend, dtype, T, width):
    N, w = 11, (5.0, 2.0)
    teacher = ReducedPrecisionHead(_teacher_head(), torch.float32)
    h, W, b, t_hidden, mask, labels = _case(N, width, dtype)
    vocab = V_TRUE if width != V_TRUE else None
    feats = teacher.features(t_hidden)
    leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
    parts = K.fused_linear_exact_losses(
        *leaves, lambda a, b_: teacher.logits(feats[a:b_]), T, mask, labels, w, chunk_rows=4, vocab_size=vocab
    )
    grads = torch.autograd.grad(1.5 * parts.total, leaves)
    for x, leaf in zip(grads, leaves, strict=True):
        assert x.dtype == dtype and x.shape == leaf.shape
    # the oracle: logits materialised in fp32 from the same inputs, autograd through the textbook formulas
    ref = [x.float().requires_grad_(True) for x in (h, W, b)]
    logits = ref[0] @ ref[1].t() + ref[2]
    total, kl, mlm, g_logits = dense_formula(logits, teacher(t_hidden), T, mask, labels, w, vocab=vocab)
    g_ref = torch.autograd.grad(logits, ref, g_logits)
    ltol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(parts.kl, kl, rtol=ltol, atol=1e-5)
    torch.testing.assert_close(parts.mlm, mlm, rtol=ltol, atol=1e-5)
    gtol = 2e-4 if dtype == torch.float32 else 5e-2
    for x, y in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(x.float(), 1.5 * y, rtol=gtol, atol=gtol * float(y.abs().max()) * 2)


def test_fused_exact_without_grad_and_with_nothing_to_learn(backend):
    N = 6
    teacher = ReducedPrecisionHead(_teacher_head(), torch.float32)
    h, W, b, t_hidden, mask, labels = _case(N, V_TRUE, torch.float32, seed=8)
    feats = teacher.features(t_hidden)
    with torch.no_grad():
        parts = K.fused_linear_exact_losses(
            h.requires_grad_(True), W, b, lambda a, b_: teacher.logits(feats[a:b_]), 2.0, mask, labels,
            chunk_rows=4,
        )  # fmt: skip
    assert not parts.total.requires_grad
    _, kl, _, _ = dense_formula(h.detach() @ W.t() + b, teacher(t_hidden), 2.0, mask, labels)
    torch.testing.assert_close(parts.kl, kl, rtol=2e-5, atol=1e-6)


def test_fused_exact_backward_never_reads_the_weight(backend):
    """What ZeRO-3 needs: the gathered weight released after the forward leaves the gradients unchanged."""
    teacher = ReducedPrecisionHead(_teacher_head(), torch.float32)
    h, W, b, t_hidden, mask, labels = _case(9, V_TRUE, torch.float32, seed=9)
    feats = teacher.features(t_hidden)
    runs = []
    for release in (False, True):
        leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
        parts = K.fused_linear_exact_losses(
            *leaves, lambda a, b_: teacher.logits(feats[a:b_]), 2.0, mask, labels, chunk_rows=4
        )
        if release:
            leaves[1].data = torch.empty(0)
        runs.append(torch.autograd.grad(parts.total, leaves))
    for x, y in zip(*runs, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "rows_fn", [dense_kl.dense_kl_ce_rows, dense_reference.dense_kl_ce_rows], ids=BACKENDS
)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_dense_rows_gradient_written_over_the_student_logits(monkeypatch, rows_fn, T):
    """grad = s (what the fused head does): the same losses and gradient as into a separate buffer, the label
    entries included (read before the row is overwritten)."""
    monkeypatch.setattr(dense_reference, "CHUNK_ELEMS", 2 * 300 + 1)
    g = torch.Generator().manual_seed(4)
    n, V = 9, 300
    s = torch.randn(n, V, generator=g) * 3
    t = torch.randn(n, V, generator=g) * 3
    sel = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.int8)
    labels = torch.tensor([5, -1, 7, 299, -1, 0, 12, -1, 150])
    coef = torch.tensor([0.3, 0.8])
    outs = []
    for in_place in (False, True):
        x = s.clone()
        grad = x if in_place else torch.empty_like(x)
        kl, ce = torch.empty(n), torch.empty(n)
        rows_fn(x, t, sel, labels, coef, T, grad, kl, ce)
        outs.append((grad.clone(), kl, ce))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool((outs[0][0][[4, 7]] == 0).all())  # rows that count for nothing get a zero gradient


# ------------------------------------------------------------------------------------- the reduced head
def test_reduced_head_float32_is_the_stored_head():
    head = _teacher_head()
    x = torch.randn(7, H).half()
    fast = ReducedPrecisionHead(head, torch.float32)
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == (7, 1024)  # padded to a multiple of 64
    with torch.no_grad():
        want = head(x.float())
    torch.testing.assert_close(got[:, :V_TRUE], want, rtol=1e-6, atol=1e-6)
    assert bool((got[:, V_TRUE:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_head_rounds_the_inputs_and_accumulates_in_fp32(dtype):
    """The reduced head's logits are the fp32 product of the dtype-rounded inputs (what tensor cores compute
    up to summation order), not the fp32 head's and not a dtype-rounded output."""
    head = _teacher_head()
    x = torch.randn(5, H).half()
    got = ReducedPrecisionHead(head, dtype)(x)[:, :V_TRUE]
    with torch.no_grad():
        f = torch.nn.functional
        y = head.act(f.linear(x.to(dtype).float(), head.dense.weight.to(dtype).float(), head.dense.bias))
        y = head.layer_norm(y)
        want = f.linear(y.to(dtype).float(), head.decoder.weight.to(dtype).float(), head.decoder.bias)
        exact = head(x.float())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert float((got - exact).abs().max()) > 1e-4  # the rounding is real, so the check above could fail
    assert float((got - want.to(dtype).float()).abs().max()) > 0  # and the output is not rounded to dtype


def test_reduced_head_without_an_fp32_output_matmul_falls_back_to_the_same_values():
    """Half-precision weights on a device whose torch has no fp32-output half matmul (this CPU's, forced): one
    warning, then the same logits from the same rounded values multiplied in fp32."""
    head = _teacher_head()
    x = torch.randn(4, H).half()
    fast = ReducedPrecisionHead(head, torch.float16)
    want = fast(x)
    fast.dense_w, fast.dec_w = fast.dense_w.half(), fast.dec_w.half()  # what a GPU holds
    with pytest.warns(RuntimeWarning, match="runs in fp32"):
        got = fast(x)
    assert torch.equal(got, want) and fast.dec_w.dtype == torch.float32
