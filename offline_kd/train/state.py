"""Where a training run stands, as saved in a checkpoint's client state, and how it resumes.

A run's position is (optimizer step, epoch, micro-batch position within the epoch's order on this
rank). The position only means the same data when the batch layout (ranks, micro batch,
accumulation) is the same, so the layout is saved with it; `remap_for_layout` maps a position onto
another layout. Everything here is pure: no engine, no files, no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Layout(NamedTuple):
    """How one optimizer step's sequences are cut: ranks × micro batch × accumulation steps."""

    ranks: int
    micro: int
    accumulation: int


@dataclass
class TrainState:
    """The resumable position of a run and the settings it was made under."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (reads mask view epoch mod views)
    micro_pos: int = 0  # micro-batches of this epoch's order already consumed by each rank
    layout: Layout | None = None  # None: unknown (an old checkpoint); taken to be the current one
    scheduler: dict | None = None  # the resolved DeepSpeed "scheduler" section

    def next_epoch(self) -> None:
        self.epoch += 1
        self.micro_pos = 0

    def to_client_state(self, epoch_micro_batches: int, metrics: dict) -> dict:
        """The checkpoint's client state; a finished epoch is saved as the start of the next one.

        Keys: step, epoch, micro_pos, metrics (the last metrics row, for people), scheduler, layout.
        """
        epoch, micro_pos = self.epoch, self.micro_pos
        if micro_pos >= epoch_micro_batches:
            epoch, micro_pos = epoch + 1, 0
        return {
            "step": self.step,
            "epoch": epoch,
            "micro_pos": micro_pos,
            "metrics": metrics,
            "scheduler": self.scheduler,
            "layout": list(self.layout) if self.layout is not None else None,
        }

    @classmethod
    def from_client_state(cls, client: dict) -> TrainState:
        """Read a client state written by `to_client_state` (or by earlier versions: same keys)."""
        layout = client.get("layout")
        return cls(
            step=int(client["step"]),
            epoch=int(client["epoch"]),
            micro_pos=int(client["micro_pos"]),
            layout=Layout(*(int(v) for v in layout)) if layout else None,
            scheduler=client.get("scheduler"),
        )


def remap_for_layout(state: TrainState, layout: Layout) -> tuple[TrainState, str | None]:
    """`state` moved onto `layout`, and a warning when the layout changed (else None).

    Another rank count or batch shape cuts the epoch's order into other rank slices, so the run
    continues after the same number of consumed sequences, rounded down to a whole optimizer
    step: close to, but not exactly, a continuation of the original data order.
    """
    saved = state.layout or layout
    moved = TrainState(state.step, state.epoch, state.micro_pos, layout, state.scheduler)
    if tuple(saved) == tuple(layout):
        return moved, None
    consumed = state.micro_pos * saved.ranks * saved.micro
    moved.micro_pos = (consumed // (layout.ranks * layout.micro)) // layout.accumulation * layout.accumulation
    warning = (
        f"checkpoint made with (ranks, micro, accumulation) = {tuple(saved)}, now {tuple(layout)}: "
        f"continuing epoch {state.epoch} after ~{consumed} sequences; "
        "the data order is not an exact continuation"
    )
    return moved, warning


def schedule_change(saved: dict | None, current: dict | None) -> str | None:
    """A warning when a resumed run's LR schedule differs from its checkpoint's (else None)."""
    if saved in (None, current):
        return None
    return (
        f"resuming with a different LR schedule than the checkpoint's: {current} (was {saved}); "
        "pass the same --schedule-steps/--max-steps to continue the original schedule"
    )


def resume_state(client: dict, layout: Layout, scheduler: dict | None) -> tuple[TrainState, list[str]]:
    """The state to continue from a checkpoint's client state under the current settings.

    Returns the state (on `layout`, with the current `scheduler`) and the warnings to show.
    """
    saved = TrainState.from_client_state(client)
    warnings = [schedule_change(saved.scheduler, scheduler)]
    state, moved = remap_for_layout(saved, layout)
    state.scheduler = scheduler
    warnings.append(moved)
    return state, [w for w in warnings if w]
