"""What several commands share: the config arguments (`--config`, `key=value`, `--resume`,
`--overwrite`) and how they become a Config."""

from __future__ import annotations

import argparse

from distributed_tune.config import Config, load_config_and_keys


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
