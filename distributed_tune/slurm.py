"""SLURM batch scripts for a run, and for a sweep's job array (the library side of `submit` and
`sweep --slurm`).

The script's shape (the conventions SLURM users expect, and the multi-node traps reported against
accelerate: every node rank 0, a forgotten srun, pdsh needing ssh):
  * one launcher per node: ``--ntasks-per-node=1`` and ``srun``, which starts ``accelerate launch``
    (torchrun underneath) once per node; no pdsh, no ssh;
  * the rendezvous host is the address SLURM has for the first node of ``scontrol show hostnames
    "$SLURM_JOB_NODELIST"`` (its ``NodeAddr`` in ``scontrol show node``: the node's name need not
    resolve on the other nodes); the port is derived from the job id (two jobs sharing a node do
    not collide);
  * the shape comes from the allocation at run time (``SLURM_JOB_NUM_NODES``, per node
    ``SLURM_GPUS_ON_NODE`` or the rendered number of CPU processes): a requeued or resubmitted job
    on other nodes, or on fewer or more, renders the launcher files for what it got and resumes;
  * the node rank is ``$SLURM_NODEID``, inside single quotes so that each node's own shell
    expands it (expanded by the batch shell, every node would believe it is rank 0);
  * GPUs: ``--gpus-per-node=N`` and one process per GPU, with ``--cpus-per-task`` = N x
    ``cpus_per_gpu`` (4 by default: without it, on clusters that set no CPUs-per-GPU default, every
    rank and the launcher share one core); a CPU partition has no GPU line (sbatch refuses any GPU
    request there: "Invalid generic resource"), and ``--cpus-per-task`` gives each training process
    a core;
  * preemption: ``--signal=B:USR1@LEAD`` sends USR1 to the batch shell LEAD..LEAD+30 s before the
    time limit (slurmctld checks on a ~30 s timer). The shell traps it first thing (bash's default
    is to exit) and passes it to the job step; launchers ignore it, and a ``STOP_REQUESTED`` file
    tells training processes that were still starting. They stop at the next check, save a
    checkpoint, write ``STOPPED`` into the run directory and exit 0. Only then, with the step gone
    (a requeue SIGTERMs a running step: a traceback and a FAILED-looking attempt), the batch shell
    runs ``scontrol requeue`` on its own job (an array task requeues only itself:
    ``${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}``) and exits 0. ``--requeue`` makes the job
    requeueable, ``--open-mode=append`` keeps the earlier attempts' logs, and ``--resume`` is always
    passed: a requeued job continues from the newest complete checkpoint. SIGTERM (scancel) saves
    the same way but does not requeue; the shell does not pass SIGTERM on (srun would SIGKILL the
    step).

What a real two-node cluster shows of these scripts is tests/test_slurm_cluster.py.
  * ``srun --kill-on-bad-exit=1``: a node whose training fails ends the whole step at once.

Imports no torch.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from distributed_tune.errors import ConfigError
from distributed_tune.launcher import Topology

SCRIPT = "job.sbatch"
# SLURM's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
TIME_FORMAT = re.compile(r"^(\d+-\d+(:\d\d){0,2}|\d+(:\d\d){0,2})$")
# The rendezvous port is 15000 + job id mod 15000: below Linux's ephemeral range (32768+).
PORT_BASE = 15000
# SLURM checks time limits (and sends --signal) on a ~30 s timer: the warning comes between LEAD and
# LEAD + 30 s before the limit (measured on slurm 22.05).
SIGNAL_JITTER_S = 30
# Seconds a run needs at least between the warning and the limit: reach the next stop check and save.
MIN_LEAD_S = 30
# CPUs per GPU a GPU job asks for unless told otherwise: the training process, its data loading and
# the launcher's share (SLURM's own default is one CPU per task, i.e. one for all the node's ranks).
DEFAULT_CPUS_PER_GPU = 4


@dataclass(frozen=True)
class Job:
    """A SLURM job: where its processes run (`topology`) and what the `#SBATCH` header asks for."""

    topology: Topology = field(default_factory=Topology)
    time: str | None = None  # SLURM time limit; None: the partition's default
    partition: str | None = None
    account: str | None = None
    job_name: str = "distributed_tune"
    cpus_per_task: int | None = None  # CPUs for the one task of each node (all its processes)
    cpus_per_gpu: int = DEFAULT_CPUS_PER_GPU  # without cpus_per_task: GPUs per node x this
    signal_lead_s: int = 90  # USR1 this long before the time limit: time to finish a step and save
    extra: tuple[str, ...] = ()  # more `#SBATCH --<x>` lines, e.g. qos=high

    def check(self) -> list[str]:
        """Refuse values that would change the script or cannot work; return warnings."""
        if self.time is not None and not TIME_FORMAT.match(self.time):
            raise ConfigError(f"--time={self.time!r} is not a SLURM time limit; use minutes, HH:MM:SS or "
                              "D-HH:MM:SS (e.g. 02:00:00)")
        for option in ("partition", "account", "job_name"):
            value = getattr(self, option)
            if value is not None and (not value or re.search(r"\s", value)):
                raise ConfigError(f"--{option.replace('_', '-')}={value!r} must be one word without spaces")
        for value in self.extra:
            if not value or "\n" in value or value.startswith("-"):
                raise ConfigError(f"--sbatch-option {value!r}: give one sbatch option without its dashes, "
                                  "e.g. qos=high")
        for option in ("cpus_per_task", "cpus_per_gpu"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ConfigError(f"--{option.replace('_', '-')}={value} must be at least 1")
        if self.signal_lead_s < MIN_LEAD_S:
            raise ConfigError(f"--signal-lead={self.signal_lead_s} s leaves too little time to reach a stop check "
                              f"and save a checkpoint; use at least {MIN_LEAD_S}")
        warnings = []
        if self.time is not None:
            limit = time_limit_s(self.time)
            earliest = limit - self.signal_lead_s - SIGNAL_JITTER_S
            if earliest <= 0:
                raise ConfigError(
                    f"--time={self.time} (SLURM rounds it up to {limit // 60} min) with --signal-lead="
                    f"{self.signal_lead_s} s: the warning signal can come {SIGNAL_JITTER_S} s early, i.e. at the "
                    f"start; raise --time above {math.ceil((self.signal_lead_s + SIGNAL_JITTER_S) / 60)} min "
                    "or lower --signal-lead")
            if earliest < 300:
                warnings.append(f"--time={self.time}: SLURM may send the warning (USR1) {earliest} s after the job "
                                "starts; every attempt then trains only that long before it saves and requeues")
        return warnings


def time_limit_s(value: str) -> int:
    """A --time value in seconds, rounded up to whole minutes as SLURM does."""
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
        parts = [int(p) for p in value.split(":")]
        h, m, s = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in value.split(":")]
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]  # type: ignore[assignment]
    seconds = ((days * 24 + h) * 60 + m) * 60 + s
    return math.ceil(seconds / 60) * 60


def cpus_per_task(job: Job) -> int:
    """CPUs of each node's one task: as given, else GPUs x cpus_per_gpu, else one per CPU process."""
    topo = job.topology
    if job.cpus_per_task:
        return job.cpus_per_task
    return topo.gpus_per_node * job.cpus_per_gpu if topo.gpus_per_node else topo.processes_per_node


