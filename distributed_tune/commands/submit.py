"""Render a SLURM batch script for a run and submit it.

    python -m distributed_tune submit --config configs/cola_bert_base_zero2.yaml --nodes 2 --gpus-per-node 8 \\
        --time 02:00:00 --partition gpu [--account A] [--dry-run] train.micro_batch_size=2
    python -m distributed_tune submit --config configs/cola_bert_base.yaml --gpus-per-node 0 \\
        --processes-per-node 2 --partition cpu          # a CPU partition: 2 training processes, 2 CPUs
    sbatch runs/<run>/job.sbatch          # submit the rendered script again (it always resumes)

Writes into the run directory (``output_dir``) the launcher files (config.yaml, accelerate.yaml,
ds_config.json; see launcher.py) and ``job.sbatch`` (see slurm.py for its shape), then calls
``sbatch`` (not with --dry-run). Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from distributed_tune import checkpoint
from distributed_tune.commands.common import add_config_arguments, load, render_target
from distributed_tune.errors import ConfigError
from distributed_tune.files import RunLock, atomic_write_text
from distributed_tune.launcher import Topology, check_resumable, render
from distributed_tune.slurm import SCRIPT, Job, render_script


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
                    help="CPUs per node for the launcher and all its processes (default without GPUs: one per process)")
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
              job_name=job_name, cpus_per_task=args.cpus_per_task, signal_lead_s=args.signal_lead,
              extra=tuple(args.sbatch_option))
    for warning in job.check():
        print(f"warning: {warning}", file=sys.stderr)
    return job


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m distributed_tune submit",
        description="Render <output_dir>/job.sbatch (+ accelerate/DeepSpeed files) and submit it with sbatch.",
        epilog="Overrides: any config key as key=value. The script always passes --resume, so a requeued "
        "(or resubmitted) job continues from the newest complete checkpoint.",
    )
    add_job_arguments(ap)
    ap.add_argument("--job-name", help="default: dt-<run directory name>")
    ap.add_argument("--dry-run", action="store_true", help="write the files, do not call sbatch")
    add_config_arguments(ap)
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    cfg, _ = load(args)
    name = args.job_name or f"dt-{Path(cfg.output_dir).resolve().name}"
    cfg, run_dir, note = render_target(cfg, args.dry_run)
    job = job_from_args(args, name)
    RunLock(run_dir).probe()
    check_resumable(cfg, job.topology.world_size)
    # The job always starts with --resume; the config it reads must not also say overwrite.
    paths = render(dataclasses.replace(cfg, resume=False, overwrite=False), job.topology, run_dir)
    command_line = shlex.join(["python", "-m", "distributed_tune", "submit", *argv])
    script = run_dir / SCRIPT
    atomic_write_text(script, render_script(job, paths, run_dir, Path.cwd(), sys.executable, command_line))
    for path in [*paths.values(), script]:
        print(f"wrote {path}")
    if note:
        print(note)
    if args.dry_run:
        print(f"dry run: submit with `sbatch {script}`")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError(f"sbatch not found on PATH: run this on a SLURM login node, or use --dry-run "
                          f"and submit {script} from one")
    if cfg.overwrite:
        removed = checkpoint.clear_results(run_dir)
        print(f"--overwrite: removed {len(removed)} result(s) of the previous run in {run_dir}")
    print(f"sbatch {script}", flush=True)
    return subprocess.call(["sbatch", str(script)])
