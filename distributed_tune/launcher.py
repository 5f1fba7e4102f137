"""Render the accelerate / DeepSpeed setup from the training config, then start it.

    python -m distributed_tune launch --config configs/cola_bert_base_zero2.yaml --gpus 8
    python -m distributed_tune launch --config ... --nodes 2 --gpus 8 distributed.zero_stage=3 --dry-run

Writes into the run directory (``output_dir``):
  config.yaml      the training config (the one the processes read)
  accelerate.yaml  topology and backend, loadable by `accelerate launch --config_file`
  ds_config.json   when DeepSpeed is on: micro batch, accumulation, clipping, precision, ZeRO
and runs ``accelerate launch --config_file <run>/accelerate.yaml -m distributed_tune --config
<run>/config.yaml``. Every number in those files comes from the training config (one source of
truth); the training processes rebuild the same DeepSpeed dict from it and check it matches.
`--gpus N` is processes per machine: on a machine without GPUs it starts N CPU processes.
Imports no torch: rendering and --dry-run are instant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distributed_tune import checkpoint
from distributed_tune.config import Config, check_batch_arithmetic, dump_resolved
from distributed_tune.distributed import check_hardware, deepspeed_config
from distributed_tune.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    nodes: int = 1
    gpus_per_node: int = 1
    main_process_ip: str | None = None
    main_process_port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def accelerate_config(cfg: Config, topo: Topology, ds_config_path: Path | None) -> dict[str, Any]:
    """The accelerate config file (the keys its own loader accepts, nothing else)."""
    deepspeed = cfg.distributed.zero_stage is not None
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED" if deepspeed else ("MULTI_GPU" if topo.world_size > 1 else "NO"),
        "mixed_precision": {"fp32": "no"}.get(cfg.precision, cfg.precision),
        # Never use_cpu: accelerate then starts a single process, and turns DeepSpeed off.
        # On a machine without CUDA the training processes pick the CPU themselves.
        "use_cpu": False,
        "debug": False,
        "num_machines": topo.nodes,
        "num_processes": topo.world_size,
        "machine_rank": 0,  # SLURM scripts pass --machine_rank per node
        "main_process_port": topo.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    if topo.main_process_ip:
        out["main_process_ip"] = topo.main_process_ip
    if deepspeed:
        # Precision lives in ds_config.json; accelerate refuses a second copy beside the file.
        del out["mixed_precision"]
        out["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_config_path),
            # torchrun on every node instead of pdsh: no passwordless ssh needed.
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        }
    return out


def render(cfg: Config, topo: Topology, run_dir: Path | None = None) -> dict[str, Path]:
    """Write config.yaml, accelerate.yaml and (DeepSpeed) ds_config.json; return their paths."""
    check_batch_arithmetic(cfg, topo.world_size)
    run_dir = Path(run_dir or cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"config": run_dir / "config.yaml", "accelerate": run_dir / "accelerate.yaml"}
    ds_path = None
    if cfg.distributed.zero_stage is not None:
        ds_path = paths["deepspeed"] = run_dir / "ds_config.json"
        ds_path.write_text(json.dumps(deepspeed_config(cfg, topo.world_size), indent=2) + "\n")
    dump_resolved(cfg, None, paths["config"])
    acc = accelerate_config(cfg, topo, ds_path.resolve() if ds_path else None)
    paths["accelerate"].write_text(yaml.safe_dump(acc, sort_keys=False))
    return paths


def launch_command(paths: dict[str, Path], topo: Topology, flags: tuple[str, ...] = (),
                   python: str = sys.executable) -> list[str]:
    """`accelerate launch ...`, or the plain single-process fallback for a world of one; `flags`
    (--resume / --overwrite) travel on the command line, never in the rendered config."""
    train = ["-m", "distributed_tune", "--config", str(paths["config"]), *flags]
    if topo.world_size == 1 and "deepspeed" not in paths:
        return [python, *train]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(paths["accelerate"]), *train]


def check_resumable(cfg: Config, world_size: int) -> None:
    """With --resume, refuse before anything starts what the training processes would each refuse
    after their imports (checkpoint.check_resumable): say it once."""
    if not cfg.resume:
        return
    ckpt = checkpoint.latest_good(Path(cfg.output_dir), warn=lambda _: None)
    if ckpt is None:
        return
    checkpoint.check_resumable(ckpt, checkpoint.read_trainer_state(ckpt), cfg.distributed.zero_stage, world_size,
                               cfg.train.global_batch_size,
                               here=f"this launch starts {world_size} (nodes x processes per node)")


def cmd_launch(argv: list[str]) -> int:
    from distributed_tune.cli import load_from_args

    ap = argparse.ArgumentParser(prog="python -m distributed_tune launch",
                                 description="Render the accelerate/DeepSpeed setup and start training.")
    ap.add_argument("--config", help="training YAML")
    ap.add_argument("--gpus", type=int, default=1, help="processes per machine (CPU processes without GPUs)")
    ap.add_argument("--nodes", type=int, default=1, help="machines (multi-node: see `submit` for SLURM)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port")
    ap.add_argument("--dry-run", action="store_true", help="write the files and print the command only")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    if args.gpus < 1 or args.nodes < 1:
        raise ConfigError(f"--gpus={args.gpus} and --nodes={args.nodes} must be at least 1")
    cfg = load_from_args(args)
    checkpoint.refuse_used_run_dir(cfg)
    topo = Topology(nodes=args.nodes, gpus_per_node=args.gpus, main_process_port=args.port)
    check_batch_arithmetic(cfg, topo.world_size)
    check_resumable(cfg, topo.world_size)
    if not args.dry_run:
        # A dry run may render files for another machine (fp16 for a GPU cluster, from a laptop).
        check_hardware(cfg)
    paths = render(cfg, topo)
    flags = tuple(flag for flag, on in (("--resume", cfg.resume), ("--overwrite", cfg.overwrite)) if on)
    cmd = launch_command(paths, topo, flags)
    for path in paths.values():
        print(f"wrote {path}")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if topo.nodes > 1:
        raise ConfigError(
            "--nodes > 1 needs one launcher per node: use `python -m distributed_tune submit` (SLURM), "
            "or run the printed command on every node with --machine_rank set"
        )
    return subprocess.call(cmd)
