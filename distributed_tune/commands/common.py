"""What several commands share: the config arguments (`--config`, `key=value`, `--resume`,
`--overwrite`) and how they become a Config; where launch/submit render; the SLURM job options of
`submit` and `sweep --slurm`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from distributed_tune import checkpoint
from distributed_tune.config import Config, load_config_and_keys
from distributed_tune.errors import ConfigError, RunDirError
from distributed_tune.launcher import Topology
from distributed_tune.slurm import DEFAULT_CPUS_PER_GPU, Job


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


def add_job_arguments(ap: argparse.ArgumentParser) -> None:
    """The SLURM options `submit` and `sweep --slurm` share."""
    ap.add_argument("--nodes", type=int, default=1, help="machines; one launcher (srun task) per machine")
    ap.add_argument("--gpus-per-node", type=int, default=1,
                    help="GPUs per machine, one training process each; 0 on a CPU partition")
    ap.add_argument("--processes-per-node", type=int,
                    help="training processes per machine (default: --gpus-per-node, or 1 without GPUs)")
    ap.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM:SS, minutes); default: the partition's")
    ap.add_argument("--partition", help="SLURM partition")
    ap.add_argument("--account", help="SLURM account to charge")
    ap.add_argument("--cpus-per-task", type=int,
                    help="CPUs per node for the launcher and all its processes (default: --gpus-per-node x "
                         "--cpus-per-gpu; without GPUs one per process)")
    ap.add_argument("--cpus-per-gpu", type=int, default=DEFAULT_CPUS_PER_GPU,
                    help=f"with GPUs and no --cpus-per-task: CPUs per GPU (default {DEFAULT_CPUS_PER_GPU}); the script "
                         "asks for --cpus-per-task = GPUs per node x this")
    ap.add_argument("--signal-lead", type=int, default=90, metavar="SECONDS",
                    help="USR1 this long before the time limit: time to reach the next stop check and save "
                         "(default 90; SLURM may send it up to a minute earlier)")
    ap.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                    help="extra #SBATCH line, repeatable: --sbatch-option qos=high --sbatch-option exclusive")


def job_from_args(args: argparse.Namespace, job_name: str) -> Job:
    for name in ("nodes", "signal_lead"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node={args.gpus_per_node} must be 0 (a CPU partition) or more")
    processes = args.processes_per_node or max(args.gpus_per_node, 1)
    if processes < 1:
        raise ConfigError(f"--processes-per-node={processes} must be at least 1")
    if args.gpus_per_node and processes != args.gpus_per_node:
        raise ConfigError(f"--processes-per-node={processes} with --gpus-per-node={args.gpus_per_node}: "
                          "one training process per GPU; leave --processes-per-node out")
    topo = Topology(nodes=args.nodes, processes_per_node=processes, gpus_per_node=args.gpus_per_node)
    job = Job(topology=topo, time=args.time, partition=args.partition, account=args.account,
              job_name=job_name, cpus_per_task=args.cpus_per_task, cpus_per_gpu=args.cpus_per_gpu, signal_lead_s=args.signal_lead,
              extra=tuple(args.sbatch_option))
    for warning in job.check():
        print(f"warning: {warning}", file=sys.stderr)
    return job
