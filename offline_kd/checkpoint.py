"""DeepSpeed checkpoints that are only trusted once every rank has finished writing.

DeepSpeed's ``latest`` file can name a checkpoint that is half on disk (a crash between ranks'
writes). Here each save is ``engine.save_checkpoint(dir, tag)``, then every rank writes its own
RNG states, then a barrier, then rank 0 writes ``<dir>/<tag>/COMPLETE`` (a small JSON record).
``--resume`` loads the newest tag that has the marker and ignores the rest.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from offline_kd.distributed import barrier, rank, world_size

MARKER = "COMPLETE"
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


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int | None = None) -> str:
    """Save a checkpoint for `step` on every rank; rank 0 marks it complete after a barrier."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True)
    tag_dir = Path(ckpt_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    this_rank = rank()
    torch.save(rng_state(), tag_dir / f"rng_rank{this_rank}.pt")
    barrier()
    if this_rank == 0:
        tmp = tag_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "time": time.time(), "world_size": world_size()}))
        os.replace(tmp, tag_dir / MARKER)
        if keep_last:
            for _, old in complete_tags(ckpt_dir)[:-keep_last]:
                _remove_tree(Path(ckpt_dir) / old)
    barrier()
    return tag


def _remove_tree(path: Path) -> None:
    import shutil

    (path / MARKER).unlink(missing_ok=True)  # unmark first: a half-deleted tag is never "complete"
    shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: str | Path, tag: str | None = None) -> tuple[str, dict] | None:
    """Load `tag` (default: newest complete) into the engine; restore this rank's RNG; return
    (tag, client_state) or None when there is nothing to resume."""
    tag = tag or latest_complete(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return tag, client_state or {}
