"""DeepSpeed checkpoints that are only trusted once every rank has finished writing.

DeepSpeed's ``latest`` file can name a checkpoint that is half on disk (a crash between ranks'
writes). Here each save is ``engine.save_checkpoint(dir, tag)``, then every rank writes its own
RNG states, then a barrier, then rank 0 writes ``<dir>/<tag>/COMPLETE``: a JSON record of the step and
of every file of the tag with its size and sha256. ``--resume`` takes the newest tag whose marker is
there and whose files all still match it; a damaged tag (a flipped byte, a truncated or missing file) is
named in one log line and the next older intact one is used.

The record carries a sha256 of itself too, so a flipped byte anywhere in the tag, the record included, is
caught. The RNG states are written without pickle: the generator states as tensors in a safetensors file,
the few scalars beside them as JSON in its metadata, so loading them runs no code from the run
directory. DeepSpeed's own files in the tag are pickles: they are read weights-only, and a file needing
more than tensors and DeepSpeed's own states is refused (`offline_kd.train.ds_files`; the sha256 record
catches damage, not forgery).

``--resume`` says which case it is in: no checkpoint yet (it starts fresh, in one log line), checkpoints
that are all damaged (an error naming each: a run that made progress is never silently started over), or
the tag it resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offline_kd.runtime.distributed import barrier, rank, world_size
from offline_kd.runtime.errors import DiskFull, UsageError, is_disk_full
from offline_kd.runtime.settings import CheckpointConfig
from offline_kd.train.ds_files import check_loadable, checkpoint_files
from offline_kd.train.state import TrainState, resume_state

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RNG_FORMAT = "offline_kd.rng_state/1"
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints with a completion marker, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _TAG_RE.match(p.name)
        if m and (p / MARKER).is_file():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def latest_complete(ckpt_dir: str | Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(ckpt_dir: str | Path, tag: str, rank_: int) -> Path:
    return Path(ckpt_dir) / tag / f"rng_rank{rank_}.safetensors"


def save_rng_state(path: str | Path, state: dict) -> None:
    """``state`` (as from :func:`rng_state`) as tensors plus JSON metadata; no pickle."""
    py_version, py_words, py_gauss = state["python"]
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    tensors = {
        "torch": state["torch"].contiguous(),
        "numpy.key": torch.from_numpy(np.ascontiguousarray(np_key, dtype=np.uint32).view(np.int32).copy()),
        "python.words": torch.tensor(py_words, dtype=torch.int64),
    }
    for i, cuda in enumerate(state.get("cuda") or []):
        tensors[f"cuda.{i}"] = cuda.cpu().contiguous()
    scalars = {
        "format": RNG_FORMAT,
        "python": {"version": py_version, "gauss_next": py_gauss},
        "numpy": {
            "name": np_name,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "cuda_devices": len(state.get("cuda") or []),
    }
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"rng": json.dumps(scalars)})
    os.replace(tmp, path)


def load_rng_state(path: str | Path) -> dict:
    """The state saved by :func:`save_rng_state` (tensors and JSON only: nothing is executed)."""
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads((f.metadata() or {}).get("rng", "{}"))
        if scalars.get("format") != RNG_FORMAT:
            raise ValueError(f"{path}: not an {RNG_FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    py, npy = scalars["python"], scalars["numpy"]
    np_key = tensors["numpy.key"].numpy().view(np.uint32)
    return {
        "python": (py["version"], tuple(int(w) for w in tensors["python.words"].tolist()), py["gauss_next"]),
        "numpy": (npy["name"], np_key, npy["pos"], npy["has_gauss"], npy["gauss"]),
        "torch": tensors["torch"],
        "cuda": [tensors[f"cuda.{i}"] for i in range(scalars["cuda_devices"])] or None,
    }


def file_digests(tag_dir: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file of a checkpoint tag but its marker."""
    import hashlib

    out = {}
    for path in sorted(
        p for p in tag_dir.rglob("*") if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")
    ):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def damage(tag_dir: Path) -> str | None:
    """Why a complete tag can no longer be trusted (a file gone, resized or changed), or None when intact.
    A marker from before files were recorded vouches for nothing: None, and the caller says so."""
    try:
        record = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"its {MARKER} record is unreadable ({e})"
    if not isinstance(record, dict):
        return f"its {MARKER} record is not a record"
    if "sha256" in record and record.pop("sha256") != _record_sha256(record):
        return f"its {MARKER} record does not match its own sha256"
    files = record.get("files")
    if files is None:
        return None
    now = file_digests(tag_dir)
    for name, want in files.items():
        got = now.get(name)
        if got is None:
            return f"{name} is missing"
        if got["size"] != want["size"]:
            return f"{name} has {got['size']:,} bytes, {want['size']:,} when saved"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _record_sha256(record: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def write_marker(tag_dir: Path, step: int) -> None:
    """Mark a tag complete: its ``COMPLETE`` record of every file's size and sha256, and of itself."""
    record = {"step": step, "time": time.time(), "world_size": world_size(), "files": file_digests(tag_dir)}
    record["sha256"] = _record_sha256(record)
    tmp = tag_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, tag_dir / MARKER)


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int | None = None) -> str:
    """Save a checkpoint for `step` on every rank; rank 0 marks it complete after a barrier."""
    tag = tag_for(step)
    tag_dir = Path(ckpt_dir) / tag
    this_rank = rank()
    if this_rank == 0:  # a tag saved again (a resumed run) is unmarked while its files are rewritten
        (tag_dir / MARKER).unlink(missing_ok=True)
    with checkpoint_files(engine):  # a full disk surfaces as an OSError, not a bare C++ message
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True)
    tag_dir.mkdir(parents=True, exist_ok=True)
    save_rng_state(rng_file(ckpt_dir, tag, this_rank), rng_state())
    barrier()
    if this_rank == 0:
        write_marker(tag_dir, step)
        if keep_last:
            for _, old in complete_tags(ckpt_dir)[:-keep_last]:
                _remove_tree(Path(ckpt_dir) / old)
    barrier()
    return tag


