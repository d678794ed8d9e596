"""Collect every wheel `pip install offline-kd` needs on a host with no network whose image already has torch.

    python scripts/wheelhouse.py [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--out wheelhouse]
    make wheelhouse PY_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64

Run it on a machine with network access (any OS and Python: pip resolves for the target's Python version
and platform, not this one's). It

1. builds the offline_kd wheel from this checkout;
2. resolves the whole dependency tree for the target (manylinux platforms fall back to older glibc tags);
   a dependency published only as a source archive (deepspeed) is built here into a pure-Python wheel;
3. downloads every resolved wheel except torch, triton and torch's CUDA libraries (nvidia-*, cuda-*),
   which a CUDA PyTorch image provides; transformers, tokenizers and numpy are included so images
   without them work too (pip keeps whatever the image already has that satisfies a requirement);
4. checks, with every pip setting and index switched off, that the wheelhouse alone resolves
   `offline-kd` for the target once torch and triton are present, and writes wheelhouse/INSTALL.md.

On the air-gapped host: pip install --no-index --find-links wheelhouse offline-kd
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What an image already holds, by --image: "torch" (any CUDA PyTorch image: torch, triton and CUDA's libraries),
# "hf" (such an image with transformers and tokenizers installed, as GPU machines for ML usually have: what
# make gpu-wheels collects for, small enough to carry to a machine with no package index).
IMAGES = {
    "torch": r"^(torch|triton|nvidia-.*|cuda-.*)$",
    "hf": r"^(torch|triton|nvidia-.*|cuda-.*|transformers|tokenizers|huggingface-hub|hf-xet|safetensors|numpy"
    r"|regex|pyyaml|requests|urllib3|idna|certifi|charset-normalizer|packaging|filelock|fsspec|tqdm|typer|click"
    r"|typing-extensions|jinja2|markupsafe|networkx|sympy|mpmath|setuptools|kernels|shellingham|rich"
    r"|markdown-it-py|mdurl|pygments|annotated-doc)$",
}

LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
MAX_SOURCE_BUILDS = 5


def platform_tags(platform: str) -> list[str]:
    """manylinux_2_28_x86_64 -> itself, then every older manylinux_2_N and legacy alias pip accepts there."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def pip(*args: str, clean: bool = False) -> subprocess.CompletedProcess:
    """Run pip; ``clean`` drops every pip setting (PIP_* variables and all configuration files)."""
    env = dict(os.environ)
    if clean:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then loads no configuration file at all
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def target_args(python_version: str, platform: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platform):
        args += ["--platform", tag]
    return args


def checked(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise SystemExit(f"Error: {what} failed:\n{proc.stderr.strip()}")
    return proc


def build_own_wheel(out: Path) -> Path:
    checked(pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)), "building the offline_kd wheel")
    return max(out.glob("offline_kd-*.whl"), key=lambda p: p.stat().st_mtime)


def resolve(own: Path, out: Path, targs: list[str]) -> list[dict]:
    """The install set for the target, building source-only dependencies into `out` as they come up."""
    for _ in range(MAX_SOURCE_BUILDS + 1):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            proc = pip(
                "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                "--target", str(Path(tmp) / "t"), "--find-links", str(out), *targs, str(own),
            )  # fmt: skip
            if proc.returncode == 0:
                return json.loads(report.read_text())["install"]
        missing = re.search(r"No matching distribution found for (\S+)", proc.stderr)
        if not missing:
            checked(proc, "resolving the dependencies")
        req = missing.group(1)
        print(f"  {req} has no wheel for the target: building one from its source archive")
        checked(
            pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), req),
            f"building a wheel of {req}",
        )
    raise SystemExit(f"Error: still unresolved after {MAX_SOURCE_BUILDS} source builds")


def download(pins: list[str], out: Path, targs: list[str]) -> None:
    if pins:
        checked(pip("download", "--no-deps", "--quiet", "-d", str(out), *targs, *pins), "downloading wheels")


