"""The triple loss against dense formulas (top-k = full vocabulary makes the tail-aware KL exact)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from offline_kd.train.loss import LossConfig, distillation_loss


def _batch(B=2, L=6, V=11, H=5, K=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = K or V
    z = torch.randn(B, L, V, generator=g) * 3
    T = 2.0
    top = z.topk(K, dim=-1)
    lengths = torch.tensor([L, L - 2])
    attn = (torch.arange(L)[None] < lengths[:, None]).long()
    mlm = torch.zeros(B, L, dtype=torch.bool)
    mlm[0, 1] = mlm[0, 4] = mlm[1, 2] = True
    ids = torch.randint(0, V, (B, L), generator=g)
    batch = {
        "attention_mask": attn,
        "mlm_mask": mlm,
        "labels": torch.where(mlm, ids, torch.full_like(ids, -100)),
        "topk_ids": top.indices,
        "topk_logits": top.values,
        "lse": torch.logsumexp(z / T, dim=-1),
        "hidden": torch.randn(B, L, H, generator=g).half(),
    }
    s = torch.randn(B, L, V, generator=g, requires_grad=True)
    h = torch.randn(B, L, H, generator=g, requires_grad=True)
    return z, s, h, batch, T


def _dense(z, s, h, batch, T, rows):
    zt, st = z[rows] / T, s[rows] / T
    p = zt.softmax(-1)
    kl = (p * (p.log() - st.log_softmax(-1))).sum(-1).mean() * T * T
    lab = batch["labels"][batch["attention_mask"].bool()]
    ce = F.cross_entropy(s[batch["attention_mask"].bool()], lab, ignore_index=-100)
    cos = (1 - F.cosine_similarity(h[rows], batch["hidden"][rows].float(), dim=-1)).mean()
    return kl, ce, cos


def test_components_match_dense_formulas_over_non_pad_tokens():
    z, s, h, batch, T = _batch()
    cfg = LossConfig(temperature=T)
    total, parts = distillation_loss(cfg, s, h, batch)
    kl, ce, cos = _dense(z, s, h, batch, T, batch["attention_mask"].bool())
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert parts["mlm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["cos"].item() == pytest.approx(cos.item(), rel=1e-4)
    assert total.item() == pytest.approx(5.0 * kl.item() + 2.0 * ce.item() + 1.0 * cos.item(), rel=1e-4)
    total.backward()
    assert s.grad is not None and h.grad is not None
    # padding rows get no gradient
    assert s.grad[1, -2:].abs().sum() == 0 and h.grad[1, -2:].abs().sum() == 0


def test_restrict_to_mask_and_weights():
    z, s, h, batch, T = _batch(seed=1)
    cfg = LossConfig(alpha_kl=1.5, alpha_mlm=0.0, alpha_cos=0.5, temperature=T, restrict_kl_to_mask=True)
    total, parts = distillation_loss(cfg, s, h, batch)
    kl, _, cos = _dense(z, s, h, batch, T, batch["mlm_mask"])
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert parts["cos"].item() == pytest.approx(cos.item(), rel=1e-4)
    assert parts["mlm"].item() == 0.0
    assert total.item() == pytest.approx(1.5 * kl.item() + 0.5 * cos.item(), rel=1e-4)


def test_topk_without_tail_renormalises():
    z, s, h, batch, T = _batch(K=3, seed=2)
    cfg = LossConfig(temperature=T, kl_tail=False, alpha_cos=0.0)
    _, parts = distillation_loss(cfg, s, None, batch)
    rows = batch["attention_mask"].bool()
    p = (batch["topk_logits"][rows] / T).softmax(-1)
    q = (s[rows] / T).log_softmax(-1).gather(1, batch["topk_ids"][rows])
    # renormalised top-k teacher against the student's full-vocabulary log-probabilities of those ids
    kl = (p * (p.log() - q)).sum(-1).mean() * T * T
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    # tail-aware differs (it also charges the mass outside the top-k)
    _, parts_tail = distillation_loss(LossConfig(temperature=T, alpha_cos=0.0), s, None, batch)
    assert not math.isclose(parts_tail["kl"].item(), parts["kl"].item(), rel_tol=1e-3)


def test_cosine_needs_hidden():
    _, s, _, batch, T = _batch()
    with pytest.raises(ValueError, match="hidden"):
        distillation_loss(LossConfig(temperature=T), s, None, batch)


def test_consumed_padded_logits_give_the_same_losses_and_gradient():
    """The trainer's call: logits padded to a multiple of 64 columns (vocab_size says which are the
    vocabulary), the gradient written over them, scaled by the upstream DeepSpeed will send. Same
    components and gradient as the plain call; the padding columns get a zero gradient; pad tokens' rows
    too."""
    z, s, h, batch, T = _batch(seed=3)
    cfg = LossConfig(temperature=T)
    total, parts = distillation_loss(cfg, s, h, batch)
    g_s, g_h = torch.autograd.grad(total, (s, h))
    V = s.shape[-1]
    wide = torch.full((*s.shape[:2], 64), 40.0)  # padding far above every logit: must get no probability
    wide[..., :V] = s.detach()
    leaf = wide.requires_grad_(True)
    logits = leaf * 1.0
    h2 = h.detach().clone().requires_grad_(True)
    total2, parts2 = distillation_loss(
        cfg, logits, h2, batch, vocab_size=V, consume_logits=True, expected_upstream=0.5
    )
    # as DeepSpeed with two accumulation steps: the loss divided by 2 before the backward
    g_wide, g_h2 = torch.autograd.grad(total2 / 2, (leaf, h2))
    g_wide, g_h2 = 2 * g_wide, 2 * g_h2
    for name in parts:
        assert parts2[name].item() == pytest.approx(parts[name].item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_wide[..., :V], g_s, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_h2, g_h)
    assert (g_wide[..., V:] == 0).all() and (g_wide[1, -2:] == 0).all()
    assert torch.equal(2 * logits.detach(), g_wide)  # the logits' storage now holds their gradient


# ------------------------------------------------------------------------------ kl_source exact


def _head(H=5, V=11, seed=3):
    """A BERT-shaped MLM head (transform, activation, LayerNorm, decoder) with spread logits."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(H, H), torch.nn.GELU(), torch.nn.LayerNorm(H), torch.nn.Linear(H, V)
    )
    with torch.no_grad():
        head[3].weight.mul_(4.0)
    return head.requires_grad_(False)


