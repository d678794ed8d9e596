"""Every input of ``kd eval`` checked before a model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offline_kd.runtime import hub_kernels
from offline_kd.runtime.checks import check_device, check_model_source, max_positions
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.settings import EvalConfig

UNSET_MODEL_MAX_LENGTH = 10**12  # tokenizers without a length report ~1e30 ("no limit")


def _tokenizer_max_length(model_dir: str) -> int | None:
    """``model_max_length`` from a local model's ``tokenizer_config.json``, when it sets a real one."""
    path = Path(model_dir).expanduser() / "tokenizer_config.json"
    try:
        value: Any = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and 0 < value < UNSET_MODEL_MAX_LENGTH else None


def check_eval(cfg: EvalConfig) -> int:
    """Model, teacher, corpus and device of ``kd eval``; returns the length to score at.

    That is ``--max-length``, else the model's own: its tokenizer's ``model_max_length`` (a student
    exported by offline_kd records its store's length there), else its ``max_position_embeddings``."""
    from offline_kd.data.corpus import check_sources

    check_device(cfg.device)
    hub_kernels.check(cfg.hub_kernels)
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size}: must be at least 1")
    models = {"model": check_model_source(cfg.model, f"--model {cfg.model}")}
    if cfg.update_card and not Path(cfg.model).expanduser().is_dir():
        raise UsageError(f"--update-card: --model {cfg.model} is no local directory to hold the card")
    if cfg.teacher is not None:
        models["teacher"] = check_model_source(cfg.teacher, f"--teacher {cfg.teacher}")
    check_sources(cfg.corpus)
    limits = {role: max_positions(config) for role, config in models.items()}
    if cfg.max_length is None:
        lengths = [_tokenizer_max_length(cfg.model), *limits.values()]
        return min([n for n in lengths if n] or [512])
    for role, positions in limits.items():
        if positions is not None and cfg.max_length > positions:
            raise UsageError(
                f"--max-length {cfg.max_length} exceeds the {role}'s max_position_embeddings {positions}"
            )
    return cfg.max_length
