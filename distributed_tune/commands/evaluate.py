"""Score a trained model on its task's evaluation sets (or your own CoLA-format TSVs).

    python -m distributed_tune evaluate runs/cola_bert_base              # a run directory
    python -m distributed_tune evaluate path/to/save_pretrained_folder data.source=/data/cola
    python -m distributed_tune evaluate runs/x --tsv my_sentences.tsv     # -> runs/x/eval/my_sentences/
    accelerate launch --multi_gpu --num_processes 2 -m distributed_tune evaluate runs/x

A run directory is scored with its `model/` folder and its own config.yaml (task, data.source,
max_length, padding), read like any config; `key=value` overrides change it (e.g. data.source=).
A bare save_pretrained folder is scored on the task its training_info.json names (else `task=`,
default cola). Splits: the task's evaluation splits (CoLA: in-domain, out-of-domain and both
together), or one split per --tsv file (named after the file) plus `combined`. Prints the task's
metrics, the confusion matrix and, for CoLA, a per-source-book breakdown; writes `metrics.json`
and `predictions.jsonl` to --out (default RUN/eval, or RUN/eval/<tsv names> for --tsv files).
Under several processes each example is predicted on one process and gathered exactly once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distributed_tune.errors import ConfigError, DataError
from distributed_tune.files import atomic_write_json, atomic_write_jsonl, make_dirs
from distributed_tune.trained import Target, load_trained, resolve_target

COMBINED_TSV = "combined"
EVAL_BATCH = 128  # evaluation.EVAL_BATCH: the training loop's batches, the same floating-point sums


def eval_accelerator() -> Any:
    """One process: `SingleProcess`. Under `accelerate launch` / `torchrun`: an Accelerator for
    inference (gloo on CPU) that must see the launcher's world size."""
    from distributed_tune.distributed import check_world_size, cuda_available, env_world_size
    from distributed_tune.evaluation import SingleProcess

    if env_world_size() == 1:
        return SingleProcess()
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not cuda_available()
    pg = InitProcessGroupKwargs()
    if cpu:
        pg.backend = "gloo"
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[pg])
    check_world_size(accelerator)
    return accelerator


def load_examples(target: Target, tsv: list[str]) -> tuple[list[Any], tuple[str, ...], str]:
    """(examples, label names, description of the data)."""
    task = target.cfg.task_spec
    if tsv:
        if task.read_file is None:
            raise ConfigError(f"--tsv reads files in a task's own format, and task={task.name} has none; point "
                              "data.source= (or the task's own section, e.g. custom.validation_file=) at your file")
        examples: list[Any] = []
        seen: dict[str, str] = {}
        for name in tsv:
            path = Path(name).expanduser()
            if path.stem == COMBINED_TSV and len(tsv) > 1:
                raise DataError(f"--tsv {name}: '{COMBINED_TSV}' names the union of several files; rename the file")
            if path.stem in seen:
                raise DataError(f"--tsv {name}: split name '{path.stem}' is already used by {seen[path.stem]}; "
                                "rename one of the files (the split is the file name without extension)")
            seen[path.stem] = name
            examples += task.read_file(path, path.stem)
        return examples, task.label_names, ", ".join(tsv)
    data = task.read(target.cfg.data)
    return data.eval, data.label_names, data.origin or str(target.cfg.data.source)


def score_examples(target: Target, examples: list[Any], label_names: tuple[str, ...], tsv: bool,
                   accelerator: Any, batch_size: int) -> tuple[dict[str, Any], Any]:
    """Predict every example once (all processes); (metrics, outputs) on every process."""
    import numpy as np

    from distributed_tune.config import pad_multiple
    from distributed_tune.data import tokenize
    from distributed_tune.evaluation import metrics_by_source, predict_distributed, predictions
    from distributed_tune.metrics import score, score_splits

    task = target.cfg.task_spec
    model, tokenizer = load_trained(target, label_names)
    model.to(accelerator.device)
    cache = Path(target.cfg.data.cache_dir).expanduser()
    with accelerator.main_process_first():  # the others read the tokenized cache it writes
        data = tokenize(examples, tokenizer, target.cfg.data.max_length, cache, task.regression)
    # The run's own padding, so that evaluate repeats the training loop's arithmetic.
    predicted = predict_distributed(accelerator, model, data, batch_size, pad_multiple(target.cfg), task.regression)
    outputs, logits = predicted.outputs, predicted.logits
    preds = predictions(task, outputs)
    splits = [e.split for e in examples]
    n = len(label_names) or 1
    if tsv:
        masks = {s: np.asarray(splits) == s for s in dict.fromkeys(splits)}
        metrics = {s: score(task, data.labels[m], preds[m], n, logits[m]) for s, m in masks.items()}
        if len(metrics) > 1:
            metrics[COMBINED_TSV] = score(task, data.labels, preds, n, logits)
    else:
        metrics = score_splits(task, data.labels, preds, splits, n, logits)
    by_source = {}
    if any(e.source for e in examples) and not task.regression:
        for split in dict.fromkeys(splits):
            rows = [i for i, s in enumerate(splits) if s == split]
            by_source[split] = metrics_by_source(data.labels[rows], preds[rows], [examples[i].source for i in rows])
    return {"splits": metrics, "by_source": by_source}, outputs


