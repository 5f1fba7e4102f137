"""Early stopping on runs that start by predicting one class: the package's rule vs the old one,
replayed on the evaluations that runs logged.

    python benchmarks/early_stopping_report.py runs/minilm_grid                  # a sweep folder (searched recursively)
    python benchmarks/early_stopping_report.py RUN_DIR [RUN_DIR ...] --patience 5

Both rules stop after `--patience` evaluations in a row without a strictly better selection value.
The OLD rule counts from the first evaluation; the package's rule (Progress.record_evaluation,
replayed here with the package's own code) counts only once an evaluation has predicted more than
one class. CoLA runs often predict one class (MCC 0) for their first hundreds of steps, then learn:
the old rule can stop them there and keep a one-class model. Each row gives, for both rules, where
they stop and the dev MCC of the model they keep (the best evaluation up to the stop), next to what
the whole logged run reached (selected = best evaluation, final = last). A rule that does not stop
keeps what the logged run kept. Only logged evaluations are replayed, so a rule can only be shown
stopping earlier than the run did; at the run's own patience the replay must match how the run
ended (a mismatch is printed as a warning).

Run it from the repository root (or with the package installed); stdlib + distributed_tune only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from distributed_tune import records
from distributed_tune.config import load_config
from distributed_tune.data import HELDOUT
from distributed_tune.train import Progress


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in paths:
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(m.parent for m in p.rglob("metrics.jsonl") if (m.parent / "config.yaml").is_file())
        else:
            sys.exit(f"{p}: neither a run folder (metrics.jsonl) nor a folder holding runs")
    return runs


def old_rule(values: list[float], patience: int) -> int | None:
    """Index of the evaluation where the old rule stops (None: never): patience from the first one."""
    best, since = -math.inf, 0
    for i, v in enumerate(values):
        best, since = (v, 0) if v > best else (best, since + 1)
        if patience and since >= patience:
            return i
    return None


def new_rule(values: list[float], collapsed: list[bool], patience: int) -> int | None:
    """Index of the evaluation where the package's rule stops (None: never)."""
    progress = Progress()
    for i, (v, c) in enumerate(zip(values, collapsed)):
        if progress.record_evaluation(v, c, patience)[1]:
            return i
    return None


def analyse(run_dir: Path, patience: int | None) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    metric, reported = cfg.task_spec.main_metric, cfg.task_spec.selection_split
    rows = records.read(run_dir / "metrics.jsonl")
    evals = [r for r in records.evaluations(rows) if r.get(metric) is not None]
    selection = HELDOUT if any(r["split"] == HELDOUT for r in evals) else reported
    chosen = {r["optimizer_step"]: r for r in evals if r["split"] == selection}  # the last record of a step wins
    dev = {r["optimizer_step"]: float(r[metric]) for r in evals if r["split"] == reported}
    steps = sorted(chosen)
    values = [float(chosen[s][metric]) for s in steps]
    collapsed = [bool(chosen[s].get("collapsed")) for s in steps]
    finished = next(iter(records.events(rows, records.FINISHED)), None)
    p = cfg.train.early_stopping_patience if patience is None else patience

    def kept(stop: int | None) -> tuple[int | None, float | None]:
        """(stop step, dev value of the best evaluation up to the stop); the whole run if no stop."""
        end = len(values) if stop is None else stop + 1
        best = max(range(end), key=lambda i: (values[i], -i))
        return (None if stop is None else steps[stop]), dev.get(steps[best])

    new_stop, old_stop = new_rule(values, collapsed, p), old_rule(values, p)
    warning = None
    if finished and p == cfg.train.early_stopping_patience:
        logged_early = finished.get("outcome") == "early_stop"
        if logged_early != (new_stop is not None) or (new_stop is not None and new_stop != len(values) - 1):
            warning = f"the replayed rule stops at {kept(new_stop)[0]}, the run ended {finished.get('outcome')}"
    one_class = next((i for i, c in enumerate(collapsed) if not c), len(collapsed))
    return {
        "run": str(run_dir), "patience": p, "status": "finished" if finished else "unfinished",
        "one_class": one_class, "one_class_steps": steps[:one_class],
        "old": kept(old_stop), "new": kept(new_stop),
        "selected": kept(None)[1], "final": dev.get(steps[-1]) if steps else None, "last_step": steps[-1],
        "warning": warning,
    }


def f4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def rule_cell(stop_and_dev: tuple[int | None, float | None]) -> str:
    stop, value = stop_and_dev
    return f"never stops: {f4(value)}" if stop is None else f"stops at {stop}: {f4(value)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding runs (searched recursively)")
    ap.add_argument("--patience", type=int, help="patience for both rules (default: each run's own)")
    ap.add_argument("--strip", default="", help="prefix removed from the run paths in the table")
    args = ap.parse_args(argv)
    rows = [analyse(run, args.patience) for run in find_runs(args.paths)]
    if not rows:
        sys.exit("no runs found")
    print("| run | one-class evaluations (steps) | patience | old rule: stop, kept dev MCC | this rule: stop, kept dev MCC "
          "| whole run: selected, final dev MCC |")
    print("| --- | --- | ---: | --- | --- | --- |")
    for r in rows:
        name = r["run"][len(args.strip):].lstrip("/") if args.strip and r["run"].startswith(args.strip) else r["run"]
        span = f"{r['one_class_steps'][0]}..{r['one_class_steps'][-1]}" if r["one_class_steps"] else "-"
        status = "" if r["status"] == "finished" else " (unfinished)"
        print(f"| {name}{status} | {r['one_class']} ({span}) | {r['patience']} | {rule_cell(r['old'])} | "
              f"{rule_cell(r['new'])} | {f4(r['selected'])}, {f4(r['final'])} @ {r['last_step']} |")
    done = [r for r in rows if r["status"] == "finished"]
    old_zero, new_zero = (sum(r[rule][1] == 0.0 for r in done) for rule in ("old", "new"))
    print(f"\n{len(done)} finished runs, {sum(r['one_class'] > 0 for r in done)} began predicting one class; the model "
          f"kept has dev MCC 0 (one class) in {old_zero} under the old rule, in {new_zero} under this rule.")
    for r in rows:
        if r["warning"]:
            print(f"WARNING {r['run']}: {r['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
