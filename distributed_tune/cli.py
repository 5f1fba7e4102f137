"""Command line: `python -m distributed_tune [COMMAND] [--config FILE] [key=value ...]`.

    python -m distributed_tune --config configs/cola_bert_base.yaml train.epochs=4   # train (default)
    python -m distributed_tune launch --config ... --gpus 8 [--dry-run]               # accelerate/DeepSpeed
    python -m distributed_tune config --keys                                          # every key, documented
    python -m distributed_tune --help                                                 # all commands

Each command is a module of distributed_tune/commands/ with `parser()` and `run(argv)`; it is
imported only when it runs. Bad input ends with one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from distributed_tune.errors import DistributedTuneError

COMMANDS = {
    "train": "fine-tune on a task (the default command)",
    "launch": "render the accelerate/DeepSpeed setup and start it",
    "submit": "render a SLURM batch script and sbatch it",
    "evaluate": "score a run or model folder on the task's evaluation sets",
    "predict": "label sentences (or GLUE's test sets) with a trained model",
    "push": "publish a run's model/ (with its model card) to the Hugging Face Hub",
    "sweep": "run one config over seeds and a grid of settings",
    "report": "markdown report with plots for a run or sweep",
    "config": "print the resolved config, or every key with --keys",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        importlib.import_module("distributed_tune.commands.train").parser().print_help()
        print("\ncommands (python -m distributed_tune COMMAND --help):")
        for name, text in COMMANDS.items():
            print(f"  {name:9s} {text}")
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        return importlib.import_module(f"distributed_tune.commands.{command}").run(argv)
    except DistributedTuneError as e:
        # Every rank hits the same input error; say it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted (Ctrl-C): stopped at once; completed checkpoints are kept (resume with --resume)",
                  file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # a file or disk problem no command turned into its own line: still one line
        if os.environ.get("RANK", "0") == "0":
            from distributed_tune.files import write_problem

            reason, fix = write_problem(e)
            print(f"error: {e.filename or 'a file'}: {reason}; {fix}", file=sys.stderr)
        return 2