def write_outputs(out: Path, result: dict[str, Any], target: Target, label_names: tuple[str, ...],
                  examples: list[Any], outputs: Any) -> None:
    from distributed_tune.evaluation import example_fields, prediction_row

    task = target.cfg.task_spec
    make_dirs(out)
    # index: the position in the evaluation set (as in the run's predictions.jsonl) or in its TSV file.
    counters: dict[str, int] = {}
    rows = []
    for e, output in zip(examples, outputs):
        key = e.split if result["tsv"] else "eval"
        counters[key] = counters.get(key, -1) + 1
        rows.append(prediction_row(task, label_names, output, **example_fields(counters[key], e, task)))
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    atomic_write_json(out / "metrics.json", result)


def print_result(result: dict[str, Any], out: Path, target: Target) -> None:
    from rich.console import Console
    from rich.table import Table

    task = target.cfg.task_spec
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{result['model']} on {result['data']} ({task.name})")
    metric_cols = list(task.metrics) + ([] if task.regression else ["accuracy"] * ("accuracy" not in task.metrics)
                                        + ["eval_loss"])  # regression: eval_loss is the mse column
    cols = ["split", "n", *metric_cols] + (["confusion [[TN, FP], [FN, TP]]" if len(result["labels"]) == 2
                                              else "confusion (rows: gold)", "collapsed"] if not task.regression
                                             else ["mse", "collapsed"])
    for col in cols:
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for split, m in result["splits"].items():
        row = [split, str(m["n"]), *(f"{m[k]:.4f}" for k in metric_cols)]
        row += [str(m["confusion_matrix"])] if not task.regression else [f"{m['mse']:.4f}"]
        row.append("YES" if m["collapsed"] else "no")
        table.add_row(*row)
    console.print(table)
    if any(m["collapsed"] for m in result["splits"].values()):
        console.print("collapsed: the model predicts a single class (or a constant) on a split")
    if result["by_source"]:
        sources = Table(title="per source publication", caption="MCC '-': one class only (gold or predicted)")
        for col in ("split", "source", "n", "accuracy", "MCC"):
            sources.add_column(col, justify="left" if col in ("split", "source") else "right", no_wrap=True)
        for split, by in result["by_source"].items():
            for source, m in by.items():
                mcc = "-" if m["mcc"] is None else f"{m['mcc']:.4f}"
                sources.add_row(split, source or "(none)", str(m["n"]), f"{m['accuracy']:.4f}", mcc)
        console.print(sources)
    logged = result.get("run_logged")
    main, split = task.main_metric, task.selection_split
    if logged and split in logged and split in result["splits"] and main in logged[split]:
        console.print(f"the run logged {split} {main} {logged[split][main]:.4f} at optimizer step "
                      f"{logged[split]['optimizer_step']}; this evaluation: {result['splits'][split][main]:.4f}")
    console.print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="RUN_DIR_OR_MODEL_FOLDER")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. data.source=/data/cola (default: the run's own config)")
    ap.add_argument("--tsv", nargs="+", default=[], metavar="FILE",
                    help="CoLA-format TSV files (source, label, mark, sentence) instead of the dev sets")
    ap.add_argument("--out", help="output folder (default: RUN/eval, or RUN/eval/<tsv names> with --tsv)")
    ap.add_argument("--batch-size", type=int, default=EVAL_BATCH, help=f"examples per forward pass ({EVAL_BATCH})")
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    target = resolve_target(args.target, args.overrides)
    accelerator = eval_accelerator()
    with accelerator.main_process_first():  # one process downloads / unpacks; the others read its cache
        examples, label_names, described = load_examples(target, args.tsv)
    result, outputs = score_examples(target, examples, label_names, bool(args.tsv), accelerator, args.batch_size)
    if accelerator.is_main_process:
        base = target.run_dir or target.model_dir
        default = base / "eval" / "+".join(Path(t).stem for t in args.tsv) if args.tsv else base / "eval"
        out = Path(args.out).expanduser() if args.out else default
        result = {
            "model": str(target.model_dir), "run_dir": str(target.run_dir) if target.run_dir else None,
            "task": target.cfg.task, "labels": list(label_names), "training_info": target.training_info,
            "data": described, "tsv": bool(args.tsv), "world_size": accelerator.num_processes,
            "batch_size": args.batch_size, **result, "run_logged": target.logged_evaluation(),
        }
        write_outputs(out, result, target, label_names, examples, outputs)
        print_result(result, out, target)
    accelerator.wait_for_everyone()
    return 0