@pytest.mark.parametrize("T, restrict", [(2.0, False), (1.0, True), (3.7, False)])
def test_exact_matches_the_dense_formula_on_the_heads_logits(T, restrict):
    """The teacher's full distribution from head(stored hidden), at any temperature (stored or not)."""
    _, s, h, batch, _ = _batch(seed=4)
    head = _head()
    z = head(batch["hidden"].float())  # the teacher logits the exact KL must recompute
    cfg = LossConfig(kl_source="exact", temperature=T, restrict_kl_to_mask=restrict)
    total, parts = distillation_loss(cfg, s, h, batch, teacher_head=head)
    rows = batch["mlm_mask"] if restrict else batch["attention_mask"].bool()
    s_ref = s.detach().clone().requires_grad_(True)
    h_ref = h.detach().clone().requires_grad_(True)
    kl, ce, cos = _dense(z, s_ref, h_ref, batch, T, rows)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert parts["mlm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["cos"].item() == pytest.approx(cos.item(), rel=1e-4)
    ref_total = 5.0 * kl + 2.0 * ce + 1.0 * cos
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-4)
    total.backward()
    ref_total.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in head.parameters())  # the head is a constant


def test_exact_differs_from_topk_on_the_same_teacher():
    """With the stored top-k of the same teacher logits, the exact KL equals the tail-aware one only when
    k covers the vocabulary; at small k the two differ (the exact KL sees every probability)."""
    _, s, _, batch, T = _batch(seed=5)
    head = _head()
    z = head(batch["hidden"].float())
    top = z.topk(3, dim=-1)
    batch.update(topk_ids=top.indices, topk_logits=top.values, lse=torch.logsumexp(z / T, dim=-1))
    exact = distillation_loss(LossConfig(kl_source="exact", alpha_cos=0.0), s, None, batch, teacher_head=head)
    topk3 = distillation_loss(LossConfig(alpha_cos=0.0), s, None, batch)
    full = z.topk(z.shape[-1], dim=-1)
    batch.update(topk_ids=full.indices, topk_logits=full.values)
    topk_all = distillation_loss(LossConfig(alpha_cos=0.0), s, None, batch)
    assert exact[1]["kl"].item() == pytest.approx(topk_all[1]["kl"].item(), rel=1e-4)
    assert not math.isclose(exact[1]["kl"].item(), topk3[1]["kl"].item(), rel_tol=1e-2)


