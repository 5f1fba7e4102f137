"""Print the resolved config of `--config` + overrides, or every key with `--keys`.

    python -m distributed_tune config --config configs/cola_bert_base.yaml train.lr=3e-5
    python -m distributed_tune config --config configs/cola_bert_base.yaml --world-size 8   # + batch layout
    python -m distributed_tune config --keys           # every key: type, default, meaning
    python -m distributed_tune config --config C --get output_dir   # one resolved value (for scripts)
"""

from __future__ import annotations

import argparse

from distributed_tune.commands.common import add_config_arguments, load
from distributed_tune.config import batch_layout, flat_dict, help_text, to_yaml
from distributed_tune.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune config", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", action="store_true", help="list every config key with its type, default and meaning")
    ap.add_argument("--world-size", type=int, help="also show the micro batch and accumulation for N processes")
    ap.add_argument("--get", metavar="KEY", help="print only this key's resolved value (e.g. output_dir)")
    add_config_arguments(ap, run_flags=False)
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.keys:
        print(help_text())
        return 0
    cfg, _ = load(args)
    if args.get:
        flat = flat_dict(cfg)
        if args.get not in flat:
            raise ConfigError(f"--get {args.get}: not a config key (`config --keys` lists them)")
        print(flat[args.get])
        return 0
    print(to_yaml(cfg), end="")
    if args.world_size:
        micro, accumulation = batch_layout(cfg.train, args.world_size)
        print(f"# world size {args.world_size}: micro batch {micro} x accumulation {accumulation} "
              f"= global batch {cfg.train.global_batch_size}")
    return 0
