"""A markdown report with PNG plots for one run or a seed sweep.

    python -m distributed_tune report runs/cola_bert_base            # one run  -> runs/cola_bert_base/report/
    python -m distributed_tune report runs/cola_sweep --out /tmp/r   # a sweep (seed_<s>/ folders)

Writes report.md and three plots: training.png (loss and learning rate per optimizer step),
dev_mcc.png (dev MCC over optimizer steps; one line per seed for a sweep) and confusion.png (the
dev confusion matrix of the last evaluation, counts annotated; one panel per seed). The report
also holds the evaluation table (or the sweep summary), throughput (samples/s, tokens/s, padding
fraction from metrics.jsonl) and the run's config.yaml. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_tune import sweep as sweep_mod
from distributed_tune.errors import ConfigError, RunDirError

DEV, IN_DOMAIN, OUT_OF_DOMAIN = "dev", "in_domain_dev", "out_of_domain_dev"
DPI = 100
# Figure sizes in inches at DPI: the PNGs have exactly these pixel sizes (no tight bbox).
TRAINING_SIZE = (10.0, 7.0)
MCC_SIZE = (10.0, 5.5)
CONFUSION_PANEL = (4.5, 4.2)
CONFUSION_COLUMNS = 4


@dataclass
class Run:
    label: str  # "run" or "seed 42"
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # records with a loss
    evals: list[dict[str, Any]] = field(default_factory=list)  # records with split and mcc

    @classmethod
    def read(cls, label: str, path: Path) -> Run:
        records = sweep_mod._records(path) or []
        return cls(label, path,
                   train=[r for r in records if "loss" in r and "optimizer_step" in r],
                   evals=[r for r in records if "split" in r and r.get("mcc") is not None])

    def dev(self) -> list[dict[str, Any]]:
        return [r for r in self.evals if r["split"] == DEV]

    def split_series(self, split: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.evals if r["split"] == split]
        return [r["optimizer_step"] for r in rows], [r["mcc"] for r in rows]


def find_runs(target: Path) -> tuple[str, list[Run]]:
    """('run', [the run]) or ('sweep', [one per seed])."""
    if not target.is_dir():
        raise RunDirError(f"{target}: no such directory; pass a run directory or a sweep directory")
    if (target / "metrics.jsonl").is_file():
        return "run", [Run.read("run", target)]
    if (target / sweep_mod.SWEEP_JSON).is_file() or any(target.glob("seed_*/metrics.jsonl")):
        seeds = sweep_mod.sweep_seeds(target)
        runs = [Run.read(f"seed {s}", sweep_mod.seed_dir(target, s)) for s in seeds]
        runs = [r for r in runs if r.train or r.evals]
        if not runs:
            raise RunDirError(f"{target}: no seed has metrics yet (seed_<s>/metrics.jsonl); run the sweep first")
        return "sweep", runs
    raise RunDirError(f"{target}: neither a run directory (metrics.jsonl) nor a sweep directory (seed_<s>/); "
                      "pass the output_dir of a run or a sweep")


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("report needs matplotlib: pip install matplotlib (or pip install distributed_tune[plots])") from None
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
    ax_loss.set_ylabel("cross-entropy loss (nats)")
    ax_lr.set_title("Learning rate (value used at each optimizer step)" + (", same for every seed" if len(runs) > 1 else ""))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax_loss.legend(loc="upper right", fontsize="small", ncol=min(len(runs), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_dev_mcc(kind: str, runs: list[Run], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=MCC_SIZE, dpi=DPI)
    if kind == "run":
        for split, style in ((DEV, "-o"), (IN_DOMAIN, "--s"), (OUT_OF_DOMAIN, ":^")):
            steps, mcc = runs[0].split_series(split)
            ax.plot(steps, mcc, style, label={DEV: "dev (both)", IN_DOMAIN: "in-domain dev",
                                              OUT_OF_DOMAIN: "out-of-domain dev"}[split])
        info = runs[0].path / "model" / "training_info.json"
        step = json.loads(info.read_text()).get("optimizer_step") if info.is_file() else None
        if step is not None:
            ax.axvline(step, color="black", linewidth=1, linestyle="--", label=f"exported model/ (step {step})")
        ax.set_title("Dev MCC over training")
    else:
        for run in runs:
            steps, mcc = run.split_series(DEV)
            (line,) = ax.plot(steps, mcc, "-o", markersize=4, label=run.label)
            if mcc:
                best = max(range(len(mcc)), key=lambda i: (mcc[i], -steps[i]))
                ax.plot([steps[best]], [mcc[best]], "*", markersize=14, color=line.get_color())
        ax.set_title(f"Dev MCC (in-domain + out-of-domain) per seed; star = each seed's best ({len(runs)} seeds)")
    ax.axhline(0.0, color="grey", linewidth=1, linestyle=":", label="MCC 0 (chance / one class)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Matthews correlation (-1 to 1)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncol=2 if len(runs) > 5 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def confusion_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of the confusion-matrix figure for n panels."""
    cols = min(n, CONFUSION_COLUMNS)
    return math.ceil(n / cols), cols


