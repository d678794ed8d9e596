"""Every user mistake ends in one ``Error: ...`` line naming the input and exit status 2.

Each case runs the real entry point: ``kd`` through click's runner, ``cli/train.py``'s ``main``
in-process, and once each as the installed programs (``kd``, ``python cli/train.py``,
``python -m offline_kd.cli.train``, ``deepspeed --module offline_kd.cli.train``). None of them may
load the teacher's weights ("Loading weights" is what transformers prints when it does).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import zarr
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem
from test_precompute import kd_cmd
from test_train import run_cli

from offline_kd.store.signal_store import SignalStore

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WEIGHTS_LOADED = "Loading weights"


def the_error(output: str, exit_code: int) -> str:
    """The one ``Error:`` line of a failed command (asserting there is exactly one, and no traceback)."""
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert exit_code == 2, output[-4000:]
    assert len(lines) == 1, output[-4000:]
    assert "Traceback" not in output and "[rank" not in output, output[-4000:]
    assert WEIGHTS_LOADED not in output, output[-4000:]
    return lines[0]


@pytest.fixture
def fx(tmp_path, tiny_teacher, tiny_corpus, tiny_store):
    return SimpleNamespace(teacher=tiny_teacher, corpus=tiny_corpus, store=tiny_store, tmp=tmp_path)


def store_copy(fx, name: str, **attrs) -> Path:
    """A copy of the tiny store with some of its recorded settings changed."""
    out = fx.tmp / name
    shutil.copytree(fx.store, out)
    g = zarr.open_group(str(out), mode="r+")
    meta = g.attrs["offline_kd"]
    for key, value in attrs.items():
        if key == "teacher_name":
            meta["teacher"]["name_or_path"] = value
        else:
            meta[key] = value
    g.attrs["offline_kd"] = meta
    return out


def store_without_hidden(fx) -> Path:
    """A tiny store precomputed with --no-hidden (a copy with `hidden` edited out of its settings would no
    longer match its own commit record)."""
    from conftest import run_tiny_precompute

    out = fx.tmp / "nohidden.zarr"
    run_tiny_precompute(fx.teacher, fx.corpus, out, hidden=False)
    return out


def teacher_without_weights(fx) -> Path:
    out = fx.tmp / "no_weights"
    shutil.copytree(fx.teacher, out)
    (out / "model.safetensors").unlink()
    return out


# ------------------------------------------------------------------------------------ kd


def _precompute(fx, *extra) -> list:
    out = fx.tmp / "s.zarr"
    base = ["precompute", "--teacher", fx.teacher, "--corpus", fx.corpus, "--output", out]
    return base + ["--max-length", "32", "--top-k", "8", "--device", "cpu", "--no-progress", *extra]


def _replace(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


# id: (arguments of `kd`, what the error line must contain)
KD_CASES = {
    "precompute-teacher-causal-lm": (
        lambda fx: _replace(_precompute(fx), "--teacher", _gpt2(fx)),
        "a gpt2 model (GPT2LMHeadModel) is not a masked language model",
    ),
    "eval-model-causal-lm": (
        lambda fx: ["eval", "--model", _gpt2(fx), "--corpus", fx.corpus],
        "a gpt2 model (GPT2LMHeadModel) is not a masked language model",
    ),
    "precompute-teacher-missing": (
        lambda fx: _replace(_precompute(fx), "--teacher", "./no_such_dir"),
        "Error: --teacher ./no_such_dir: no such directory",
    ),
    "precompute-teacher-without-weights": (
        lambda fx: _replace(_precompute(fx), "--teacher", teacher_without_weights(fx)),
        "no_weights: no weights (model.safetensors or pytorch_model.bin)",
    ),
    "precompute-corpus-missing": (
        lambda fx: _replace(_precompute(fx), "--corpus", "nope.txt"),
        "Error: corpus file 'nope.txt' does not exist",
    ),
    "precompute-max-length-over-teacher": (
        lambda fx: _replace(_precompute(fx), "--max-length", "512"),
        "Error: --max-length 512 exceeds the teacher's max_position_embeddings 128",
    ),
    "precompute-holdout-file-directory-missing": (
        lambda fx: _precompute(fx, "--holdout", "0.1", "--holdout-file", fx.tmp / "missing" / "held.txt"),
        "Error: --holdout-file ",
    ),
    "precompute-chunk-size": (
        lambda fx: _precompute(fx, "--shard-size", "8", "--chunk-size", "3"),
        "Error: --chunk-size 3: must divide --shard-size 8",
    ),
    "precompute-device": (
        lambda fx: _replace(_precompute(fx), "--device", "cuda:99"),
        "Error: --device cuda:99: ",
    ),
    "precompute-rank": (
        lambda fx: _precompute(fx, "--rank", "2", "--world-size", "2"),
        "Error: --rank 2 is not in [0, --world-size 2)",
    ),
    "precompute-group-rows-unknown-source": (
        lambda fx: _precompute(fx, "--group-rows", "bookcorpus=8"),
        "Error: --group-rows bookcorpus=8: no --corpus source is 'bookcorpus'",
    ),
    "precompute-group-rows-not-positive": (
        lambda fx: _precompute(fx, "--group-rows", f"{fx.corpus}=0"),
        "=0: the number of rows must be a positive integer",
    ),
    "precompute-num-proc": (
        lambda fx: _precompute(fx, "--num-proc", "0"),
        "Error: --num-proc 0: must be at least 1",
    ),
    "precompute-remote-store-ranks-without-cache-dir": (
        lambda fx: _replace(
            _precompute(fx, "--rank", "0", "--world-size", "2"), "--output", "memory://kd/s.zarr"
        ),
        "Error: --cache-dir: 2 ranks writing the remote store 'memory://kd/s.zarr' need a directory every rank",
    ),
    "precompute-cache-dir-url": (
        lambda fx: _precompute(fx, "--cache-dir", "s3://bucket/cache"),
        "Error: --cache-dir s3://bucket/cache: must be a directory on a filesystem every rank mounts",
    ),
    "eval-model-missing": (
        lambda fx: ["eval", "--model", "./no_model", "--corpus", fx.corpus],
        "Error: --model ./no_model: no such directory",
    ),
    "eval-corpus-missing": (
        lambda fx: ["eval", "--model", fx.teacher, "--corpus", "missing.txt"],
        "Error: corpus file 'missing.txt' does not exist",
    ),
    "eval-teacher-missing": (
        lambda fx: ["eval", "--model", fx.teacher, "--corpus", fx.corpus, "--teacher", "./no_teacher"],
        "Error: --teacher ./no_teacher: no such directory",
    ),
    "eval-max-length-over-model": (
        lambda fx: ["eval", "--model", fx.teacher, "--corpus", fx.corpus, "--max-length", "4096"],
        "Error: --max-length 4096 exceeds the model's max_position_embeddings 128",
    ),
    "inspect-not-a-store": (
        lambda fx: ["inspect", fx.corpus],
        "Error: no signal store at ",
    ),
    "verify-teacher-missing": (
        lambda fx: ["verify", fx.store, "--teacher", "./no_such_dir", "--sample", "2"],
        "Error: --teacher ./no_such_dir: no such directory",
    ),
}


@pytest.mark.parametrize("case", KD_CASES, ids=list(KD_CASES))
def test_kd_misuse(case, fx):
    from offline_kd.cli.kd import main

    make_args, expected = KD_CASES[case]
    r = CliRunner().invoke(main, [str(a) for a in make_args(fx)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no escaped error
    assert expected in the_error(r.stderr, r.exit_code)
    assert not (fx.tmp / "s.zarr").exists()


# ------------------------------------------------------------------------------------ cli/train.py


def _train(fx, *extra) -> list:
    return ["--store", fx.store, "--student", "distil", "--output", fx.tmp / "run", "--no-progress", *extra]


def _write(fx, name: str, text: str) -> Path:
    (fx.tmp / name).write_text(text)
    return fx.tmp / name


def _incomplete_store(fx) -> Path:
    out = store_copy(fx, "incomplete.zarr")
    zarr.open_group(str(out), mode="r+")["committed"][1] = 0
    return out


# id: (arguments of cli/train.py, what the error line must contain)
def _gpt2(fx) -> Path:
    """A tiny causal LM: a model transformers loads, but no masked LM."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = fx.tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=100)).save_pretrained(out)
    AutoTokenizer.from_pretrained(fx.teacher).save_pretrained(out)
    return out


