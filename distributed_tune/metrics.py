"""Evaluation metrics (one function per task kind).

    score(task, labels, preds, 2, logits)  ->  {"n": 1043, "mcc": 0.52, ..., "eval_loss": 0.47}

Classification: Matthews correlation, accuracy, F1 (binary: of label 1; more classes: macro),
the confusion matrix and `collapsed` (a single class predicted: CoLA's classic failure, MCC 0).
Regression: Pearson and Spearman correlation and the mean squared error. Both: `eval_loss`, the
training objective on the split (the HF Trainer's name; `loss` names training records).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distributed_tune.tasks import Task

# Plain numpy, not scikit-learn / scipy: the same formulas, without the ~2 s their imports add to
# every process that evaluates (a third of a small run's start-up on a 2-core machine).


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """[num_labels, num_labels] counts; rows are gold labels, columns predictions."""
    out = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(out, (labels, preds), 1)
    return out


def mcc(c: np.ndarray) -> float:
    """Matthews correlation from a confusion matrix; for more than two classes Gorodkin's R_K (as
    sklearn's matthews_corrcoef). 0 where undefined (one class predicted, or one gold class)."""
    c = c.astype(np.float64)
    t, p, correct, n = c.sum(axis=1), c.sum(axis=0), np.trace(c), c.sum()
    denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denominator) if denominator else 0.0


def f1_per_class(c: np.ndarray) -> np.ndarray:
    """F1 of each class, 2tp / (2tp + fp + fn); 0 for a class never gold nor predicted."""
    tp = np.diag(c).astype(np.float64)
    den = 2 * tp + (c.sum(axis=0) - tp) + (c.sum(axis=1) - tp)
    return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's rankdata 'average')."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # values ranked before each distinct value
    return (starts + (counts + 1) / 2.0)[inverse.reshape(-1)]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float(np.clip((x @ y) / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int = 2) -> dict[str, Any]:
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    n = len(labels)
    c = confusion(labels, preds, num_labels)
    f1 = 0.0
    if n:
        per_class = f1_per_class(c)
        f1 = float(per_class[1]) if num_labels == 2 else float(per_class.mean())  # binary: of label 1
    return {
        "n": int(n),
        "mcc": mcc(c) if n else 0.0,
        "accuracy": float((labels == preds).mean()) if n else 0.0,
        "f1": f1,
        "confusion_matrix": c.tolist(),
        "collapsed": bool(len(np.unique(preds)) < 2),
    }


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    labels, preds = np.asarray(labels, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    constant = len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(preds) == 0
    return {
        "n": int(len(labels)),
        # Undefined for constant predictions (a collapsed regressor): reported as 0, flagged.
        "pearson": 0.0 if constant else pearson(labels, preds),
        "spearman": 0.0 if constant else pearson(average_ranks(labels), average_ranks(preds)),
        "mse": float(np.mean((labels - preds) ** 2)) if len(labels) else 0.0,
        "collapsed": bool(len(preds) and np.ptp(preds) == 0),
    }


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of [n, classes] logits against class indices (the classification
    training loss), in float64 through log-sum-exp."""
    z = np.asarray(logits, dtype=np.float64)
    if not len(z):
        return 0.0
    z = z - z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), np.asarray(labels, dtype=np.int64)]
    return float(nll.mean())


def score(task: Task, labels: np.ndarray, preds: np.ndarray, num_labels: int, logits: np.ndarray) -> dict[str, Any]:
    """The task's metrics for one split (labels, predictions and logits in the same order), and
    `eval_loss`: mean cross-entropy of the logits, or for regression the mean squared error (the
    training loss of each)."""
    if task.regression:
        m = regression_metrics(labels, preds)
        return {**m, "eval_loss": m["mse"]}
    return {**classification_metrics(labels, preds, num_labels), "eval_loss": cross_entropy(logits, labels)}


def score_splits(task: Task, labels: np.ndarray, preds: np.ndarray, splits: list[str],
                 num_labels: int, logits: np.ndarray) -> dict[str, dict[str, Any]]:
    """`score` for each eval split (in order of first appearance), plus the task's combined split."""
    splits_arr = np.asarray(splits)
    out = {}
    for split in dict.fromkeys(splits):
        mask = splits_arr == split
        out[split] = score(task, labels[mask], preds[mask], num_labels, logits[mask])
    if task.combined_split:
        out[task.combined_split] = score(task, labels, preds, num_labels, logits)
    return out