def cpus_note(job: Job) -> str:
    """One header line saying where --cpus-per-task comes from and how to change it."""
    topo, cpus = job.topology, cpus_per_task(job)
    if job.cpus_per_task:
        why = "as given (--cpus-per-task)"
    elif topo.gpus_per_node:
        why = f"{topo.gpus_per_node} GPU(s) x {job.cpus_per_gpu} (submit --cpus-per-gpu N, or --cpus-per-task N)"
    else:
        why = "one per training process (submit --cpus-per-task N)"
    return f"CPUs: --cpus-per-task={cpus} per node, {why}."


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def sbatch_directives(job: Job, workdir: Path, output: str, error: str | None = None,
                      array: str | None = None) -> list[str]:
    """The #SBATCH lines of a job (a run's script, or a sweep's array): resources, logs, and the
    USR1 warning before the time limit plus --requeue that preemption handling relies on."""
    topo = job.topology
    lines = [f"--job-name={job.job_name}"] + ([f"--array={array}"] if array else [])
    lines += [f"--{key}={value}" for key, value in
              (("partition", job.partition), ("account", job.account), ("time", job.time)) if value]
    lines += [f"--nodes={topo.nodes}", "--ntasks-per-node=1"]
    if topo.gpus_per_node:
        lines.append(f"--gpus-per-node={topo.gpus_per_node}")
    lines.append(f"--cpus-per-task={cpus_per_task(job)}")
    lines += [f"--chdir={workdir.resolve()}", f"--output={output}"] + ([f"--error={error}"] if error else [])
    lines += ["--open-mode=append", f"--signal=B:USR1@{job.signal_lead_s}", "--requeue",
              *(f"--{x}" for x in job.extra)]
    return [f"#SBATCH {line}" for line in lines]


