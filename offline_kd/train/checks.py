"""Every input of a training run checked before the process group forms or DeepSpeed starts.

`check_train` returns what it found (`TrainInputs`: the opened store, the KL source ``auto`` stands
for, the teacher to use); it changes nothing of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offline_kd.runtime import hub_kernels
from offline_kd.runtime.checks import check_model_source, is_hub_name
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.options import check_ranges
from offline_kd.runtime.settings import TrainConfig
from offline_kd.store.signal_store import SignalStore, StoreMeta


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
    if is_hub_name(name):
        return name
    raise UsageError(
        f"the store records its teacher as the relative path {name!r}, found neither in the current "
        f"directory nor above the store: pass --teacher DIR"
    )


# What a run writes in its --output: anything else there is the user's.
RUN_FILES = ("train_config.json", "ds_config.json", "checkpoints", "logs", "final", "final.partial",
             "projection.safetensors", "debug")  # fmt: skip


def check_run_dir(cfg: TrainConfig) -> None:
    """--output is new, empty, or an earlier run of this tool that --resume continues or --overwrite
    restarts; a finished or interrupted run is never trained over silently, and a directory holding
    anything else is refused (nothing of it would be safe from --overwrite)."""
    out = Path(cfg.output)
    if cfg.checkpoint.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite: choose one (continue the run, or start it again)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {cfg.output}: is an existing file, not a run directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "train_config.json").is_file():
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise UsageError(
            f"--output {cfg.output}: holds files that are not an offline_kd run ({found}); choose a new or "
            "empty directory"
        )
    if cfg.checkpoint.resume or cfg.overwrite:
        return
    if (out / "final").is_dir():
        what = "a finished run (final/ exists)"
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        what = "an interrupted run with checkpoints"
    else:
        return  # a run that stopped before its first checkpoint: nothing to lose
    raise UsageError(
        f"--output {cfg.output}: is {what}; pass --resume to continue it or --overwrite to start it again"
    )


@dataclass(frozen=True)
class TrainInputs:
    """What checking a training run's inputs found. The config itself is not rewritten."""

    store: SignalStore  # opened once here; the run and its reader use this one
    kl_source: str  # --kl-source with 'auto' resolved to 'exact' or 'topk'
    teacher: str | None  # --teacher (as an absolute path when local), else the store's when it is needed


def check_train(cfg: TrainConfig, world_size: int) -> TrainInputs:
    """Store, DeepSpeed config, loss settings, teacher and student of a training run."""
    import torch

    from offline_kd.store.signal_store import open_store
    from offline_kd.store.storage import check_store_url
    from offline_kd.train.ds_config import check_optimizer_buildable, load_ds_config, resolve_ds_config

    check_ranges(cfg)
    check_run_dir(cfg)
    hub_kernels.check(cfg.hub_kernels)
    ds = resolve_ds_config(
        load_ds_config(cfg.deepspeed_config), world_size, micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr=cfg.lr,
    )  # fmt: skip
    check_optimizer_buildable(ds, "cuda" if torch.cuda.is_available() else "cpu")
    check_store_url(cfg.store, cfg.storage_options)  # filesystem installed, bucket answering
    store = open_store(cfg.store, cfg.storage_options)
    missing = [i for i, c in enumerate(store.committed()) if not c]
    if missing:
        raise UsageError(
            f"--store {cfg.store}: incomplete, shards {missing[:20]} are not committed (rerun the same "
            "kd precompute command to finish it)"
        )
    kl_source = kl_source_for(cfg.loss.kl_source, store.meta)
    _check_loss_against_store(cfg, kl_source, store.meta)
    _check_eval_corpus(cfg)
    return TrainInputs(store, kl_source, _check_teacher_and_student(cfg, kl_source, store.meta))


def _check_eval_corpus(cfg: TrainConfig) -> None:
    """``--eval-corpus``: a local file or store that exists, or a well-formed dataset name."""
    from offline_kd.data.corpus import check_sources

    if cfg.heldout.eval_every < 0:
        raise UsageError(f"--eval-every {cfg.heldout.eval_every}: must be 0 (at the end only) or more")
    src = cfg.heldout.eval_corpus
    if src is None:
        return
    if "://" not in src and (Path(src).suffix or src.startswith((".", "/", "~"))):
        if not Path(src).expanduser().exists():
            raise UsageError(f"--eval-corpus {src}: no such file or store")
        if (Path(src).expanduser() / "zarr.json").is_file():
            return
    check_sources([src])


def kl_source_for(requested: str, meta: StoreMeta) -> str:
    """``--kl-source auto``: the exact KL when the store alone supports it (hidden states and the teacher's
    head), else the top-k KL. An explicit source is kept (and checked against the store)."""
    if requested != "auto":
        return requested
    return "exact" if "exact" in meta.kl_sources() else "topk"


def kl_source_note(source: str) -> str:
    """Why ``--kl-source auto`` chose `source`: one log line."""
    if source == "exact":
        return "--kl-source auto: exact (the store holds the hidden states and the teacher's MLM head)"
    return (
        "--kl-source auto: topk (the store holds no hidden states with the teacher's MLM head; precompute "
        "with --hidden to train on the teacher's full distribution)"
    )


def _check_loss_against_store(cfg: TrainConfig, kl_source: str, meta: StoreMeta) -> None:
    from offline_kd.store.signal_store import temperature_index

    exact = kl_source == "exact"
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


def _head_needs_teacher(kl_source: str, meta: StoreMeta) -> bool:
    """The exact KL on a store without a stored head takes the head from the teacher."""
    return kl_source == "exact" and not meta.has_head


def _check_teacher_and_student(cfg: TrainConfig, kl_source: str, meta: StoreMeta) -> str | None:
    """A given ``--teacher`` is always checked; the store's record only when the student (or the exact
    KL's head) needs it. Returns the teacher the run uses, or None."""
    from offline_kd.train.student import check_spec, student_needs_teacher

    teacher, teacher_config = cfg.teacher, None
    revision = (meta.teacher or {}).get("revision")
    if teacher is not None:
        teacher_config = check_model_source(teacher, f"--teacher {teacher}", revision=revision)
    elif student_needs_teacher(cfg.student, cfg.init_from_teacher) or _head_needs_teacher(kl_source, meta):
        teacher = recorded_teacher(meta, cfg.store)
        hint = "; pass --teacher DIR to use another copy"
        if not Path(teacher).is_absolute():  # a hub name, or an old store's relative path
            hint = "; no directory of that name here or above the store either: pass --teacher DIR"
        teacher_config = check_model_source(
            teacher, f"the store's teacher {teacher}", revision=revision, hint=hint
        )
    check_spec(cfg.student, init_layers=cfg.init_layers, teacher_config=teacher_config)
    if teacher is not None and Path(teacher).expanduser().exists():
        return str(Path(teacher).expanduser().resolve())
    return teacher
