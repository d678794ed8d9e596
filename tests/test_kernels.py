"""offline_kd.kernels: Triton path (under TRITON_INTERPRET=1 on CPU) and the chunked reference, each against a
dense fp32 PyTorch implementation of the formulas written out here."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import offline_kd.kernels as K  # noqa: E402
from offline_kd.kernels import reference  # noqa: E402

BACKENDS = ["triton", "reference"]
# (loss rtol, grad rtol, grad atol relative to max|grad|). Both sides compute in fp32 from the same quantised
# inputs, so the loss is tight for every dtype; the gradient is rounded once to the logits' dtype.
TOL = {
    torch.float32: (2e-5, 1e-4, 1e-6),
    torch.bfloat16: (2e-5, 1e-2, 1e-3),
    torch.float16: (2e-5, 2e-3, 2e-4),
}


# --------------------------------------------------------------------------------------------- the oracle
def dense_losses(s, ids, tz, T, row_mask=None, teacher_lse=None, labels=None, ignore_index=-100):
    """Straightforward full-[N, V] fp32 formulas (s is an fp32 leaf)."""
    ids = ids.long()
    valid = ids >= 0
    sid = ids.clamp(min=0)
    logq = torch.log_softmax(s / T, dim=-1)
    lq = logq.gather(1, sid)
    z = tz.float() / T
    if teacher_lse is None:
        lp = torch.log_softmax(z.masked_fill(~valid, float("-inf")), dim=-1)
        lp = torch.where(valid, lp, 0.0)
        p = torch.where(valid, lp.exp(), 0.0)
        rows = torch.where(valid & (p > 0), p * (lp - lq), 0.0).sum(-1)
    else:
        lp = torch.where(valid, z - teacher_lse.float()[:, None], 0.0)
        p = torch.where(valid, lp.exp(), 0.0)
        rows = torch.where(valid & (p > 0), p * (lp - lq), 0.0).sum(-1)
        pt = (1 - p.sum(-1)).clamp(min=0)
        qt = (1 - torch.where(valid, lq.exp(), 0.0).sum(-1)).clamp(min=1e-30)
        rows = rows + torch.where(pt > 0, pt * (pt.clamp(min=1e-30).log() - qt.log()), 0.0)
    sel = valid.any(-1)
    if row_mask is not None:
        sel = sel & row_mask
    kl = T * T * rows[sel].sum() / max(int(sel.sum()), 1)
    if labels is None:
        return kl, None
    lab = labels != ignore_index
    ce_rows = torch.logsumexp(s, -1) - s.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    ce = ce_rows[lab].sum() / max(int(lab.sum()), 1)
    return kl, ce


def make_case(N, V, k, dtype, T, seed=0, ids_dtype=torch.int64, teacher_dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, V, generator=g) * scale
    # student correlated with the teacher so the KL is neither trivial nor huge
    student = (0.6 * teacher + torch.randn(N, V, generator=g) * scale).to(dtype)
    top = teacher.topk(k, dim=-1)
    ids = top.indices.to(ids_dtype)
    tz = top.values.to(teacher_dtype)
    lse = torch.logsumexp(teacher / T, dim=-1)
    row_mask = torch.ones(N, dtype=torch.bool)
    row_mask[1::3] = False
    if N > 2:
        ids[2] = -1  # a row the teacher has nothing for: skipped
    if N > 4 and k > 1:
        ids[4, k // 2 :] = -1  # a row with some ids absent
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    if N > 3:
        labels[3] = top.indices[3, 0]  # label among the top-k ids
    return student, ids, tz, lse, row_mask, labels


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, request.param)
    return request.param


def small_chunks(monkeypatch, V):
    """Make the reference process 2 rows per chunk so the chunk loop is exercised."""
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 2 * V + 1)


def run_and_compare(student, ids, tz, T, row_mask, lse, labels, w_kl=0.7, w_ce=1.3, ignore_index=-100):
    """Both entry points against the dense oracle: `distillation_logit_losses` (separate upstream gradients,
    backward reading the logits again) and `distillation_losses` (weights up front, gradient written in the
    forward over the logits themselves, here scaled by an upstream gradient of 1.5)."""
    dtype = student.dtype
    s = student.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(s, ids, tz, T, row_mask, lse, labels, ignore_index)
    assert kl.dim() == 0 and ce.dim() == 0
    (g,) = torch.autograd.grad(w_kl * kl + w_ce * ce, s)
    assert g.dtype == dtype and g.shape == s.shape

    leaf = student.clone().requires_grad_(True)
    parts = K.distillation_losses(
        leaf * 1.0, ids, tz, T, row_mask, lse, labels, weights=(w_kl, w_ce), ignore_index=ignore_index,
        in_place=True,
    )  # fmt: skip
    (g_w,) = torch.autograd.grad(1.5 * parts.total, leaf)

    sf = student.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, row_mask, lse, labels, ignore_index)
    (g_d,) = torch.autograd.grad(w_kl * kl_d + w_ce * ce_d, sf)

    lrtol, grtol, gatol = TOL[dtype]
    for k_, c_ in ((kl, ce), (parts.kl, parts.mlm)):
        torch.testing.assert_close(k_.detach(), kl_d.detach(), rtol=lrtol, atol=1e-5)
        torch.testing.assert_close(c_.detach(), ce_d.detach(), rtol=lrtol, atol=1e-5)
    torch.testing.assert_close(parts.total, w_kl * parts.kl + w_ce * parts.mlm)
    atol = gatol * float(g_d.abs().max()) + 1e-12
    torch.testing.assert_close(g.float(), g_d, rtol=grtol, atol=atol)
    torch.testing.assert_close(g_w.float(), 1.5 * g_d, rtol=grtol, atol=1.5 * atol)
    return kl, ce, g


# --------------------------------------------------------------------------------------- the sweep, small V
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
def test_kl_ce_sweep_small_vocab(backend, monkeypatch, dtype, k, T, tail):
    V, N = 1001, 9
    small_chunks(monkeypatch, V)
    ids_dtype = torch.int32 if (k + int(T)) % 2 else torch.int64
    student, ids, tz, lse, mask, labels = make_case(
        N, V, k, dtype, T, seed=k * 10 + int(T), ids_dtype=ids_dtype
    )
    kl, ce, g = run_and_compare(student, ids, tz, T, mask, lse if tail else None, labels)
    assert float(kl.detach()) > 0 and float(ce.detach()) > 0
    # rows that count for neither loss get exactly zero gradient
    sel = (ids >= 0).any(-1) & mask
    dead = ~sel & (labels == -100)
    assert dead.any()
    assert (g[dead] == 0).all()


@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_without_labels_matches_dense(backend, monkeypatch, dtype, tail):
    V, N, k, T = 517, 7, 8, 2.0
    small_chunks(monkeypatch, V)
    student, ids, tz, lse, mask, _ = make_case(N, V, k, dtype, T, seed=3)
    s = student.clone().requires_grad_(True)
    kl, _ = K.distillation_logit_losses(s, ids, tz, T, row_mask=mask, teacher_lse=lse if tail else None)
    (g,) = torch.autograd.grad(kl * 2.5, s)
    sf = student.float().requires_grad_(True)
    kl_d, _ = dense_losses(sf, ids, tz, T, mask, lse if tail else None)
    (g_d,) = torch.autograd.grad(kl_d * 2.5, sf)
    lrtol, grtol, gatol = TOL[dtype]
    torch.testing.assert_close(kl.detach(), kl_d.detach(), rtol=lrtol, atol=1e-5)
    torch.testing.assert_close(g.float(), g_d, rtol=grtol, atol=gatol * float(g_d.abs().max()))
    # and it is the kl of distillation_logit_losses
    kl2, ce2 = K.distillation_logit_losses(student, ids, tz, T, mask, lse if tail else None)
    torch.testing.assert_close(kl2, kl.detach())
    assert float(ce2.detach()) == 0.0


# ------------------------------------------------------------------------------------ selected, full vocab
@pytest.mark.parametrize(
    "dtype,k,T,tail,ids_dtype",
    [
        (torch.bfloat16, 64, 2.0, True, torch.int32),
        (torch.float32, 8, 1.0, False, torch.int64),
        (torch.float16, 1, 4.0, True, torch.int64),
    ],
    ids=["bf16-k64-T2-tail", "fp32-k8-T1-renorm", "fp16-k1-T4-tail"],
)
def test_kl_ce_full_vocab(backend, monkeypatch, dtype, k, T, tail, ids_dtype):
    V, N = 30522, 5
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 3 * V)
    student, ids, tz, lse, mask, labels = make_case(N, V, k, dtype, T, seed=7, ids_dtype=ids_dtype)
    run_and_compare(student, ids, tz, T, mask, lse if tail else None, labels, w_kl=1.9, w_ce=0.4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_padded_full_vocab_rows_match_the_dense_formulas(backend, monkeypatch, dtype):
    """Rows padded to 30,528 (16-byte aligned: the kernels take their vector-wide layout) with
    vocab_size = 30,522, both entry points, against the dense formulas on the unpadded logits."""
    V, W, N, k, T = 30522, 30528, 4, 16, 2.0
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 3 * W)
    student, ids, tz, lse, mask, labels = make_case(N, V, k, dtype, T, seed=17)
    wide = torch.full((N, W), 30.0, dtype=dtype)
    wide[:, :V] = student
    sf = student.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, mask, lse, labels)
    (g_d,) = torch.autograd.grad(1.5 * kl_d + 0.5 * ce_d, sf)
    leaf = wide.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(leaf, ids, tz, T, mask, lse, labels, vocab_size=V)
    (g,) = torch.autograd.grad(1.5 * kl + 0.5 * ce, leaf)
    leaf2 = wide.clone().requires_grad_(True)
    parts = K.distillation_losses(
        leaf2 * 1, ids, tz, T, mask, lse, labels, (1.5, 0.5), vocab_size=V, in_place=True
    )
    (g2,) = torch.autograd.grad(parts.total, leaf2)
    lrtol, grtol, gatol = TOL[dtype]
    for x, y, grad in ((kl, ce, g), (parts.kl, parts.mlm, g2)):
        torch.testing.assert_close(x.detach(), kl_d.detach(), rtol=lrtol, atol=1e-5)
        torch.testing.assert_close(y.detach(), ce_d.detach(), rtol=lrtol, atol=1e-5)
        torch.testing.assert_close(grad[:, :V].float(), g_d, rtol=grtol, atol=gatol * float(g_d.abs().max()))
        assert (grad[:, V:] == 0).all()


# ----------------------------------------------------------------------------------- upstream gradients
def test_upstream_gradients_are_separate(backend):
    V, N, k, T = 300, 6, 8, 2.0
    student, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=11)
    s = student.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(s, ids, tz, T, mask, lse, labels)
    g_kl = torch.autograd.grad(kl, s, retain_graph=True)[0]
    g_ce = torch.autograd.grad(ce, s, retain_graph=True)[0]
    g_both = torch.autograd.grad(-3.0 * kl + 0.25 * ce, s)[0]
    torch.testing.assert_close(g_both, -3.0 * g_kl + 0.25 * g_ce, rtol=1e-5, atol=1e-8)
    assert g_kl.abs().max() > 0 and g_ce.abs().max() > 0
    # each row's KL gradient sums to ~0 (softmax), the CE gradient too
    torch.testing.assert_close(g_kl.sum(-1), torch.zeros(N), atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ce.sum(-1), torch.zeros(N), atol=1e-6, rtol=0)


def test_kl_only_has_no_ce_gradient(backend):
    V, N, k, T = 300, 5, 4, 1.0
    student, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=12)
    s = student.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(s, ids, tz, T, None, None, labels)
    g = torch.autograd.grad(kl, s)[0]
    sf = student.float().requires_grad_(True)
    g_d = torch.autograd.grad(dense_losses(sf, ids, tz, T)[0], sf)[0]
    torch.testing.assert_close(g, g_d, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("tail", [False, True])
def test_nan_teacher_logit_makes_the_loss_nan(backend, tail):
    """A NaN in the teacher's signal must surface in the loss, where the trainer checks it, not only in the gradient."""
    V, N, k, T = 200, 4, 4, 2.0
    student, ids, tz, lse, _, labels = make_case(N, V, k, torch.float32, T, seed=6)
    tz = tz.clone()
    tz[1, 0] = float("nan")
    kl, _ = K.distillation_logit_losses(
        student.clone().requires_grad_(True), ids, tz, T, None, lse if tail else None, labels
    )
    assert torch.isnan(kl)