def plot_confusion(runs: list[Run], path: Path) -> None:
    plt = _pyplot()
    panels = [(run, run.dev()[-1]) for run in runs if run.dev()]
    rows, cols = confusion_grid(max(1, len(panels)))
    fig, axes = plt.subplots(rows, cols, figsize=(CONFUSION_PANEL[0] * cols, CONFUSION_PANEL[1] * rows), dpi=DPI,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no dev evaluation yet", ha="center", va="center")
    for ax, (run, ev) in zip(axes.flat, panels):
        cm = ev["confusion_matrix"]
        total = sum(sum(row) for row in cm) or 1
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(max(row) for row in cm) or 1)
        peak = max(max(row) for row in cm)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{cm[i][j]}\n({100 * cm[i][j] / total:.1f}%)", ha="center", va="center",
                        fontsize=12, color="white" if cm[i][j] > 0.6 * peak else "black")
        ax.set_xticks([0, 1], ["unacceptable", "acceptable"])
        ax.set_yticks([0, 1], ["unacceptable", "acceptable"], rotation=90, va="center")
        ax.set_xlabel("predicted label")
        ax.set_ylabel("gold label")
        flag = ", COLLAPSED" if ev.get("collapsed") else ""
        prefix = "" if run.label == "run" else f"{run.label}: "
        ax.set_title(f"{prefix}dev, step {ev['optimizer_step']}\nMCC {ev['mcc']:.3f}, n={total}{flag}", fontsize=10,
                     color="tab:red" if ev.get("collapsed") else "black")
    sep = "\n" if cols == 1 else " "  # one narrow panel: two lines, or the title is cut off
    fig.suptitle(f"Confusion matrix of the last dev evaluation{sep}(counts, % of n)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def throughput(run: Run) -> dict[str, Any]:
    """Medians over the logging windows (the first window includes start-up effects), and the
    whole-run figures of the loop's `train_summary` record when there is one."""
    def med(key: str) -> float | None:
        values = [r[key] for r in run.train if r.get(key) is not None]
        return statistics.median(values) if values else None

    whole = next((r for r in reversed(sweep_mod._records(run.path) or []) if r.get("event") == "train_summary"), {})
    return {"windows": len(run.train), "samples_per_s": med("samples_per_s"), "tokens_per_s": med("tokens_per_s"),
            "padding_fraction": med("padding_fraction"), "run_samples_per_s": whole.get("samples_per_s"),
            "run_train_seconds": whole.get("train_seconds")}


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def eval_table(run: Run) -> list[str]:
    last_step = run.evals[-1]["optimizer_step"]
    dev = run.dev()
    best = max(dev, key=lambda r: (r["mcc"], -r["optimizer_step"])) if dev else None
    lines = ["| evaluation | split | n | MCC | accuracy | confusion [[TN, FP], [FN, TP]] | collapsed |",
             "| --- | --- | ---: | ---: | ---: | --- | :---: |"]
    steps = [("last", last_step)]
    if best and best["optimizer_step"] != last_step:
        steps.append(("best dev MCC", best["optimizer_step"]))
    elif best:
        steps = [("last = best dev MCC", last_step)]
    for name, step in steps:
        for r in (r for r in run.evals if r["optimizer_step"] == step):
            lines.append(f"| {name} (step {step}) | {r['split']} | {r.get('n', '-')} | {r['mcc']:.4f} | "
                         f"{r.get('accuracy', float('nan')):.4f} | {r.get('confusion_matrix', '-')} | "
                         f"{'**yes**' if r.get('collapsed') else 'no'} |")
    return lines


def render_markdown(kind: str, target: Path, runs: list[Run], images: dict[str, str]) -> str:
    out = [f"# Training report: {target}", ""]
    if kind == "sweep":
        results = sweep_mod.collect(target, sweep_mod.sweep_seeds(target))
        summary = sweep_mod.summarize(results)
        out += [f"A seed sweep of {len(results)} runs of one config.", ""]
        out += sweep_mod.summary_markdown(results, summary, "Summary").replace("# Summary", "## Summary").splitlines()
        out.append("")
    else:
        run = runs[0]
        info_path = run.path / "model" / "training_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            out += [f"Exported model (`model/`): optimizer step {info.get('optimizer_step')}, "
                    f"kept as: {info.get('selected')}.", ""]
        if run.evals:
            out += ["## Dev evaluation", "", *eval_table(run), ""]
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
    config = runs[0].path / "config.yaml"
    out += ["", "## Config", ""]
    if config.is_file():
        if kind == "sweep":
            out += [f"`{runs[0].label}`'s config.yaml; the seeds differ only in `seed` and `output_dir`.", ""]
        out += ["```yaml", config.read_text().rstrip(), "```", ""]
    else:
        out += ["(no config.yaml in the run directory)", ""]
    return "\n".join(out)


def write_report(target: Path, out: Path) -> tuple[str, list[Path]]:
    kind, runs = find_runs(target)
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "training.png": "Training loss and learning rate per optimizer step",
        "dev_mcc.png": "Dev MCC over optimizer steps" + (" (one line per seed)" if kind == "sweep" else ""),
        "confusion.png": "Confusion matrix of the last dev evaluation",
    }
    plot_training(runs, out / "training.png")
    plot_dev_mcc(kind, runs, out / "dev_mcc.png")
    plot_confusion(runs, out / "confusion.png")
    tmp = out / "report.md.tmp"
    tmp.write_text(render_markdown(kind, target, runs, images))
    tmp.replace(out / "report.md")
    return kind, [out / "report.md", *(out / name for name in images)]


def cmd_report(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune report", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", metavar="RUN_OR_SWEEP_DIR")
    ap.add_argument("--out", help="output folder (default: RUN_OR_SWEEP_DIR/report)")
    args = ap.parse_args(argv)
    target = Path(args.target).expanduser()
    out = Path(args.out).expanduser() if args.out else target / "report"
    kind, files = write_report(target, out)
    print(f"{kind} report:")
    for f in files:
        print(f"  {f}")
    return 0
