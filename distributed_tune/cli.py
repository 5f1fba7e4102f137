"""Command line: `python -m distributed_tune [COMMAND] [--config FILE] [key=value ...]`.

    python -m distributed_tune --config configs/cola_bert_base.yaml train.epochs=4   # train (default)
    python -m distributed_tune launch --config ... --gpus 8 [--dry-run]               # accelerate/DeepSpeed
    python -m distributed_tune config                                                 # every key, documented
    python -m distributed_tune --help                                                 # all commands

Bad input ends with one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from distributed_tune.errors import DistributedTuneError

# command -> (module, function, help); modules are imported only when their command runs.
COMMANDS = {
    "train": ("distributed_tune.cli", "cmd_train", "fine-tune on CoLA (the default command)"),
    "launch": ("distributed_tune.launcher", "cmd_launch", "render the accelerate/DeepSpeed setup and start it"),
    "submit": ("distributed_tune.slurm", "cmd_submit", "render a SLURM batch script and sbatch it"),
    "evaluate": ("distributed_tune.evaluate", "cmd_evaluate", "score a run or model folder on the dev sets"),
    "predict": ("distributed_tune.predict", "cmd_predict", "label sentences with a trained model"),
    "sweep": ("distributed_tune.sweep", "cmd_sweep", "run one config over several seeds"),
    "report": ("distributed_tune.report", "cmd_report", "markdown report with plots for a run or sweep"),
    "config": ("distributed_tune.cli", "cmd_config", "print every config key with its type, default and meaning"),
}


def _train_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a Hugging Face encoder on CoLA; MCC on the dev sets.",
        epilog="Overrides: any config key as key=value, e.g. train.lr=3e-5 model.name=/path/to/model. "
        "`python -m distributed_tune config` lists them all.",
    )
    ap.add_argument("--config", help="YAML config file (defaults: bert-base-uncased on CoLA)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ap.add_argument("--overwrite", action="store_true", help="replace the results in an existing output_dir")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def load_from_args(args: argparse.Namespace):
    from distributed_tune.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    return load_config(args.config, overrides)


def cmd_train(argv: list[str]) -> int:
    args = _train_parser("python -m distributed_tune").parse_intermixed_args(argv)
    cfg = load_from_args(args)
    from distributed_tune.train import train

    train(cfg)
    return 0


def cmd_config(argv: list[str]) -> int:
    from distributed_tune.config import help_text

    print(help_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        _train_parser("python -m distributed_tune").print_help()
        print("\ncommands (python -m distributed_tune COMMAND --help):")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:9s} {text}")
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    module, function, _ = COMMANDS[command]
    try:
        handler = getattr(importlib.import_module(module), function)
        return handler(argv)
    except DistributedTuneError as e:
        # Every rank hits the same input error; say it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