def test_logits_changed_in_place_after_the_forward_are_refused(backend):
    """The backward reads the logits again: autograd must refuse to run it once they were modified."""
    student, ids, tz, lse, mask, labels = make_case(4, 100, 4, torch.float32, 2.0, seed=13)
    leaf = student.clone().requires_grad_(True)
    s = leaf * 1.0
    kl, ce = K.distillation_logit_losses(s, ids, tz, 2.0, mask, lse, labels)
    s.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(kl + ce, leaf)


def test_teacher_tensors_get_no_gradient(backend):
    student, ids, tz, lse, mask, labels = make_case(4, 100, 4, torch.float32, 2.0, seed=14)
    s = student.clone().requires_grad_(True)
    t = tz.clone().requires_grad_(True)
    e = lse.clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(s, ids, t, 2.0, mask, e, labels)
    (kl + ce).backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert t.grad is None and e.grad is None


def test_no_selected_rows_and_no_labels(backend):
    V, N, k, T = 200, 4, 4, 2.0
    student, ids, tz, lse, _, _ = make_case(N, V, k, torch.float32, T, seed=5)
    s = student.clone().requires_grad_(True)
    labels = torch.full((N,), -100)
    kl, ce = K.distillation_logit_losses(s, ids, tz, T, torch.zeros(N, dtype=torch.bool), lse, labels)
    assert float(kl.detach()) == 0.0 and float(ce.detach()) == 0.0
    assert ce.requires_grad and kl.requires_grad
    (g,) = torch.autograd.grad(kl + ce, s)
    assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
