"""SLURM: render a batch script for a run, submit it, and requeue it when it is preempted.

    python -m distributed_tune submit --config configs/cola_bert_base_zero2.yaml --nodes 2 --gpus-per-node 8 \\
        --time 02:00:00 --partition gpu [--account A] [--dry-run] train.micro_batch_size=2
    sbatch runs/<run>/job.sbatch          # submit the rendered script again (it always resumes)

Writes into the run directory (``output_dir``) the launcher files (config.yaml, accelerate.yaml,
ds_config.json; see launcher.py) and ``job.sbatch``, then calls ``sbatch`` (not with --dry-run).

The script's shape (ANCHORS.md, "SLURM conventions"):
  * one launcher per node: ``--ntasks-per-node=1`` and ``srun``, which starts
    ``accelerate launch`` (torchrun underneath) once per node; no pdsh, no ssh;
  * the rendezvous host is the first node of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``,
    the port is derived from the job id (two jobs sharing a node do not collide);
  * the node rank is ``$SLURM_NODEID``, inside single quotes so that each node's own shell
    expands it (expanded by the batch shell, every node would believe it is rank 0);
  * preemption: ``--signal=B:USR1@90`` sends USR1 to the batch shell 90 s before the time limit;
    its trap passes the signal to the job step (srun forwards it to every process of the step).
    The launcher processes ignore USR1 (``trap "" USR1`` is inherited through exec), the training
    processes catch it, agree at the next optimizer step, save a checkpoint, rank 0 runs
    ``scontrol requeue $SLURM_JOB_ID`` and all exit 0. SIGTERM (scancel, preemption) stops and
    saves the same way but does not requeue (see requeue_job). ``--requeue`` makes the job requeueable,
    ``--open-mode=append`` keeps the earlier attempts' logs, and ``--resume`` is always passed:
    a requeued job continues from the newest complete checkpoint (a first start finds none and
    starts fresh);
  * ``srun --kill-on-bad-exit=1``: a node whose training fails ends the whole step at once.

One node renders the same without the rendezvous lines; a world of one process without DeepSpeed
renders ``srun python -m distributed_tune`` (the fallback). Imports no torch.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from distributed_tune import checkpoint
from distributed_tune.errors import ConfigError

SCRIPT = "job.sbatch"
# SLURM's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
TIME_FORMAT = re.compile(r"^(\d+-\d+(:\d\d){0,2}|\d+(:\d\d){0,2})$")
# The rendezvous port is 15000 + job id mod 15000: below Linux's ephemeral range (32768+).
PORT_BASE = 15000


@dataclass(frozen=True)
class Job:
    """What the `#SBATCH` header asks for."""

    nodes: int = 1
    gpus_per_node: int = 1
    time: str | None = None  # SLURM time limit; None: the partition's default
    partition: str | None = None
    account: str | None = None
    job_name: str = "distributed_tune"
    cpus_per_task: int | None = None  # CPUs for the one task of each node (all its processes)
    signal_lead_s: int = 90  # USR1 this long before the time limit: time to finish a step and save
    extra: tuple[str, ...] = field(default_factory=tuple)  # more `#SBATCH --<x>` lines, e.g. qos=high

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def sbatch_directives(job: Job, workdir: Path, output: str, error: str | None = None,
                      array: str | None = None) -> list[str]:
    """The #SBATCH lines of a job (a run's script, or a sweep's array): resources, logs, and the
    USR1 warning before the time limit plus --requeue that preemption handling relies on."""
    lines = [f"--job-name={job.job_name}"] + ([f"--array={array}"] if array else [])
    lines += [f"--{key}={value}" for key, value in
              (("partition", job.partition), ("account", job.account), ("time", job.time)) if value]
    lines += [f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={job.gpus_per_node}"]
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    lines += [f"--chdir={workdir.resolve()}", f"--output={output}"] + ([f"--error={error}"] if error else [])
    lines += ["--open-mode=append", f"--signal=B:USR1@{job.signal_lead_s}", "--requeue", *(f"--{x}" for x in job.extra)]
    return [f"#SBATCH {line}" for line in lines]


def render_script(job: Job, paths: dict[str, Path], run_dir: Path, workdir: Path, python: str,
                  command_line: str) -> str:
    """The batch script text. `paths` are launcher.render's files; every path is made absolute."""
    run_dir = run_dir.resolve()
    header = [
        "#!/bin/bash",
        f"# {command_line}",
        f"# Rendered by distributed_tune; submit it again with: sbatch {run_dir / SCRIPT}",
        f"# {job.nodes} node(s) x {job.gpus_per_node} GPU(s) = {job.world_size} training process(es); "
        "a requeued job resumes from the newest complete checkpoint.",
        *sbatch_directives(job, workdir, output=f"{run_dir}/slurm-%j.out", error=f"{run_dir}/slurm-%j.err"),
    ]

    hello = 'echo "[job.sbatch] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST'
    body = [
        "",
        "set -eu",
        f"export DT_PYTHON={_q(python)}",
        f"export DT_TRAIN_CONFIG={_q(paths['config'].resolve())}",
    ]
    train = '-m distributed_tune --config "$DT_TRAIN_CONFIG" --resume'
    if job.world_size == 1 and "deepspeed" not in paths:
        # One process: no launcher in between; srun passes USR1 straight to the training process.
        body.append(hello + '"')
        step = f'srun --kill-on-bad-exit=1 "$DT_PYTHON" {train}'
    else:
        body += [
            f"export DT_ACCELERATE_CONFIG={_q(paths['accelerate'].resolve())}",
            f"export DT_MAIN_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_BASE} ))",
        ]
        launch = [
            "trap \"\" USR1",
            'exec "$DT_PYTHON" -m accelerate.commands.launch --config_file "$DT_ACCELERATE_CONFIG" \\',
            f"  --num_machines {job.nodes} --num_processes {job.world_size} "
            '--main_process_port "$DT_MAIN_PORT" \\',
        ]
        if job.nodes > 1:
            body += [
                'DT_MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                "export DT_MAIN_IP",
                hello + '; rendezvous $DT_MAIN_IP:$DT_MAIN_PORT"',
            ]
            launch.append('  --machine_rank "$SLURM_NODEID" --main_process_ip "$DT_MAIN_IP" \\')
        else:
            body.append(hello + '"')
        launch.append(f"  {train}")
        why = [
            "# One launcher per node. The single quotes matter: $SLURM_NODEID and the other variables are",
            "# expanded by each node's own shell (expanded here, every node would be rank 0).",
        ] if job.nodes > 1 else ["# One launcher (accelerate launch -> torchrun) on the node."]
        why += [
            "# trap \"\" USR1: the launcher processes ignore the warning signal (inherited through exec);",
            "# the training processes catch it and stop cleanly.",
        ]
        step = "\n".join([*why, "srun --kill-on-bad-exit=1 bash -c '" + "\n".join(launch) + "'"])
    body += [
        "",
        "# SLURM signals this shell (B:USR1); bash runs a trap only between commands, hence srun in the",
        "# background and wait. srun forwards the signal to every process of the job step.",
        'step=""',
        "trap 'kill -USR1 \"$step\" 2>/dev/null || true' USR1",
        "trap 'kill -TERM \"$step\" 2>/dev/null || true' TERM",
        f"{step} &",
        "step=$!",
        "status=0",
        'wait "$step" || status=$?',
        'while kill -0 "$step" 2>/dev/null; do  # wait returned early for a signal: the step still runs',
        '  status=0; wait "$step" || status=$?',
        "done",
        'echo "[job.sbatch] job step exited with status $status"',
        'exit "$status"',
    ]
    return "\n".join(header + body) + "\n"


