"""The library's functions stay short: one job each (kernel bodies, which a compiler fuses whole, aside)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "offline_kd"
MAX_LINES = 60


def _is_kernel(node: ast.FunctionDef) -> bool:
    """A Triton kernel body: ``@triton.jit`` (or ``@jit``, with or without arguments)."""
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def test_no_function_is_longer_than_sixty_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not _is_kernel(node)
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert long == []
