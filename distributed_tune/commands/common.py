"""What several commands share: the config arguments (`--config`, `key=value`, `--resume`,
`--overwrite`) and how they become a Config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from distributed_tune import checkpoint
from distributed_tune.config import Config, load_config_and_keys
from distributed_tune.errors import RunDirError


def add_config_arguments(ap: argparse.ArgumentParser, run_flags: bool = True) -> None:
    ap.add_argument("--config", help="YAML config file (defaults: bert-base-uncased on CoLA)")
    if run_flags:
        ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
        ap.add_argument("--overwrite", action="store_true",
                        help="replace the results of a previous run in output_dir (only files a run wrote)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="any config key, e.g. train.lr=3e-5 (`python -m distributed_tune config --keys`)")


def load(args: argparse.Namespace) -> tuple[Config, frozenset[str]]:
    """The config of `--config` + overrides (+ --resume / --overwrite), and the keys it sets."""
    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    return load_config_and_keys(args.config, overrides)


def render_target(cfg: Config, dry_run: bool) -> tuple[Config, Path, str | None]:
    """Where `launch` / `submit` write their files: the run directory, refused when it holds a run
    (without --resume / --overwrite) unless this is a dry run, which then writes into
    <output_dir>/dry-run/ and leaves the run's own files alone. Returns (config, folder, a note)."""
    run_dir = Path(cfg.output_dir)
    try:
        checkpoint.refuse_used_run_dir(cfg)
    except RunDirError:
        if not dry_run:
            raise
        target = run_dir / "dry-run"
        note = f"({run_dir} holds a run: the dry run wrote into {target}; a real one needs --resume or --overwrite)"
        return dataclasses.replace(cfg, output_dir=str(target)), target, note
    return cfg, run_dir, None
