"""Render the accelerate/DeepSpeed setup of a run from its training config, then start it.

    python -m distributed_tune launch --config configs/cola_bert_base_zero2.yaml --gpus 8
    python -m distributed_tune launch --config ... --nodes 2 --gpus 8 distributed.zero_stage=3 --dry-run

Writes into the run directory (``output_dir``): config.yaml (what the processes read),
accelerate.yaml (topology and backend, loadable by `accelerate launch --config_file`) and, with
DeepSpeed, ds_config.json; then runs ``accelerate launch --config_file <run>/accelerate.yaml -m
distributed_tune --config <run>/config.yaml``. `--gpus N` is processes per machine: on a machine
without GPUs it starts N CPU processes. `--dry-run` only writes the files and prints the
command; on a run directory that holds a run (without --resume/--overwrite) it writes them into
<output_dir>/dry-run/ instead, leaving the run's own files alone. Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import subprocess
from pathlib import Path

from distributed_tune.commands.common import add_config_arguments, load, render_target
from distributed_tune.config import batch_layout
from distributed_tune.distributed import check_hardware
from distributed_tune.errors import ConfigError
from distributed_tune.files import RunLock
from distributed_tune.launcher import DEFAULT_PORT, Topology, check_resumable, launch_command, render


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune launch",
                                 description="Render the accelerate/DeepSpeed setup and start training.")
    ap.add_argument("--gpus", type=int, default=1, help="processes per machine (CPU processes without GPUs)")
    ap.add_argument("--nodes", type=int, default=1, help="machines (multi-node: see `submit` for SLURM)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port")
    ap.add_argument("--dry-run", action="store_true", help="write the files and print the command only")
    add_config_arguments(ap)
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.gpus < 1 or args.nodes < 1:
        raise ConfigError(f"--gpus={args.gpus} and --nodes={args.nodes} must be at least 1")
    cfg, _ = load(args)
    topo = Topology(nodes=args.nodes, processes_per_node=args.gpus, gpus_per_node=args.gpus,
                    main_process_port=args.port)
    batch_layout(cfg.train, topo.world_size)
    run_dir = Path(cfg.output_dir)
    cfg, target, note = render_target(cfg, args.dry_run)
    if not args.dry_run:
        RunLock(run_dir).probe()  # a running job owns config.yaml: do not rewrite it under it
        check_resumable(cfg)
        # A dry run may render files for another machine (fp16 for a GPU cluster, from a laptop).
        check_hardware(cfg)
    paths = render(dataclasses.replace(cfg, resume=False, overwrite=False), topo, target)
    flags = tuple(flag for flag, on in (("--resume", cfg.resume), ("--overwrite", cfg.overwrite)) if on)
    cmd = launch_command(paths, topo, flags)
    for path in paths.values():
        print(f"wrote {path}")
    if note:
        print(note)
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if topo.nodes > 1:
        raise ConfigError(
            "--nodes > 1 needs one launcher per node: use `python -m distributed_tune submit` (SLURM), "
            "or run the printed command on every node with --machine_rank set"
        )
    # This process is a launcher: only the training processes act on SLURM's warning (USR1); a
    # launcher in between must not die of it. SIG_IGN passes down through exec, and each training
    # process installs its own handler first thing (signals.py).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return subprocess.call(cmd)
