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
from distributed_tune.commands.common import add_config_arguments, add_job_arguments, job_from_args, load, render_target
from distributed_tune.errors import ConfigError
from distributed_tune.files import RunLock, atomic_write_text
from distributed_tune.launcher import check_resumable, render
from distributed_tune.slurm import SCRIPT, render_script


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
    check_resumable(cfg)
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
