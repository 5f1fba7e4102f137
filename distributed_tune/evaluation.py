"""Batched prediction over a tokenized set, on one process or many, each example exactly once.

Used by the training loop's evaluation and by the `evaluate` and `predict` commands:

    predicted = predict_distributed(accelerator, model, data, batch_size=128, pad_to_multiple_of=1)
    preds = predictions(task, predicted.outputs)   # class indices, or scores for regression
    # predicted.logits: the raw logits, what the evaluation loss is computed from (metrics.score)

Every process runs the same number of batches (ZeRO-3's forward is a collective), takes its
length-sorted round-robin shard (`data.eval_shard`), and the outputs are gathered with their
example indices; `gather_exactly_once` then checks that each example came back exactly once
(the duplicated/missing-sample trap of `gather_for_metrics`, accelerate #350 and others).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune.data import Tokenized, collate, eval_shard
from distributed_tune.files import atomic_write_jsonl
from distributed_tune.metrics import confusion, mcc
from distributed_tune.tasks import Example, Task

EVAL_BATCH = 128  # the training loop's and `evaluate`'s batch: same batches, same floating-point sums
# (example index, the model's outputs: class probabilities or the score, its logits)
Output = tuple[int, list[float], list[float]]


@dataclass(frozen=True)
class Predicted:
    """One prediction pass over a set, in example order."""

    outputs: np.ndarray  # [n, classes] probabilities (softmax on the device), or [n, 1] scores
    # [n, classes] the float32 logits themselves: the loss is computed from these, not from the
    # probabilities (a probability that rounds to 0 has no logarithm).
    logits: np.ndarray


@torch.no_grad()
def predict_indices(model: torch.nn.Module, data: Tokenized, index: np.ndarray, device: Any,
                    batch_size: int, pad_to_multiple_of: int, regression: bool) -> list[Output]:
    """Predict the examples `index` (-1 = padding slot: run, then dropped) in batches."""
    out: list[Output] = []
    for start in range(0, len(index), batch_size):
        part = index[start : start + batch_size]
        batch = collate(data, part, pad_to_multiple_of)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits.float()
        values = logits if regression else torch.softmax(logits, dim=-1)
        out += [(int(i), v, z) for i, v, z in zip(part, values.cpu().tolist(), logits.cpu().tolist()) if i >= 0]
    return out


def gather_exactly_once(local: list[Output], n: int, gather: Callable[[list[Output]], list[Output]] | None = None
                        ) -> Predicted:
    """All processes' outputs and logits in example order; fails if an example is missing or
    counted twice."""
    gathered = list(gather(local) if gather is not None else local)
    indices = sorted(item[0] for item in gathered)
    if indices != list(range(n)):
        raise AssertionError(
            f"gathered {len(indices)} predictions for {n} examples ({len(set(indices))} distinct): "
            "an example was lost or counted twice"
        )
    gathered.sort(key=lambda item: item[0])
    return Predicted(np.array([v for _, v, _ in gathered], dtype=np.float64).reshape(n, -1),
                     np.array([z for _, _, z in gathered], dtype=np.float64).reshape(n, -1))


def predict_distributed(accelerator: Any, model: torch.nn.Module, data: Tokenized, batch_size: int,
                        pad_to_multiple_of: int, regression: bool) -> Predicted:
    """The model's outputs ([n, classes] probabilities, or [n, 1] scores) and logits for every
    example of `data`, on every process. Collective: all processes must call it. The model is put
    in eval mode and restored after."""
    shard = eval_shard(data.lengths, accelerator.process_index, accelerator.num_processes)
    was_training = model.training
    model.eval()
    try:
        local = predict_indices(model, data, shard, accelerator.device, batch_size, pad_to_multiple_of, regression)
    finally:
        model.train(was_training)
    if accelerator.num_processes == 1:
        return gather_exactly_once(local, len(data))
    from accelerate.utils import gather_object

    return gather_exactly_once(local, len(data), gather_object)


def predictions(task: Task, outputs: np.ndarray) -> np.ndarray:
    """Class indices (argmax) or regression scores from `predict_distributed`'s outputs."""
    return outputs[:, 0] if task.regression else outputs.argmax(axis=1)


def prediction_row(task: Task, label_names: tuple[str, ...], output: np.ndarray, **fields: Any) -> dict[str, Any]:
    """One line of a predictions.jsonl (training, evaluate and predict write the same fields)."""
    if task.regression:
        return {**fields, "pred": round(float(output[0]), 6)}
    pred = int(np.argmax(output))
    return {**fields, "pred": pred, "pred_label": label_names[pred], "prob": round(float(output[pred]), 6),
            "probs": [round(float(p), 6) for p in output]}


def example_fields(index: int, e: Example, task: Task) -> dict[str, Any]:
    """The example's own fields: position, split, source (CoLA), its text and gold label."""
    fields: dict[str, Any] = {"index": index, "split": e.split}
    if e.source:
        fields["source"] = e.source
    if len(e.text) == 1:
        fields["sentence"] = e.text[0]
    else:
        fields["text"] = list(e.text)
    if e.label is not None:
        fields["label"] = e.label
    return fields


def example_rows(task: Task, label_names: tuple[str, ...], examples: list[Example], outputs: np.ndarray):
    for i, (e, out) in enumerate(zip(examples, outputs)):
        yield prediction_row(task, label_names, out, **example_fields(i, e, task))


def write_predictions(path: Path, task: Task, label_names: tuple[str, ...], examples: list[Example],
                      outputs: np.ndarray) -> None:
    """predictions.jsonl: one row per evaluation example (its fields and the model's prediction), atomically."""
    atomic_write_jsonl(path, example_rows(task, label_names, examples, outputs))


def metrics_by_source(labels: np.ndarray, preds: np.ndarray, sources: list[str]) -> dict[str, dict[str, Any]]:
    """n, accuracy and MCC per source publication (CoLA column 1), sorted by source.

    MCC is None where it is undefined: a source whose gold labels or predictions are all one class.
    """
    sources_arr = np.asarray(sources)
    out: dict[str, dict[str, Any]] = {}
    for source in sorted(set(sources)):
        mask = sources_arr == source
        y, p = labels[mask], preds[mask]
        defined = len(np.unique(y)) == 2 and len(np.unique(p)) == 2
        out[source] = {
            "n": int(mask.sum()),
            "accuracy": float((y == p).mean()),
            "mcc": mcc(confusion(y, p, 2)) if defined else None,
        }
    return out


class SingleProcess:
    """What `predict_distributed` needs of an Accelerator, for a world of one: no process group,
    no accelerate global state (a plain `python -m distributed_tune evaluate` / `predict`)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def main_process_first(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass
