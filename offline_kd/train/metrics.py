"""Training observability (rank 0 only): ``logs/metrics.csv``, TensorBoard, DeepSpeed's monitors
and the progress (a bar on a TTY, plain lines in a log file: `offline_kd.runtime.progress`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

from offline_kd.runtime.progress import Progress, human
from offline_kd.runtime.settings import LogConfig

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
    "grad_norm",
)
# The scalars every step sends to TensorBoard and DeepSpeed's monitors (W&B, Comet, CSV, TensorBoard).
SCALARS = {
    "loss": "loss/loss",
    "kl": "loss/kl",
    "mlm": "loss/mlm",
    "cos": "loss/cos",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "tokens_per_s": "throughput/tokens_per_s",
    "step_time_s": "time/step_s",
    "reader_wait_s": "time/reader_wait_s",
}
EVAL_COLUMNS = ("step", "sequences", "masked_tokens", "accuracy", "masked_perplexity", "teacher_agreement")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _CsvLog:
    """An append-only CSV with a header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: tuple[str, ...], start_step: int):
        self.path, self.columns = path, columns
        self._truncate(start_step)
        new = not path.exists()
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns)
        if new:
            self._w.writeheader()
            self._f.flush()

    def _truncate(self, start_step: int) -> None:
        """Drop rows written after the checkpoint we resume from (they will be redone); a file with
        other columns (an older version's) is rewritten with these."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), tuple(reader.fieldnames or ())
        keep = [r for r in rows if int(r["step"]) <= start_step]
        if len(keep) != len(rows) or header != self.columns:
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore", restval="")
                w.writeheader()
                w.writerows(keep)

    def write(self, row: dict) -> None:
        self._w.writerow({k: _cell(row.get(k)) for k in self.columns})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _cell(v) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


class MetricsLogger:
    """Writes one row per optimizer step. Inactive (no files, no output) unless `enabled`."""

    def __init__(
        self,
        log_dir: str | Path,
        cfg: LogConfig,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        monitor=None,
        monitor_x: Callable[[], int] | None = None,
    ):
        """`cfg.progress`: a bar on a TTY (plain lines otherwise, and always without it); `monitor`: a
        DeepSpeed ``MonitorMaster`` (``engine.monitor``) that also receives every scalar when enabled,
        at ``monitor_x()`` (DeepSpeed's own events use the samples seen: W&B needs one rising x-axis)."""
        self.enabled = enabled
        self.tb = None
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.history: list[dict] = []
        self._monitor_x = monitor_x
        self.progress = Progress(
            total_steps, desc="train", unit="step", enabled=enabled, bar=cfg.progress, every=cfg.log_every,
            every_seconds=cfg.log_every_seconds, initial=start_step,
        )  # fmt: skip
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        self._csv = _CsvLog(self.csv_path, COLUMNS, start_step)
        self.history = read_csv(self.csv_path)  # a resumed run's card averages over the steps before it too
        self._eval_csv = _CsvLog(self.dir / "eval.csv", EVAL_COLUMNS, start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def log_hparams(self, hparams: dict) -> None:
        """The resolved settings, once: ``logs/hparams.json``, TensorBoard text and a plain line."""
        if not self.enabled:
            return
        text = json.dumps(hparams, indent=2, sort_keys=True, default=str)
        (self.dir / "hparams.json").write_text(text + "\n")
        if self.tb is not None:
            self.tb.add_text("hparams", "```\n" + text + "\n```", 0)
        self.progress.note("hyperparameters: " + json.dumps(_flat(hparams), default=str))

    def log(self, row: dict, monitor_x: int | None = None) -> None:
        """One step's row; `monitor_x`: the x the monitors file it under (default: `monitor_x()` now)."""
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in COLUMNS}
        self._csv.write(row)
        self.history.append(row)
        step = int(row["step"])
        self._scalars({SCALARS[k]: row[k] for k in SCALARS}, step, monitor_x)
        self.progress.update(1, _fields(row))

    def log_eval(self, step: int, result: dict) -> None:
        """A held-out evaluation: ``logs/eval.csv``, the trackers and one plain line."""
        if not self.enabled:
            return
        self._eval_csv.write({"step": step, **result})
        self._scalars({f"eval/{k}": result[k] for k in EVAL_COLUMNS[3:] if result.get(k) is not None}, step)
        shown = ", ".join(f"{k} {result[k]:.4g}" for k in EVAL_COLUMNS[3:] if result.get(k) is not None)
        self.progress.note(f"eval step {step} | {result['sequences']} held-out sequences | {shown}")

    def _scalars(self, values: dict[str, float], step: int, x: int | None = None) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for name, v in values.items():
                self.tb.add_scalar(name, v, step)
        if self.monitor is not None:
            if x is None:
                x = self._monitor_x() if self._monitor_x is not None else step
            self.monitor.write_events([(f"kd/{name}", v, x) for name, v in values.items()])

    def mean_of_last(self, n: int) -> dict[str, float]:
        """The loss components averaged over the last `n` logged steps (a steadier figure than one step)."""
        rows = self.history[-n:]
        if not rows:
            return {}
        out = {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("loss", "kl", "mlm", "cos")}
        return {**out, "steps": len(rows), "last_step": int(rows[-1]["step"])}

    def close(self) -> None:
        self.progress.close()
        if not self.enabled:
            return
        self._csv.close()
        self._eval_csv.close()
        if self.tb is not None:
            self.tb.close()


def _fields(row: dict) -> dict[str, str]:
    grad = row.get("grad_norm")
    return {
        "loss": f"{row['loss']:.4f} (kl {row['kl']:.4f}, mlm {row['mlm']:.4f}, cos {row['cos']:.4f})",
        "grad_norm": f"{grad:.3g}" if isinstance(grad, float) and math.isfinite(grad) else "-",
        "lr": f"{row['lr']:.3g}",
        "tok/s": human(row["tokens_per_s"]),
        "epoch": str(row["epoch"]),
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
