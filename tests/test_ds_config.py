"""Resolving the user's DeepSpeed JSON: batch shape, overrides and "auto" values (pure, no engine)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from offline_kd.train.ds_config import fill_schedule, load_ds_config, resolve_ds_config

CONFIGS = Path(__file__).resolve().parents[1] / "offline_kd" / "configs"


def test_the_bundled_configs_resolve():
    tiny = resolve_ds_config(load_ds_config(None), world_size=1)  # the default: ds_cpu_tiny.json
    assert (tiny["train_micro_batch_size_per_gpu"], tiny["gradient_accumulation_steps"]) == (4, 2)
    assert tiny["train_batch_size"] == 8 and tiny["optimizer"]["params"]["lr"] == 0.001
    distil = resolve_ds_config(load_ds_config(str(CONFIGS / "ds_distilbert.json")), world_size=8)
    assert distil["train_batch_size"] == 16 * 32 * 8 == 4096
    assert distil["optimizer"]["params"]["lr"] == 5e-4


def test_overrides_win_and_the_batch_is_derived():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 999}
    out = resolve_ds_config(ds, 3, micro_batch_size=6, gradient_accumulation_steps=5)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (6, 5)
    assert out["train_batch_size"] == 6 * 5 * 3
    assert ds["train_batch_size"] == 999  # the input is not modified


@pytest.mark.parametrize(
    "ds, world, micro, gas",
    [
        ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, 8, 2),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto"}, 2, 32, 1),
        ({"train_batch_size": 64, "gradient_accumulation_steps": "auto"}, 1, 64, 1),
        ({"train_micro_batch_size_per_gpu": 3}, 2, 3, 1),
    ],
)
def test_auto_micro_batch_and_accumulation(ds, world, micro, gas):
    out = resolve_ds_config(ds, world)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (micro, gas)
    assert out["train_batch_size"] == micro * gas * world


def test_no_batch_size_at_all_is_refused():
    with pytest.raises(ValueError, match="neither train_micro_batch_size_per_gpu nor train_batch_size"):
        resolve_ds_config({"train_batch_size": "auto"}, 1)


@pytest.mark.parametrize(
    "lr_in_json, override, expected",
    [("auto", None, 5e-4), (None, None, 5e-4), (1e-3, None, 1e-3), ("auto", 2e-4, 2e-4), (1e-3, 2e-4, 2e-4)],
)
def test_optimizer_lr(lr_in_json, override, expected):
    params = {} if lr_in_json is None else {"lr": lr_in_json}
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": params}}
    assert resolve_ds_config(ds, 1, lr=override)["optimizer"]["params"]["lr"] == expected


def test_steps_per_print_is_quiet_unless_set():
    assert resolve_ds_config({"train_micro_batch_size_per_gpu": 1}, 1)["steps_per_print"] == 10**9
    ds = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 5}
    assert resolve_ds_config(ds, 1)["steps_per_print"] == 5


def _scheduled(sched_type="WarmupDecayLR", **params):
    return {"optimizer": {"params": {"lr": 1e-3}}, "scheduler": {"type": sched_type, "params": params}}


def test_fill_schedule_fills_every_auto_value():
    ds = _scheduled(total_num_steps="auto", warmup_num_steps="auto", warmup_max_lr="auto", warmup_min_lr=0)
    out = fill_schedule(ds, total_steps=200, warmup_fraction=0.05)
    assert out["scheduler"]["params"] == {
        "total_num_steps": 200, "warmup_num_steps": 10, "warmup_max_lr": 1e-3, "warmup_min_lr": 0,
    }  # fmt: skip
    assert ds["scheduler"]["params"]["total_num_steps"] == "auto"  # the input is not modified


def test_fill_schedule_keeps_explicit_values():
    ds = _scheduled(total_num_steps=50, warmup_num_steps=3, warmup_max_lr=2e-3)
    assert fill_schedule(ds, 200, 0.05)["scheduler"]["params"] == {
        "total_num_steps": 50, "warmup_num_steps": 3, "warmup_max_lr": 2e-3,
    }  # fmt: skip


def test_a_decaying_schedule_always_gets_a_length():
    # total_num_steps missing is filled (DeepSpeed needs it); missing warm-up values keep DeepSpeed's defaults
    out = fill_schedule(_scheduled("WarmupCosineLR"), 40, 0.1)["scheduler"]["params"]
    assert out == {"total_num_steps": 40}


def test_warmup_is_a_fraction_of_an_explicit_length_and_at_least_one_step():
    out = fill_schedule(_scheduled(total_num_steps=1000, warmup_num_steps="auto"), 10, 0.05)
    assert out["scheduler"]["params"]["warmup_num_steps"] == 50  # of total_num_steps, not total_steps
    out = fill_schedule(_scheduled(total_num_steps="auto", warmup_num_steps="auto"), 0, 0.05)
    assert out["scheduler"]["params"]["total_num_steps"] == 1
    assert out["scheduler"]["params"]["warmup_num_steps"] == 1


def test_a_schedule_without_length_gets_none():
    out = fill_schedule(_scheduled("WarmupLR", warmup_num_steps="auto"), 80, 0.05)["scheduler"]["params"]
    assert "total_num_steps" not in out and out["warmup_num_steps"] == 4


def test_no_scheduler_is_left_alone():
    ds = {"optimizer": {"params": {"lr": 1e-3}}}
    assert fill_schedule(copy.deepcopy(ds), 10, 0.05) == ds
