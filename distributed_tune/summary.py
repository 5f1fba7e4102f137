"""What a finished (or running) run achieved, read from its metrics.jsonl, and the statistics of
several runs (seeds of one setting). Pure: no torch.

    r = run_result(run_dir, task, label="seed 42")     # selected and final values, collapsed flags
    stats(r.selected for r in results)                # mean, sample std, median, min, max
    write_results(run_dir)                            # <run_dir>/results.json, when an attempt ends

Two numbers per run, both on the task's main metric of its selection split (CoLA: dev MCC):
  * selected: the best evaluation's value, the model kept in model/. Chosen on the data it is
    reported on, it is optimistic (part of its lead is selection luck);
  * final: the last evaluation's value, an honest estimate.
With data.heldout_fraction the best evaluation is chosen on a held-out slice of train; the
report value `selected_dev` is then the dev metric at that step, honest too.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_tune import records
from distributed_tune.data import HELDOUT
from distributed_tune.files import atomic_write_json
from distributed_tune.tasks import Task

RESULTS_JSON = "results.json"
BOOKKEEPING = ("split", "optimizer_step", "epoch", "world_size")  # in every evaluation record; not metrics


@dataclass(frozen=True)
class RunResult:
    label: str
    status: str  # done | incomplete | missing
    selection_split: str = ""
    best_value: float | None = None  # on the selection split (dev, or heldout)
    best_step: int | None = None
    best_collapsed: bool | None = None
    final_value: float | None = None  # the last evaluation, on the task's own selection split
    final_step: int | None = None
    final_collapsed: bool | None = None
    selected_dev: float | None = None  # the task's split at best_step (== best_value without heldout)
    splits_at_best: dict[str, float] | None = None  # every split's main metric at best_step
    evaluations: int = 0
    first_non_collapsed_step: int | None = None


def run_result(run_dir: Path, task: Task, label: str = "") -> RunResult:
    """The best and the last evaluation among a run's metrics records (the earliest step on ties)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return RunResult(label or run_dir.name, "missing")
    return result_from_records(records.read(path), task, label or run_dir.name)