# The start of every batch script, before anything that takes time: bash's default for USR1 is to
# exit, and SLURM may send the warning at once (--time <= lead + 30 s).
WARNING_TRAP = """
# SLURM's warning before the time limit (--signal=B:USR1@LEAD) comes to this shell. srun forwards it
# to every process of the job step; the file tells training processes that were not listening yet
# (still starting, under a launcher that ignores USR1) to stop as well.
warned=0
step=""
on_warning() {{
  warned=1
  echo "[{name}] USR1: the training stops at its next check, saves a checkpoint, then the job requeues"
  if [ -n "${{DT_STOP_FILE:-}}" ]; then : > "$DT_STOP_FILE" || true; fi
  if [ -n "$step" ]; then kill -USR1 "$step" 2>/dev/null || true; fi
}}
trap on_warning USR1
# SIGTERM (scancel, the time limit, a requeue) reaches every process of the job from slurmd itself;
# passed on to srun it would become a SIGKILL of the training. Keep waiting for the step to save.
trap 'echo "[{name}] SIGTERM: waiting for the step to save and exit"' TERM
"""

# The end of every batch script: run the step in the background (bash runs a trap only between
# commands) and requeue only after the step has exited.
STEP_AND_REQUEUE = """
# An array task requeues only itself: for the array's last task SLURM_JOB_ID equals
# SLURM_ARRAY_JOB_ID, and requeueing that id would rerun every task of the array.
DT_JOB=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}}}
DT_JOB=${{DT_JOB:-$SLURM_JOB_ID}}
export DT_STOP_FILE="$DT_RUN_DIR/STOP_REQUESTED"
# An earlier attempt's markers must not stop or requeue this one; a warning already here must.
rm -f "$DT_RUN_DIR/STOPPED" "$DT_STOP_FILE"
if [ "$warned" -eq 1 ]; then : > "$DT_STOP_FILE"; fi
{step} &
step=$!
if [ "$warned" -eq 1 ]; then kill -USR1 "$step" 2>/dev/null || true; fi
status=0
wait "$step" || status=$?
while kill -0 "$step" 2>/dev/null; do  # wait returned early for a signal: the step still runs
  status=0; wait "$step" || status=$?
done
rm -f "$DT_STOP_FILE"
echo "[{name}] job step exited with status $status"
# Requeue only now that the step is gone (a requeue while it runs would SIGTERM it), and only if the
# run stopped for the warning with a checkpoint (STOPPED), not if it finished in the meantime.
if [ "$status" -eq 0 ] && [ "$warned" -eq 1 ] && [ -f "$DT_RUN_DIR/STOPPED" ]; then
  echo "[{name}] requeueing job $DT_JOB: it resumes from the checkpoint"
  trap '' TERM  # the requeue SIGTERMs this shell; leave with status 0 all the same
  scontrol requeue "$DT_JOB" || {{ echo "[{name}] scontrol requeue failed: sbatch {script} to resume" >&2; exit 1; }}
fi
exit "$status"
"""