def test_extreme_logits_stay_finite(monkeypatch, dtype, tail):
    V, N, k, T = 600, 6, 8, 4.0
    student, ids, tz, lse, mask, labels = make_case(N, V, k, dtype, T, seed=9)
    fill = -1e9 if dtype != torch.float16 else torch.finfo(torch.float16).min
    student = student.float()
    student[0] = fill  # a padding-like row of huge negatives
    student[1, :] = fill
    student[1, ids[1, 0]] = 1e4  # one enormous logit on a top-k id: the student's tail mass underflows to 0
    student[3, ::2] = -1e4
    student[3, 1::2] = 1e4
    student[5, ids[5].clamp(min=0).long()] = -1e4  # the teacher's top-k far below everything for the student
    labels[5] = int(ids[5, 0])
    student = student.to(dtype)
    tz = tz.clone()
    tz[0] = 1e4 - torch.arange(k, dtype=torch.float32)  # extreme teacher logits too (with a consistent lse)
    lse[0] = torch.logsumexp(tz[0] / T, 0)
    out = {}
    for b in BACKENDS:
        monkeypatch.setenv(K.ENV_VAR, b)
        s = student.clone().requires_grad_(True)
        kl, ce = K.distillation_logit_losses(s, ids, tz, T, None, lse if tail else None, labels)
        (g,) = torch.autograd.grad(kl + ce, s)
        assert torch.isfinite(kl) and torch.isfinite(ce) and torch.isfinite(g).all(), b
        out[b] = (kl.detach(), ce.detach(), g.float())
    sf = student.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, None, lse if tail else None, labels)
    (g_d,) = torch.autograd.grad(kl_d + ce_d, sf)
    for b in BACKENDS:
        torch.testing.assert_close(out[b][0], kl_d.detach(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out[b][1], ce_d.detach(), rtol=1e-4, atol=1e-3)
    # where the student's tail mass underflows, the dense oracle's clamp cuts the tail gradient while the
    # kernels use the analytic limit (docs/kernels.md), so with the tail term compare the two paths instead
    want = out["reference"][2] if tail else g_d
    rtol, atol = TOL[dtype][1:]
    torch.testing.assert_close(out["triton"][2], want, rtol=rtol, atol=atol * float(want.abs().max()))
    if not tail:
        torch.testing.assert_close(out["reference"][2], want, rtol=rtol, atol=atol * float(want.abs().max()))


def test_uint16_ids_and_batched_shapes(backend):
    B, L, V, k, T = 2, 3, 257, 8, 2.0
    student, ids, tz, lse, mask, labels = make_case(B * L, V, k, torch.float32, T, seed=4)
    ids[2] = torch.arange(k)  # uint16 from storage has no -1: distinct valid ids instead
    ids[4] = torch.arange(k) + 100
    s3 = student.reshape(B, L, V).clone().requires_grad_(True)
    kl, ce = K.distillation_logit_losses(
        s3,
        ids.to(torch.uint16).reshape(B, L, k),
        tz.reshape(B, L, k),
        T,
        mask.reshape(B, L),
        lse.reshape(B, L),
        labels.reshape(B, L),
    )
    (g,) = torch.autograd.grad(kl + ce, s3)
    assert g.shape == (B, L, V)
    sf = student.float().requires_grad_(True)
    kl_d, ce_d = dense_losses(sf, ids, tz, T, mask, lse, labels)
    (g_d,) = torch.autograd.grad(kl_d + ce_d, sf)
    torch.testing.assert_close(kl.detach(), kl_d.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g.reshape(B * L, V), g_d, rtol=1e-4, atol=1e-7)


def test_triton_and_reference_agree_on_a_noncontiguous_view(monkeypatch):
    V, N, k, T = 301, 5, 8, 2.0
    student, ids, tz, lse, mask, labels = make_case(N, V, k, torch.float32, T, seed=21)
    wide = torch.randn(N, V + 5)
    wide[:, :V] = student
    out = {}
    for b in BACKENDS:
        monkeypatch.setenv(K.ENV_VAR, b)
        s = wide.clone().requires_grad_(True)
        kl, ce = K.distillation_logit_losses(s[:, :V], ids, tz, T, mask, lse, labels)
        (g,) = torch.autograd.grad(kl + ce, s)
        assert (g[:, V:] == 0).all()
        out[b] = (kl.detach(), ce.detach(), g)
    for a, b in zip(out["triton"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------- cosine
@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
)
@pytest.mark.parametrize("H", [32, 769])
def test_cosine_loss(backend, s_dtype, t_dtype, H):
    N = 7
    g = torch.Generator().manual_seed(H)
    t = torch.randn(N, H, generator=g)
    s0 = (0.5 * t + torch.randn(N, H, generator=g)).to(s_dtype)
    t = t.to(t_dtype)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    s = s0.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    loss = K.cosine_loss(s, tt, mask)
    (gs,) = torch.autograd.grad(loss * 1.7, s)
    assert tt.grad is None
    assert gs.dtype == s_dtype
    sf = s0.float().requires_grad_(True)
    ref = torch.nn.CosineEmbeddingLoss()(sf[mask], t.float()[mask], torch.ones(int(mask.sum())))
    (g_d,) = torch.autograd.grad(ref * 1.7, sf)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    grtol = 1e-4 if s_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gs.float(), g_d, rtol=grtol, atol=grtol * float(g_d.abs().max()))
    assert (gs[~mask] == 0).all()
    # no mask: all rows
    full = K.cosine_loss(s0, t)
    ref_all = torch.nn.CosineEmbeddingLoss()(s0.float(), t.float(), torch.ones(N))
    torch.testing.assert_close(full, ref_all, rtol=1e-5, atol=1e-6)


def test_cosine_no_rows(backend):
    s = torch.randn(3, 16, requires_grad=True)
    loss = K.cosine_loss(s, torch.randn(3, 16), torch.zeros(3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    assert (torch.autograd.grad(loss, s)[0] == 0).all()


# ----------------------------------------------------------------------------------------------- dispatch
def test_dispatch_env_switch(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.backend_for(x) == "reference"  # auto + CPU tensor
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.backend_for(x) == "reference"
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert K.backend_for(x) == "triton"
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert K.backend_for(x) == "reference"
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(ValueError):
        K.backend_for(x)


def test_dispatch_calls_the_chosen_backend(monkeypatch):
    import offline_kd.kernels.kl as kl_mod

    calls = []
    orig = kl_mod.kl_ce_forward
    monkeypatch.setattr(kl_mod, "kl_ce_forward", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    student, ids, tz, lse, mask, labels = make_case(3, 50, 4, torch.float32, 1.0)
    monkeypatch.setenv(K.ENV_VAR, "reference")
    K.distillation_logit_losses(student, ids, tz, 1.0)
    assert calls == []
    monkeypatch.setenv(K.ENV_VAR, "triton")
    K.distillation_logit_losses(student, ids, tz, 1.0)
    assert calls == [1]


def test_bad_inputs_raise():
    s = torch.randn(4, 10)
    ids = torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError):
        K.distillation_logit_losses(s, ids, torch.randn(4, 2), 2.0)
    with pytest.raises(ValueError):
        K.distillation_logit_losses(s, ids, torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError):
        K.distillation_logit_losses(s, ids, torch.randn(4, 3), 1.0, row_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError):
        K.distillation_logit_losses(s, ids.float(), torch.randn(4, 3), 1.0)


def test_reference_chunk_is_bounded():
    assert reference.chunk_rows(30522) * 30522 <= reference.CHUNK_ELEMS
    assert reference.chunk_rows(10**9) == 1
