"""The README's "On a real cluster" commands, run as written on the tiny fixtures.

Each command is read from the README and changed only where the fixtures require it: the tiny
local teacher and corpus for the hub names, a local store for ``s3://``, two CPU processes for the
GPUs (``srun`` becomes two processes with SLURM's variables), tiny-model sizes, a few steps.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Flag values too big for the tiny fixtures, and their tiny replacements.
TINY_VALUES = {
    "--max-length": "32", "--top-k": "8", "--batch-size": "8", "--dtype": "float32", "--holdout": "0.2",
    "--sample": "2", "--deepspeed_config": "ds_cpu_tiny", "--nproc_per_node": "2", "--num_gpus": "2",
    "--num-proc": "2",
}  # fmt: skip
DROPPED = ("--num_nodes", "--hostfile")  # one host here


def readme_commands() -> list[list[str]]:
    """Every command of the README's cluster section, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## On a real cluster", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _free_port(low: int = 20000, high: int = 40000) -> int:
    for port in range(low + os.getpid() % (high - low), high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return dict(env, PYTHONUNBUFFERED="1", **extra)


def tiny_arguments(args: list[str], teacher: Path, corpora: list[Path], store: Path) -> list[str]:
    """The same arguments for the fixtures (see the module docstring): the i-th ``--corpus`` becomes
    ``corpora[i]`` (``kd eval``'s keeps its file), ``--group-rows`` names the local stand-in."""
    out: list[str] = []
    local: dict[str, str] = {}
    it = iter(args)
    for arg in it:
        if arg in DROPPED:
            next(it)
        elif arg == "--corpus" and "eval" not in out:
            local[next(it)] = str(corpora[len(local)])
            out += [arg, local[list(local)[-1]]]
        elif arg == "--group-rows":
            name, _, _ = next(it).partition("=")
            out += [arg, f"{local[name]}=3"]
        elif arg == "--cache-dir":
            out += [arg, str(store.parent / "corpus-cache")]
            next(it)
        elif arg == "--teacher":
            out += [arg, str(teacher)]
            next(it)
        elif arg in TINY_VALUES:
            out += [arg, TINY_VALUES[arg]]
            next(it)
        else:
            out.append(str(store) if arg.startswith("s3://") else arg)
    if "precompute" in out:
        out += ["--shard-size", "8", "--no-progress"]
    if "offline_kd.cli.train" in out:
        out += ["--max-steps", "2", "--no-progress"]
    return out


def program(argv: list[str]) -> list[str]:
    """The executable a README command names, as installed beside this interpreter."""
    head, rest = argv[0], argv[1:]
    if head == "python":
        return [sys.executable, *rest]
    if head == "torchrun":  # the same program as python -m torch.distributed.run
        return [sys.executable, "-m", "torch.distributed.run", "--master_port", str(_free_port()), *rest]
    if head == "deepspeed":
        deepspeed = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
        return [deepspeed, "--master_port", str(_free_port()), *rest]
    if head == "kd":
        return [shutil.which("kd", path=str(BIN)) or "kd", *rest]
    raise AssertionError(f"unexpected program in the README: {head}")


def run(argv: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """One README command; ``srun ... CMD`` runs CMD as two tasks with SLURM's variables."""
    if argv[0] != "srun":
        proc = subprocess.run(
            program(argv), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, " ".join(argv) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc
    rest = argv[1:]
    while rest[0].startswith("--"):
        rest = rest[2:]  # srun's own options
    job = str(_free_port() - 20000)  # MASTER_PORT becomes 20000 + job id
    tasks = [
        _env(
            SLURM_PROCID=str(r),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(r),
            SLURM_JOB_ID=job,
            SLURM_JOB_NODELIST="localhost",
        )
        for r in (0, 1)
    ]
    pipe = subprocess.PIPE
    procs = [
        subprocess.Popen(program(rest), cwd=cwd, stdout=pipe, stderr=pipe, text=True, env=e) for e in tasks
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, " ".join(rest) + "\n" + out[-3000:] + err[-5000:]
    return subprocess.CompletedProcess(argv, 0, [o for o, _ in outs], [e for _, e in outs])


def test_commands_are_extracted():
    kinds = [" ".join(c[:2]) for c in readme_commands()]
    assert kinds == [
        "torchrun --nproc_per_node", "kd inspect", "kd verify", "kd verify", "deepspeed --num_nodes", "kd eval",
        "srun --nodes", "srun --nodes",
    ]  # fmt: skip


@pytest.mark.slow
def test_readme_cluster_commands_run(tmp_path, tiny_teacher, tiny_corpus, tiny_docs):
    from offline_kd.precompute.run import assigned_shards
    from offline_kd.store.signal_store import SignalStore
    from offline_kd.train.metrics import read_csv

    store = tmp_path / "bert-base.zarr"
    sentences = tmp_path / "sentences.txt"  # BookCorpus's stand-in: a sentence a row
    sentences.write_text("".join(f"{s.strip()}.\n" for d in tiny_docs for s in d.split(".") if s.strip()))
    pre, inspect, verify, verify_exact, train, evaluate, srun_pre, srun_train = [
        tiny_arguments(c, tiny_teacher, [tiny_corpus, sentences], store) for c in readme_commands()
    ]
    # "Add --dry-run to the precompute command": the command srun runs, on one process.
    dry = run(srun_pre[srun_pre.index("kd") :] + ["--dry-run"], tmp_path)
    assert "estimated store size" in dry.stdout and not store.exists()

    run(pre, tmp_path)
    meta = SignalStore.open(str(store)).meta
    assert meta.corpus["group_rows"] == {str(sentences): 3}  # documents of 3 sentences
    assert len(list((tmp_path / "corpus-cache").iterdir())) == 1  # prepared once, by rank 0
    assert SignalStore.open(str(store)).is_complete() and meta.max_length == 32
    assert (tmp_path / "heldout.txt").read_text().strip()
    assert "complete" in run(inspect, tmp_path).stdout
    assert "OK" in run(verify, tmp_path).stdout
    exact = run(verify_exact, tmp_path).stdout
    assert "exact: " in exact and "OK" in exact

    run(train, tmp_path)
    final = tmp_path / "runs" / "distilbert" / "final"
    rows = read_csv(final.parent / "logs" / "metrics.csv")
    assert len(rows) == 2 and all(r["samples"] == "16" for r in rows)  # 4 micro × 2 accumulation × 2 ranks
    assert '"model_max_length": 32' in (final / "tokenizer_config.json").read_text()
    assert "masked acc" in run(evaluate, tmp_path).stdout

    # srun: each task finds its rank and the world size in SLURM's variables.
    outs = run(srun_pre, tmp_path).stdout
    for rank, out in enumerate(outs):
        skipped = len(assigned_shards(meta.num_shards, rank, 2))
        assert f"skipped {skipped} already committed; {meta.num_shards} shards" in out
    shutil.rmtree(final.parent)
    run(srun_train, tmp_path)
    rows = read_csv(final.parent / "logs" / "metrics.csv")
    assert len(rows) == 2 and all(r["samples"] == "16" for r in rows)
    assert (final / "model.safetensors").exists()
