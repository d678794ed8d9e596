"""Each task's official metric, computed with scikit-learn and scipy (no hub metric script, no network).

Matthews correlation for CoLA, Pearson and Spearman for STS-B, F1 and accuracy for MRPC and QQP,
accuracy elsewhere (MNLI: on the matched and the mismatched validation sets). A task's *score*, the
number its retention and the macro average use, is the mean of its metrics, as the GLUE score takes it.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = {
    "accuracy": "accuracy",
    "f1": "F1",
    "macro_f1": "macro F1",
    "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson r",
    "spearmanr": "Spearman ρ",
}


def compute(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """One metric of predicted labels (classification) or values (regression) against the references."""
    from scipy import stats
    from sklearn import metrics as skm

    if metric == "accuracy":
        return float(skm.accuracy_score(labels, predictions))
    if metric == "f1":
        return float(skm.f1_score(labels, predictions))
    if metric == "macro_f1":
        return float(skm.f1_score(labels, predictions, average="macro"))
    if metric == "matthews_correlation":
        return float(skm.matthews_corrcoef(labels, predictions))
    if metric == "pearson":
        return _finite(stats.pearsonr(predictions, labels)[0]) if _varies(predictions) else 0.0
    if metric == "spearmanr":
        return _finite(stats.spearmanr(predictions, labels)[0]) if _varies(predictions) else 0.0
    raise ValueError(f"unknown metric {metric!r}")


def _varies(x: np.ndarray) -> bool:
    """A constant prediction has no correlation (scipy would warn and return NaN): scored 0."""
    return bool(np.ptp(x) > 0)


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else 0.0


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Regression: the single output; classification: the arg-max class."""
    return logits.reshape(-1) if regression else logits.argmax(axis=-1)


def split_suffix(split: str, n_splits: int) -> str:
    """``''`` for a task's only eval split; MNLI's ``validation_matched`` → ``'_matched'``."""
    if n_splits == 1:
        return ""
    return "_" + split.removeprefix("validation_").removeprefix("validation")


def task_score(values: dict[str, float]) -> float:
    """The task's one number: the mean of its metrics."""
    return float(np.mean(list(values.values())))
