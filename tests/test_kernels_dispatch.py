"""Which backend runs where (`offline_kd.kernels.choose_backend`, the rule `backend_for` applies to each call)
and the fallbacks: no or a broken Triton, ROCm, a leftover TRITON_INTERPRET=1 on a GPU host, the reference's
chunk size on an accelerator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import offline_kd.kernels as K
from offline_kd.kernels import choose_backend, dispatch, reference


@pytest.mark.parametrize(
    "mode,device,kw,want,warns",
    [
        ("auto", "cpu", {}, "reference", False),
        ("auto", "cuda", {}, "triton", False),
        ("", "cuda", {}, "triton", False),
        ("auto", "mps", {}, "reference", False),
        # ROCm: routed to the reference explicitly (the kernels are only compiled and checked for NVIDIA)
        ("auto", "cuda", {"rocm": True}, "reference", False),
        ("triton", "cuda", {"rocm": True}, "triton", False),
        # CUDA without a working Triton: the reference (large chunks), with a warning naming the failure
        ("auto", "cuda", {"triton_error": "RuntimeError: boom"}, "reference", True),
        ("auto", "cpu", {"triton_error": "RuntimeError: boom"}, "reference", False),
        # a leftover TRITON_INTERPRET=1 on a GPU host: not the interpreter, and a warning saying why
        ("auto", "cuda", {"interpreted": True}, "reference", True),
        ("triton", "cuda", {"interpreted": True}, "triton", True),
        ("triton", "cpu", {"interpreted": True}, "triton", False),
        ("reference", "cuda", {}, "reference", False),
        (" Reference ", "cpu", {}, "reference", False),
    ],
)
def test_choose_backend(mode, device, kw, want, warns):
    backend, warning = choose_backend(mode, device, **kw)
    assert backend == want
    assert (warning is not None) == warns
    if "triton_error" in kw and warns:
        assert "boom" in warning


def test_choose_backend_refuses_bad_modes_and_a_missing_triton():
    with pytest.raises(ValueError, match="auto|triton|reference"):
        choose_backend("cuda", "cpu")
    with pytest.raises(RuntimeError, match="cannot be imported: ImportError: no triton"):
        choose_backend("triton", "cpu", triton_error="ImportError: no triton")


def test_backend_for_warns_on_the_gpu_fallbacks(monkeypatch):
    """backend_for applies the rule with this process's state; the warning reaches the caller."""
    monkeypatch.setattr(dispatch, "TRITON_ERROR", "RuntimeError: boom")
    monkeypatch.setenv(K.ENV_VAR, "auto")
    with pytest.warns(RuntimeWarning, match="Triton cannot be imported"):
        assert K.backend_for_device("cuda") == "reference"
    assert K.backend_for(torch.zeros(1)) == "reference"


def test_reference_chunks_are_large_on_an_accelerator():
    """Without Triton on a GPU the reference must not run in 8-row chunks (about 40k launches per step)."""
    assert reference.chunk_rows(30522, "cpu") == 8
    assert reference.chunk_rows(30522, "cuda") >= 512
    assert reference.chunk_rows(30522, torch.device("cuda", 1)) >= 512


BROKEN_TRITON = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import offline_kd.kernels as K
    out = {"has_triton": K.HAS_TRITON, "error": K.TRITON_ERROR}
    s = torch.randn(4, 50, requires_grad=True)
    ids = torch.randint(0, 50, (4, 3))
    parts = K.distillation_losses(s, ids, torch.randn(4, 3), 2.0, mlm_labels=torch.tensor([1, -100, 3, 4]))
    parts.total.backward()
    out["finite"] = bool(torch.isfinite(s.grad).all() and torch.isfinite(parts.total))
    os.environ[K.ENV_VAR] = "triton"
    try:
        K.distillation_losses(s, ids, torch.randn(4, 3), 2.0)
    except RuntimeError as e:
        out["forced"] = str(e)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("failure", ["raise RuntimeError('driver mismatch')", "import no_such_module_xyz"])
def test_a_broken_triton_install_leaves_the_cpu_path_working(tmp_path, failure):
    """Any exception while importing triton (not only ImportError) leaves the reference path working, and
    forcing the Triton backend then names the failure."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text(failure + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", K.ENV_VAR)}
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", BROKEN_TRITON], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["has_triton"] is False and out["finite"] is True
    want = "RuntimeError: driver mismatch" if "Runtime" in failure else "No module named 'no_such_module_xyz'"
    assert want in out["error"]
    assert "cannot be imported" in out["forced"] and want in out["forced"]
