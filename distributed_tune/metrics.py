"""Classification metrics and the run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def classification_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    """MCC (scikit-learn), accuracy and the confusion matrix [[tn, fp], [fn, tp]]."""
    from sklearn.metrics import confusion_matrix, matthews_corrcoef

    labels, preds = np.asarray(labels), np.asarray(preds)
    cm = confusion_matrix(labels, preds, labels=[0, 1])
    return {
        "n": int(len(labels)),
        "mcc": float(matthews_corrcoef(labels, preds)) if len(labels) else 0.0,
        "accuracy": float((labels == preds).mean()) if len(labels) else 0.0,
        "confusion_matrix": cm.tolist(),
        # A run that predicts a single class has MCC 0: CoLA's classic failure, said out loud.
        "collapsed": bool(len(np.unique(preds)) < 2),
    }


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
                if r.get("optimizer_step", 0) <= optimizer_step and r.get("event") not in ("train_summary", "finished")]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record; a half-written last line (a process killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
