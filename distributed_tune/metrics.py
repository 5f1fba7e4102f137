"""Evaluation metrics (one function per task kind) and the run's metrics.jsonl.

    score(task, labels, preds)  ->  {"n": 1043, "mcc": 0.52, "accuracy": 0.83, "confusion_matrix": ..., ...}

Classification: Matthews correlation, accuracy, F1 (binary: of label 1; more classes: macro),
the confusion matrix and `collapsed` (a single class predicted: CoLA's classic failure, MCC 0).
Regression: Pearson and Spearman correlation and the mean squared error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distributed_tune.files import atomic_write_jsonl
from distributed_tune.tasks import Task

METRICS = ("mcc", "accuracy", "f1", "pearson", "spearman")


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int = 2) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, matthews_corrcoef

    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    n = len(labels)
    classes = list(range(num_labels))
    f1 = 0.0
    if n:
        if num_labels == 2:
            f1 = float(f1_score(labels, preds, pos_label=1, zero_division=0))
        else:
            f1 = float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0))
    return {
        "n": int(n),
        "mcc": float(matthews_corrcoef(labels, preds)) if n else 0.0,
        "accuracy": float((labels == preds).mean()) if n else 0.0,
        "f1": f1,
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
        "collapsed": bool(len(np.unique(preds)) < 2),
    }


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    from scipy.stats import pearsonr, spearmanr

    labels, preds = np.asarray(labels, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    constant = len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(preds) == 0
    return {
        "n": int(len(labels)),
        # Undefined for constant predictions (a collapsed regressor): reported as 0, flagged.
        "pearson": 0.0 if constant else float(pearsonr(labels, preds)[0]),
        "spearman": 0.0 if constant else float(spearmanr(labels, preds)[0]),
        "mse": float(np.mean((labels - preds) ** 2)) if len(labels) else 0.0,
        "collapsed": bool(len(preds) and np.ptp(preds) == 0),
    }


def score(task: Task, labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, Any]:
    """The task's metrics for one split (labels and predictions in the same order)."""
    if task.regression:
        return regression_metrics(labels, preds)
    return classification_metrics(labels, preds, num_labels)


def score_splits(task: Task, labels: np.ndarray, preds: np.ndarray, splits: list[str],
                 num_labels: int) -> dict[str, dict[str, Any]]:
    """`score` for each eval split (in order of first appearance), plus the task's combined split."""
    splits_arr = np.asarray(splits)
    out = {}
    for split in dict.fromkeys(splits):
        mask = splits_arr == split
        out[split] = score(task, labels[mask], preds[mask], num_labels)
    if task.combined_split:
        out[task.combined_split] = score(task, labels, preds, num_labels)
    return out


def main_value(task: Task, result: dict[str, dict[str, Any]]) -> float:
    """The number that selects the best model: the task's first metric on its selection split."""
    return float(result[task.selection_split][task.main_metric])


class MetricsLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, optimizer_step: int) -> None:
        """On resume: drop what a crashed attempt logged after the checkpoint it resumes from
        (those steps run again), and the attempt's own summary records."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read_metrics(self.path)
                if r.get("optimizer_step", 0) <= optimizer_step
                and r.get("event") not in ("train_summary", "finished", "stopped")]
        atomic_write_jsonl(self.path, keep)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record; a half-written last line (a process killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
