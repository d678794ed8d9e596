"""What the CPU interpreter forgives and a GPU would not: FMA contraction and write races, made visible on CPU.

* **Contraction.** The interpreter rounds every multiply on its own; the GPU compiler contracts a multiply
  feeding an add or a subtraction into one FMA (Triton compiles with fp fusion on). `contracting` makes the
  interpreter do the same everywhere it may (a multiply whose result goes straight into an add/sub; a
  select in between blocks it, as it does in LLVM), so a kernel whose numerics depend on a separately
  rounded product fails here. With -1e9 fill logits at T = 1, an exponent offset fl(m k) is ~1.4e9 with an
  ulp of 128: a rescale factor 2^(m k - fl(m k)) computed from the exact product is off by up to 2^64.
* **Write races.** Within one program, stores from two different store instructions to the same address
  with no barrier between them are a race on a GPU (different threads; which lands last is not defined).
  `store_races` records every store's addresses per program and barrier interval and reports overlaps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import offline_kd.kernels as K  # noqa: E402

pytestmark = pytest.mark.skipif(
    not K.INTERPRETED, reason="instruments Triton's CPU interpreter (TRITON_INTERPRET=1)"
)


def _builder():
    from triton.runtime import interpreter

    return interpreter.InterpreterBuilder, interpreter.TensorHandle


@contextlib.contextmanager
def contracting(monkeypatch):
    """fp32 a * b followed by + c / - c computed as one fused multiply-add (rounded once)."""
    Builder, Handle = _builder()
    mul, add, sub = Builder.create_fmul, Builder.create_fadd, Builder.create_fsub

    def fmul(self, lhs, rhs):
        out = mul(self, lhs, rhs)
        if out.data.dtype == np.float32:
            out.attr["fmul"] = (lhs.data, rhs.data)
        return out

    def fused(a, b, c, sign_ab):
        r = sign_ab * a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)
        return r.astype(np.float32)

    def fadd(self, lhs, rhs):
        for x, y in ((lhs, rhs), (rhs, lhs)):
            if "fmul" in x.attr and y.data.dtype == np.float32:
                return Handle(fused(*x.attr["fmul"], y.data, 1.0), lhs.dtype)
        return add(self, lhs, rhs)

    def fsub(self, lhs, rhs):
        if "fmul" in lhs.attr and rhs.data.dtype == np.float32:
            return Handle(fused(*lhs.attr["fmul"], -rhs.data, 1.0), lhs.dtype)
        if "fmul" in rhs.attr and lhs.data.dtype == np.float32:
            return Handle(fused(*rhs.attr["fmul"], lhs.data, -1.0), lhs.dtype)
        return sub(self, lhs, rhs)

    monkeypatch.setattr(Builder, "create_fmul", fmul)
    monkeypatch.setattr(Builder, "create_fadd", fadd)
    monkeypatch.setattr(Builder, "create_fsub", fsub)
    yield


@contextlib.contextmanager
def store_races(monkeypatch):
    """Yields a list that collects (program, address) for every address two store instructions of one
    program write with no barrier between them."""
    Builder, _ = _builder()
    store, barrier, grid_idx = Builder.create_masked_store, Builder.create_barrier, Builder.set_grid_idx
    races: list[tuple] = []
    state = {"writer": {}, "op": 0}

    def masked_store(self, ptrs, value, mask, *args):
        state["op"] += 1
        written = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        for addr in np.asarray(ptrs.data)[written]:
            prev = state["writer"].setdefault(int(addr), state["op"])
            if prev != state["op"]:
                races.append((self.grid_idx, int(addr)))
        return store(self, ptrs, value, mask, *args)

    def on_barrier(self):
        state["writer"].clear()
        return barrier(self)

    def on_program(self, x, y, z):
        state["writer"].clear()
        return grid_idx(self, x, y, z)

    monkeypatch.setattr(Builder, "create_masked_store", masked_store)
    monkeypatch.setattr(Builder, "create_barrier", on_barrier)
    monkeypatch.setattr(Builder, "set_grid_idx", on_program)
    yield races


def _sparse_case(V=300, N=4, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 3
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    tz = torch.randn(N, k, generator=g).sort(-1, descending=True).values
    labels = ids[:, 2].clone()  # every label inside the top-k
    labels[1] = int(torch.tensor([i for i in range(V) if i not in ids[1]])[0])  # one outside it
    return s, ids, tz, labels


@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
def test_sparse_kernels_store_each_gradient_entry_once_per_barrier(monkeypatch, tail):
    """A label inside the top-k: the top-k fix-up and the label fix-up must not both store its entry."""
    monkeypatch.setenv(K.ENV_VAR, "triton")
    s, ids, tz, labels = _sparse_case()
    lse = torch.logsumexp(tz / 2.0, -1) + 0.5 if tail else None
    with store_races(monkeypatch) as races:
        x = s.clone().requires_grad_(True)
        K.distillation_losses(x, ids, tz, 2.0, teacher_lse=lse, mlm_labels=labels).total.backward()
        kl, ce = K.distillation_logit_losses(s.clone().requires_grad_(True), ids, tz, 2.0, None, lse, labels)
        (kl + ce).backward()
    assert races == []


def test_dense_kernel_stores_each_gradient_entry_once_per_barrier(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    s, _, _, labels = _sparse_case()
    with store_races(monkeypatch) as races:
        x = s.clone().requires_grad_(True)
        K.dense_distillation_losses(x, torch.randn_like(s), 1.0, mlm_labels=labels).total.backward()
    assert races == []


def test_the_race_detector_sees_two_stores_to_one_address(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def racy(X, BARRIER: tl.constexpr):
        tl.store(X + tl.arange(0, 4), tl.zeros([4], tl.float32))
        if BARRIER:
            tl.debug_barrier()
        tl.store(X + 2, 1.0)

    with store_races(monkeypatch) as races:
        racy[(1,)](torch.zeros(4), BARRIER=True)
        assert races == []
        racy[(1,)](torch.zeros(4), BARRIER=False)
    assert len(races) == 1


def _fill_rows(V: int):
    """A -1e9 fill row, a row of -1e9 with one ordinary logit, an ordinary row (fp32)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, V, generator=g) * 3
    s[0] = -1e9
    s[1] = -1e9
    s[1, 17] = 2.0
    return s


