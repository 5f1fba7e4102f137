"""Experiment trackers through accelerate (`report_to: [tensorboard]`, wandb, mlflow).

    start(accelerator, cfg, derived)            # after the Accelerator, rank 0 writes
    log(accelerator, {"train/loss": 0.61}, step)

The tracker files live under ``output_dir/trackers`` (the Accelerator's project_dir); the run's
resolved config (and the derived batch numbers) is recorded as hyperparameters, and every record
of metrics.jsonl is logged: training windows as ``train/<key>``, evaluations as
``eval/<split>/<metric>``. Only the main process writes (accelerate's rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distributed_tune.config import Config, Derived, flat_dict
from distributed_tune.errors import ConfigError

PROJECT = "distributed_tune"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "padding_fraction", "mfu")


def hyperparameters(cfg: Config, derived: Derived) -> dict[str, Any]:
    """Scalars only (TensorBoard's hparams take int, float, str, bool)."""
    flat = {**flat_dict(cfg), **{f"derived.{k}": v for k, v in dataclasses.asdict(derived).items()}}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def check_available(cfg: Config) -> None:
    """A tracker whose package is missing is one line, before the run starts (accelerate would
    drop it with a warning)."""
    import importlib.util

    for name in cfg.report_to:  # each tracker's package has the tracker's name
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"report_to: {name} needs the {name} package: pip install {name} "
                              "(or pip install 'distributed_tune[trackers]'), or remove it from report_to")


def start(accelerator: Any, cfg: Config, derived: Derived) -> None:
    if cfg.report_to:
        accelerator.init_trackers(PROJECT, config=hyperparameters(cfg, derived))


def log_train(accelerator: Any, cfg: Config, record: dict[str, Any]) -> None:
    if cfg.report_to:
        values = {f"train/{k}": record[k] for k in TRAIN_KEYS if isinstance(record.get(k), (int, float))}
        accelerator.log(values, step=record["optimizer_step"])


def log_eval(accelerator: Any, cfg: Config, split: str, record: dict[str, Any], step: int) -> None:
    if cfg.report_to:
        values = {f"eval/{split}/{k}": v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("optimizer_step", "world_size")}
        accelerator.log(values, step=step)
