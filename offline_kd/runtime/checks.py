"""Checks several stages share: a model given as a directory or a hub name, and a device string.

Only a model's *config* is read (its weights never load), so a check costs milliseconds. A failed
check raises `UsageError` naming the flag and its value.
"""

from __future__ import annotations

from pathlib import Path

from offline_kd.runtime.errors import UsageError

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def is_hub_name(value: str) -> bool:
    """True when `value` could name a hub repository (``NAME`` or ``ORG/NAME``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_model_dir(path: Path, need_weights: bool, need_tokenizer: bool) -> None:
    if not path.is_dir():
        raise UsageError("is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise UsageError("not a Hugging Face model directory (no config.json)")
    if need_weights and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UsageError(f"no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def check_model_source(
    value: str,
    label: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    need_weights: bool = True,
    need_tokenizer: bool = True,
    hint: str = "",
):
    """The config of a model given as a local directory or a hub name.

    A directory must hold ``config.json`` (and weights and tokenizer files when asked); a name that
    is no directory must be a valid hub name whose config loads. Only the config is read. Errors
    read ``{label}: {problem}{hint}``.
    """
    from transformers import AutoConfig

    path = Path(value).expanduser()
    try:
        if path.exists():
            _check_model_dir(path, need_weights, need_tokenizer)
        elif not is_hub_name(value):
            raise UsageError("no such directory")
    except UsageError as e:
        raise UsageError(f"{label}: {e}{hint}") from None
    try:
        config = AutoConfig.from_pretrained(
            str(path) if path.exists() else value, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        where = "its config.json cannot be read" if path.exists() else (
            "no such directory, and no model of that name could be loaded from the hub"
        )  # fmt: skip
        raise UsageError(f"{label}: {where} ({first_line(e)}){hint}") from None
    check_masked_lm(config, label)
    return config


def check_masked_lm(config, label: str) -> None:
    """Refuse a model that is not a masked language model (a GPT-2, a T5), naming what it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "auto_map", None):
        return  # a known masked LM, or remote code that declares its own classes
    what = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
    raise UsageError(
        f"{label}: a {model_type} model ({what}) is not a masked language model; expected one "
        "AutoModelForMaskedLM loads (BERT, RoBERTa, DistilBERT, ...)"
    )


def max_positions(config) -> int | None:
    """The longest input a model config allows (``max_position_embeddings``), if it says."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def check_device(value: str | None, flag: str = "--device") -> None:
    """Refuse a device string torch does not know, or a CUDA device this host does not have."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"{flag} {value}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {value}: CUDA is not available on this host")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value}: this host has {torch.cuda.device_count()} CUDA device(s)")
