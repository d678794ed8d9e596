"""DeepSpeed's checkpoint files: read without running code from them, written so that a full disk is named.

DeepSpeed saves its states (``mp_rank_*_model_states.pt``, ``*zero_pp_rank_*_optim_states.pt``) with
``torch.save``, and its ``TorchCheckpointEngine`` reads them back with ``torch.load`` unpickling them whole:
a file planted in a run directory would run code on ``--resume``. Every read DeepSpeed makes while resuming
goes through the engine's ``checkpoint_engine.load`` (the model states through its state-dict loader, the
ZeRO partitions directly), so for the one ``engine.load_checkpoint`` call `checkpoint_files` puts in its
place an engine whose ``load`` is ``torch.load(weights_only=True)`` with `allowed_globals` allowed: tensors,
containers, numbers and strings, and the three DeepSpeed classes its own files hold. Those three are what
the checkpoints this trainer saves hold under ZeRO 0, 1, 2 and 3, fp32 and bf16, one rank and two (listed
with ``torch.serialization.get_unsafe_globals_in_checkpoint``); each is a plain record (a static loss scale,
the ZeRO stage enum, a (numel, start) pair) whose construction runs nothing else.

Before that load every rank lists the globals of every file of the tag (a static reading of each pickle's
opcodes: nothing runs) and refuses a file naming anything else, so that all ranks refuse the same file
together in one line. ``--trust-run-dir`` leaves DeepSpeed's own loading (unpickling) in place.

DeepSpeed reads a universal checkpoint (``"checkpoint": {"load_universal": true}``) with ``torch.load``
calls of its own, outside the checkpoint engine and unpickling: such a config is refused on resume unless
``--trust-run-dir``.

Writes: torch's C++ zip writer reports a failed write as "unexpected pos N vs M", without its reason. For
the one ``engine.save_checkpoint`` call DeepSpeed's ``torch.save`` writes through a Python file object
instead, so a full disk surfaces as the ``OSError`` it is (`offline_kd.runtime.errors.is_disk_full`). The
records written are the same; only the zip's top folder is named ``archive`` instead of after the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from offline_kd.runtime.errors import UsageError

# How torch's weights-only unpickler names what it refused.
_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


class UntrustedCheckpointFile(UsageError):
    """A checkpoint file that needs more than tensors and DeepSpeed's own states to load."""


def allowed_globals() -> list[type]:
    """The classes DeepSpeed's own checkpoint files hold beyond torch's weights-only set."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}


def refusal(path: str | Path, needs: list[str]) -> UntrustedCheckpointFile:
    what = ", ".join(needs) or "more than tensors and DeepSpeed's states"
    return UntrustedCheckpointFile(
        f"checkpoint file {path} needs {what} to load, which is not among the tensors and DeepSpeed states "
        "offline_kd writes: it was not loaded and nothing in it ran. Resume only run directories made by "
        "offline_kd, or pass --trust-run-dir to unpickle it (which runs any code it holds)"
    )


def check_tag_files(tag_dir: Path) -> None:
    """Refuse the first DeepSpeed file of a checkpoint tag whose pickle names a global outside torch's
    weights-only set and `allowed_globals` (read from its opcodes: nothing runs)."""
    allowed = _allowed_names()
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError):  # not a zip checkpoint: the weights-only load judges it alone
            continue
        extra = sorted(set(found) - allowed)
        if extra:
            raise refusal(path, extra)


def check_loadable(engine, tag_dir: Path, trust: bool) -> None:
    """What a resume checks before DeepSpeed reads a tag (nothing, with ``--trust-run-dir``)."""
    if trust:
        return
    if engine.load_universal_checkpoint():
        raise UsageError(
            'the DeepSpeed config sets "checkpoint": {"load_universal": true}: DeepSpeed reads a universal '
            "checkpoint by unpickling, outside the weights-only load offline_kd gives it; resume without it, "
            "or pass --trust-run-dir for a run directory you wrote"
        )
    check_tag_files(tag_dir)


def load_weights_only(path: str, map_location=None):
    """``torch.load`` of tensors, containers and `allowed_globals` only; anything else is refused, unrun."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refusal(path, sorted(set(_UNSUPPORTED.findall(str(e))))) from None


class _CheckpointFiles:
    """DeepSpeed's checkpoint engine for one call: loads weights-only (unless trusted), and its plain
    ``torch.save`` writes through a Python file object; everything else is the engine's own."""

    def __init__(self, inner, weights_only: bool):
        self._inner, self._weights_only = inner, weights_only

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        if not self._weights_only:
            return self._inner.load(path, map_location=map_location)
        return load_weights_only(path, map_location)

    def save(self, state_dict, path: str) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(self._inner) is not TorchCheckpointEngine:  # another engine writes its own way
            self._inner.save(state_dict, path)
            return
        with open(path, "wb") as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=self._inner.zipfile_serialization)


@contextmanager
def checkpoint_files(engine, trust: bool = False) -> Iterator[None]:
    """Within the block, `engine` reads its checkpoint files weights-only (unpickling with `trust`) and
    writes them so that a full disk is an ``OSError``; its own checkpoint engine is back afterwards."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _CheckpointFiles(inner, weights_only=not trust)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