# Where the allocation's first node is reachable: the address SLURM itself uses for it (NodeAddr),
# not its name, which need not resolve on the other nodes (nor anywhere: NodeAddr may be the only
# way to reach it). A node without its own NodeAddr reports its name there.
RENDEZVOUS = """
if [ "$DT_NODES" -gt 1 ]; then
  DT_MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  DT_MAIN_IP=$(scontrol show node "$DT_MAIN_NODE" 2>/dev/null | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)
  DT_MAIN_IP=${DT_MAIN_IP:-$DT_MAIN_NODE}
else
  DT_MAIN_IP=127.0.0.1
fi
export DT_MAIN_IP
"""

# The launcher files must match the allocation: rendered for another shape (a resubmission with
# other --nodes/--gpus-per-node), they are rendered again for this one before the step starts.
RERENDER = """
if ! grep -qx "num_machines: $DT_NODES" "$DT_ACCELERATE_CONFIG" || ! grep -qx "num_processes: $DT_WORLD" "$DT_ACCELERATE_CONFIG"; then
  echo "[{name}] this allocation: $DT_NODES node(s) x $DT_PER_NODE process(es); rendering the launcher files for it"
  "$DT_PYTHON" -m distributed_tune launch --nodes "$DT_NODES" --gpus "$DT_PER_NODE" --resume --dry-run \\
    --config "$DT_TRAIN_CONFIG" || exit 2
fi
"""


