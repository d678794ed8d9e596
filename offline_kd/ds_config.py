"""The user's DeepSpeed JSON, resolved for one run: batch shape, ``"auto"`` values, the schedule.

The JSON stays DeepSpeed's own. Training overrides only what the command line names (micro batch,
accumulation, lr) and fills the ``"auto"`` values DeepSpeed cannot know: the learning rate, and
the scheduler's length, warm-up and peak, which depend on the store's size and the rank count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ds_cpu_tiny.json"
DEFAULT_LR = 5e-4  # DistilBERT's


def load_ds_config(value: str | dict | None) -> dict:
    """A copy of a DeepSpeed config given as a dict or a JSON path (default: the tiny CPU one)."""
    if value is None:
        value = str(DEFAULT_CONFIG)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return json.loads(Path(value).read_text())


def is_auto(value: Any) -> bool:
    """True for a value the config leaves to us: missing or ``"auto"``."""
    return value is None or value == "auto"


def resolve_ds_config(
    ds: dict,
    world_size: int,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    lr: float | None = None,
) -> dict:
    """Fill batch sizes and "auto" optimizer values; the scheduler is `fill_schedule`'s job.

    Overrides win over the JSON. Without a micro batch size, ``train_batch_size`` is split over the
    accumulation steps and ranks; ``train_batch_size`` is then always micro × accumulation × ranks.
    """
    ds = copy.deepcopy(ds)
    micro = micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    gas = gradient_accumulation_steps or ds.get("gradient_accumulation_steps")
    if is_auto(micro):
        tb = ds.get("train_batch_size")
        if is_auto(tb):
            raise ValueError(
                "the DeepSpeed config sets neither train_micro_batch_size_per_gpu nor train_batch_size"
            )
        gas = 1 if is_auto(gas) else int(gas)
        micro = int(tb) // (gas * world_size)
    gas = 1 if is_auto(gas) else int(gas)
    micro = int(micro)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if lr is not None:
            params["lr"] = lr
        elif is_auto(params.get("lr")):
            params["lr"] = DEFAULT_LR
    ds.setdefault("steps_per_print", 10**9)
    return ds


def fill_schedule(ds: dict, total_steps: int, warmup_fraction: float) -> dict:
    """Fill the scheduler's "auto" length (`total_steps`), warm-up (a fraction of it) and peak (lr)."""
    ds = copy.deepcopy(ds)
    sched = ds.get("scheduler")
    if sched is None:
        return ds
    params = sched.setdefault("params", {})
    if "total_num_steps" in params or sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        if is_auto(params.get("total_num_steps")):
            params["total_num_steps"] = max(int(total_steps), 1)
    if is_auto(params.get("warmup_num_steps", 0)):
        total = int(params.get("total_num_steps", total_steps))
        params["warmup_num_steps"] = max(1, int(round(warmup_fraction * total)))
    opt_lr = (ds.get("optimizer") or {}).get("params", {}).get("lr")
    if opt_lr is not None and is_auto(params.get("warmup_max_lr", 0)):
        params["warmup_max_lr"] = opt_lr
    return ds


def param_dtype(ds: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the module's parameters in (stored hidden states are cast to it)."""
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32