def placeholder_wheel(name: str, version: str, directory: Path) -> None:
    """An empty wheel that stands for a package the image provides, so the check can resolve around it."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")


def check_offline(out: Path, provided: list[dict], targs: list[str], image: re.Pattern) -> list[str]:
    """Resolve offline-kd from the wheelhouse alone (no index, no pip config); return what would install."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image"
        image.mkdir()
        for item in provided:
            placeholder_wheel(item["metadata"]["name"], item["metadata"]["version"], image)
        report = Path(tmp) / "report.json"
        proc = pip(
            "install", "--dry-run", "--ignore-installed", "--no-index", "--quiet", "--report", str(report),
            "--find-links", str(out), "--find-links", str(image), "--target", str(Path(tmp) / "t"),
            *targs, "offline-kd",
            clean=True,
        )  # fmt: skip
        checked(proc, "the offline check (pip install --dry-run --no-index, no pip configuration)")
        items = json.loads(report.read_text())["install"]
    return sorted(i["metadata"]["name"] for i in items if not image.match(i["metadata"]["name"].lower()))


def write_install_notes(out: Path, python_version: str, platform: str, provided: list[dict]) -> Path:
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    image = ", ".join(sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in provided))
    lines = [
        "# Air-gapped install of offline-kd",
        "",
        f"{len(wheels)} wheels, {size / 1e6:,.0f} MB, for CPython {python_version} on {platform} "
        "(and older manylinux tags).",
        "",
        "The host's image must already provide torch and triton (any CUDA PyTorch image does). Copy this",
        "directory to the host, then, with no network:",
        "",
        "    pip install --no-index --find-links wheelhouse offline-kd",
        "",
        "pip keeps the packages the image already has when they satisfy a requirement and installs the rest",
        "from here. Check the install with `kd --help`.",
        "",
        f"Resolved against: {image}.",
        "",
        "## Wheels",
        "",
        *[f"- {w.name}" for w in wheels],
        "",
    ]
    path = out / "INSTALL.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-version", default="3.12", help="target CPython, e.g. 3.12")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64", help="target platform tag")
    ap.add_argument("--out", default=str(ROOT / "wheelhouse"), help="output directory")
    ap.add_argument(
        "--image", choices=sorted(IMAGES), default="torch",
        help="what the host already has: torch (a CUDA PyTorch image) or hf (one with transformers too)",
    )  # fmt: skip
    ap.add_argument("--max-mb", type=float, default=None, help="refuse a wheelhouse larger than this (MB)")
    args = ap.parse_args()
    image = re.compile(IMAGES[args.image])
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    targs = target_args(args.python_version, args.platform)

    print(f"building offline_kd and resolving for CPython {args.python_version} on {args.platform}")
    own = build_own_wheel(out)
    items = resolve(own, out, targs)
    provided = [i for i in items if image.match(i["metadata"]["name"].lower())]
    pins = [
        f"{i['metadata']['name']}=={i['metadata']['version']}"
        for i in items
        if i not in provided and not i["download_info"]["url"].startswith(out.as_uri())  # built here
    ]
    print(f"downloading {len(pins)} wheels; {len(provided)} packages left to the image ({args.image})")
    download(pins, out, targs)
    would_install = check_offline(out, provided, targs, image)
    notes = write_install_notes(out, args.python_version, args.platform, provided)
    wheels = list(out.glob("*.whl"))
    size_mb = sum(w.stat().st_size for w in wheels) / 2**20
    if args.max_mb is not None and size_mb > args.max_mb:
        raise SystemExit(f"Error: the wheelhouse holds {size_mb:,.1f} MiB, over --max-mb {args.max_mb:g}")
    print(
        f"offline check passed: {len(would_install)} packages resolve from {out} alone\n"
        f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 1e6:,.0f} MB; see {notes}\n"
        f"on the air-gapped host: pip install --no-index --find-links {out.name} offline-kd"
    )


if __name__ == "__main__":
    main()
