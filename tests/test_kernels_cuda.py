"""Compiled Triton kernels on a CUDA device against the CPU reference (skipped without one; `make gpu-check`
runs them): the usual shapes, and one call whose logits have more than 2^31 elements (int64 row offsets)."""

from __future__ import annotations

import pytest
import torch
from test_kernels import TOL, make_case

import offline_kd.kernels as K

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    if K.INTERPRETED:  # e.g. imported after tests/test_kernels.py set TRITON_INTERPRET=1 for CPU tensors
        pytest.skip("the kernels were built for the interpreter: run with TRITON_INTERPRET=0")
    monkeypatch.setenv(K.ENV_VAR, "auto")


@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["V", "padded"])
def test_cuda_triton_matches_cpu_reference(dtype, tail, padded):
    V, N, k, T = 30522, 33, 64, 2.0
    W = 30528 if padded else V
    student, ids, tz, lse, mask, labels = make_case(N, V, k, dtype, T, seed=31)
    wide = torch.full((N, W), 30.0, dtype=dtype)  # padding columns far above every logit: must not count
    wide[:, :V] = student
    out = {}
    for dev in ("cuda", "cpu"):
        args = [x.to(dev) for x in (ids, tz, mask, lse, labels)]
        s = wide.to(dev).requires_grad_(True)
        kl, ce = K.distillation_logit_losses(
            s, args[0], args[1], T, args[2], args[3] if tail else None, args[4], vocab_size=V
        )
        (g,) = torch.autograd.grad(1.5 * kl + 0.5 * ce, s)
        leaf = wide.to(dev).requires_grad_(True)
        parts = K.distillation_losses(
            leaf * 1.0, args[0], args[1], T, args[2], args[3] if tail else None, args[4], weights=(1.5, 0.5),
            vocab_size=V, in_place=True,
        )  # fmt: skip
        (g_w,) = torch.autograd.grad(parts.total, leaf)
        h = (
            torch.randn(N, 768, generator=torch.Generator().manual_seed(1))
            .to(dev, dtype)
            .requires_grad_(True)
        )
        cos = K.cosine_loss(h, h.detach().half() + 0.1, args[2])
        (gh,) = torch.autograd.grad(cos, h)
        out[dev] = [x.detach().float().cpu() for x in (kl, ce, g, parts.kl, parts.mlm, g_w, cos, gh)]
    assert (out["cuda"][2][:, V:] == 0).all() and (out["cuda"][5][:, V:] == 0).all()
    rtol = TOL[dtype][1]
    for a, b in zip(out["cuda"], out["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-7)


def test_cuda_more_than_2_31_logits():
    """N * V > 2^31: row offsets past int32. A few rows spread over the batch (the last one included) count;
    their losses and gradient rows match the CPU reference, every other gradient row is zero."""
    V, k, T = 30522, 32, 2.0
    N = (1 << 31) // V + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * N * V * 2:
        pytest.skip("not enough GPU memory for two bf16 [N, V] buffers")
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1])
    student, ids, tz, lse, _, labels = make_case(len(rows), V, k, torch.bfloat16, T, seed=41)
    big = torch.zeros(N, V, dtype=torch.bfloat16, device="cuda")
    big[rows.cuda()] = student.cuda()
    full_ids = torch.full((N, k), -1, dtype=torch.int32, device="cuda")
    full_ids[rows.cuda()] = ids.int().cuda()
    full_tz = torch.zeros(N, k, device="cuda")
    full_tz[rows.cuda()] = tz.cuda()
    full_lse = torch.zeros(N, device="cuda")
    full_lse[rows.cuda()] = lse.cuda()
    full_lab = torch.full((N,), -100, device="cuda")
    full_lab[rows.cuda()] = labels.cuda()
    leaf = big.requires_grad_(True)
    parts = K.distillation_losses(
        leaf * 1.0, full_ids, full_tz, T, None, full_lse, full_lab, weights=(1.0, 1.0), in_place=True
    )
    (g,) = torch.autograd.grad(parts.total, leaf)
    ref_leaf = student.float().requires_grad_(True)
    ref = K.distillation_losses(ref_leaf, ids, tz, T, None, lse, labels)
    (g_ref,) = torch.autograd.grad(ref.total, ref_leaf)
    torch.testing.assert_close(parts.kl.cpu(), ref.kl, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(parts.mlm.cpu(), ref.mlm, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        g[rows.cuda()].float().cpu(), g_ref, rtol=1e-2, atol=1e-2 * float(g_ref.abs().max())
    )
    keep = torch.ones(N, dtype=torch.bool, device="cuda")
    keep[rows.cuda()] = False
    assert float(g.abs().amax(1)[keep].max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_exact_matches_cpu(dtype):
    """The fused output layer with the exact source on the GPU (compiled dense kernel, the teacher head's fp16
    tensor-core matmuls with fp32 output, the weight gradient accumulated in fp32 by the matmul) against the
    same on the CPU (reference kernel, the head's inputs rounded and multiplied in fp32)."""
    from offline_kd.teacher.head import build_head
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead

    N, H, V, W, T = 300, 64, 30522, 30528, 2.0
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    head = build_head(dict(hidden_size=H, vocab_size=V, activation="gelu", layer_norm_eps=1e-12))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.05))
    h = torch.randn(N, H, generator=g)
    weight = torch.randn(W, H, generator=g) * 0.2
    bias = torch.randn(W, generator=g) * 0.05
    t_hidden = (torch.randn(N, H, generator=g) * 2).half()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    out = {}
    for dev in ("cuda", "cpu"):
        teacher = ReducedPrecisionHead(head, torch.float16, device=dev)
        feats = teacher.features(t_hidden.to(dev))
        leaves = [x.to(dev, dtype).requires_grad_(True) for x in (h, weight, bias)]
        parts = K.fused_linear_exact_losses(
            *leaves, lambda a, b, t=teacher, f=feats: t.logits(f[a:b]), T, mlm_labels=labels.to(dev),
            weights=(5.0, 2.0),
            chunk_rows=64, vocab_size=V,
        )  # fmt: skip
        grads = torch.autograd.grad(parts.total, leaves)
        out[dev] = [x.detach().float().cpu() for x in (parts.kl, parts.mlm, *grads)]
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(out["cuda"], out["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-7)
