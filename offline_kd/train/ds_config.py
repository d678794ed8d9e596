"""The user's DeepSpeed JSON, resolved for one run: batch shape, ``"auto"`` values, the schedule.

The JSON stays DeepSpeed's own. Training overrides only what the command line names (micro batch,
accumulation, lr) and fills the ``"auto"`` values DeepSpeed cannot know: the learning rate, and
the scheduler's length, warm-up and peak, which depend on the store's size and the rank count.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from offline_kd.runtime.errors import UsageError

DEFAULT_CONFIG = "ds_cpu_tiny"  # a shipped config (offline_kd/configs/)
DEFAULT_LR = 5e-4  # DistilBERT's
FLAG = "--deepspeed_config"


def shipped_configs() -> dict[str, Any]:
    """The DeepSpeed JSONs installed with the package, by name without ``.json``."""
    files = resources.files("offline_kd.configs")
    return {f.name[: -len(".json")]: f for f in files.iterdir() if f.name.endswith(".json")}


def _config_text(value: str) -> tuple[str, str]:
    """(note, JSON text) of a path, or of a shipped config named ``NAME`` or ``NAME.json``."""
    path = Path(value).expanduser()
    if path.is_file():
        return "", path.read_text(encoding="utf-8")
    if path.is_dir():
        raise UsageError(f"{FLAG} {value}: is a directory, not a DeepSpeed JSON file")
    shipped = shipped_configs()
    name = value[: -len(".json")] if value.endswith(".json") else value
    if name in shipped:
        return f" (the shipped {name}.json)", shipped[name].read_text(encoding="utf-8")
    raise UsageError(f"{FLAG} {value}: no such file (nor a shipped config: {', '.join(sorted(shipped))})")


def load_ds_config(value: str | dict | None) -> dict:
    """A copy of a DeepSpeed config: a dict, a JSON path or a shipped config's name (default: ds_cpu_tiny).

    Raises `UsageError` naming the file for a missing file, invalid JSON or a non-object."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    value = DEFAULT_CONFIG if value is None else str(value)
    note, text = _config_text(value)
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{FLAG} {value}{note}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise UsageError(f"{FLAG} {value}{note}: holds a JSON {type(ds).__name__}, not an object")
    return ds


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
    Refuses fp16 (`check_precision`).
    """
    check_precision(ds)
    ds = copy.deepcopy(ds)
    micro = micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    gas = gradient_accumulation_steps or ds.get("gradient_accumulation_steps")
    if is_auto(micro):
        tb = ds.get("train_batch_size")
        if is_auto(tb):
            raise UsageError(
                "the DeepSpeed config sets neither train_micro_batch_size_per_gpu nor train_batch_size"
            )
        gas = 1 if is_auto(gas) else int(gas)
        micro = int(tb) // (gas * world_size)
    gas = 1 if is_auto(gas) else int(gas)
    micro = int(micro)
    if micro < 1 or gas < 1:
        raise UsageError(
            f"{FLAG}: train_micro_batch_size_per_gpu {micro} and gradient_accumulation_steps {gas} must both be "
            "at least 1"
        )
    asked = ds.get("train_batch_size")
    overridden = micro_batch_size is not None or gradient_accumulation_steps is not None
    if not overridden and not is_auto(asked) and asked is not None and int(asked) != micro * gas * world_size:
        raise UsageError(
            f"{FLAG}: train_batch_size {asked} is not train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {gas} x {world_size} rank(s) = {micro * gas * world_size}"
        )
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


def check_precision(ds: dict) -> None:
    """fp16 training cannot be right: the losses write their gradient in the forward, in the logits' dtype,
    before DeepSpeed multiplies by its loss scale, so the small gradient terms (~1e-8) underflow in fp16 and
    the scale comes too late to save them. bf16 has fp32's exponent range."""
    if (ds.get("fp16") or {}).get("enabled"):
        raise UsageError(
            f"{FLAG}: fp16 is not supported (the loss gradient is written before DeepSpeed's loss scaling "
            'and underflows); use bf16 instead: "bf16": {"enabled": true}, "fp16": {"enabled": false}'
        )


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


# DeepSpeed's own optimizers are C++/CUDA ops compiled (with ninja, and nvcc for CUDA) at the first step
# unless the install prebuilt them; torch's AdamW ("torch_adam": true) needs neither.
_COMPILED_OPTIMIZERS = {
    "adam": "fused_adam",
    "adamw": "fused_adam",
    "lamb": "fused_lamb",
    "lion": "fused_lion",
}


def check_optimizer_buildable(ds: dict, device_type: str) -> None:
    """Refuse, before DeepSpeed starts, an optimizer DeepSpeed would have to compile where it cannot."""
    import shutil

    opt = ds.get("optimizer") or {}
    name, params = str(opt.get("type", "")).lower(), opt.get("params") or {}
    if name not in _COMPILED_OPTIMIZERS or (name in ("adam", "adamw") and params.get("torch_adam")):
        return
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    op = (
        _COMPILED_OPTIMIZERS[name].replace("fused_", "cpu_")
        if offload in ("cpu", "nvme")
        else _COMPILED_OPTIMIZERS[name]
    )
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # an older DeepSpeed: nothing to tell
        return
    if installed_ops.get(op):
        return
    missing = [] if shutil.which("ninja") else ["ninja"]
    if device_type == "cuda" and not op.startswith("cpu_"):
        from torch.utils.cpp_extension import CUDA_HOME

        missing += [] if CUDA_HOME else ["nvcc (the CUDA toolkit)"]
    if missing:
        raise UsageError(
            f"{FLAG}: optimizer {opt.get('type')} runs DeepSpeed's {op} op, which this DeepSpeed did not prebuild "
            f'and cannot compile without {" and ".join(missing)}: add "torch_adam": true (and "fused": true '
            "on a GPU) to the optimizer's params for torch's AdamW, or install what is missing"
        )
