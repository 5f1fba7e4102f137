"""Fine-tune (the default command).

    python -m distributed_tune --config configs/cola_bert_base.yaml train.epochs=4 train.lr=3e-5
    accelerate launch --multi_gpu --num_processes 4 -m distributed_tune --config configs/cola_bert_base.yaml
    python -m distributed_tune --config runs/x/config.yaml --resume

Exit status: 0 when the run finished, stopped early, or stopped for a signal with a checkpoint
(STOPPED in the run directory says which); 2 for bad input, with one line saying what to fix.
"""

from __future__ import annotations

import argparse

from distributed_tune.commands.common import add_config_arguments, load


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m distributed_tune",
        description="Fine-tune a Hugging Face encoder on CoLA (or a GLUE task, or your own files).",
        epilog="Overrides: any config key as key=value, e.g. train.lr=3e-5 model.name=/path/to/model. "
        "`python -m distributed_tune config --keys` lists them all.",
    )
    add_config_arguments(ap)
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    cfg, explicit = load(args)
    from distributed_tune.distributed import let_gloo_workers_finish, resolve_accelerate_settings
    from distributed_tune.train import Recipe  # torch, transformers: only once the arguments are valid

    Recipe(resolve_accelerate_settings(cfg, explicit)).run()
    let_gloo_workers_finish()
    return 0