def result_from_records(rows: list[dict[str, Any]], task: Task, label: str) -> RunResult:
    metric, split = task.main_metric, task.selection_split
    status = "done" if records.finished(rows) else "incomplete"
    evals = [r for r in records.evaluations(rows) if r.get(metric) is not None]
    heldout = any(r["split"] == HELDOUT for r in evals)
    selection = HELDOUT if heldout else split
    chosen = [r for r in evals if r["split"] == selection]
    reported = [r for r in evals if r["split"] == split]
    if not chosen:
        return RunResult(label, status, selection)
    best = max(chosen, key=lambda r: (r[metric], -r["optimizer_step"]))
    last = reported[-1] if reported else None
    at_best = {r["split"]: r[metric] for r in evals if r["optimizer_step"] == best["optimizer_step"]}
    first_ok = next((r["optimizer_step"] for r in chosen if not r.get("collapsed")), None)
    return RunResult(
        label, status, selection,
        best_value=float(best[metric]), best_step=int(best["optimizer_step"]),
        best_collapsed=bool(best.get("collapsed", False)),
        final_value=float(last[metric]) if last else None, final_step=int(last["optimizer_step"]) if last else None,
        final_collapsed=bool(last.get("collapsed", False)) if last else None,
        selected_dev=at_best.get(split), splits_at_best=at_best, evaluations=len(chosen),
        first_non_collapsed_step=first_ok,
    )


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), median, min and max of the values that exist."""
    xs = [v for v in values if v is not None]
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "median": statistics.median(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
    }


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """Statistics of the selected and the final values over finished runs, and how many collapsed.
    An unfinished run (still training, or killed) is listed as unscored: its last evaluation is not
    a final value, and counting it would let a half-trained run decide the winner."""
    scored = [r for r in results if r.status == "done" and r.best_value is not None]
    return {
        "runs": len(results),
        "scored": len(scored),
        "selected": stats(r.best_value for r in scored),
        "final": stats(r.final_value for r in scored),
        "selected_dev": stats(r.selected_dev for r in scored),
        "collapsed_selected": sum(bool(r.best_collapsed) for r in scored),
        "collapsed_final": sum(bool(r.final_collapsed) for r in scored),
        "unscored": [r.label for r in results if r not in scored],
    }


def honest(summary: dict[str, Any], heldout: bool) -> dict[str, Any]:
    """The statistics to compare settings by: the dev value at the held-out selection, else the
    final value (never the dev-selected one)."""
    return summary["selected_dev"] if heldout else summary["final"]


def pick_winner(settings: dict[str, dict[str, Any]], heldout: bool) -> tuple[str | None, str | None]:
    """(the winning setting, None), by the highest median of the honest value; or (None, why there
    is none). A setting whose every scored run collapsed (a single class predicted at the honest
    value's evaluation) is no candidate: its MCC 0 is the absence of a model, not a score. A tie at
    the top names no winner either. (None, None): no finished run yet."""
    collapsed = "collapsed_selected" if heldout else "collapsed_final"
    scored = {n: s for n, s in settings.items() if honest(s, heldout)["median"] is not None}
    if not scored:
        return None, None
    candidates = {n: s for n, s in scored.items() if s[collapsed] < s["scored"]}
    if not candidates:
        return None, (f"every finished run of {'every setting' if len(scored) > 1 else 'the sweep'} collapsed "
                      "(predicted a single class): their value is no signal of which setting is better; "
                      "try another train.lr, more steps or more seeds")
    best = max(honest(s, heldout)["median"] for s in candidates.values())
    top = [n or "(config)" for n, s in candidates.items() if honest(s, heldout)["median"] == best]
    if len(top) > 1:
        return None, f"{' and '.join(top)} tie at median {best:.4f}"
    return next(n for n, s in candidates.items() if honest(s, heldout)["median"] == best), None


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def describe(s: dict[str, Any]) -> str:
    """'0.3120 ± 0.0210 (median 0.3040, 0.2690..0.3290)'."""
    if not s["n"]:
        return "-"
    std = "n/a" if s["std"] is None else fmt(s["std"])
    return f"{fmt(s['mean'])} ± {std} (median {fmt(s['median'])}, {fmt(s['min'])}..{fmt(s['max'])})"


# --------------------------------------------------------------------------- one run's results file


def evaluation_at(rows: list[dict[str, Any]], step: int) -> dict[str, dict[str, Any]]:
    """split -> its metrics (n, the task's metrics, eval_loss, confusion, collapsed) at optimizer step `step`."""
    return {split: {k: v for k, v in r.items() if k not in BOOKKEEPING}
            for split, r in records.at_step(rows, step).items()}


def exported_evaluation(run_dir: Path, step: int, selection_split: str) -> dict[str, Any]:
    """What training_info.json says of the weights of step `step`: their evaluation (logged just
    before the export), and whether they predict a single class on the selection split: `predict`
    and the model card warn from it, also where the run directory is not at hand."""
    evaluation = evaluation_at(records.read(run_dir / "metrics.jsonl"), step)
    return {"collapsed": bool(evaluation.get(selection_split, {}).get("collapsed", False)), "evaluation": evaluation}


def run_results(run_dir: Path) -> dict[str, Any]:
    """How the run's last attempt ended, what model/ holds (its step and every split's metrics) and
    the last evaluation, from the run's own files: what results.json holds."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = records.read(run_dir / "metrics.jsonl")
    end = records.last_end(rows) or {}
    info_path = run_dir / "model" / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    evaluated = [r["optimizer_step"] for r in records.evaluations(rows)]
    summary = next(reversed(records.events(rows, records.TRAIN_SUMMARY)), None)
    model = None
    if info is not None:
        evaluation = evaluation_at(rows, info["optimizer_step"])
        model = {"path": str(run_dir / "model"), "optimizer_step": info["optimizer_step"],
                 "selected": info["selected"], "collapsed": bool(evaluation.get(info["metric"].split("/")[0], {})
                                                                 .get("collapsed", False)),
                 "eval": evaluation}
    out: dict[str, Any] = {
        "status": "finished" if end.get("event") == "finished" else "stopped",
        "outcome": end.get("outcome", "stopped"),
        "task": config["task"],
        "optimizer_step": end.get("optimizer_step"),
        "epoch": round(end["optimizer_step"] / config["derived"]["steps_per_epoch"], 4) if end else None,
        "selection": info["metric"] if info else end.get("selection"),
        "model": model,
        "last_evaluation": {"optimizer_step": evaluated[-1], "eval": evaluation_at(rows, evaluated[-1])}
        if evaluated else None,
        "train": {k: v for k, v in summary.items() if k != "event"} if summary else None,
    }
    if out["status"] == "stopped":
        out["resume"] = f"python -m distributed_tune --config {run_dir / 'config.yaml'} --resume"
    return out


def write_results(run_dir: Path) -> dict[str, Any]:
    """<run_dir>/results.json (atomically), when an attempt ends: finished, stopped early, or stopped
    for a signal with a checkpoint. A new attempt removes it (train.py), so it always describes the
    last attempt that ended."""
    results = run_results(run_dir)
    atomic_write_json(run_dir / RESULTS_JSON, results)
    return results