def _ds_batch_3(fx) -> Path:
    import json

    ds = json.loads((ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json").read_text())
    return _write(fx, "ds3.json", json.dumps({**ds, "train_batch_size": 3}))


TRAIN_CASES = {
    "epochs-0": (lambda fx: _train(fx, "--epochs", "0"), "Error: --epochs 0: must be at least 1"),
    "max-steps-0": (lambda fx: _train(fx, "--max-steps", "0"), "Error: --max-steps 0: must be at least 1"),
    "micro-batch-0": (
        lambda fx: _train(fx, "--micro-batch-size", "0"),
        "Error: --micro-batch-size 0: must be at least 1",
    ),
    "alpha-kl-negative": (
        lambda fx: _train(fx, "--alpha-kl", "-1"),
        "Error: --alpha-kl -1.0: must be at least 0",
    ),
    "lr-negative": (lambda fx: _train(fx, "--lr", "-1"), "Error: --lr -1.0: must be above 0"),
    "warmup-1": (
        lambda fx: _train(fx, "--warmup-fraction", "1"),
        "Error: --warmup-fraction 1.0: must be below 1",
    ),
    "train-batch-size-3": (
        lambda fx: _train(fx, "--deepspeed_config", _ds_batch_3(fx)),
        "train_batch_size 3 is not train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x 1 rank(s) = 8",
    ),
    "student-causal-lm": (
        lambda fx: _replace(_train(fx), "--student", _gpt2(fx)),
        "is not a masked language model; expected one AutoModelForMaskedLM loads",
    ),
    "store-not-a-store": (
        lambda fx: _replace(_train(fx), "--store", fx.corpus),
        "Error: no signal store at '{corpus}'",
    ),
    "store-incomplete": (
        lambda fx: _replace(_train(fx), "--store", _incomplete_store(fx)),
        "incomplete.zarr: incomplete, shards [1] are not committed",
    ),
    "deepspeed-config-missing": (
        lambda fx: _train(fx, "--deepspeed_config", "nope.json"),
        "Error: --deepspeed_config nope.json: no such file",
    ),
    "deepspeed-config-bad-json": (
        lambda fx: _train(fx, "--deepspeed_config", _write(fx, "bad.json", '{"train_batch_size": 8,')),
        "bad.json: not valid JSON (",
    ),
    "deepspeed-config-not-an-object": (
        lambda fx: _train(fx, "--deepspeed_config", _write(fx, "list.json", "[8]")),
        "list.json: holds a JSON list, not an object",
    ),
    "train-eval-corpus-missing": (
        lambda fx: _train(fx, "--eval-corpus", "heldout_nope.txt"),
        "Error: --eval-corpus heldout_nope.txt: no such file or store",
    ),
    "teacher-missing": (
        lambda fx: _train(fx, "--teacher", "./no_such_dir"),
        "Error: --teacher ./no_such_dir: no such directory",
    ),
    "student-unknown": (
        lambda fx: _replace(_train(fx), "--student", "nope"),
        "Error: --student nope: unknown; use 'distil'",
    ),
    "student-directory-without-config": (
        lambda fx: _replace(_train(fx), "--student", fx.tmp),
        ": not a Hugging Face model directory (no config.json)",
    ),
    "student-config-without-model-type": (
        lambda fx: _replace(_train(fx), "--student", _write(fx, "student.json", '{"dim": 32}')),
        'student.json: a JSON config without "model_type"',
    ),
    "init-layers-not-numbers": (
        lambda fx: _train(fx, "--init-layers", "0,x"),
        "Error: --init-layers '0,x': expected comma-separated teacher layer numbers",
    ),
    "init-layers-out-of-range": (
        lambda fx: _train(fx, "--init-layers", "0,9"),
        "Error: --init-layers [0, 9] out of range for a 4-layer teacher",
    ),
    "init-layers-with-a-preset": (
        lambda fx: _replace(_train(fx, "--init-layers", "0,1"), "--student", "tiny"),
        "Error: --init-layers applies to the distil students only, not to --student tiny",
    ),
    "temperature-not-stored": (
        lambda fx: _train(fx, "--kl-source", "topk", "--temperature", "3"),
        "Error: --temperature 3.0 is not one of the store's temperatures [1.0, 2.0]",
    ),
    "cosine-without-stored-hidden-states": (
        lambda fx: _replace(_train(fx), "--store", store_without_hidden(fx)),
        "Error: --alpha-cos 1.0 needs the teacher's hidden states",
    ),
    "recorded-teacher-path-gone": (
        lambda fx: _replace(_train(fx), "--store", store_copy(fx, "rel.zarr", teacher_name="./gone/teacher")),
        "Error: the store records its teacher as the relative path './gone/teacher', found neither in",
    ),
    "recorded-teacher-name-unknown": (
        lambda fx: _replace(_train(fx), "--store", store_copy(fx, "hub.zarr", teacher_name="gone/teacher")),
        "no directory of that name here or above the store either: pass --teacher DIR",
    ),
    "recorded-teacher-absolute-gone": (
        lambda fx: _replace(_train(fx), "--store", store_copy(fx, "abs.zarr", teacher_name="/gone/teacher")),
        "Error: the store's teacher /gone/teacher no longer exists: pass --teacher DIR",
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_train_misuse(case, fx, capsys):
    import importlib

    train_cli = importlib.import_module("offline_kd.cli.train")
    make_args, expected = TRAIN_CASES[case]
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in make_args(fx)])
    captured = capsys.readouterr()
    assert expected.format(corpus=fx.corpus) in the_error(captured.err, exc.value.code)
    assert not (fx.tmp / "run").exists()


# ------------------------------------------------------------------------------------ real programs


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return dict(env, PYTHONUNBUFFERED="1")


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _program(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def test_programs_print_one_line(fx):
    """The installed programs: exactly one stderr line each, and nothing on stdout."""
    runs = {
        "kd": (
            [_program("kd"), *_replace(_precompute(fx), "--teacher", "./no_such_dir")],
            "Error: --teacher ./no_such_dir: no such directory",
        ),
        "cli/train.py": (
            [sys.executable, ROOT / "cli" / "train.py", *_replace(_train(fx), "--store", fx.corpus)],
            f"Error: no signal store at '{fx.corpus}'",
        ),
        "python -m offline_kd.cli.train": (
            [sys.executable, "-m", "offline_kd.cli.train", *_train(fx, "--deepspeed_config", "nope.json")],
            "Error: --deepspeed_config nope.json: no such file (nor a shipped config: ds_cpu_tiny, ds_distilbert)",
        ),
    }
    for name, (cmd, expected) in runs.items():
        proc = _run(cmd, fx.tmp)
        assert the_error(proc.stderr, proc.returncode) == expected, name
        assert proc.stderr.strip() == expected and proc.stdout == "", (name, proc.stderr, proc.stdout)


@pytest.mark.slow
def test_deepspeed_module_two_ranks_print_one_line(fx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [_program("deepspeed"), "--num_gpus", "2", "--master_port", port]
    proc = _run(
        [*launcher, "--module", "offline_kd.cli.train", *_replace(_train(fx), "--store", fx.corpus)], fx.tmp
    )
    output = proc.stdout + proc.stderr
    assert the_error(output, proc.returncode) == f"Error: no signal store at '{fx.corpus}'"


def test_error_classes_and_their_exit_codes():
    """A user's mistake is a UsageError (one line, status 2); data gone bad or a model's outputs failing
    is a RunFailed (one line, status 1)."""
    from offline_kd.data.corpus import CorpusError
    from offline_kd.runtime.errors import RunFailed, UsageError
    from offline_kd.store.signal_store import StoreCorruptionError, StoreError, StoreMismatchError
    from offline_kd.teacher.errors import TeacherError, TeacherFailed
    from offline_kd.train.ledger import NonFiniteLossError
    from offline_kd.train.student import StudentError

    for cls in (CorpusError, StoreError, StoreMismatchError, StudentError, TeacherError):
        assert issubclass(cls, UsageError) and cls.exit_code == 2
    for cls in (StoreCorruptionError, TeacherFailed, NonFiniteLossError):
        assert issubclass(cls, RunFailed) and not issubclass(cls, UsageError) and cls.exit_code == 1
    assert issubclass(StoreError, RuntimeError)  # callers that caught RuntimeError still do


def test_hub_kernels_asked_where_the_environment_disables_them(fx, monkeypatch):
    from offline_kd.cli.kd import main

    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    r = CliRunner().invoke(main, [str(a) for a in _precompute(fx, "--hub-kernels")])
    assert "Error: --hub-kernels: USE_HUB_KERNELS=0 disables them" in the_error(r.stderr, r.exit_code)
    assert not (fx.tmp / "s.zarr").exists()


# ------------------------------------------------------------------------ bad inputs through the CLI, end to end


class FullMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose disk holds `quota` bytes of store files (leases aside)."""

    protocol = "fullmem"
    store: dict = {}  # noqa: RUF012 - fsspec's memory filesystems keep their files per class
    pseudo_dirs = [""]  # noqa: RUF012
    quota = 0
    used = 0

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        cls = type(self)
        if ".leases/" not in path:
            if cls.used + len(value) > cls.quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            cls.used += len(value)
        return super().pipe_file(path, value, mode=mode, **kwargs)


def _kd_cli(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from offline_kd.cli.kd import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _precompute_cli(teacher, corpus, out, *extra) -> tuple[int, str]:
    return _kd_cli(*kd_cmd(teacher, corpus, out, *extra)[3:])


def _output_is_a_file(teacher, corpus, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code, output = _precompute_cli(teacher, corpus, out)

    def nothing_lost():
        assert out.read_text() == "keep me" and not Path(f"{out}.leases").exists()

    return code, output, rf"Error: store '{out}' is an existing file, not a directory", nothing_lost


def _truncated_teacher(teacher, corpus, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "t.zarr"
    code, output = _precompute_cli(broken, corpus, out)
    return code, output, rf"Error: teacher '{broken}' cannot be loaded: .*incomplete metadata", lambda: None


def _empty_corpus(teacher, corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, output = _precompute_cli(teacher, empty, tmp_path / "e.zarr")
    return code, output, rf"Error: corpus file '{empty}' is empty", lambda: None


def _max_length_4(teacher, corpus, tmp_path):
    out = tmp_path / "m.zarr"
    code, output = _kd_cli(*kd_cmd(teacher, corpus, out)[3:], "--max-length", "4")

    def nothing_written():
        assert not out.exists()

    return (
        code,
        output,
        r"Error: --max-length 4: too small: sequences of at most 11 real tokens",
        nothing_written,
    )


def _disk_full_while_creating(teacher, corpus, tmp_path):
    import fsspec

    fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)
    FullMemoryFileSystem.store.clear()
    FullMemoryFileSystem.quota, FullMemoryFileSystem.used = 1500, 0  # the group and an array or two
    url = f"fullmem://{tmp_path.name}/full.zarr"
    code, output = _precompute_cli(teacher, corpus, url, "--views", "1", "--no-hidden")

    def resumes_once_space_is_freed():
        FullMemoryFileSystem.quota = 1 << 30
        again, again_output = _precompute_cli(teacher, corpus, url, "--views", "1", "--no-hidden")
        assert again == 0 and "complete" in again_output, again_output
        assert SignalStore.open(url).is_complete()

    return (
        code,
        output,
        rf"Error: disk full while creating '{url}'; free space and rerun",
        resumes_once_space_is_freed,
    )


@pytest.mark.parametrize(
    "case",
    [_output_is_a_file, _truncated_teacher, _empty_corpus, _max_length_4, _disk_full_while_creating],
    ids=["output-is-a-file", "truncated-teacher", "empty-corpus", "max-length-4", "disk-full-creating"],
)
def test_bad_precompute_input_is_one_error_line(case, tiny_teacher, tiny_corpus, tmp_path):
    code, output, message, nothing_lost = case(tiny_teacher, tiny_corpus, tmp_path)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 2 and "Traceback" not in output, output
    assert len(errors) == 1 and re.match(message, errors[0]), output
    nothing_lost()


def _train_store_typo(store, tmp_path):
    out = tmp_path / "run"
    return (
        ["--store", tmp_path / "stroe.zarr", "--output", out],
        r"Error: no signal store at '.*stroe\.zarr'",
        out,
        2,
    )


def _train_output_is_a_file(store, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    return (
        ["--store", store, "--output", out],
        rf"Error: --output {out}: is an existing file, not a run directory",
        out,
        2,
    )


def _train_corrupt_chunk_in_a_worker(store, tmp_path):
    corrupt = tmp_path / "corrupt.zarr"
    shutil.copytree(store, corrupt)
    shard = corrupt / "topk_logits" / "c" / "0" / "1" / "0" / "0"  # view 0, shard 1
    data = bytearray(shard.read_bytes())
    data[40:60] = bytes(b ^ 0xFF for b in data[40:60])
    shard.write_bytes(bytes(data))
    # the top-k KL reads the damaged topk_logits
    args = ["--store", corrupt, "--output", tmp_path / "run", "--num-workers", 1, "--epochs", 1]
    args += ["--kl-source", "topk"]
    return (
        args,
        r"Error: .*'topk_logits' view 0, chunk of sequences \[\d+, \d+\) \(shard 1\) is corrupt",
        None,
        1,  # data gone bad is no user mistake: a failed run
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [_train_store_typo, _train_output_is_a_file, _train_corrupt_chunk_in_a_worker],
    ids=["store-typo", "output-is-a-file", "corrupt-chunk-num-workers-1"],
)
def test_bad_training_input_is_one_error_line(case, tiny_store, tmp_path):
    args, message, out, status = case(tiny_store, tmp_path)
    before = out.read_bytes() if out is not None and out.is_file() else None
    base = [
        "--student",
        "distil",
        "--deepspeed_config",
        ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json",
        "--no-progress",
    ]
    proc = run_cli(base + args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert len(errors) == 1 and re.match(message, errors[0]), proc.stderr[-4000:]
    if out is not None:  # refused before anything was written
        assert out.read_bytes() == before if before is not None else not out.exists()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_sequences", -5, "recorded num_sequences -5 is not an integer of at least 1"),
        ("num_sequences", 10**12, "recorded num_shards 13 does not cover num_sequences 1000000000000"),
        ("top_k", "8", "recorded top_k '8' is not an integer of at least 0"),
        (
            "max_length",
            64,
            "array 'input_ids' has shape (97, 32), not the (97, 64) its recorded settings give",
        ),
    ],
)
def test_a_store_whose_record_lies_is_refused_naming_the_field(fx, field, value, expected):
    """Before anything is sized from it: kd inspect and training stop in one line (a damaged store: exit 1)."""
    from offline_kd.cli.kd import main

    bad = store_copy(fx, f"lie-{field}.zarr", **{field: value})
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1 and expected in lines[0], r.stderr[-2000:]
    train_cli = importlib.import_module("offline_kd.cli.train")
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in _train(fx)[:1] + [bad] + _train(fx)[2:]])
    assert exc.value.code == 1
