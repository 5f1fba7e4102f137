"""metrics.jsonl: the one file every command shares, its record kinds, the one writer and the one reader.

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)    # rank 0 writes
    log.train(optimizer_step=10, loss=0.61, ...)                    # a logging window
    log.evaluation(split="dev", n=1043, mcc=0.52, ...)              # one split of one evaluation
    log.event(FINISHED, outcome="done", ...)                        # what happened to the run
    rows = read(run_dir / "metrics.jsonl")
    evaluations(rows), train_steps(rows), events(rows, FINISHED)

One JSON object per line, appended. A record's kind is its `event` field, else `eval` (it has a
`split`), else `train`. Every field a record may carry is declared in SCHEMA, which the writer
enforces and README's table of the file is generated from (`markdown_table`). Pure: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distributed_tune.files import atomic_write_jsonl

TRAIN, EVAL = "train", "eval"
FIRST_STEP, EPOCH_DATA, TRAIN_SUMMARY, STOPPED, EXTENDED, CONVERTED, FINISHED = (
    "first_step", "epoch_data", "train_summary", "stopped", "extended", "converted", "finished")

# kind -> (what it is, {field: meaning}). `optimizer_step` is on every record: a resume cuts the file
# back to the checkpoint's step with it.
SCHEMA: dict[str, tuple[str, dict[str, str]]] = {
    TRAIN: ("one logging window of training (every train.log_every optimizer steps)", {
        "optimizer_step": "optimizer steps done", "epoch": "epochs done (fractional)",
        "loss": "mean training loss over the window's micro-batches", "lr": "learning rate of the step",
        "grad_norm": "global gradient norm before clipping (null without clipping)",
        "samples_per_s": "training throughput, evaluation excluded", "tokens_per_s": "real (non-padding) tokens/s",
        "padding_fraction": "share of padding in the window's batches",
        "skipped_steps": "fp16 overflow steps so far (no update)", "mfu": "model FLOP utilisation (CUDA only)"}),
    EVAL: ("one split of one evaluation (every train.eval_every steps, each epoch end, the end)", {
        "split": "the split (CoLA: in_domain_dev, out_of_domain_dev, dev; heldout)", "n": "examples scored",
        "mcc": "Matthews correlation (classes)", "accuracy": "accuracy (classes)",
        "f1": "F1 (classes; two: of label 1, more: macro)", "pearson": "Pearson r (regression)",
        "spearman": "Spearman rho (regression)", "mse": "mean squared error (regression)",
        "eval_loss": "mean cross-entropy over the split, from the gathered logits (regression: the MSE); the HF "
                     "Trainer's name", "confusion_matrix": "counts, rows gold, columns predicted",
        "collapsed": "a single class (or constant) predicted",
        "optimizer_step": "when", "epoch": "epochs done (fractional)", "world_size": "processes that predicted"}),
    FIRST_STEP: ("the first optimizer step finished", {
        "optimizer_step": "1", "startup_s": "seconds from process start", "world_size": "processes"}),
    EPOCH_DATA: ("the end-of-epoch audit: every example trained at most once, by one rank", {
        "epoch": "the epoch", "optimizer_step": "when", "examples": "examples trained in the epoch",
        "distinct": "distinct examples among them", "per_rank": "examples per rank",
        "from_step": "first step of the epoch in this attempt (> 0 after a mid-epoch resume)",
        "world_size": "processes"}),
    TRAIN_SUMMARY: ("throughput over the attempt, evaluation excluded", {
        "optimizer_step": "when", "optimizer_steps": "steps in this attempt", "samples": "samples trained",
        "train_seconds": "training time", "eval_seconds": "evaluation time",
        "warmup_seconds": "compile / CUDA-graph warm-up before the clock", "samples_per_s": "samples/s",
        "tokens_per_s": "real tokens/s", "padding_fraction": "share of padding", "world_size": "processes",
        "skipped_steps": "fp16 overflow steps", "peak_memory_gib": "peak CUDA memory of rank 0",
        "mfu": "model FLOP utilisation (CUDA only)"}),
    STOPPED: ("stopped for a signal with a checkpoint (resume with --resume)", {
        "signal": "USR1, TERM or INT", "optimizer_step": "the checkpoint's step"}),
    EXTENDED: ("a resume made the run longer (train.max_steps / train.epochs raised)", {
        "optimizer_step": "the step it continued from", "from_steps": "the run's length before",
        "to_steps": "its length now"}),
    CONVERTED: ("a resume on another number of processes: the checkpoint's layout converted on load", {
        "optimizer_step": "the step it continued from", "from_world_size": "processes that saved the checkpoint",
        "to_world_size": "processes now", "zero_stage": "the ZeRO stage (null: DDP, nothing sharded)",
        "seconds": "time the conversion took"}),
    FINISHED: ("the last line of a complete run", {
        "outcome": "done or early_stop", "optimizer_step": "steps trained",
        "selection": "split/metric that selected model/", "best_value": "its best value",
        "best_step": "the step of model/ (with train.select_best)"}),
}


def kind(record: dict[str, Any]) -> str:
    if "event" in record:
        return record["event"]
    return EVAL if "split" in record else TRAIN


class MetricsLog:
    """Appends one record per line; only the main process writes. Every field is checked against
    SCHEMA: a record the schema does not describe is a bug, not a new format."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def _write(self, kind_: str, record: dict[str, Any]) -> None:
        undeclared = set(record) - set(SCHEMA[kind_][1]) - {"event"}
        assert not undeclared, f"metrics.jsonl {kind_} record with undeclared fields {sorted(undeclared)}"
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, **fields: Any) -> None:
        self._write(TRAIN, fields)

    def evaluation(self, **fields: Any) -> None:
        self._write(EVAL, fields)

    def event(self, name: str, **fields: Any) -> None:
        self._write(name, {"event": name, **fields})

    def truncate_after(self, optimizer_step: int) -> None:
        """On resume: drop what a crashed attempt logged after the checkpoint it resumes from
        (those steps run again), and the attempt's own summary records."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read(self.path) if r.get("optimizer_step", 0) <= optimizer_step
                and kind(r) not in (TRAIN_SUMMARY, FINISHED, STOPPED)]
        atomic_write_jsonl(self.path, keep)


def read(path: Path) -> list[dict[str, Any]]:
    """Every record; a half-written last line (a process killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def evaluations(rows: Iterable[dict[str, Any]], split: str | None = None) -> list[dict[str, Any]]:
    """Evaluation records (of one split), in file order."""
    return [r for r in rows if kind(r) == EVAL and (split is None or r["split"] == split)]


def train_steps(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training-window records, in file order."""
    return [r for r in rows if kind(r) == TRAIN]


def events(rows: Iterable[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if kind(r) == name]


def finished(rows: Iterable[dict[str, Any]]) -> bool:
    """The run completed (its last record is `finished`; a stopped or killed run has none)."""
    return bool(events(rows, FINISHED))


def last_end(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """How the last attempt ended: its `finished` or `stopped` record (None: still running, or killed)."""
    ends = [r for r in rows if kind(r) in (FINISHED, STOPPED)]
    return ends[-1] if ends else None


def at_step(rows: Iterable[dict[str, Any]], step: int) -> dict[str, dict[str, Any]]:
    """split -> the evaluation record at optimizer step `step` (the last one of a split wins)."""
    return {r["split"]: r for r in evaluations(rows) if r.get("optimizer_step") == step}


def markdown_table() -> str:
    """README's table of metrics.jsonl, from SCHEMA: each record kind, its fields and their meaning."""
    lines = ["| record | field | meaning |", "| --- | --- | --- |"]
    for name, (what, fields) in SCHEMA.items():
        how = {EVAL: "has `split`", TRAIN: "no `event`, no `split`"}.get(name, f"`event: {name}`")
        for i, (f, meaning) in enumerate(fields.items()):
            lines.append(f"| {f'**{name}** ({how}): {what}' if i == 0 else ''} | `{f}` | {meaning} |")
    return "\n".join(lines)