def render_script(job: Job, paths: dict[str, Path], run_dir: Path, workdir: Path, python: str,
                  command_line: str) -> str:
    """The batch script text. `paths` are launcher.render's files; every path is made absolute.

    The script takes its shape from the allocation it gets (SLURM_JOB_NUM_NODES, and per node
    SLURM_GPUS_ON_NODE with GPUs, else the rendered number of CPU processes; DT_PROCESSES_PER_NODE
    overrides), so that `sbatch --nodes=1 job.sbatch` of a script rendered for two nodes
    continues the run on one: the global batch stays, the accumulation follows the world size.
    """
    topo = job.topology
    run_dir = run_dir.resolve()
    gpu = "--gpus-per-node=G " if topo.gpus_per_node else ""
    header = [
        "#!/bin/bash",
        f"# {command_line}",
        f"# Rendered by distributed_tune; submit it again with: sbatch {run_dir / SCRIPT}",
        f"# {topo.describe()}; a requeued job resumes from the newest complete checkpoint.",
        f"# {cpus_note(job)}",
        f"# On whatever is free: sbatch --nodes=N {gpu}{run_dir / SCRIPT} takes its processes from the",
        "# allocation, renders the launcher files for it and resumes the run (same global batch).",
        *sbatch_directives(job, workdir, output=f"{run_dir}/slurm-%j.out", error=f"{run_dir}/slurm-%j.err"),
    ]
    per_node = (f"${{DT_PROCESSES_PER_NODE:-${{SLURM_GPUS_ON_NODE:-{topo.processes_per_node}}}}}"
                if topo.gpus_per_node else f"${{DT_PROCESSES_PER_NODE:-{topo.processes_per_node}}}")
    hello = ('echo "[job.sbatch] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: '
             '$DT_NODES node(s) x $DT_PER_NODE process(es); rendezvous $DT_MAIN_IP:$DT_MAIN_PORT"')
    body = [
        "",
        "set -eu",
        WARNING_TRAP.format(name="job.sbatch").strip("\n"),
        "",
        f"export DT_PYTHON={_q(python)}",
        f"export DT_TRAIN_CONFIG={_q(paths['config'].resolve())}",
        f"export DT_RUN_DIR={_q(run_dir)}",
        f"export DT_ACCELERATE_CONFIG={_q(paths['accelerate'].resolve())}",
        f"# This allocation's shape (rendered for {topo.nodes} x {topo.processes_per_node}; see the header).",
        f"export DT_NODES=${{SLURM_JOB_NUM_NODES:-{topo.nodes}}}",
        f"export DT_PER_NODE={per_node}",
        "export DT_WORLD=$(( DT_NODES * DT_PER_NODE ))",
        f"export DT_MAIN_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_BASE} ))",
        RENDEZVOUS.strip("\n"),
        hello,
        RERENDER.format(name="job.sbatch").strip("\n"),
    ]
    train = '-m distributed_tune --config "$DT_TRAIN_CONFIG" --resume'
    launch = ['trap "" USR1']
    why = []
    if "deepspeed" not in paths:
        why.append("# A world of one: one process, no launcher.")
        launch.append(f'if [ "$DT_WORLD" -eq 1 ]; then exec "$DT_PYTHON" {train}; fi')
    why += [
        "# One launcher per node. The single quotes matter: $SLURM_NODEID and the other variables are",
        "# expanded by each node's own shell (expanded here, every node would be rank 0).",
        '# trap "" USR1 (inherited through exec): launchers ignore the warning, and so does Python until',
        "# its handler is installed (the stop file covers that moment); the training processes stop cleanly.",
    ]
    launch += [
        'exec "$DT_PYTHON" -m accelerate.commands.launch --config_file "$DT_ACCELERATE_CONFIG" \\',
        '  --num_machines "$DT_NODES" --num_processes "$DT_WORLD" --main_process_port "$DT_MAIN_PORT" \\',
        '  --machine_rank "$SLURM_NODEID" --main_process_ip "$DT_MAIN_IP" \\',
        f"  {train}",
    ]
    # One task per node, said outright: a job requeued onto fewer nodes keeps its first
    # allocation's task count in the environment srun reads (SLURM_NTASKS), 2 tasks on 1 node.
    step = "\n".join([*why, 'srun --nodes="$DT_NODES" --ntasks="$DT_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
                             "bash -c '" + "\n".join(launch) + "'"])
    return "\n".join(header + body) + STEP_AND_REQUEUE.format(step=step, name="job.sbatch",
                                                              script=_q(run_dir / SCRIPT))


def array_spec(indices: list[int]) -> str:
    """SLURM's --array value: '0-4' for a contiguous list, else '1,3'."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))


def render_array(job: Job, sweep_dir: Path, run_dirs: list[Path], indices: list[int], command_line: str,
                 workdir: Path) -> str:
    """A job array: task i execs run_dirs[i]/job.sbatch, the run's own batch script.

    `exec` keeps the batch shell's PID, so SLURM's `--signal=B:USR1` reaches that script's trap
    (checkpoint, then requeue of this array task only) exactly as for a single `submit`ted run.
    """
    sweep_dir = sweep_dir.resolve()
    header = [
        "#!/bin/bash",
        f"# {command_line}",
        "# A sweep as a SLURM job array: task i trains RUNS[i] with its own job.sbatch.",
        "# To resubmit, run the sweep command again: it leaves finished runs out of the array.",
        *sbatch_directives(job, workdir, output=f"{sweep_dir}/slurm-%A_%a.out", array=array_spec(indices)),
    ]
    body = [
        "",
        "set -eu",
        "RUNS=(" + " ".join(_q(p.resolve()) for p in run_dirs) + ")",
        'RUN=${RUNS[$SLURM_ARRAY_TASK_ID]}',
        'echo "[sweep.sbatch] array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: $RUN"',
        'exec bash "$RUN/job.sbatch"',
        "",
    ]
    return "\n".join(header + body)
