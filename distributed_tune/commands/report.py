"""A markdown report with PNG plots for one run or a sweep.

    python -m distributed_tune report runs/cola_bert_base            # one run  -> runs/cola_bert_base/report/
    python -m distributed_tune report runs/cola_sweep --out /tmp/r   # a sweep (its seed/setting runs)

Writes report.md and three plots: training.png (loss and learning rate per optimizer step),
evaluation.png (the task's main metric on its evaluation splits over optimizer steps; one line per
run for a sweep) and confusion.png (the confusion matrix of the last evaluation, counts annotated;
one panel per run; classification tasks). The report also holds the evaluation table (or the
sweep summary: selected and final values), throughput (samples/s, tokens/s, padding fraction from
metrics.jsonl) and the run's config.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_tune import records
from distributed_tune import sweeps as sweeps
from distributed_tune.config import load_config
from distributed_tune.errors import ConfigError, RunDirError
from distributed_tune.files import atomic_open, atomic_write_text, make_dirs
from distributed_tune.tasks import Task

DPI = 100
# Figure sizes in inches at DPI: the PNGs have exactly these pixel sizes (no tight bbox).
TRAINING_SIZE = (10.0, 7.0)
EVAL_SIZE = (10.0, 5.5)
CONFUSION_PANEL = (4.5, 4.2)
CONFUSION_COLUMNS = 4
IMAGES = ("training.png", "evaluation.png", "confusion.png")


@dataclass
class Run:
    label: str  # "run" or "seed 42" / "train.lr=5e-5 seed 42"
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # its metrics.jsonl

    @property
    def train(self) -> list[dict[str, Any]]:
        return records.train_steps(self.rows)

    @property
    def evals(self) -> list[dict[str, Any]]:
        return records.evaluations(self.rows)

    def series(self, split: str, metric: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.evals if r["split"] == split and metric in r]
        return [r["optimizer_step"] for r in rows], [r[metric] for r in rows]


def find_runs(target: Path) -> tuple[str, list[Run], Task, Path | None]:
    """('run' or 'sweep', runs, task, a config.yaml to show)."""
    if not target.is_dir():
        raise RunDirError(f"{target}: no such directory; pass a run directory or a sweep directory")
    if (target / "metrics.jsonl").is_file():
        config = target / "config.yaml"
        task = load_config(config).task_spec if config.is_file() else load_config().task_spec
        return "run", [Run("run", target, records.read(target / "metrics.jsonl"))], task, config
    if (target / sweeps.SWEEP_JSON).is_file():
        sweep, cfg = sweeps.read_sweep(target)
        runs = []
        for setting, seed, run_dir in sweep.runs(target):
            if (run_dir / "metrics.jsonl").is_file():
                label = f"{setting.name} seed {seed}" if setting.overrides else f"seed {seed}"
                runs.append(Run(label, run_dir, records.read(run_dir / "metrics.jsonl")))
        if not runs:
            raise RunDirError(f"{target}: no run has metrics yet; run the sweep first")
        return "sweep", runs, cfg.task_spec, runs[0].path / "config.yaml"
    raise RunDirError(f"{target}: neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json); "
                      "pass the output_dir of a run or a sweep")


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_training(runs: list[Run], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=TRAINING_SIZE, dpi=DPI, sharex=True)
    for run in runs:
        steps = [r["optimizer_step"] for r in run.train]
        ax_loss.plot(steps, [r["loss"] for r in run.train], marker="." if len(steps) < 50 else None, label=run.label)
        ax_lr.plot(steps, [r["lr"] for r in run.train], label=run.label)
    ax_loss.set_title("Training loss (mean over each logging window)")
    ax_loss.set_ylabel("loss")
    ax_lr.set_title("Learning rate (value used at each optimizer step)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax_loss.legend(loc="upper right", fontsize="small", ncol=min(len(runs), 4))
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # a full disk leaves no half-written picture
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)


def plot_evaluation(kind: str, runs: list[Run], task: Task, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    metric = task.main_metric
    fig, ax = plt.subplots(figsize=EVAL_SIZE, dpi=DPI)
    if kind == "run":
        styles = ["-o", "--s", ":^", "-.v"]
        splits = list(dict.fromkeys(r["split"] for r in runs[0].evals))
        for split, style in zip(splits, styles * 3):
            steps, values = runs[0].series(split, metric)
            ax.plot(steps, values, style, label=split)
        info = runs[0].path / "model" / "training_info.json"
        step = json.loads(info.read_text()).get("optimizer_step") if info.is_file() else None
        if step is not None:
            ax.axvline(step, color="black", linewidth=1, linestyle="--", label=f"exported model/ (step {step})")
        ax.set_title(f"{metric} over training")
    else:
        for run in runs:
            steps, values = run.series(task.selection_split, metric)
            (line,) = ax.plot(steps, values, "-o", markersize=4, label=run.label)
            if values:
                best = max(range(len(values)), key=lambda i: (values[i], -steps[i]))
                ax.plot([steps[best]], [values[best]], "*", markersize=14, color=line.get_color())
        ax.set_title(f"{task.selection_split} {metric} per run; star = each run's best ({len(runs)} runs)")
    if metric in ("mcc", "pearson", "spearman"):
        ax.axhline(0.0, color="grey", linewidth=1, linestyle=":", label=f"{metric} 0 (chance / one class)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncol=2 if len(runs) > 5 else 1)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # a full disk leaves no half-written picture
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)


def confusion_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of the confusion-matrix figure for n panels."""
    cols = min(n, CONFUSION_COLUMNS)
    return math.ceil(n / cols), cols