def check_header(args: argparse.Namespace) -> None:
    """Values that become `#SBATCH` lines: a space or a line break would change the script."""
    if args.time is not None and not TIME_FORMAT.match(args.time):
        raise ConfigError(
            f"--time={args.time!r} is not a SLURM time limit; use minutes, HH:MM:SS or D-HH:MM:SS (e.g. 02:00:00)"
        )
    for option in ("partition", "account", "job_name"):
        value = getattr(args, option)
        if value is not None and (not value or re.search(r"\s", value)):
            raise ConfigError(f"--{option.replace('_', '-')}={value!r} must be one word without spaces")
    for value in args.sbatch_option:
        if not value or "\n" in value or value.startswith("-"):
            raise ConfigError(f"--sbatch-option {value!r}: give one sbatch option without its dashes, e.g. qos=high")


def requeue_job(signum: int | None, log: Callable[[str], None]) -> bool:
    """Rank 0, after the stop-signal checkpoint: put this SLURM job back in the queue.

    Only for USR1 (the `--signal` warning before the time limit; None: another rank got the
    signal). SIGTERM is also what `scancel` sends: requeueing then would bring a cancelled job
    back, and a preempted job is requeued by SLURM itself (PreemptMode=REQUEUE). Outside a SLURM
    job (no SLURM_JOB_ID) there is nothing to requeue. A failure is reported, not raised: the
    checkpoint is complete, and `sbatch job.sbatch` resumes from it.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if signum == signal.SIGTERM:
        log(f"SLURM job {job_id} got SIGTERM (scancel or preemption): not requeued; "
            "`sbatch job.sbatch` resumes it from the checkpoint")
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"could not requeue SLURM job {job_id} ({e}); submit job.sbatch again to resume")
        return False
    if proc.returncode != 0:
        log(f"scontrol requeue {job_id} failed ({proc.stderr.strip() or proc.returncode}); "
            "submit job.sbatch again to resume")
        return False
    log(f"requeued SLURM job {job_id}: it resumes from the checkpoint when it starts again")
    return True


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m distributed_tune submit",
        description="Render <output_dir>/job.sbatch (+ accelerate/DeepSpeed files) and submit it with sbatch.",
        epilog="Overrides: any config key as key=value. The script always passes --resume, so a requeued "
        "(or resubmitted) job continues from the newest complete checkpoint.",
    )
    ap.add_argument("--config", help="training YAML")
    ap.add_argument("--nodes", type=int, default=1, help="machines; one launcher (srun task) per machine")
    ap.add_argument("--gpus-per-node", type=int, default=1, help="GPUs = training processes per machine")
    ap.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM:SS, minutes); default: the partition's")
    ap.add_argument("--partition", help="SLURM partition")
    ap.add_argument("--account", help="SLURM account to charge")
    ap.add_argument("--job-name", help="default: dt-<run directory name>")
    ap.add_argument("--cpus-per-task", type=int, help="CPUs per node for the launcher and all its processes")
    ap.add_argument("--signal-lead", type=int, default=90, metavar="SECONDS",
                    help="USR1 this long before the time limit: time to reach the next stop check and save (default 90)")
    ap.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                    help="extra #SBATCH line, repeatable: --sbatch-option qos=high --sbatch-option exclusive")
    ap.add_argument("--dry-run", action="store_true", help="write the files, do not call sbatch")
    ap.add_argument("--resume", action="store_true", help="submit into a run directory that holds a run")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete the previous results in output_dir now (not with --dry-run), then submit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def cmd_submit(argv: list[str]) -> int:
    from distributed_tune.cli import load_from_args
    from distributed_tune.launcher import Topology, check_resumable, render

    args = _parser().parse_intermixed_args(argv)
    for name in ("nodes", "gpus_per_node", "signal_lead"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    check_header(args)
    cfg = load_from_args(args)
    run_dir = checkpoint.refuse_used_run_dir(cfg)
    topo = Topology(nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    check_resumable(cfg, topo.world_size)
    job = Job(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
        account=args.account, job_name=args.job_name or f"dt-{run_dir.resolve().name}",
        cpus_per_task=args.cpus_per_task, signal_lead_s=args.signal_lead, extra=tuple(args.sbatch_option),
    )
    # The job always starts with --resume; the config it reads must not also say overwrite.
    paths = render(replace(cfg, resume=False, overwrite=False), topo, run_dir)
    command_line = shlex.join(["python", "-m", "distributed_tune", "submit", *argv])
    text = render_script(job, paths, run_dir, Path.cwd(), sys.executable, command_line)
    script = run_dir / SCRIPT
    tmp = script.with_suffix(".sbatch.tmp")
    tmp.write_text(text)
    tmp.replace(script)
    for path in [*paths.values(), script]:
        print(f"wrote {path}")
    if args.dry_run:
        print(f"dry run: submit with `sbatch {script}`")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError(f"sbatch not found on PATH: run this on a SLURM login node, or use --dry-run "
                          f"and submit {script} from one")
    if cfg.overwrite:
        checkpoint.clear_results(run_dir)
        print(f"--overwrite: removed the previous results in {run_dir}")
    print(f"sbatch {script}", flush=True)
    return subprocess.call(["sbatch", str(script)])
