"""Torture trials of the signal store: kill -9 at random moments, same-rank writers, byte flips.

    python benchmarks/torture.py                  # 20 trials of each kind
    python benchmarks/torture.py --trials 5 --kinds kill,flip

Every trial runs the real `kd precompute` command (its click entry point) and `kd verify` on a tiny
teacher and corpus (the test fixtures') against a reference store written once, uninterrupted.
Each `kd precompute` is a process forked from this one after the imports, so a trial pays for the
work and not for a fresh interpreter's imports; this process itself never runs torch or the
teacher, so each child starts from a clean state.

* kill: `kd precompute` is killed with SIGKILL at a moment drawn uniformly over the reference
  run's duration (a quarter of the trials are killed a second time while resuming), then the same
  command is rerun. Identical: every file of the store equals the reference (no `*.partial`, no
  lease left) and `kd inspect --json` equals the reference's.
* writers: two `kd precompute` processes of the same rank on one fresh output, the second started
  a random delay (up to a quarter of the reference run) after the first, or, in half the trials,
  after the first took its lease. Identical: exactly one is refused with one `Error:` line naming
  the lease, the other finishes, and the store equals the reference.
* flip: one byte of a random chunk file of a copy of the reference is flipped. Caught: `kd verify`
  fails naming that array.

Prints a table of identical (or caught) / total per kind. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

FLAGS = [
    "--max-length", "32", "--top-k", "8", "--temperatures", "1,2", "--views", "2", "--hidden",
    "--seed", "0", "--batch-size", "8", "--shard-size", "8", "--chunk-size", "4", "--device", "cpu",
    "--no-progress",
]  # fmt: skip
# Widens each shard's write window a little so that kills and overlaps land inside shards too
# (read by offline_kd.precompute.run at import).
os.environ.update(OFFLINE_KD_PRECOMPUTE_DELAY="0.02", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

BUILD_TEACHER = """
import sys
from pathlib import Path
from offline_kd.examples.tiny import build_tiny_teacher, make_documents
build_tiny_teacher(Path(sys.argv[1]), make_documents(int(sys.argv[2])))
"""


def preload() -> None:
    """Everything a `kd precompute` child imports, imported once here (imports run no torch ops)."""
    import datasets  # noqa: F401
    from transformers import BertForMaskedLM, BertTokenizerFast  # noqa: F401

    import offline_kd.cli.kd  # noqa: F401
    import offline_kd.precompute.run  # noqa: F401


class Child:
    """`kd ARGS` in a forked process, its stdout and stderr in a file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the command, never return into the caller
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                from offline_kd.cli.kd import main

                main(args, prog_name="kd", standalone_mode=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported as the traceback a user would see
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.code: int | None = None

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.code is None:
            pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                return None
            else:
                time.sleep(0.005)
        return self.code

    def kill(self) -> None:
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Fixture:
    """The tiny teacher, its corpus and the reference store (files and `kd inspect --json`)."""

    def __init__(self, work: Path, documents: int):
        from offline_kd.examples.tiny import make_documents

        docs = make_documents(documents)
        self.work = work
        self.teacher = work / "teacher"
        subprocess.run(
            [sys.executable, "-c", BUILD_TEACHER, str(self.teacher), str(documents)],
            check=True,
            capture_output=True,
        )
        self.corpus = work / "corpus.txt"
        self.corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
        self.reference = work / "reference.zarr"
        t0 = time.monotonic()
        ref = self.run(self.reference)
        if ref.wait() != 0:
            raise SystemExit(f"reference precompute failed:\n{ref.output[-3000:]}")
        self.seconds = time.monotonic() - t0
        self.files = store_files(self.reference)
        self.inspect = inspect_json(self.reference)

    def run(self, out: Path) -> Child:
        args = [
            "precompute",
            "--teacher",
            str(self.teacher),
            "--corpus",
            str(self.corpus),
            "--output",
            str(out),
        ]
        return Child(args + FLAGS, Path(f"{out}.{time.monotonic_ns()}.log"))

    def identical(self, out: Path) -> bool:
        leases = Path(f"{out}.leases")
        return store_files(out) == self.files and inspect_json(out) == self.inspect and not leases.exists()


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def inspect_json(store: Path) -> dict:
    from offline_kd.precompute.verify import inspect_store

    info = inspect_store(str(store))
    info.pop("url")
    return json.loads(json.dumps(info))


def _kill_at(fx: Fixture, out: Path, delay: float) -> None:
    child = fx.run(out)
    if child.wait(timeout=delay) is None:
        child.kill()


def trial_kill(fx: Fixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    _kill_at(fx, out, rng.uniform(0, fx.seconds))
    notes = {"partial files left by a kill": len(list(out.rglob("*.partial"))) if out.exists() else 0}
    if rng.random() < 0.25:  # a second kill, while resuming
        _kill_at(fx, out, rng.uniform(0, fx.seconds))
        notes["double kills"] = 1
    rerun = fx.run(out)
    return rerun.wait() == 0 and fx.identical(out), notes


def trial_writers(fx: Fixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    first = fx.run(out)
    delay = rng.uniform(0, fx.seconds / 4)
    if rng.random() < 0.5:  # half the trials: a random moment after the first one holds its rank
        while not list(Path(f"{out}.leases").glob("rank0.*.json")) and first.wait(timeout=0.005) is None:
            pass
    time.sleep(delay)
    second = fx.run(out)
    children = [first, second]
    codes = sorted(min(c.wait(), 1) for c in children)  # 0: finished, 1: refused (exit status 2)
    refused = [c.output for c in children if c.code != 0]
    errors = [line for line in refused[0].splitlines() if line.startswith("Error:")] if refused else []
    one_line = len(refused) == 1 and len(errors) == 1 and "being written by another process" in errors[0]
    ok = codes == [0, 1] and one_line and "Traceback" not in refused[0] and fx.identical(out)
    if not ok:
        tails = " || ".join(
            f"exit {c.code}: " + " | ".join(c.output.strip().splitlines()[-3:]) for c in children
        )
        print(f"    {tails}", flush=True)
    return ok, {"both finished (no overlap)": int(codes == [0, 0])}


def trial_flip(fx: Fixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    from offline_kd.precompute.verify import verify_store

    shutil.copytree(fx.reference, out)
    chunks = sorted(p for p in out.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(out.parent)))
    victim = rng.choice(chunks)
    data = bytearray(victim.read_bytes())
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    victim.write_bytes(bytes(data))
    array = victim.relative_to(out).parts[0]
    report = verify_store(str(out))
    return (not report.ok) and any(f"'{array}'" in e for e in report.errors), {}


TRIALS = {
    "kill": ("kill -9 at a random moment, then rerun", "identical", trial_kill),
    "writers": ("two same-rank writers at once", "identical", trial_writers),
    "flip": ("one flipped byte in a chunk file", "caught by kd verify", trial_flip),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials of each kind")
    ap.add_argument("--kinds", default="kill,writers,flip", help="comma-separated: kill, writers, flip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--documents", type=int, default=40, help="documents of the tiny corpus")
    args = ap.parse_args()
    preload()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kd-torture-") as tmp:
        work = Path(tmp)
        fx = Fixture(work, args.documents)
        print(f"reference precompute: {fx.seconds:.1f} s, {len(fx.files)} files", flush=True)
        rows = []
        for kind in kinds:
            title, what, trial = TRIALS[kind]
            good, notes, t0 = 0, {}, time.monotonic()
            for i in range(args.trials):
                out = work / f"{kind}{i}.zarr"
                ok, extra = trial(fx, rng, out)
                good += ok
                for k, v in extra.items():
                    notes[k] = notes.get(k, 0) + v
                if not ok:
                    print(f"  {kind} trial {i}: NOT {what}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(f"{out}.leases", ignore_errors=True)
                for log in work.glob(f"{out.name}.*.log"):
                    log.unlink()
            extra = ", ".join(f"{k}: {v}" for k, v in notes.items())
            rows.append((title, what, f"{good}/{args.trials}", f"{time.monotonic() - t0:.0f}", extra))
            print(f"{kind}: {good}/{args.trials} {what}", flush=True)
    print()
    print("| trial | counted | result | seconds | notes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
