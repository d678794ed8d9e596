"""What the optimizer steps since the last flush computed, kept where they ran: one host sync per flush.

Every micro-batch's loss components, tokens and sequences are summed over ranks on the device, and
every step's "parameters finite" flag is reduced there too. Reading any of them on the host would
make the host wait for the GPU each micro-batch, so they stay queued here until `flush`, which the
loop calls every ``--log-every`` steps and before anything that must not see a broken step (a
checkpoint, a held-out evaluation, the export). Every rank flushes at the same steps and sees the
same reduced values, so a non-finite loss stops every rank together, naming the first micro-batch
that had one, and nothing is saved after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offline_kd.runtime.errors import RunFailed
from offline_kd.train.loss import COMPONENTS

# The columns of a micro-batch's sums: the loss components, then real tokens and sequences.
TOKENS, SEQUENCES = len(COMPONENTS), len(COMPONENTS) + 1
WIDTH = SEQUENCES + 1


class NonFiniteLossError(RunFailed):
    """A loss component or a parameter became NaN or infinite; the run stops without saving."""


@dataclass
class _Step:
    step: int
    epoch: int
    micro: list[int]  # the micro-batch index (within the epoch) of each row of `sums`
    sums: torch.Tensor  # [micro-batches, WIDTH] float64 on the device, summed over ranks
    params_finite: torch.Tensor | None  # int32 on the device, MIN over ranks
    host: dict = field(default_factory=dict)  # lr, times, ... known on the host


class StepLedger:
    """Device-side records of the steps since the last `flush`."""

    def __init__(self, world: int):
        self.world = world
        self.steps: list[_Step] = []
        self._micro: list[torch.Tensor] = []
        self._micro_pos: list[int] = []

    def add_micro_batch(self, sums: torch.Tensor, micro_pos: int) -> None:
        """One micro-batch's ``[components..., tokens, sequences]``, already summed over ranks."""
        self._micro.append(sums)
        self._micro_pos.append(micro_pos)

    def end_step(self, step: int, epoch: int, params_finite: torch.Tensor | None, **host) -> None:
        """Close optimizer step `step` with its parameter check and host-side figures (lr, times, ...)."""
        sums = torch.stack(self._micro)
        self.steps.append(_Step(step, epoch, self._micro_pos, sums, params_finite, host))
        self._micro, self._micro_pos = [], []

    def flush(self, last_saved: str | None) -> list[dict]:
        """The metrics rows of the recorded steps, after one copy to the host; raises
        `NonFiniteLossError` for the first non-finite loss or parameter update among them."""
        if not self.steps:
            return []
        sums = torch.cat([s.sums for s in self.steps]).cpu()  # the one synchronisation
        flags = [s.params_finite for s in self.steps]
        params_ok = torch.stack([f.reshape(()) for f in flags]).cpu().tolist() if None not in flags else None
        rows, offset = [], 0
        for i, s in enumerate(self.steps):
            mine = sums[offset : offset + len(s.micro)]
            offset += len(s.micro)
            self._check_loss(s, mine, last_saved)
            if params_ok is not None and not params_ok[i]:
                raise NonFiniteLossError(
                    f"non-finite parameters after the update of step {s.step} (epoch {s.epoch}): the "
                    f"gradients were not finite although the loss was; stopping without saving; last good "
                    f"checkpoint: {last_saved or 'none'}"
                )
            totals = mine[0].clone()
            for row in mine[1:]:  # in micro-batch order, as the sums were always added
                totals += row
            rows.append(self._row(s, totals))
        self.steps = []
        return rows

    def _check_loss(self, s: _Step, sums: torch.Tensor, last_saved: str | None) -> None:
        finite = torch.isfinite(sums[:, :TOKENS]).all(dim=1)
        if bool(finite.all()):
            return
        k = int((~finite).nonzero()[0, 0])
        detail = ", ".join(f"{n}={float(sums[k, i]) / self.world:.6g}" for i, n in enumerate(COMPONENTS))
        raise NonFiniteLossError(
            f"non-finite loss at step {s.step} (epoch {s.epoch}, micro-batch {s.micro[k]}): {detail}; "
            f"stopping without saving; last good checkpoint: {last_saved or 'none'}"
        )

    def _row(self, s: _Step, totals: torch.Tensor) -> dict:
        """One optimizer step's row: loss components averaged over its micro-batch × rank sums."""
        parts, host = len(s.micro) * self.world, s.host
        norm = host.get("grad_norm")
        return {
            "step": s.step,
            "epoch": s.epoch,
            "samples": int(totals[SEQUENCES]),
            "tokens": int(totals[TOKENS]),
            **{name: float(totals[i] / parts) for i, name in enumerate(COMPONENTS)},
            "lr": host["lr"],
            "tokens_per_s": float(totals[TOKENS]) / max(host["step_time_s"], 1e-9),
            "step_time_s": host["step_time_s"],
            "reader_wait_s": host["reader_wait_s"],
            "grad_norm": float("nan") if norm is None else float(norm),
            "global_samples": host.get("global_samples"),  # DeepSpeed's x for its monitors, not a column
        }
