"""Every Triton launch runs on its tensors' device, and each rank makes its own GPU the current device.

Triton launches on the *current* CUDA device. A rank whose tensors live on cuda:r but whose current device is
still cuda:0 would launch there with pointers into another GPU's memory (an illegal address at best). Two
defences, both checked here without a GPU: every launch site in `offline_kd/kernels` sits inside a
`with device_guard(...)` block (a static check over the source: `kernel[grid](...)` calls), and the places
that choose a rank's CUDA device (`offline_kd.runtime.distributed.local_device` / `accelerator_device`, used by
precompute, train and eval) call `torch.cuda.set_device`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "offline_kd" / "kernels"


def _is_guard(item: ast.withitem) -> bool:
    call = item.context_expr
    return isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) == (
        "device_guard"
    )


def unguarded_launches(source: str, filename: str = "<src>") -> list[str]:
    """`file:line` of every `kernel[grid](...)` call not lexically inside `with device_guard(...)`."""
    tree = ast.parse(source, filename)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            up, guarded = node, False
            while up in parents and not guarded:
                up = parents[up]
                guarded = isinstance(up, ast.With) and any(map(_is_guard, up.items))
            if not guarded:
                out.append(f"{filename}:{node.lineno}")
    return out


def test_every_triton_launch_runs_under_a_device_guard():
    bad = [site for p in KERNELS.glob("*.py") for site in unguarded_launches(p.read_text(), p.name)]
    assert bad == [], f"Triton launches without `with device_guard(tensor):` {bad}"
    # the check has something to check: the package's launchers (sparse, dense, cosine, signals, scaling)
    calls = sum("](" in p.read_text() for p in KERNELS.glob("*.py"))
    assert calls >= 5


def test_the_static_check_sees_an_unguarded_launch():
    src = (
        "def ok(x):\n    with device_guard(x):\n        k[(1,)](x)\n"
        "def bad(x):\n    with other(x):\n        k[(1,)](x)\n"
        "def worse(x):\n    k[(x.shape[0],)](x, BLOCK=4)\n"
    )
    assert sorted(unguarded_launches(src)) == ["<src>:6", "<src>:8"]


@pytest.mark.parametrize("explicit", [None, "cuda:1"])
def test_local_device_makes_the_ranks_gpu_current(monkeypatch, explicit):
    from offline_kd.runtime import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = distributed.local_device(explicit)
    assert device == (explicit or "cuda:3")
    assert calls == [1 if explicit else 3]


def test_local_device_leaves_cpu_alone(monkeypatch):
    from offline_kd.runtime import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    assert distributed.local_device("cpu") == "cpu"
    assert calls == []


def test_the_entry_points_choose_their_device_through_distributed():
    """precompute, train and eval pick a rank's device only through the functions that make it current."""
    uses = {
        "precompute/run.py": "local_device(",
        "publish/evaluate.py": "local_device(",
        "train/loop.py": "accelerator_device()",
    }
    for name, call in uses.items():
        text = (ROOT / "offline_kd" / name).read_text()
        assert call in text, name
        assert 'f"cuda:{' not in text and 'torch.device("cuda"' not in text, name
