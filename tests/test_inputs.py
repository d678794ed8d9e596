"""What the input checks resolve: the store's teacher, eval's default length, shipped DeepSpeed configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]


def _train_cfg(store, **kw):
    from offline_kd.runtime.settings import TrainConfig

    return TrainConfig(store=str(store), student="distil", output="unused", **kw)


def test_a_local_teacher_is_recorded_by_absolute_path(tiny_teacher, monkeypatch):
    from offline_kd.teacher.model import load_teacher

    monkeypatch.chdir(tiny_teacher.parent)
    teacher = load_teacher(tiny_teacher.name, device="cpu")
    assert teacher.provenance()["name_or_path"] == str(tiny_teacher.resolve())


def test_training_from_another_directory_finds_the_recorded_teacher(
    tiny_store, tiny_teacher, tmp_path, monkeypatch
):
    from offline_kd.train.checks import check_train

    monkeypatch.chdir(tmp_path)
    assert check_train(_train_cfg(tiny_store), 1).teacher == str(tiny_teacher.resolve())
    assert check_train(_train_cfg(tiny_store, teacher=str(tiny_teacher)), 1).teacher == str(
        tiny_teacher.resolve()
    )


def test_an_old_relative_record_is_found_above_the_store(tiny_store, tiny_teacher, tmp_path, monkeypatch):
    """A store made by an older version recorded ``--teacher`` as typed, relative to where it ran."""
    from offline_kd.train.checks import check_train

    project = tmp_path / "project"
    shutil.copytree(tiny_teacher, project / "models" / "teacher")
    store = project / "runs" / "stores" / "old.zarr"
    shutil.copytree(tiny_store, store)
    g = zarr.open_group(str(store), mode="r+")
    meta = g.attrs["offline_kd"]
    meta["teacher"]["name_or_path"] = "models/teacher"  # precompute ran in project/
    g.attrs["offline_kd"] = meta
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert check_train(_train_cfg(store), 1).teacher == str((project / "models" / "teacher").resolve())


def test_a_student_with_its_own_tokenizer_needs_no_teacher(tiny_store, tiny_teacher, tmp_path):
    """The store's teacher is gone, but a pretrained student directory has weights and a tokenizer."""
    from offline_kd.runtime.settings import TrainConfig
    from offline_kd.train.checks import check_train

    store = tmp_path / "moved.zarr"
    shutil.copytree(tiny_store, store)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["offline_kd"] = {**g.attrs["offline_kd"], "teacher": {"name_or_path": "/gone/teacher"}}
    cfg = TrainConfig(store=str(store), student=str(tiny_teacher), output="unused")
    assert check_train(cfg, 1).teacher is None


def test_eval_defaults_to_the_model_length(tiny_teacher, tiny_corpus, tmp_path):
    from offline_kd.publish.checks import check_eval
    from offline_kd.publish.evaluate import EvalConfig

    base = dict(corpus=[str(tiny_corpus)])
    # no model_max_length in the tokenizer: the model's max_position_embeddings
    assert check_eval(EvalConfig(model=str(tiny_teacher), **base)) == 128
    student = tmp_path / "student"
    shutil.copytree(tiny_teacher, student)
    tok_config = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps({**tok_config, "model_max_length": 32}))
    assert check_eval(EvalConfig(model=str(student), **base)) == 32  # what training records
    assert check_eval(EvalConfig(model=str(student), max_length=64, **base)) == 64


def test_shipped_deepspeed_configs_by_name(tmp_path, monkeypatch):
    from offline_kd.train.ds_config import load_ds_config

    shipped = json.loads((ROOT / "offline_kd" / "configs" / "ds_distilbert.json").read_text())
    assert load_ds_config("ds_distilbert") == shipped == load_ds_config("ds_distilbert.json")
    assert load_ds_config(None) == json.loads(
        (ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json").read_text()
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_distilbert.json").write_text('{"train_batch_size": 8}')
    assert load_ds_config("ds_distilbert.json") == {"train_batch_size": 8}  # a file wins over a name


@pytest.mark.parametrize(
    "value", ["ds_distilbert", str(ROOT / "offline_kd" / "configs" / "ds_distilbert.json")]
)
def test_shipped_config_resolves_for_eight_ranks(value):
    from offline_kd.train.ds_config import load_ds_config, resolve_ds_config

    ds = resolve_ds_config(load_ds_config(value), 8)
    assert ds["train_batch_size"] == 16 * 32 * 8
