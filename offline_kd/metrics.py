"""Training observability (rank 0 only): a tqdm bar, ``logs/metrics.csv`` and TensorBoard."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = (
    "step",
    "epoch",
    "samples",
    "tokens",
    "loss",
    "kl",
    "mlm",
    "cos",
    "lr",
    "tokens_per_s",
    "step_time_s",
    "reader_wait_s",
)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLogger:
    """Writes one row per optimizer step. Inactive (no files, no bar) unless `enabled`."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.history: list[dict] = []
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        self._truncate(start_step)
        new = not self.csv_path.exists()
        self._f = open(self.csv_path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()
            self._f.flush()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """On resume, drop rows written after the checkpoint we resume from (they will be redone)."""
        if not self.csv_path.exists():
            return
        rows = read_csv(self.csv_path)
        keep = [r for r in rows if int(r["step"]) <= start_step]
        if len(keep) != len(rows):
            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(keep)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in COLUMNS}
        self._w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()
        self.history.append(row)
        step = int(row["step"])
        if self.tb is not None:
            for k in ("loss", "kl", "mlm", "cos"):
                self.tb.add_scalar(f"loss/{k}", row[k], step)
            self.tb.add_scalar("lr", row["lr"], step)
            self.tb.add_scalar("throughput/tokens_per_s", row["tokens_per_s"], step)
            self.tb.add_scalar("time/step_s", row["step_time_s"], step)
            self.tb.add_scalar("time/reader_wait_s", row["reader_wait_s"], step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                kl=f"{row['kl']:.3f}",
                mlm=f"{row['mlm']:.3f}",
                tok_s=_human(row["tokens_per_s"]),
                refresh=False,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _human(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"