def _remove_tree(path: Path) -> None:
    import shutil

    (path / MARKER).unlink(missing_ok=True)  # unmark first: a half-deleted tag is never "complete"
    shutil.rmtree(path, ignore_errors=True)


def newest_intact(ckpt_dir: str | Path) -> tuple[str | None, list[str]]:
    """The newest complete tag whose files match its record (None when none does), and each newer damaged
    one with what is wrong with it; the damaged ones are named in the log."""
    damaged = []
    for _, tag in reversed(complete_tags(ckpt_dir)):
        why = damage(Path(ckpt_dir) / tag)
        if why is None:
            return tag, damaged
        damaged.append(f"{tag} ({why})")
        if rank() == 0:
            log.warning("checkpoint %s is damaged (%s): not resuming from it", tag, why)
    return None, damaged


def load(engine, ckpt_dir: str | Path, tag: str, trust: bool = False) -> tuple[str, dict]:
    """Load `tag` into the engine (DeepSpeed's files weights-only unless `trust`); restore this rank's
    RNG; return (tag, client_state)."""
    check_loadable(engine, Path(ckpt_dir) / tag, trust)
    with checkpoint_files(engine, trust=trust):
        path, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    path = rng_file(ckpt_dir, tag, rank())
    if path.exists():
        set_rng_state(load_rng_state(path))
    else:  # e.g. an older checkpoint's pickled rng_rank<r>.pt, which is never unpickled
        log.warning(
            "%s has no %s: the random state (dropout masks) is not restored, so the resumed run is "
            "not an exact continuation",
            tag,
            path.name,
        )
    return tag, client_state or {}


