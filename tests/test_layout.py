"""No name in the checkout shadows an installed distribution (docs/layout.md).

Documented commands put checkout folders first on ``sys.path``: the root under ``python -m``,
``python -c``, pytest, ``torchrun -m`` and ``deepspeed --module``; ``benchmarks/`` under
``python benchmarks/NAME.py``; ``cli/`` under ``deepspeed cli/train.py``; ``tests/`` under pytest. A
regular module or package there named like an installed distribution's module hides that module
from every library that imports it (transformers imports Hugging Face's ``kernels``).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every folder some documented command puts first on sys.path.
PATH_FOLDERS = ("", "benchmarks", "cli", "tests", "scripts")


def _regular_modules(folder: Path) -> set[str]:
    """What ``import NAME`` finds in ``folder`` ahead of site-packages: modules and regular packages
    (a folder without ``__init__.py`` is a namespace portion, which never hides a regular package)."""
    modules = {p.stem for p in folder.glob("*.py")}
    return modules | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def test_no_folder_on_a_documented_sys_path_shadows_an_installed_module():
    installed = importlib.metadata.packages_distributions()
    clashes = {
        f"{folder or '.'}/{name}": installed[name]
        for folder in PATH_FOLDERS
        for name in sorted(_regular_modules(ROOT / folder))
        if name in installed and installed[name] != ["offline-kd"] and name != "offline_kd"
    }
    assert clashes == {}


def test_the_checkout_root_has_one_importable_package():
    assert _regular_modules(ROOT) == {"offline_kd"}


def _run_from_root(code_or_module: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_or_module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_from_the_checkout_root_libraries_import_their_kernels_and_kd_runs(tmp_path, tiny_teacher):
    """From the root, with a `kernels` package installed behind it, `import kernels` finds that package,
    transformers loads a BERT (importing the real `kernels` where it depends on it) and `kd` runs."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHERE = 'installed'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    behind_root = dict(env, PYTHONPATH=str(site))  # after the root (sys.path[0]), like site-packages
    found = _run_from_root(["-c", "import kernels; print(kernels.WHERE)"], behind_root)
    assert found.returncode == 0 and found.stdout.strip() == "installed", found.stderr[-2000:]

    load = (
        "from transformers import AutoModelForMaskedLM\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(tiny_teacher)!r})\n"
        "print(type(m).__name__)\n"
    )
    loaded = _run_from_root(["-c", load], env)
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("ForMaskedLM"), loaded.stderr[-3000:]
    helped = _run_from_root(["-m", "offline_kd.cli.kd", "--help"], env)
    assert helped.returncode == 0 and "precompute" in helped.stdout, helped.stderr[-3000:]