def plot_confusion(runs: list[Run], task: Task, label_names: list[str], path: Path) -> None:
    plt = _pyplot()
    split = task.selection_split
    panels = [(run, [r for r in run.evals if r["split"] == split and "confusion_matrix" in r][-1])
              for run in runs if any(r["split"] == split and "confusion_matrix" in r for r in run.evals)]
    rows, cols = confusion_grid(max(1, len(panels)))
    fig, axes = plt.subplots(rows, cols, figsize=(CONFUSION_PANEL[0] * cols, CONFUSION_PANEL[1] * rows), dpi=DPI,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no classification evaluation", ha="center", va="center")
    for ax, (run, ev) in zip(axes.flat, panels):
        cm = ev["confusion_matrix"]
        k = len(cm)
        names = label_names if len(label_names) == k else [str(i) for i in range(k)]
        total = sum(sum(row) for row in cm) or 1
        peak = max(max(row) for row in cm) or 1
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=peak)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cm[i][j]}\n({100 * cm[i][j] / total:.1f}%)", ha="center", va="center",
                        fontsize=12 if k <= 3 else 8, color="white" if cm[i][j] > 0.6 * peak else "black")
        ax.set_xticks(range(k), names)
        ax.set_yticks(range(k), names, rotation=90, va="center")
        ax.set_xlabel("predicted label")
        ax.set_ylabel("gold label")
        flag = ", COLLAPSED" if ev.get("collapsed") else ""
        prefix = "" if run.label == "run" else f"{run.label}: "
        ax.set_title(f"{prefix}{split}, step {ev['optimizer_step']}\n{task.main_metric} {ev[task.main_metric]:.3f}, "
                     f"n={total}{flag}", fontsize=10, color="tab:red" if ev.get("collapsed") else "black")
    sep = "\n" if cols == 1 else " "  # one narrow panel: two lines, or the title is cut off
    fig.suptitle(f"Confusion matrix of the last evaluation{sep}(counts, % of n)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # a full disk leaves no half-written picture
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def throughput(run: Run) -> dict[str, Any]:
    """Medians over the logging windows (the first window includes start-up effects), and the
    whole-run figures of the loop's `train_summary` record when there is one."""
    def med(key: str) -> float | None:
        values = [r[key] for r in run.train if r.get(key) is not None]
        return statistics.median(values) if values else None

    whole = next(reversed(records.events(run.rows, records.TRAIN_SUMMARY)), {})
    return {"windows": len(run.train), "samples_per_s": med("samples_per_s"), "tokens_per_s": med("tokens_per_s"),
            "padding_fraction": med("padding_fraction"), "run_samples_per_s": whole.get("samples_per_s"),
            "run_train_seconds": whole.get("train_seconds")}


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def eval_table(run: Run, task: Task) -> list[str]:
    metric = task.main_metric
    last_step = run.evals[-1]["optimizer_step"]
    chosen = [r for r in run.evals if r["split"] == task.selection_split and metric in r]
    best = max(chosen, key=lambda r: (r[metric], -r["optimizer_step"])) if chosen else None
    cols = list(task.metrics) + (["accuracy"] if "accuracy" not in task.metrics and not task.regression else [])
    extra = "confusion | collapsed" if not task.regression else "mse | collapsed"
    lines = [f"| evaluation | split | n | {' | '.join(cols)} | {extra} |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " | --- | :---: |"]
    steps = [("last", last_step)]
    if best and best["optimizer_step"] != last_step:
        steps.append(("best", best["optimizer_step"]))
    elif best:
        steps = [("last = best", last_step)]
    for name, step in steps:
        for r in (r for r in run.evals if r["optimizer_step"] == step):
            values = " | ".join(_f(r.get(c), ".4f") for c in cols)
            tail = r.get("confusion_matrix", "-") if not task.regression else _f(r.get("mse"), ".4f")
            lines.append(f"| {name} (step {step}) | {r['split']} | {r.get('n', '-')} | {values} | {tail} | "
                         f"{'**yes**' if r.get('collapsed') else 'no'} |")
    return lines


def render_markdown(kind: str, target: Path, runs: list[Run], task: Task, config: Path | None,
                    images: dict[str, str]) -> str:
    out = [f"# Training report: {target}", ""]
    if kind == "sweep":
        payload = sweeps.write_summary(target, echo=False)
        out += [f"A sweep of {len(runs)} runs ({task.name}).", "", "## Summary", ""]
        out += sweeps.summary_markdown(payload).splitlines()[2:]
        out.append("")
    else:
        run = runs[0]
        info_path = run.path / "model" / "training_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            out += [f"Exported model (`model/`): optimizer step {info.get('optimizer_step')}, "
                    f"kept as: {info.get('selected')}.", ""]
        if run.evals:
            out += ["## Evaluation", "", *eval_table(run, task), ""]
    out += ["## Plots", ""]
    for name, caption in images.items():
        out += [f"### {caption}", "", f"![{caption}]({name})", ""]
    out += ["## Throughput", "", "Medians over the logging windows of metrics.jsonl; the last two columns are the "
            "whole run's training time (evaluation excluded), from its `train_summary` record.", "",
            "| run | windows | samples/s | tokens/s (real, no padding) | padding fraction | run samples/s | "
            "training time (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        t = throughput(run)
        out.append(f"| {run.label} | {t['windows']} | {_f(t['samples_per_s'], '.1f')} | {_f(t['tokens_per_s'], '.0f')} | "
                   f"{_f(t['padding_fraction'], '.3f')} | {_f(t['run_samples_per_s'], '.1f')} | "
                   f"{_f(t['run_train_seconds'], '.1f')} |")
    out += ["", "## Config", ""]
    if config is not None and config.is_file():
        if kind == "sweep":
            out += [f"`{runs[0].label}`'s config.yaml; the runs differ in their seed, their setting and "
                    "output_dir.", ""]
        out += ["```yaml", config.read_text().rstrip(), "```", ""]
    else:
        out += ["(no config.yaml in the run directory)", ""]
    return "\n".join(out)


def write_report(target: Path, out: Path) -> tuple[str, list[Path]]:
    kind, runs, task, config = find_runs(target)
    make_dirs(out)
    images = {
        "training.png": "Training loss and learning rate per optimizer step",
        "evaluation.png": f"{task.main_metric} over optimizer steps" + (" (one line per run)" if kind == "sweep" else ""),
        "confusion.png": "Confusion matrix of the last evaluation",
    }
    label_names = list(task.label_names)
    if config is not None and config.is_file() and not label_names:
        model_config = config.parent / "model" / "config.json"
        if model_config.is_file():
            id2label = json.loads(model_config.read_text()).get("id2label", {})
            label_names = [id2label[str(i)] for i in range(len(id2label))]
    plot_training(runs, out / "training.png")
    plot_evaluation(kind, runs, task, out / "evaluation.png")
    plot_confusion(runs, task, label_names, out / "confusion.png")
    atomic_write_text(out / "report.md", render_markdown(kind, target, runs, task, config, images))
    return kind, [out / "report.md", *(out / name for name in images)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune report", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", metavar="RUN_OR_SWEEP_DIR")
    ap.add_argument("--out", help="output folder (default: RUN_OR_SWEEP_DIR/report)")
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    target = Path(args.target).expanduser()
    out = Path(args.out).expanduser() if args.out else target / "report"
    kind, files = write_report(target, out)
    print(f"{kind} report:")
    for f in files:
        print(f"  {f}")
    return 0
