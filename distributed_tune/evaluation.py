"""Batched prediction over a tokenized set, on one process or many, each example exactly once.

Used by the training loop's evaluation, by `evaluate` and by `predict`:

    preds, probs = predict_distributed(accelerator, model, data, batch_size=128, pad_to_multiple_of=1)

Every process runs the same number of batches (ZeRO-3's forward is a collective), takes its
length-sorted round-robin shard (`data.eval_shard`), and the predictions are gathered with their
example indices; `gather_exactly_once` then checks that each example came back exactly once
(the duplicated/missing-sample trap of `gather_for_metrics`, accelerate #350 and others).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune.data import LABELS, Example, Tokenized, collate, eval_shard
from distributed_tune.metrics import classification_metrics

EVAL_BATCH = 128  # the training loop's and `evaluate`'s batch: same batches, same floating-point sums
Prediction = tuple[int, int, float]  # (example index, predicted label, probability of label 1)


@torch.no_grad()
def predict_indices(model: torch.nn.Module, data: Tokenized, index: np.ndarray, device: Any,
                    batch_size: int, pad_to_multiple_of: int) -> list[Prediction]:
    """Predict the examples `index` (-1 = padding slot: run, then dropped) in batches."""
    out: list[Prediction] = []
    for start in range(0, len(index), batch_size):
        part = index[start : start + batch_size]
        batch = collate(data, part, pad_to_multiple_of)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        probs = torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()
        out += [(int(i), int(p > 0.5), float(p)) for i, p in zip(part, probs) if i >= 0]
    return out


def gather_exactly_once(local: list[Prediction], n: int,
                        gather: Callable[[list[Prediction]], list[Prediction]] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """All processes' predictions in example order; fails if one is missing or counted twice."""
    gathered = list(gather(local) if gather is not None else local)
    indices = sorted(i for i, _, _ in gathered)
    if indices != list(range(n)):
        raise AssertionError(
            f"gathered {len(indices)} predictions for {n} examples ({len(set(indices))} distinct): "
            "an example was lost or counted twice"
        )
    gathered.sort()
    preds = np.array([p for _, p, _ in gathered], dtype=np.int64)
    probs = np.array([q for _, _, q in gathered], dtype=np.float64)
    return preds, probs


def predict_distributed(accelerator: Any, model: torch.nn.Module, data: Tokenized, batch_size: int,
                        pad_to_multiple_of: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, P(label 1)) for every example of `data`, on every process.

    Collective: all processes must call it. The model is put in eval mode and restored after.
    """
    shard = eval_shard(data.lengths, accelerator.process_index, accelerator.num_processes)
    was_training = model.training
    model.eval()
    try:
        local = predict_indices(model, data, shard, accelerator.device, batch_size, pad_to_multiple_of)
    finally:
        model.train(was_training)
    if accelerator.num_processes == 1:
        return gather_exactly_once(local, len(data))
    from accelerate.utils import gather_object

    return gather_exactly_once(local, len(data), gather_object)


def metrics_by_split(labels: np.ndarray, preds: np.ndarray, splits: Sequence[str],
                     combined: str | None) -> dict[str, dict[str, Any]]:
    """`classification_metrics` for each split (in order of first appearance), plus `combined`
    (all examples) when given."""
    splits_arr = np.asarray(splits)
    out = {}
    for split in dict.fromkeys(splits):
        mask = splits_arr == split
        out[split] = classification_metrics(labels[mask], preds[mask])
    if combined is not None:
        out[combined] = classification_metrics(labels, preds)
    return out


def metrics_by_source(labels: np.ndarray, preds: np.ndarray, sources: Sequence[str]) -> dict[str, dict[str, Any]]:
    """n, accuracy and MCC per source publication (CoLA column 1), sorted by source.

    MCC is None where it is undefined: a source whose gold labels or predictions are all one class.
    """
    from sklearn.metrics import matthews_corrcoef

    sources_arr = np.asarray(sources)
    out: dict[str, dict[str, Any]] = {}
    for source in sorted(set(sources)):
        mask = sources_arr == source
        y, p = labels[mask], preds[mask]
        defined = len(np.unique(y)) == 2 and len(np.unique(p)) == 2
        out[source] = {
            "n": int(mask.sum()),
            "accuracy": float((y == p).mean()),
            "mcc": float(matthews_corrcoef(y, p)) if defined else None,
        }
    return out


def prediction_row(pred: int, prob_acceptable: float, **fields: Any) -> dict[str, Any]:
    """One line of a predictions.jsonl (run, evaluate and predict write the same fields)."""
    return {**fields, "pred": int(pred), "pred_label": LABELS[int(pred)],
            "prob_acceptable": round(float(prob_acceptable), 6)}


def example_row(index: int, e: Example, pred: int, prob_acceptable: float) -> dict[str, Any]:
    return prediction_row(pred, prob_acceptable, index=index, split=e.split, source=e.source,
                          sentence=e.sentence, label=e.label)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines atomically: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
