"""No import cycles inside a package, and no module importing another's private names.

`import_graph(package_dir)` parses every module's imports with `ast` (no module is imported, so nothing runs)
and resolves them against the package's own modules; function-level imports count too, because a cycle
deferred into a function is still a cycle (it only moves the failure to the first call). Importing a
submodule runs its parent packages' `__init__` first; that implicit edge is not counted, or every package
whose `__init__` re-exports its submodules would be a cycle. Imports under ``if TYPE_CHECKING:`` never run
and are left out. Use it for any package directory:

    assert_no_cycles(Path("offline_kd/kernels"))
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `package_dir` (the package's own name included), named from
    the outermost enclosing package, so absolute imports (`offline_kd.kernels.kl`) resolve too."""
    package_dir = package_dir.resolve()
    base = package_dir.parent
    while (base / "__init__.py").exists():
        base = base.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a `from X import ...` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _running_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module within `known`, names imported from it) for every import statement of a module."""
    is_package = path.name == "__init__.py"
    out = []
    for node in _running_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            names = [a.name for a in node.names]
            # `from pkg import sub` imports the submodule pkg.sub; other names come from pkg itself
            subs = [n for n in names if f"{target}.{n}" in known]
            out += [(f"{target}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest and target in known:
                out.append((target, rest))
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any level of the file)."""
    known = module_names(package_dir)
    return {m: {t for t, _ in imports_of(m, p, known) if t != m} for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def private_imports(package_dir: Path) -> list[str]:
    """`module imports name from other` for every underscored name one module takes from another."""
    known = module_names(package_dir)
    return [
        f"{m} imports {n} from {t}"
        for m, p in known.items()
        for t, names in imports_of(m, p, known)
        for n in names
        if n.startswith("_") and not n.startswith("__") and t != m
    ]


def assert_no_cycles(package_dir: Path) -> None:
    cycle = find_cycle(import_graph(package_dir))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def stage_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The graph between a package's first-level folders and modules (its stages)."""

    def stage(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    stages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if module == package:
            continue  # the package's own __init__
        targets = {stage(d) for d in deps if d != package}
        stages.setdefault(stage(module), set()).update(targets - {stage(module)})
    return stages


@pytest.mark.parametrize("package", ["offline_kd", "offline_kd/kernels"])
def test_no_import_cycles(package):
    assert_no_cycles(ROOT / package)


def test_the_stages_import_in_one_direction():
    """Folders, not just modules: a stage that imports a stage which imports it back is one stage."""
    cycle = find_cycle(stage_graph(import_graph(ROOT / "offline_kd"), "offline_kd"))
    assert cycle is None, "stages in a cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["offline_kd", "offline_kd/kernels"])
def test_no_module_imports_another_modules_private_names(package):
    assert private_imports(ROOT / package) == []


def test_the_checker_finds_cycles_and_private_imports(tmp_path):
    """The checker on a small package: a cycle through a function-level import and a relative
    `from . import`, and an underscored name taken from a sibling."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    return b.g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import _h\n    return _h\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}
    assert private_imports(pkg) == ["pkg.sub.b imports _h from pkg.a"]
    (pkg / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None and private_imports(pkg) == []