def test_exact_needs_the_head_and_hidden_states():
    _, s, _, batch, T = _batch()
    with pytest.raises(ValueError, match="hidden states and the teacher's MLM head"):
        distillation_loss(LossConfig(kl_source="exact", alpha_cos=0.0), s, None, batch)


def test_exact_with_the_trainers_padded_logits():
    """The trainer's call: logits padded to 64 columns (vocab_size says which are the vocabulary) and the
    upstream gradient DeepSpeed sends (1 / accumulation steps): same components and gradient as the plain
    call, zero gradient on the padding columns and on pad tokens' rows."""
    _, s, h, batch, T = _batch(seed=6)
    head = _head()
    cfg = LossConfig(kl_source="exact", temperature=T)
    total, parts = distillation_loss(cfg, s, h, batch, teacher_head=head)
    (g_s,) = torch.autograd.grad(total, (s,))
    V = s.shape[-1]
    wide = torch.full((*s.shape[:2], 64), 40.0)  # padding far above every logit: must get no probability
    wide[..., :V] = s.detach()
    wide.requires_grad_(True)
    total2, parts2 = distillation_loss(
        cfg, wide, h, batch, vocab_size=V, consume_logits=True, expected_upstream=0.5, teacher_head=head
    )
    (g_wide,) = torch.autograd.grad(total2 / 2, (wide,))
    for name in parts:
        assert parts2[name].item() == pytest.approx(parts[name].item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(2 * g_wide[..., :V], g_s, rtol=1e-4, atol=1e-7)
    assert (g_wide[..., V:] == 0).all() and (g_wide[1, -2:] == 0).all()


def _mlm_head(H=5, V=11, seed=3):
    from offline_kd.teacher.head import build_head
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead

    torch.manual_seed(seed)
    head = build_head(dict(hidden_size=H, vocab_size=V, activation="gelu", layer_norm_eps=1e-12))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * (2.0 if p.dim() > 1 else 0.1))
    return ReducedPrecisionHead(head, torch.float32)


@pytest.mark.parametrize(
    "settings",
    [
        dict(kl_source="exact"),
        dict(kl_source="exact", restrict_kl_to_mask=True),
        dict(kl_source="exact", alpha_mlm=0.0),
        dict(kl_source="exact", alpha_kl=0.0),
        dict(kl_source="topk"),
        dict(kl_source="topk", kl_tail=False, restrict_kl_to_mask=True),
        dict(kl_source="topk", alpha_mlm=0.0, temperature=1.0),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
@pytest.mark.parametrize("host_rows", [True, False], ids=["rows-from-the-host", "rows-found-here"])
def test_fused_output_layer_gives_the_unfused_losses_and_gradients(settings, host_rows):
    """The student's output layer applied inside the loss (on the rows that count only) against the model's
    own logits: every component and every gradient, for both sources and the row selections."""
    from offline_kd.train.loss import FusedHead, loss_rows

    z, _, h, batch, T = _batch(K=4, seed=5)
    cfg = LossConfig(**{"temperature": T, **settings})
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 6, 7, generator=g, requires_grad=True)
    layer = torch.nn.Linear(7, 64)  # the student's output layer, padded to 64 columns
    teacher = _mlm_head()
    if host_rows:
        batch = dict(batch, loss_rows=loss_rows(cfg, batch))
    leaves = [feats, layer.weight, layer.bias, h]
    fused, fparts = distillation_loss(
        cfg,
        feats,
        h,
        batch,
        vocab_size=11,
        teacher_head=teacher,
        fused=FusedHead(layer.weight, layer.bias, 3),
    )
    f_grads = torch.autograd.grad(fused, leaves)
    plain, pparts = distillation_loss(cfg, layer(feats), h, batch, vocab_size=11, teacher_head=teacher)
    p_grads = torch.autograd.grad(plain, leaves)
    for name in fparts:
        torch.testing.assert_close(fparts[name], pparts[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(f_grads, p_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float(fparts["loss"]) > 0
