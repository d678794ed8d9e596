"""Command lines generated from the settings dataclasses: defaults, spellings, refusals."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from click.testing import CliRunner

from offline_kd.cli.commands_eval import eval_command
from offline_kd.cli.commands_store import precompute_cmd
from offline_kd.cli.kd import main as kd
from offline_kd.cli.train import build_parser, parse_config
from offline_kd.runtime.options import from_click_params, options
from offline_kd.runtime.settings import EvalConfig, LossConfig, PrecomputeConfig, TrainConfig

TRAIN_REQUIRED = dict(store="s.zarr", student="distil", output="runs/x")
PRECOMPUTE_REQUIRED = dict(teacher="t", corpus=["c.txt"], output="s.zarr")
EVAL_REQUIRED = dict(model="m", corpus=["c.txt"])


def _args(required: dict) -> list[str]:
    out = []
    for name, value in required.items():
        for v in value if isinstance(value, list) else [value]:
            out += ["--" + name.replace("_", "-"), v]
    return out


def _click_config(cmd, cls, argv):
    ctx = cmd.make_context(cmd.name, list(argv))
    params = {k: v for k, v in ctx.params.items() if k != "as_json"}
    return from_click_params(cls, params)


def _differences(parsed, expected, prefix: str = "") -> list[str]:
    """The settings (dotted paths) whose values differ."""
    out = []
    for f in dataclasses.fields(expected):
        a, b = getattr(parsed, f.name), getattr(expected, f.name)
        if dataclasses.is_dataclass(b):
            out += _differences(a, b, prefix + f.name + ".")
        elif a != b:
            out.append(f"{prefix}{f.name}: CLI {a!r} vs dataclass {b!r}")
    return out


def test_train_cli_defaults_are_the_dataclass_defaults():
    parsed = parse_config(_args(TRAIN_REQUIRED))
    assert _differences(parsed, TrainConfig(**TRAIN_REQUIRED)) == []


def test_precompute_cli_defaults_are_the_dataclass_defaults():
    parsed = _click_config(precompute_cmd, PrecomputeConfig, _args(PRECOMPUTE_REQUIRED))
    assert _differences(parsed, PrecomputeConfig(**PRECOMPUTE_REQUIRED)) == []


def test_eval_cli_defaults_are_the_dataclass_defaults():
    parsed = _click_config(eval_command, EvalConfig, _args(EVAL_REQUIRED))
    assert _differences(parsed, EvalConfig(**EVAL_REQUIRED)) == []


def test_every_train_setting_has_help_and_one_flag():
    flags = [f for o in options(TrainConfig) for f in (*o.flags, *o.deprecated)]
    assert len(flags) == len(set(flags))
    assert all(o.help for o in options(TrainConfig))
    assert {o.path for o in options(TrainConfig) if o.path[0] == "loss"} == {
        ("loss", f.name) for f in dataclasses.fields(LossConfig)
    }


def test_train_cli_spellings():
    cfg = parse_config(
        _args(TRAIN_REQUIRED)
        + ["--deepspeed-config", "ds.json", "--no-progress", "--no-tensorboard", "--no-kl-tail"]
        + ["--storage-option", "anon=true", "--storage-option", "endpoint_url=http://h:9000/?a=b"]
        + ["--local_rank=1", "--alpha-mlm", "0.5", "--restrict-kl-to-mask", "--max-steps", "7"]
    )
    assert cfg.deepspeed_config == "ds.json" and cfg.local_rank == 1 and cfg.max_steps == 7
    assert (cfg.logs.progress, cfg.logs.tensorboard, cfg.loss.kl_tail) == (False, False, False)
    assert cfg.storage_options == {"anon": "true", "endpoint_url": "http://h:9000/?a=b"}
    assert cfg.loss == LossConfig(alpha_mlm=0.5, kl_tail=False, restrict_kl_to_mask=True)
    other = parse_config(_args(TRAIN_REQUIRED) + ["--deepspeed_config", "a.json", "--local-rank", "0"])
    assert other.deepspeed_config == "a.json" and other.local_rank == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--storage-option", "anon"], "argument --storage-option: expected KEY=VALUE, got 'anon'"),
        (["--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_train_cli_usage_errors_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(_args(TRAIN_REQUIRED) + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_cli_requires_store_student_output(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--store", "s"])
    assert exc.value.code == 2
    assert "--student" in capsys.readouterr().err


def test_alpha_ce_is_a_deprecated_alias_of_alpha_kl():
    with pytest.warns(FutureWarning, match="--alpha-ce is deprecated; use --alpha-kl"):
        old = parse_config(_args(TRAIN_REQUIRED) + ["--alpha-ce", "3"])
    assert old.loss.alpha_kl == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = parse_config(_args(TRAIN_REQUIRED) + ["--alpha-kl", "3"])
    assert new == old
    assert "--alpha-ce" not in build_parser().format_help()


def test_precompute_cli_spellings():
    argv = _args(PRECOMPUTE_REQUIRED) + ["--corpus", "d.txt", "--temperatures", "1,2.5,4", "--no-hidden"]
    argv += ["--no-progress", "--dtype", "bfloat16", "--dry-run", "--world-size", "2", "--rank", "1"]
    cfg = _click_config(precompute_cmd, PrecomputeConfig, argv)
    assert cfg.corpus == ["c.txt", "d.txt"] and cfg.temperatures == [1.0, 2.5, 4.0]
    assert (cfg.hidden, cfg.progress, cfg.dry_run) == (False, False, True)
    assert (cfg.dtype, cfg.rank, cfg.world_size) == ("bfloat16", 1, 2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperatures", "1,x"], "expected comma-separated numbers"),
        (["--dtype", "float8"], "'float8' is not one of"),
        (["--top-k", "many"], "'many' is not a valid integer"),
    ],
)
def test_precompute_cli_usage_errors_exit_2(extra, message):
    r = CliRunner().invoke(kd, ["precompute", *_args(PRECOMPUTE_REQUIRED), *extra])
    assert r.exit_code == 2 and message in r.output


def test_eval_cli_spellings():
    argv = _args(EVAL_REQUIRED) + ["--corpus", "e.txt", "--max-sequences", "3", "--device", "cpu"]
    cfg = _click_config(eval_command, EvalConfig, argv + ["--json"])
    assert cfg == EvalConfig(model="m", corpus=["c.txt", "e.txt"], max_sequences=3, device="cpu")


def test_click_params_that_are_not_settings_are_refused():
    params = eval_command.make_context("eval", _args(EVAL_REQUIRED)).params
    with pytest.raises(TypeError, match="as_json"):
        from_click_params(EvalConfig, params)


def test_every_environment_variable_is_declared_once():
    """offline_kd reads its own variables through `offline_kd.runtime.env` only: a name written as a
    string anywhere else in the package is a second declaration."""
    import ast
    from pathlib import Path

    from offline_kd.runtime import env

    package = Path(env.__file__).resolve().parents[1]
    declared = {v.name for v in env.ALL}
    assert len(declared) == len(env.ALL) and all(v.help for v in env.ALL)
    elsewhere = {
        f"{path.relative_to(package)}: {node.value}"
        for path in package.rglob("*.py")
        if path.name != "env.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("OFFLINE_KD_")
    }
    assert elsewhere == set()
