"""Torture trials of the signal store and of training: kill -9 at random moments, same-rank writers, byte
flips; SIGTERM mid-run, a damaged checkpoint, a store missing a chunk, two trainings on one run directory.

    python benchmarks/torture.py                  # 20 trials of each kind
    python benchmarks/torture.py --trials 5 --kinds kill,flip
    python benchmarks/torture.py --kinds sigterm,ckpt-flip,store-chunk,two-trainings

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

The training kinds run the real training CLI (`offline_kd.cli.train`'s entry point, forked the same way) on
the reference store with the tiny teacher's dropout on (0.1, so that a continuation must also restore the
random state): 8 optimizer steps of 8 sequences, ZeRO 0 in fp32, a checkpoint every 2 steps. An
uninterrupted reference run is made once; "identical" means its metrics rows (step, epoch, samples, tokens,
loss, kl, mlm, cos, lr, grad_norm) and its exported `final/model.safetensors` are the reference's, bit for
bit, and no lease is left.

* sigterm: SIGTERM after a step drawn uniformly from 1-7 (OFFLINE_KD_PAUSE_AFTER_STEP holds the run there
  until the signal, so the step is chosen, not raced): the run exits 143 with one `Error:` line naming
  the checkpoint it saved, then the same command with `--resume` finishes. Identical.
* ckpt-flip: a copy of the reference run as if it had stopped before its export (no `final/`), with one
  byte flipped in a random file of its newest checkpoint (`COMPLETE` included), then `--resume`. Caught,
  identical: the log names the damaged checkpoint, the run resumes from the one before and finishes
  identical.
* store-chunk: one random chunk file of a per-sequence array deleted from a copy of the store. Caught:
  `kd verify` exits non-zero with one `ERROR:` line naming the array; training on that copy (top-k KL, two
  epochs of one micro-batch a step: every chunk of every per-sequence array of both views is read) exits 1 with one `Error:` line naming the array,
  leaves no `final/`, and the metrics rows it wrote before stopping equal an intact run's (no step trained
  on zeros).
* two-trainings: two trainings on one fresh `--output` (the same command, no checkpoint before the end).
  The first waits after a random step (OFFLINE_KD_PAUSE_AFTER_STEP) until the second has exited, so the two
  always overlap; the second starts a random moment (up to 0.3 s, while the first starts up) after the
  first, or, in half the trials, up to 0.5 s after the first took its lease. Identical: exactly one is
  refused (exit 2) with one `Error:` line naming the lease (whichever asked for it second), and the other
  finishes identical.

Prints a table of identical (or caught) / total per kind. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
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


def _kd(args: list[str]) -> None:
    from offline_kd.cli.kd import main

    main(args, prog_name="kd", standalone_mode=True)


def _train(args: list[str]) -> None:
    """The training CLI (`python -m offline_kd.cli.train ARGS`), as one process with its own process group."""
    from offline_kd.cli.train import main

    sys.exit(main(args))


class Child:
    """`kd ARGS` (or, with ``entry=_train``, the training CLI) in a forked process, its stdout and stderr in a
    file, `env` added to its environment."""

    def __init__(self, args: list[str], log: Path, entry=_kd, env: dict[str, str] | None = None):
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
                os.environ.update(env or {})
                entry(args)
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


# ------------------------------------------------------------------------------------------- training

# A short run of the real training CLI on the reference store: 8 optimizer steps of 8 sequences (ZeRO 0, fp32),
# a checkpoint every 2 steps, every step's metrics row written as it ends.
TRAIN_FLAGS = [
    "--student", "distil", "--deepspeed_config", "ds_cpu_tiny", "--epochs", "1", "--max-steps", "8",
    "--save-every", "2", "--log-every", "1", "--no-progress", "--no-tensorboard",
]  # fmt: skip
# The metrics columns a continuation must reproduce exactly (the timings differ from run to run).
EXACT_COLUMNS = ("step", "epoch", "samples", "tokens", "loss", "kl", "mlm", "cos", "lr", "grad_norm")
# store-chunk: the top-k KL over two epochs (both mask views), one micro-batch of 4 a step, so that training reads
# every per-sequence array of every chunk (the tiny store's 68 sequences are 17 micro-batches: none left over).
CHUNK_FLAGS = [
    "--kl-source",
    "topk",
    "--epochs",
    "2",
    "--max-steps",
    "1000",
    "--gradient-accumulation-steps",
    "1",
]
CHUNK_ARRAYS = (
    "input_ids",
    "lengths",
    "masked_input_ids",
    "mlm_mask",
    "topk_ids",
    "topk_logits",
    "lse",
    "hidden",
)
RUN_TIMEOUT = 600.0


def preload_training() -> None:
    """What a training child imports, imported once here (no torch op runs in this process)."""
    import deepspeed  # noqa: F401
    from transformers import DistilBertForMaskedLM  # noqa: F401

    import offline_kd.cli.train  # noqa: F401
    import offline_kd.train.loop  # noqa: F401


def metrics_rows(run: Path) -> list[tuple]:
    path = run / "logs" / "metrics.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [tuple(row[c] for c in EXACT_COLUMNS) for row in csv.DictReader(f)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


class TrainFixture:
    """The tiny teacher with dropout on (so a continuation must restore the random state too), the reference
    store, and uninterrupted reference runs: their metrics rows and exported weights."""

    def __init__(self, fx: Fixture, work: Path):
        self.work, self.store = work, fx.reference
        self.teacher = work / "dropout-teacher"
        shutil.copytree(fx.teacher, self.teacher)
        config = json.loads((self.teacher / "config.json").read_text())
        config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        (self.teacher / "config.json").write_text(json.dumps(config))
        self.reference = work / "train-reference"
        t0 = time.monotonic()
        self._reference(self.reference)
        self.seconds = time.monotonic() - t0
        self.rows, self.weights = metrics_rows(self.reference), self._weights(self.reference)
        self.chunk_rows: list[tuple] | None = None  # store-chunk's reference, made when first needed

    def _reference(self, out: Path, extra: list[str] = ()) -> None:
        ref = self.run(out, extra)
        if finish(ref) != 0:
            raise SystemExit(f"reference training failed:\n{ref.output[-3000:]}")

    def chunk_reference(self) -> list[tuple]:
        if self.chunk_rows is None:
            out = self.work / "chunk-reference"
            self._reference(out, CHUNK_FLAGS)
            self.chunk_rows = metrics_rows(out)
        return self.chunk_rows

    @staticmethod
    def _weights(run: Path) -> bytes | None:
        path = run / "final" / "model.safetensors"
        return path.read_bytes() if path.exists() else None

    def run(
        self, out: Path, extra: list[str] = (), env: dict | None = None, store: Path | None = None
    ) -> Child:
        args = ["--store", str(store or self.store), "--teacher", str(self.teacher), "--output", str(out)]
        log = Path(f"{out}.{time.monotonic_ns()}.log")
        return Child(args + TRAIN_FLAGS + list(extra), log, entry=_train, env=env)

    def identical(self, out: Path) -> bool:
        """The run's metrics rows and exported weights are the reference's, bit for bit, and no lease is left."""
        leases = Path(f"{out}.leases")
        no_lease = not leases.exists() or not any(leases.iterdir())
        return metrics_rows(out) == self.rows and self._weights(out) == self.weights and no_lease


def finish(child: Child) -> int:
    """The child's exit status; one still running after RUN_TIMEOUT is killed (and counts as failed)."""
    if child.wait(RUN_TIMEOUT) is None:
        child.kill()
    return child.code


