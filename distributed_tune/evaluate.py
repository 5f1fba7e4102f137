"""Score a trained model on CoLA's dev sets (or your own CoLA-format TSVs).

    python -m distributed_tune evaluate runs/cola_bert_base              # a run directory
    python -m distributed_tune evaluate path/to/save_pretrained_folder --data ../shared/data/cola
    python -m distributed_tune evaluate runs/x --tsv my_sentences.tsv --out /tmp/x_eval
    accelerate launch --multi_gpu --num_processes 2 -m distributed_tune evaluate runs/x

A run directory is scored with its final `model/` folder and its config's `data.source` (unless
--data); any `save_pretrained` folder works too. Splits: in-domain dev, out-of-domain dev and
both together (`dev`, GLUE's 1043 sentences), or one split per --tsv file (named after the file)
plus `combined`. Prints MCC, accuracy, the confusion matrix and a per-source-book breakdown;
writes `metrics.json` and `predictions.jsonl` to --out (default: RUN/eval or MODEL/eval).
Under several processes each example is predicted on one process and gathered exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distributed_tune.data import DEV, Example, read_tsv
from distributed_tune.errors import ConfigError, DataError, ModelError, RunDirError
from distributed_tune.evaluation import EVAL_BATCH, example_row, write_jsonl

COMBINED_TSV = "combined"


@dataclass(frozen=True)
class Target:
    """What the user pointed at: the model folder and, for a run directory, the run."""

    model_dir: Path
    run_dir: Path | None
    run_config: dict[str, Any]  # the run's config.yaml ({} for a bare model folder)

    @property
    def training_info(self) -> dict[str, Any] | None:
        path = self.model_dir / "training_info.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def setting(self, section: str, key: str, default: Any) -> Any:
        value = (self.run_config.get(section) or {}).get(key)
        return default if value is None else value

    @property
    def max_length(self) -> int:
        return int(self.setting("data", "max_length", 128))

    @property
    def pad_to_multiple_of(self) -> int:
        # The run's own padding, so that evaluate repeats the training loop's arithmetic.
        return int((self.run_config.get("derived") or {}).get("pad_to_multiple_of") or 1)

    @property
    def cache_dir(self) -> Path:
        return Path(self.setting("data", "cache_dir", "~/.cache/distributed_tune")).expanduser()


def resolve_target(path: str) -> Target:
    """A run directory (RUN/model + RUN/config.yaml) or a save_pretrained folder (config.json)."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        run_dir = p.parent if p.name == "model" and (p.parent / "config.yaml").is_file() else None
        return Target(p, run_dir, _run_config(run_dir) if run_dir else {})
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        if not (p / "model" / "config.json").is_file():
            raise RunDirError(
                f"{p}: run directory without a model/ folder (the run has not finished or failed); "
                "evaluate a finished run or a save_pretrained folder"
            )
        return Target(p / "model", p, _run_config(p))
    raise ModelError(
        f"{p}: neither a run directory (config.yaml + model/) nor a save_pretrained folder "
        "(config.json + weights); pass one of those"
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: unreadable YAML ({str(e).splitlines()[0]}); fix or remove the file") from None


def load_trained(target: Target) -> tuple[Any, Any]:
    """(model in eval mode, fp32; tokenizer) from the target's model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from distributed_tune.config import ModelConfig
    from distributed_tune.model import load_tokenizer

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with our table
    tokenizer = load_tokenizer(ModelConfig(name=str(target.model_dir)))
    try:
        # fp32 whatever the saved dtype (ZeRO-3 + bf16 saves 16-bit weights): CPU-safe and exact.
        model = AutoModelForSequenceClassification.from_pretrained(target.model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{target.model_dir}: cannot load the model ({reason}); "
                         "pass a save_pretrained folder with config.json and weights") from None
    if model.config.num_labels != 2:
        raise ModelError(f"{target.model_dir}: the model has {model.config.num_labels} labels; "
                         "CoLA models have 2 (unacceptable, acceptable)")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


class SingleProcess:
    """What `predict_distributed` and `evaluate` need of an Accelerator, for a world of one: no
    process group, no accelerate global state (a plain `python -m distributed_tune evaluate`)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self) -> None:
        from distributed_tune.distributed import cuda_available

        self.device = "cuda" if cuda_available() else "cpu"

    def main_process_first(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def eval_accelerator() -> Any:
    """One process: `SingleProcess`. Under `accelerate launch` / `torchrun`: an Accelerator for
    inference (gloo on CPU) that must see the launcher's world size."""
    from distributed_tune.distributed import check_world_size, cuda_available, env_world_size

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


def load_examples(target: Target, data_source: str | None, tsv: list[str]) -> tuple[list[Example], str | None, str]:
    """(examples, name of the all-examples split or None, description of the data)."""
    if tsv:
        examples: list[Example] = []
        seen: dict[str, str] = {}
        for name in tsv:
            path = Path(name).expanduser()
            if path.stem == COMBINED_TSV and len(tsv) > 1:
                raise DataError(f"--tsv {name}: '{COMBINED_TSV}' names the union of several files; rename the file")
            if path.stem in seen:
                raise DataError(f"--tsv {name}: split name '{path.stem}' is already used by {seen[path.stem]}; "
                                "rename one of the files (the split is the file name without extension)")
            seen[path.stem] = name
            examples += read_tsv(path, path.stem)
        return examples, (COMBINED_TSV if len(tsv) > 1 else None), ", ".join(tsv)
    from distributed_tune.config import DataConfig
    from distributed_tune.data import load_cola

    source = data_source or target.setting("data", "source", DataConfig().source)
    cfg = DataConfig(source=str(source), cache_dir=str(target.cache_dir))
    return load_cola(cfg).dev, DEV, str(source)


def evaluate(target: Target, examples: list[Example], combined: str | None, accelerator: Any,
             batch_size: int) -> tuple[dict[str, Any], Any, Any]:
    """Predict every example once (all processes); returns (metrics, preds, probs) on every process."""
    from distributed_tune.data import tokenize
    from distributed_tune.evaluation import metrics_by_source, metrics_by_split, predict_distributed

    model, tokenizer = load_trained(target)
    model.to(accelerator.device)
    with accelerator.main_process_first():  # the others read the tokenized cache it writes
        data = tokenize(examples, tokenizer, target.max_length, target.cache_dir)
    preds, probs = predict_distributed(accelerator, model, data, batch_size, target.pad_to_multiple_of)
    splits = [e.split for e in examples]
    metrics = metrics_by_split(data.labels, preds, splits, combined)
    by_source = {}
    for split in dict.fromkeys(splits):
        rows = [i for i, s in enumerate(splits) if s == split]
        by_source[split] = metrics_by_source(data.labels[rows], preds[rows], [examples[i].source for i in rows])
    return {"splits": metrics, "by_source": by_source}, preds, probs


def run_logged_eval(target: Target) -> dict[str, Any] | None:
    """The run's own evaluation of the weights in model/ (the step in training_info.json, else
    the last one), split -> record; None for a bare model folder."""
    if target.run_dir is None or not (target.run_dir / "metrics.jsonl").is_file():
        return None
    from distributed_tune.metrics import read_metrics

    evals = [r for r in read_metrics(target.run_dir / "metrics.jsonl") if "split" in r and "mcc" in r]
    if not evals:
        return None
    info = target.training_info or {}
    step = info.get("optimizer_step", evals[-1]["optimizer_step"])
    at_step = [r for r in evals if r["optimizer_step"] == step] or evals
    return {r["split"]: r for r in at_step}


def write_outputs(out: Path, result: dict[str, Any], examples: list[Example], preds: Any, probs: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # index: the position in the dev set (as in the run's predictions.jsonl) or in its TSV file.
    counters: dict[str, int] = {}
    rows = []
    for e, pred, prob in zip(examples, preds, probs):
        key = e.split if result["tsv"] else DEV
        counters[key] = counters.get(key, -1) + 1
        rows.append(example_row(counters[key], e, pred, prob))
    write_jsonl(out / "predictions.jsonl", rows)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "metrics.json")


def print_result(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"{result['model']} on {result['data']}")
    for col in ("split", "n", "MCC", "accuracy", "TN", "FP", "FN", "TP", "collapsed"):
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for split, m in result["splits"].items():
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        table.add_row(split, str(m["n"]), f"{m['mcc']:.4f}", f"{m['accuracy']:.4f}", str(tn), str(fp), str(fn),
                      str(tp), "YES" if m["collapsed"] else "no")
    console.print(table)
    if any(m["collapsed"] for m in result["splits"].values()):
        console.print("collapsed: the model predicts a single class on a split (MCC 0); CoLA's classic failure")
    sources = Table(title="per source publication", caption="MCC '-': one class only (gold or predicted)")
    for col in ("split", "source", "n", "accuracy", "MCC"):
        sources.add_column(col, justify="left" if col in ("split", "source") else "right", no_wrap=True)
    for split, by in result["by_source"].items():
        for source, m in by.items():
            mcc = "-" if m["mcc"] is None else f"{m['mcc']:.4f}"
            sources.add_row(split, source or "(none)", str(m["n"]), f"{m['accuracy']:.4f}", mcc)
    console.print(sources)
    logged = result.get("run_logged")
    if logged:
        dev = logged.get(DEV)
        if dev and DEV in result["splits"]:
            console.print(f"the run logged dev MCC {dev['mcc']:.4f} / accuracy {dev['accuracy']:.4f} at optimizer "
                          f"step {dev['optimizer_step']}; this evaluation: {result['splits'][DEV]['mcc']:.4f} / "
                          f"{result['splits'][DEV]['accuracy']:.4f}")
    console.print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="RUN_DIR_OR_MODEL_FOLDER")
    ap.add_argument("--data", help="CoLA source (folder, URL or hub); default: the run's data.source")
    ap.add_argument("--tsv", nargs="+", default=[], metavar="FILE",
                    help="CoLA-format TSV files (source, label, mark, sentence) instead of the dev sets")
    ap.add_argument("--out", help="output folder (default: RUN/eval, or MODEL/eval for a model folder)")
    ap.add_argument("--batch-size", type=int, default=EVAL_BATCH, help=f"sentences per forward pass ({EVAL_BATCH})")
    return ap


def cmd_evaluate(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    if args.tsv and args.data:
        raise ConfigError("--tsv and --data exclude each other: pass either CoLA-format files or a CoLA source")
    target = resolve_target(args.target)
    accelerator = eval_accelerator()
    with accelerator.main_process_first():  # one process downloads / unpacks; the others read its cache
        examples, combined, described = load_examples(target, args.data, args.tsv)
    result, preds, probs = evaluate(target, examples, combined, accelerator, args.batch_size)
    if accelerator.is_main_process:
        out = Path(args.out).expanduser() if args.out else (target.run_dir or target.model_dir) / "eval"
        result = {
            "model": str(target.model_dir), "run_dir": str(target.run_dir) if target.run_dir else None,
            "training_info": target.training_info, "data": described, "tsv": bool(args.tsv),
            "world_size": accelerator.num_processes, "batch_size": args.batch_size, **result,
            "run_logged": run_logged_eval(target),
        }
        write_outputs(out, result, examples, preds, probs)
        print_result(result, out)
    accelerator.wait_for_everyone()
    return 0