@pytest.mark.parametrize("T", [1.0, 2.0, 3.7])
def test_dense_kernel_survives_fma_contraction_on_fill_rows(monkeypatch, T):
    """-1e9 rows at T = 1 overflowed to NaN once the compiler contracted the rescale factors into FMAs."""
    monkeypatch.setenv(K.ENV_VAR, "triton")
    V = 700
    s = _fill_rows(V)
    t = torch.randn(3, V) * 2
    labels = torch.tensor([3, 17, 5])
    with contracting(monkeypatch):
        x = s.clone().requires_grad_(True)
        out = K.dense_distillation_losses(x, t, T, mlm_labels=labels)
        out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(x.grad).all()
    monkeypatch.setenv(K.ENV_VAR, "reference")
    y = s.clone().requires_grad_(True)
    ref = K.dense_distillation_losses(y, t, T, mlm_labels=labels)
    ref.total.backward()
    torch.testing.assert_close(out.total, ref.total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 3.7])
def test_sparse_kernels_survive_fma_contraction_on_fill_rows(monkeypatch, T):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    V, k = 700, 5
    s = _fill_rows(V)
    ids = torch.tensor([[0, 1, 2, 3, 4], [17, 1, 2, 3, 4], [9, 8, 7, 6, 5]])
    tz = torch.randn(3, k).sort(-1, descending=True).values
    labels = torch.tensor([3, 17, 5])
    lse = torch.logsumexp(tz / T, -1) + 0.3
    with contracting(monkeypatch):
        x = s.clone().requires_grad_(True)
        out = K.distillation_losses(x, ids, tz, T, teacher_lse=lse, mlm_labels=labels)
        out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(x.grad).all()
    monkeypatch.setenv(K.ENV_VAR, "reference")
    y = s.clone().requires_grad_(True)
    ref = K.distillation_losses(y, ids, tz, T, teacher_lse=lse, mlm_labels=labels)
    ref.total.backward()
    torch.testing.assert_close(out.total, ref.total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-3, atol=1e-6)


def test_contraction_emulation_changes_a_contractible_expression(monkeypatch):
    """The emulation is live: m*k - fl(m*k) is the exact residual once fused, 0 when rounded apart."""
    import triton
    import triton.language as tl

    @triton.jit
    def residual(X, OUT, k):
        m = tl.load(X)
        tl.store(OUT, m * k - tl.where(m > 0, m * k, 0.0))

    x, out = torch.tensor([1.0e9 / 3.0]), torch.zeros(1)
    residual[(1,)](x, out, 1.4426950408889634)
    assert out.item() == 0.0
    with contracting(monkeypatch):
        residual[(1,)](x, out, 1.4426950408889634)
    assert out.item() != 0.0
