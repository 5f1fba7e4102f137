"""One config over several seeds and a grid of settings: run them one after another, or as one SLURM
job array; then a summary per setting.

    python -m distributed_tune sweep --config configs/cola_bert_base.yaml --seeds 5
    python -m distributed_tune sweep --config C --seeds 3 --grid train.lr=2e-5,5e-5,1e-4 [--grid KEY=...]
    python -m distributed_tune sweep --config C --seeds 3 --grid ... --slurm --gpus 8 --partition gpu --time 2:00:00
    python -m distributed_tune sweep --summarize runs/cola_bert_base          # table only

The sweep directory is the config's `output_dir`. Without --grid, seed s runs in
`<output_dir>/seed_<s>`; with it, in `<output_dir>/<key>=<value>[,...]/seed_<s>` for every
combination of the grid's values. Seeds are `--first-seed` (default: the config's) and the next
ones. Finished runs are skipped and unfinished ones resumed: rerunning the command completes a
sweep. `sweep.json` records what the sweep is; a rerun with other settings is refused (a finished
run is only reused when its own config.yaml is the one this sweep asks for). SIGTERM, SIGUSR1 or
Ctrl-C to the sweep: the current run saves at its next step, and the sweep stops there.

The summary (`sweep_summary.json` / `.md`, printed; `--summarize DIR` recomputes it at any time)
gives, per setting, the selected (best evaluation) and the final value of the task's main metric
(CoLA: dev MCC) over seeds: mean ± sample std, median, min/max and collapsed runs. The selected
value is chosen on the data it is reported on (optimistic); the winning setting is chosen by the
median of an honest value: the final one, or, with data.heldout_fraction, the dev value at the
step selected on the held-out slice of train. A setting whose every run collapsed is no candidate,
and a tie names no winner: the summary then says `no winner:` and why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from distributed_tune import checkpoint
from distributed_tune.config import load_config
from distributed_tune.errors import ConfigError, RunDirError
from distributed_tune.files import RunLock, atomic_write_json, atomic_write_text, make_dirs, remove
from distributed_tune.sweeps import (
    RESERVED,
    SBATCH,
    SWEEP_JSON,
    SWEEP_LOCK,
    Sweep,
    check_run_matches,
    check_same_sweep,
    parse_grid,
    write_summary,
)

# --------------------------------------------------------------------------- running


def run_command(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> list[str]:
    """The command that trains one run: plain `python -m distributed_tune`, or `launch --gpus N`."""
    from distributed_tune.distributed import free_port

    cmd = [sys.executable, "-m", "distributed_tune"]
    if args.gpus:
        # A free port per run: another sweep may be launching on this machine too.
        cmd += ["launch", "--gpus", str(args.gpus), "--port", str(free_port())]
    if args.config:
        cmd += ["--config", args.config]
    cmd += overrides
    if any((run_dir / n).exists() for n in ("metrics.jsonl", "checkpoints")):
        cmd.append("--resume")  # an interrupted run continues from its newest checkpoint
    return cmd


def run_one(cmd: list[str]) -> tuple[int, int | None]:
    """Run one training process to its end: (exit code, the stop signal this sweep got, if any).

    A stop signal to the sweep stops the sweep after the current run has saved: SIGTERM and SIGUSR1
    are passed on to the run (which saves at its next step and exits 0); Ctrl-C reaches the run
    from the terminal itself (the same process group), so it is not sent twice. The sweep never
    kills a run that is saving."""
    stops: list[int] = []
    proc = subprocess.Popen(cmd)

    def on_signal(signum: int, _frame: Any) -> None:
        if signum != signal.SIGINT and proc.poll() is None:
            proc.send_signal(signum)
        stops.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, (stops[0] if stops else None)


def parser() -> argparse.ArgumentParser:
    from distributed_tune.commands.common import add_job_arguments

    ap = argparse.ArgumentParser(prog="python -m distributed_tune sweep", description=__doc__.split("\n\n")[0],
                                 epilog="Overrides: any config key as key=value (not seed: see --first-seed).")
    ap.add_argument("--config", help="training YAML (defaults if omitted)")
    ap.add_argument("--seeds", type=int, help="how many seeds per setting")
    ap.add_argument("--first-seed", type=int, help="first seed (default: the config's seed)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2",
                    help="values to sweep for a config key, repeatable (the product of all grids runs)")
    ap.add_argument("--gpus", type=int, default=0, help="processes per run via `launch` (0: one plain process)")
    ap.add_argument("--overwrite", action="store_true", help="start the sweep over: delete its runs first")
    ap.add_argument("--summarize", metavar="SWEEP_DIR", help="only print and write the summary of SWEEP_DIR")
    slurm = ap.add_argument_group("SLURM job array")
    slurm.add_argument("--slurm", action="store_true",
                       help="write a job.sbatch per run and the array <output_dir>/sweep.sbatch; sbatch it")
    slurm.add_argument("--dry-run", action="store_true", help="with --slurm: write the scripts, do not submit")
    add_job_arguments(slurm)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.summarize:
        sweep_dir = Path(args.summarize)
        if not sweep_dir.is_dir():
            raise RunDirError(f"--summarize {sweep_dir}: no such directory")
        write_summary(sweep_dir)
        return 0
    if args.seeds is None or args.seeds < 1:
        raise ConfigError(f"--seeds must be given and at least 1 (got {args.seeds})")
    if args.gpus < 0:
        raise ConfigError(f"--gpus={args.gpus} must be 0 (one plain process) or more")
    for item in args.overrides:
        if item.split("=", 1)[0] in RESERVED[:1] + RESERVED[2:]:
            raise ConfigError(f"override '{item}': the sweep sets seed, resume and overwrite per run; "
                              "use --first-seed / --overwrite instead")
    cfg = load_config(args.config, args.overrides)  # validated once here, before any run starts
    grid = parse_grid(args.grid)
    first = cfg.seed if args.first_seed is None else args.first_seed
    sha = hashlib.sha256(Path(args.config).read_bytes()).hexdigest() if args.config else None
    sweep = Sweep(args.config, sha, tuple(args.overrides), grid, tuple(range(first, first + args.seeds)))
    sweep_dir = Path(cfg.output_dir)
    # One sweep per folder at a time: a second one started alongside would find each run locked
    # by the first and report every seed failed. It is refused at once, in one line.
    lock = RunLock(sweep_dir, SWEEP_LOCK)
    if not args.dry_run:
        make_dirs(sweep_dir)
        try:
            lock.acquire()
        except RunDirError:
            raise RunDirError(f"output_dir={sweep_dir} is in use by a running sweep ({lock.holder()}); wait for it "
                              "to end (rerun the same command then: finished runs are skipped), stop it, or choose "
                              "another output_dir") from None
    try:
        return sweep_locked(args, argv, cfg, sweep, sweep_dir)
    finally:
        lock.release()


def sweep_locked(args: argparse.Namespace, argv: list[str], cfg: Any, sweep: Sweep, sweep_dir: Path) -> int:
    if args.overwrite and sweep_dir.is_dir() and not args.dry_run:
        runs = [run_dir for _, _, run_dir in Sweep.from_json(json.loads((sweep_dir / SWEEP_JSON).read_text())).runs(
            sweep_dir)] if (sweep_dir / SWEEP_JSON).is_file() else []
        remove(sweep_dir, [r for r in runs if r.is_dir() and checkpoint.looks_like_a_run(r)], "sweep --overwrite")
    else:
        check_same_sweep(sweep_dir, sweep)
    plans = []
    for setting, seed, run_dir in sweep.runs(sweep_dir):
        overrides = sweep.run_overrides(sweep_dir, setting, seed)
        expected = load_config(args.config, overrides)
        check_run_matches(run_dir, expected)
        plans.append((setting, seed, run_dir, overrides, expected))
    make_dirs(sweep_dir)
    atomic_write_json(sweep_dir / SWEEP_JSON, sweep.to_json())
    print(f"[sweep] {len(sweep.settings())} setting(s) x {len(sweep.seeds)} seed(s) = {len(plans)} runs in {sweep_dir}")
    if args.slurm:
        return submit_array(args, sweep_dir, plans, argv)
    from distributed_tune import signals

    failed = []
    for setting, seed, run_dir, overrides, _ in plans:
        what = f"{setting.name + ' ' if setting.overrides else ''}seed {seed}"
        if signals.requested() is not None:  # a stop signal between two runs
            write_summary(sweep_dir)
            print(f"[sweep] {signal.Signals(signals.requested()).name}: stopped before {what}; rerun the same command "
                  "to resume", file=sys.stderr, flush=True)
            return 0
        if checkpoint.run_finished(run_dir):
            print(f"[sweep] {what}: already finished in {run_dir}; skipped", flush=True)
            continue
        cmd = run_command(args, overrides, run_dir)
        print(f"[sweep] {what}: {shlex.join(cmd)}", flush=True)
        code, stopped_by = run_one(cmd)
        if stopped_by is not None:
            write_summary(sweep_dir)
            print(f"[sweep] {signal.Signals(stopped_by).name} during {what}: it saved and stopped (exit {code}); "
                  "the next runs were not started; rerun the same command to resume", file=sys.stderr, flush=True)
            return 130 if stopped_by == signal.SIGINT else (0 if code == 0 else 1)
        if code != 0:
            failed.append(what)
    write_summary(sweep_dir)
    if failed:
        print(f"[sweep] {', '.join(failed)} failed; their logs are above; rerun the same command to resume them",
              file=sys.stderr)
        return 1
    return 0


def submit_array(args: argparse.Namespace, sweep_dir: Path, plans: list[Any], argv: list[str]) -> int:
    """Each unfinished run's folder gets the launcher files and its own job.sbatch (slurm.py:
    preemption -> checkpoint -> requeue of that array task only, always --resume); sweep.sbatch is
    the array over them."""
    import dataclasses

    from distributed_tune.commands.common import job_from_args
    from distributed_tune.launcher import check_resumable, render
    from distributed_tune.slurm import SCRIPT, render_array, render_script

    if args.gpus and args.gpus != args.gpus_per_node and args.gpus_per_node == 1:
        args.gpus_per_node = args.gpus  # --gpus N: N GPUs (processes) per node
    job = job_from_args(args, f"dt-sweep-{sweep_dir.resolve().name}")
    command_line = shlex.join(["python", "-m", "distributed_tune", "sweep", *argv])
    run_dirs, indices = [], []
    for i, (setting, seed, run_dir, _, cfg) in enumerate(plans):
        run_dirs.append(run_dir)
        if checkpoint.run_finished(run_dir):
            print(f"[sweep] {setting.name} seed {seed}: already finished in {run_dir}; not in the array")
            continue
        check_resumable(dataclasses.replace(cfg, resume=True))
        paths = render(dataclasses.replace(cfg, resume=False, overwrite=False), job.topology, run_dir)
        atomic_write_text(run_dir / SCRIPT, render_script(job, paths, run_dir, Path.cwd(), sys.executable, command_line))
        indices.append(i)
    array = sweep_dir / SBATCH
    if not indices:
        array.unlink(missing_ok=True)
        print("[sweep] every run has finished: nothing to submit")
        return 0
    atomic_write_text(array, render_array(job, sweep_dir, run_dirs, indices, command_line, Path.cwd()))
    print(f"wrote {array}")
    if args.dry_run:
        print(f"dry run: submit with `sbatch {array}`")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(f"sbatch not found on PATH; submit {array} on a SLURM login node, or pass --dry-run")
    proc = subprocess.run([sbatch, str(array)], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {array} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    print(f"when the array is done: python -m distributed_tune sweep --summarize {sweep_dir}")
    return 0