class Checkpointer:
    """When a run saves, what it keeps and where it resumes: the loop only reports its steps.

    ``save(state, ..., last_step=False)`` saves every ``save_every`` optimizer steps;
    ``last_step=True`` saves the final step too (unless it was just saved), so a finished run is
    always resumable. Nothing is saved with ``save_every`` 0.
    """

    def __init__(self, engine, ckpt_dir: Path, cfg: CheckpointConfig):
        self.engine, self.dir, self.cfg = engine, Path(ckpt_dir), cfg
        self.last_saved: str | None = None  # the newest checkpoint of this run, resumed from or saved
        self.resumed_from: str | None = None

    def resume(self, fresh: TrainState, is_main: bool) -> TrainState:
        """With ``--resume`` the newest complete checkpoint's state (remapped to `fresh`'s layout), else
        `fresh`."""
        if not self.cfg.resume:
            return fresh
        tag, damaged = newest_intact(self.dir)
        if tag is None:
            if damaged:  # a run that made progress is never silently started over
                raise UsageError(
                    f"--resume: every checkpoint in {self.dir} is damaged: {'; '.join(damaged)}. Nothing was "
                    "trained over; restore them, or pass --overwrite instead of --resume to start the run again"
                )
            if is_main:
                log.info("%s", no_checkpoint_note(self.dir))
            return fresh
        if self.cfg.trust_run_dir and is_main:
            log.warning("--trust-run-dir: DeepSpeed unpickles the files of %s (any code in them runs)", tag)
        self.last_saved, client = load(self.engine, self.dir, tag, trust=self.cfg.trust_run_dir)
        self.resumed_from = self.last_saved
        state, warnings = resume_state(client, fresh.layout, fresh.scheduler)
        if is_main:
            for warning in warnings:
                log.warning("%s", warning)
            log.info(
                "resumed from %s at step %d (epoch %d, micro-batch %d)",
                self.last_saved, state.step, state.epoch, state.micro_pos,
            )  # fmt: skip
        return state

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether `save` would write `step`: every ``save_every`` steps, and the last one unless just saved."""
        every = self.cfg.save_every
        if not every or self.last_saved == tag_for(step):
            return False
        return step > 0 if last_step else step % every == 0

    def save(
        self, state: TrainState, micro_batches: int, row: dict, last_step: bool = False, force: bool = False
    ) -> bool:
        """Save `state` when its step is due, or is the last one, or when `force`d (a stop or a timed save),
        unless this step is saved already. Returns whether it saved."""
        forced = force and state.step > 0 and self.last_saved != tag_for(state.step)
        if not (forced or self.due(state.step, last_step)):
            return False
        client = state.to_client_state(micro_batches, row)
        tag = tag_for(state.step)
        try:
            self.last_saved = save(self.engine, self.dir, state.step, client, self.cfg.keep_checkpoints)
        except Exception as e:
            if not is_disk_full(e):
                raise
            _remove_tree(self.dir / tag)  # never marked complete: only space taken
            previous = (
                f"the previous checkpoint {self.last_saved} is intact" if self.last_saved
                else "no earlier checkpoint of this run exists"
            )  # fmt: skip
            raise DiskFull(
                f"disk full while saving checkpoint {tag} to {self.dir}; {previous} ({tag} was removed): free "
                "space and rerun the same command with --resume"
            ) from None
        return True


def no_checkpoint_note(ckpt_dir: Path) -> str:
    """The log line of a ``--resume`` that starts fresh: which of the no-checkpoint cases it is."""
    if not ckpt_dir.is_dir():
        return f"--resume: no checkpoint directory {ckpt_dir} yet, starting fresh"
    unfinished = sorted(p.name for p in ckpt_dir.iterdir() if _TAG_RE.match(p.name))
    if unfinished:  # saves cut short before their marker: nothing in them is vouched for
        return (
            f"--resume: no complete checkpoint in {ckpt_dir} ({', '.join(unfinished)} never finished saving), "
            "starting fresh"
        )
    return f"--resume: no checkpoint in {ckpt_dir} yet, starting fresh"
