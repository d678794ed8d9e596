"""Every input of a command checked before anything expensive starts.

`check_precompute`, `check_train` and `check_eval` run first in `precompute`, `train` and
`evaluate` (so the library and every entry point get them): paths exist, configs parse, a model's
*config* loads (its weights do not), the student spec names something buildable, the temperature is
among the store's. A failed check raises `UsageError` (or a subclass) naming the flag and its value;
the entry points print it as one ``Error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offline_kd import hub_kernels
from offline_kd.errors import UsageError

if TYPE_CHECKING:
    from offline_kd.settings import EvalConfig, PrecomputeConfig, TrainConfig
    from offline_kd.store import StoreMeta

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
UNSET_MODEL_MAX_LENGTH = 10**12  # tokenizers without a length report ~1e30 ("no limit")


# ------------------------------------------------------------------------------------ models


def _is_hub_name(value: str) -> bool:
    """True when `value` could name a hub repository (``NAME`` or ``ORG/NAME``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
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
        elif not _is_hub_name(value):
            raise UsageError("no such directory")
    except UsageError as e:
        raise UsageError(f"{label}: {e}{hint}") from None
    try:
        return AutoConfig.from_pretrained(
            str(path) if path.exists() else value, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        where = "its config.json cannot be read" if path.exists() else (
            "no such directory, and no model of that name could be loaded from the hub"
        )  # fmt: skip
        raise UsageError(f"{label}: {where} ({_first_line(e)}){hint}") from None


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


# ------------------------------------------------------------------------------------ precompute


def check_precompute(cfg: PrecomputeConfig, world_size: int) -> None:
    """Settings, device, teacher config and corpus sources of ``kd precompute``."""
    from offline_kd.corpus import check_group_rows, check_sources
    from offline_kd.storage import check_store_url

    _check_precompute_settings(cfg, world_size)
    hub_kernels.check(cfg.hub_kernels)
    # The store's filesystem installed and its bucket answering; a local output under a writable directory.
    check_store_url(cfg.output, cfg.storage_options, writing=not cfg.dry_run)
    check_device(cfg.device)
    label = f"--teacher {cfg.teacher}"
    config = check_model_source(
        cfg.teacher, label, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
        need_weights=not cfg.dry_run,  # a dry run reads the config and the tokenizer only
    )  # fmt: skip
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and cfg.top_k > vocab:
        raise UsageError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary size {vocab}")
    positions = max_positions(config)
    if positions is not None and cfg.max_length > positions:
        raise UsageError(
            f"--max-length {cfg.max_length} exceeds the teacher's max_position_embeddings {positions}"
        )
    check_sources(cfg.corpus)
    check_group_rows(cfg.group_rows, cfg.corpus)
    _check_corpus_cache(cfg, world_size)


def _check_corpus_cache(cfg: PrecomputeConfig, world_size: int) -> None:
    """Where rank 0 prepares the corpus for every rank (`offline_kd.corpus_cache`)."""
    from offline_kd.storage import is_local

    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise UsageError(f"--num-proc {cfg.num_proc}: must be at least 1")
    if cfg.wait_timeout <= 0:
        raise UsageError(f"--wait-timeout {cfg.wait_timeout}: must be positive")
    if cfg.cache_dir is None:
        if world_size > 1 and not is_local(cfg.output):
            raise UsageError(
                f"--cache-dir: {world_size} ranks writing the remote store {cfg.output!r} need a directory "
                "every rank reads (a shared filesystem) where rank 0 prepares the corpus once"
            )
        return
    if "://" in cfg.cache_dir:
        raise UsageError(
            f"--cache-dir {cfg.cache_dir}: must be a directory on a filesystem every rank mounts"
        )
    existing = Path(cfg.cache_dir).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--cache-dir {cfg.cache_dir}: {existing} is not a writable directory")


def _check_precompute_settings(cfg: PrecomputeConfig, world_size: int) -> None:
    from offline_kd.store import CODECS, HIDDEN_STORAGE

    if cfg.top_k < 0:
        raise UsageError(f"--top-k {cfg.top_k}: must be at least 0")
    if cfg.top_k == 0 and not (cfg.hidden and cfg.store_head):
        raise UsageError(
            "--top-k 0 stores no top-k signals: the store is for the exact KL source, which needs "
            "--hidden and --store-head"
        )
    if cfg.hidden_dtype not in HIDDEN_STORAGE:
        raise UsageError(f"--hidden-dtype {cfg.hidden_dtype}: must be one of {sorted(HIDDEN_STORAGE)}")
    if cfg.hidden_codec not in CODECS:
        raise UsageError(f"--hidden-codec {cfg.hidden_codec}: must be one of {', '.join(CODECS)}")
    if cfg.views < 1:
        raise UsageError(f"--views {cfg.views}: must be at least 1")
    if cfg.top_k > 0 and (not cfg.temperatures or any(t <= 0 for t in cfg.temperatures)):
        raise UsageError(f"--temperatures {cfg.temperatures}: must be positive")
    for flag, value in (("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if cfg.writer_threads is not None and cfg.writer_threads < 1:
        raise UsageError(f"--writer-threads {cfg.writer_threads}: must be at least 1")
    if cfg.chunk_size is not None and (cfg.chunk_size < 1 or cfg.shard_size % cfg.chunk_size):
        raise UsageError(f"--chunk-size {cfg.chunk_size}: must divide --shard-size {cfg.shard_size}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise UsageError(f"--holdout {cfg.holdout}: must be in [0, 1)")
    if cfg.holdout_file is not None:
        parent = Path(cfg.holdout_file).expanduser().absolute().parent
        if not parent.is_dir():
            raise UsageError(f"--holdout-file {cfg.holdout_file}: no such directory {parent}")
    if cfg.overwrite and world_size > 1:
        from offline_kd.store import StoreError

        raise StoreError("--overwrite with several ranks is racy: delete the store first, then run all ranks")
    _check_max_length(cfg)


def _check_max_length(cfg: PrecomputeConfig) -> None:
    from offline_kd.corpus import MIN_TOKENS

    if cfg.max_length <= MIN_TOKENS:
        raise UsageError(
            f"--max-length {cfg.max_length}: too small: sequences of at most {MIN_TOKENS} real tokens are "
            f"dropped as degenerate, so none would be left; use at least {MIN_TOKENS + 1}"
        )


# ------------------------------------------------------------------------------------ train


def recorded_teacher(meta: StoreMeta, store_url: str) -> str:
    """The teacher a store records, as a usable path or hub name.

    Stores record an absolute path for a local teacher. Older ones recorded the path as typed: it is
    looked up relative to the current directory, then to each directory above a local store.
    """
    name = (meta.teacher or {}).get("name_or_path")
    if not name:
        raise UsageError(f"the store {store_url} records no teacher: pass --teacher")
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.exists():
            return str(path)
        raise UsageError(f"the store's teacher {name} no longer exists: pass --teacher DIR")
    candidates = [Path.cwd()]
    if "://" not in store_url:
        candidates += list(Path(store_url).expanduser().absolute().parents)
    for base in candidates:
        if (base / path).is_dir():
            return str((base / path).resolve())
    if _is_hub_name(name):
        return name
    raise UsageError(
        f"the store records its teacher as the relative path {name!r}, found neither in the current "
        f"directory nor above the store: pass --teacher DIR"
    )


def check_train(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Store, DeepSpeed config, loss settings, teacher and student of a training run.

    Returns `cfg` with the teacher resolved (``--teacher``, else the store's record) when the
    student needs it."""
    from offline_kd.ds_config import load_ds_config, resolve_ds_config
    from offline_kd.storage import check_store_url
    from offline_kd.store import open_store

    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise UsageError(f"--output {cfg.output}: is an existing file, not a run directory")
    hub_kernels.check(cfg.hub_kernels)
    resolve_ds_config(
        load_ds_config(cfg.deepspeed_config), world_size, micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr=cfg.lr,
    )  # fmt: skip
    check_store_url(cfg.store, cfg.storage_options)  # filesystem installed, bucket answering
    store = open_store(cfg.store, cfg.storage_options)
    meta = store.meta
    missing = [i for i, c in enumerate(store.committed()) if not c]
    if missing:
        raise UsageError(
            f"--store {cfg.store}: incomplete, shards {missing[:20]} are not committed (rerun the same "
            "kd precompute command to finish it)"
        )
    cfg = resolve_kl_source(cfg, meta)
    _check_loss_against_store(cfg, meta)
    _check_eval_corpus(cfg)
    return _check_teacher_and_student(cfg, meta)


def _check_eval_corpus(cfg: TrainConfig) -> None:
    """``--eval-corpus``: a local file or store that exists, or a well-formed dataset name."""
    from offline_kd.corpus import check_sources

    if cfg.eval_every < 0:
        raise UsageError(f"--eval-every {cfg.eval_every}: must be 0 (at the end only) or more")
    src = cfg.eval_corpus
    if src is None:
        return
    if "://" not in src and (Path(src).suffix or src.startswith((".", "/", "~"))):
        if not Path(src).expanduser().exists():
            raise UsageError(f"--eval-corpus {src}: no such file or store")
        if (Path(src).expanduser() / "zarr.json").is_file():
            return
    check_sources([src])


def resolve_kl_source(cfg: TrainConfig, meta: StoreMeta) -> TrainConfig:
    """``--kl-source auto``: the exact KL when the store alone supports it (hidden states and the teacher's
    head), else the top-k KL. An explicit source is kept (and checked against the store)."""
    if cfg.loss.kl_source != "auto":
        return cfg
    source = "exact" if "exact" in meta.kl_sources() else "topk"
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kl_source=source))


def kl_source_note(source: str) -> str:
    """Why ``--kl-source auto`` chose `source`: one log line."""
    if source == "exact":
        return "--kl-source auto: exact (the store holds the hidden states and the teacher's MLM head)"
    return (
        "--kl-source auto: topk (the store holds no hidden states with the teacher's MLM head; precompute "
        "with --hidden to train on the teacher's full distribution)"
    )


def _check_loss_against_store(cfg: TrainConfig, meta: StoreMeta) -> None:
    from offline_kd.store import temperature_index

    exact = cfg.loss.kl_source == "exact"
    if exact and not meta.hidden:
        raise UsageError(
            f"--kl-source exact recomputes the teacher's logits from the stored hidden states, but the "
            f"store {cfg.store} has none (precompute with --hidden, or train with --kl-source topk)"
        )
    if cfg.loss.alpha_cos > 0 and not meta.hidden:
        raise UsageError(
            f"--alpha-cos {cfg.loss.alpha_cos} needs the teacher's hidden states, but the store "
            f"{cfg.store} was precomputed without them: pass --alpha-cos 0"
        )
    if exact:
        return  # any temperature: the exact KL reads no stored log-sum-exp
    if int(meta.top_k) == 0:
        raise UsageError(
            f"--kl-source topk needs the teacher's stored top-k, but the store {cfg.store} was precomputed "
            "with --top-k 0: train with --kl-source exact"
        )
    if cfg.loss.kl_tail:  # the tail-aware KL reads the stored log-sum-exp at T
        try:
            temperature_index(meta.temperatures, cfg.loss.temperature)
        except KeyError:
            raise UsageError(
                f"--temperature {cfg.loss.temperature} is not one of the store's temperatures "
                f"{meta.temperatures}; the tail-aware KL needs the stored log-sum-exp at T (pick a stored T "
                "or pass --no-kl-tail)"
            ) from None


def _head_needs_teacher(cfg: TrainConfig, meta: StoreMeta) -> bool:
    """The exact KL on a store without a stored head takes the head from the teacher."""
    return cfg.loss.kl_source == "exact" and not meta.has_head


def _check_teacher_and_student(cfg: TrainConfig, meta: StoreMeta) -> TrainConfig:
    """A given ``--teacher`` is always checked; the store's record only when the student needs it."""
    from offline_kd.student import check_spec, student_needs_teacher

    teacher, teacher_config = cfg.teacher, None
    revision = (meta.teacher or {}).get("revision")
    if teacher is not None:
        teacher_config = check_model_source(teacher, f"--teacher {teacher}", revision=revision)
    elif student_needs_teacher(cfg.student, cfg.init_from_teacher) or _head_needs_teacher(cfg, meta):
        teacher = recorded_teacher(meta, cfg.store)
        hint = "; pass --teacher DIR to use another copy"
        if not Path(teacher).is_absolute():  # a hub name, or an old store's relative path
            hint = "; no directory of that name here or above the store either: pass --teacher DIR"
        teacher_config = check_model_source(
            teacher, f"the store's teacher {teacher}", revision=revision, hint=hint
        )
    if teacher is not None and Path(teacher).expanduser().exists():
        cfg = dataclasses.replace(cfg, teacher=str(Path(teacher).expanduser().resolve()))
    elif teacher is not None:
        cfg = dataclasses.replace(cfg, teacher=teacher)
    check_spec(cfg.student, init_layers=cfg.init_layers, teacher_config=teacher_config)
    return cfg


# ------------------------------------------------------------------------------------ eval


def _tokenizer_max_length(model_dir: str) -> int | None:
    """``model_max_length`` from a local model's ``tokenizer_config.json``, when it sets a real one."""
    path = Path(model_dir).expanduser() / "tokenizer_config.json"
    try:
        value: Any = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and 0 < value < UNSET_MODEL_MAX_LENGTH else None


def check_eval(cfg: EvalConfig) -> EvalConfig:
    """Model, teacher, corpus and device of ``kd eval``; returns `cfg` with ``max_length`` resolved.

    Without ``--max-length`` the model's own is used: its tokenizer's ``model_max_length`` (a
    student exported by offline_kd records its store's length there), else its
    ``max_position_embeddings``."""
    from offline_kd.corpus import check_sources

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
        return dataclasses.replace(cfg, max_length=min([n for n in lengths if n] or [512]))
    for role, positions in limits.items():
        if positions is not None and cfg.max_length > positions:
            raise UsageError(
                f"--max-length {cfg.max_length} exceeds the {role}'s max_position_embeddings {positions}"
            )
    return cfg