def _report(children: list[Child]) -> None:
    tails = " || ".join(f"exit {c.code}: " + " | ".join(c.output.strip().splitlines()[-3:]) for c in children)
    print(f"    {tails}", flush=True)


def _wait_for(path: Path, child: Child, timeout: float = RUN_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.wait(timeout=0.02) is not None or time.monotonic() > deadline:
            return False
    return True


def trial_sigterm(tx: TrainFixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    """SIGTERM after a random optimizer step (the run waits there for it: no race), then --resume."""
    step = rng.randint(1, len(tx.rows) - 1)
    release = Path(f"{out}.release")
    child = tx.run(out, env={"OFFLINE_KD_PAUSE_AFTER_STEP": f"{step}:{release}"})
    if _wait_for(Path(f"{release}.paused"), child):
        os.kill(child.pid, signal.SIGTERM)
    code = finish(child)
    want = f"Error: stopped by SIGTERM after step {step}; checkpoint step{step:08d} saved"
    errors = error_lines(child.output)
    stopped = code == 128 + signal.SIGTERM and len(errors) == 1 and errors[0].startswith(want)
    stopped = stopped and "Traceback" not in child.output and not (out / "final").exists()
    rerun = tx.run(out, ["--resume"])
    ok = stopped and finish(rerun) == 0 and tx.identical(out)
    if not ok:
        _report([child, rerun])
    return ok, {}


def _flip_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def trial_ckpt_flip(tx: TrainFixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    """One byte flipped in a random file of the newest checkpoint of a run that stopped before its export."""
    shutil.copytree(tx.reference, out)
    shutil.rmtree(out / "final")
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    newest, previous = tags[-1], tags[-2]
    victim = rng.choice(sorted(p for p in (out / "checkpoints" / newest).rglob("*") if p.is_file()))
    _flip_byte(victim, rng)
    rerun = tx.run(out, ["--resume"])
    code = finish(rerun)
    named = f"checkpoint {newest} is damaged (" in rerun.output and f"resumed from {previous}" in rerun.output
    ok = code == 0 and named and tx.identical(out)
    if not ok:
        _report([rerun])
    return ok, {f"flips in {victim.name if victim.name == 'COMPLETE' else '*' + victim.suffix}": 1}


def trial_store_chunk(tx: TrainFixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    """One random chunk file of a per-sequence array deleted from a copy of the store: `kd verify` and training
    each fail in one line naming the array, and what training logged before it equals the reference's steps."""
    reference_rows = tx.chunk_reference()
    store = Path(f"{out}.store.zarr")
    shutil.copytree(tx.store, store)
    chunks = sorted(p for a in CHUNK_ARRAYS for p in (store / a / "c").rglob("*") if p.is_file())
    victim = rng.choice(chunks)
    victim.unlink()
    array = victim.relative_to(store).parts[0]
    verify = Child(["verify", str(store)], Path(f"{out}.verify.log"))
    problems = (
        [line for line in verify.output.splitlines() if line.startswith("ERROR:")] if verify.wait() else []
    )
    verified = len(problems) == 1 and f"'{array}'" in problems[0]
    train = tx.run(out, CHUNK_FLAGS, store=store)
    code, errors = finish(train), error_lines(train.output)
    refused = (
        code == 1 and len(errors) == 1 and f"array '{array}'" in errors[0] and "Traceback" not in train.output
    )
    rows = metrics_rows(out)
    ok = verified and refused and rows == reference_rows[: len(rows)] and not (out / "final").exists()
    if not ok:
        _report([verify, train])
    shutil.rmtree(store, ignore_errors=True)
    return ok, {array: 1}


def trial_two_trainings(tx: TrainFixture, rng: random.Random, out: Path) -> tuple[bool, dict]:
    """Two trainings on one --output (the same command). The first waits after a random step until the second
    has exited, so the two always overlap; the second starts a random moment (up to 0.3 s) after the first,
    or, in half the trials, a random moment (up to 0.5 s) after the first took its lease."""
    extra = ["--save-every", "0"]  # no checkpoint before the end, so only the lease can refuse the second
    release = Path(f"{out}.release")
    first = tx.run(
        out, extra, env={"OFFLINE_KD_PAUSE_AFTER_STEP": f"{rng.randint(1, len(tx.rows))}:{release}"}
    )
    if rng.random() < 0.5:
        while not list(Path(f"{out}.leases").glob("rank0.*.json")) and first.wait(timeout=0.005) is None:
            pass
        time.sleep(rng.uniform(0, 0.5))
    else:
        time.sleep(rng.uniform(0, 0.3))
    second = tx.run(out, extra)
    finish(second)
    release.touch()
    children = [first, second]
    codes = [finish(c) for c in children]  # 0: finished, 2: refused
    refused = [c.output for c in children if c.code != 0]
    errors = error_lines(refused[0]) if len(refused) == 1 else []
    one_line = len(errors) == 1 and "is being written by another process" in errors[0]
    ok = sorted(codes) == [0, 2] and one_line and "Traceback" not in refused[0] and tx.identical(out)
    if not ok:
        _report(children)
    return ok, {"the second won the lease": int(codes == [2, 0])}


TRIALS = {
    "kill": ("kill -9 at a random moment, then rerun", "identical", trial_kill),
    "writers": ("two same-rank writers at once", "identical", trial_writers),
    "flip": ("one flipped byte in a chunk file", "caught by kd verify", trial_flip),
    "sigterm": ("training: SIGTERM at a random step, then --resume", "identical", trial_sigterm),
    "ckpt-flip": (
        "training: one flipped byte in the newest checkpoint",
        "caught, identical",
        trial_ckpt_flip,
    ),
    "store-chunk": ("training: one chunk file deleted from the store", "caught", trial_store_chunk),
    "two-trainings": ("training: two trainings on one --output", "identical", trial_two_trainings),
}
TRAINING = ("sigterm", "ckpt-flip", "store-chunk", "two-trainings")


def run_kind(kind: str, target, rng: random.Random, work: Path, trials: int) -> tuple:
    """`trials` trials of one kind; its row of the table."""
    title, what, trial = TRIALS[kind]
    good, notes, t0 = 0, {}, time.monotonic()
    for i in range(trials):
        out = work / (f"{kind}{i}" if kind in TRAINING else f"{kind}{i}.zarr")
        ok, extra = trial(target, rng, out)
        good += ok
        for k, v in extra.items():
            notes[k] = notes.get(k, 0) + v
        if not ok:
            print(f"  {kind} trial {i}: NOT {what}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.leases", ignore_errors=True)
        for leftover in work.glob(f"{out.name}.*"):  # logs, release files, a store copy
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(notes.items()))
    print(f"{kind}: {good}/{trials} {what}", flush=True)
    return title, what, f"{good}/{trials}", f"{time.monotonic() - t0:.0f}", extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials of each kind")
    ap.add_argument("--kinds", default=",".join(TRIALS), help=f"comma-separated, of: {', '.join(TRIALS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--documents", type=int, default=40, help="documents of the tiny corpus")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if unknown := [k for k in kinds if k not in TRIALS]:
        ap.error(f"--kinds: unknown {', '.join(unknown)} (known: {', '.join(TRIALS)})")
    training = any(k in TRAINING for k in kinds)
    preload()
    if training:
        preload_training()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kd-torture-") as tmp:
        work = Path(tmp)
        fx = Fixture(work, args.documents)
        print(f"reference precompute: {fx.seconds:.1f} s, {len(fx.files)} files", flush=True)
        tx = TrainFixture(fx, work) if training else None
        if tx is not None:
            print(f"reference training: {tx.seconds:.1f} s, {len(tx.rows)} steps", flush=True)
        rows = [run_kind(k, tx if k in TRAINING else fx, rng, work, args.trials) for k in kinds]
    print()
    print("| trial | counted | result | seconds | notes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
