"""One config, several seeds: run them one after another, or as a SLURM job array; then a summary.

    python -m distributed_tune sweep --config configs/cola_bert_base.yaml --seeds 5             # sequential
    python -m distributed_tune sweep --config ... --seeds 5 --gpus 4                            # each via `launch`
    python -m distributed_tune sweep --config ... --seeds 5 --slurm --gpus 8 --partition gpu --time 2:00:00 [--dry-run]
    python -m distributed_tune sweep --summarize runs/cola_bert_base                            # table only

The sweep directory is the config's `output_dir`; seed s runs in `<output_dir>/seed_<s>`, with
seeds `--first-seed` (default: the config's seed) and the next ones. Seeds that already finished
are skipped, unfinished ones resumed: rerunning the command completes a sweep.

With --slurm nothing runs here: each unfinished seed's folder gets the launcher files and its own
`job.sbatch` (the script of `python -m distributed_tune submit`: one launcher per node, USR1
before the time limit -> checkpoint -> requeue, always --resume), and `<output_dir>/sweep.sbatch`,
a job array `--array=0-(N-1)` whose task i runs seed i's script, is submitted with sbatch.

The summary (`sweep_summary.json` / `.md`, printed; `--summarize DIR` recomputes it at any time):
each seed's best dev MCC (and its optimizer step), mean ± std (sample std), median, and how many
seeds collapsed (their best evaluation predicted a single class).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distributed_tune.distributed import free_port
from distributed_tune.errors import ConfigError, RunDirError

SUMMARY_JSON, SUMMARY_MD, SWEEP_JSON, SBATCH = "sweep_summary.json", "sweep_summary.md", "sweep.json", "sweep.sbatch"
DEV = "dev"  # the combined dev split; data.DEV, repeated so that this module imports no numpy/torch


# --------------------------------------------------------------------------- summary (pure)


@dataclass(frozen=True)
class SeedResult:
    seed: int
    status: str  # done | incomplete | missing
    best_mcc: float | None = None
    best_step: int | None = None
    in_domain_mcc: float | None = None  # at the best step
    out_of_domain_mcc: float | None = None
    collapsed: bool | None = None  # the best evaluation predicted a single class
    evaluations: int = 0


def seed_result(seed: int, records: list[dict[str, Any]] | None, finished: bool) -> SeedResult:
    """The best dev evaluation among a run's metrics records (the earliest step on ties)."""
    if records is None:
        return SeedResult(seed, "missing")
    dev = [r for r in records if r.get("split") == DEV and r.get("mcc") is not None]
    status = "done" if finished else "incomplete"
    if not dev:
        return SeedResult(seed, status)
    best = max(dev, key=lambda r: (r["mcc"], -r["optimizer_step"]))
    at_step = {r.get("split"): r for r in records if r.get("optimizer_step") == best["optimizer_step"] and "mcc" in r}
    return SeedResult(
        seed, status, best_mcc=float(best["mcc"]), best_step=int(best["optimizer_step"]),
        in_domain_mcc=at_step.get("in_domain_dev", {}).get("mcc"),
        out_of_domain_mcc=at_step.get("out_of_domain_dev", {}).get("mcc"),
        collapsed=bool(best.get("collapsed", False)), evaluations=len(dev),
    )


def summarize(results: list[SeedResult]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), median, min and max of the seeds' best dev MCC; collapsed count.

    Seeds without any evaluation are listed, not counted.
    """
    scored = [r for r in results if r.best_mcc is not None]
    mccs = [r.best_mcc for r in scored]
    return {
        "seeds": len(results),
        "scored": len(scored),
        "mean": statistics.fmean(mccs) if mccs else None,
        "std": statistics.stdev(mccs) if len(mccs) > 1 else None,
        "median": statistics.median(mccs) if mccs else None,
        "min": min(mccs) if mccs else None,
        "max": max(mccs) if mccs else None,
        "collapsed": sum(bool(r.collapsed) for r in scored),
        "unscored_seeds": [r.seed for r in results if r.best_mcc is None],
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_markdown(results: list[SeedResult], summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "| seed | best dev MCC | at step | in-domain MCC | out-of-domain MCC | collapsed "
             "| evaluations | status |", "| ---: | ---: | ---: | ---: | ---: | :---: | ---: | --- |"]
    for r in results:
        collapsed = "-" if r.collapsed is None else ("**yes**" if r.collapsed else "no")
        lines.append(f"| {r.seed} | {_fmt(r.best_mcc)} | {r.best_step if r.best_step is not None else '-'} | "
                     f"{_fmt(r.in_domain_mcc)} | {_fmt(r.out_of_domain_mcc)} | {collapsed} | {r.evaluations} | "
                     f"{r.status} |")
    lines += ["", summary_line(summary), ""]
    return "\n".join(lines)


def summary_line(s: dict[str, Any]) -> str:
    if not s["scored"]:
        return f"no seed has a dev evaluation yet ({s['seeds']} seeds)"
    std = "n/a (1 seed)" if s["std"] is None else _fmt(s["std"])
    return (f"best dev MCC over {s['scored']} of {s['seeds']} seeds: mean {_fmt(s['mean'])} ± {std} (sample std), "
            f"median {_fmt(s['median'])}, min {_fmt(s['min'])}, max {_fmt(s['max'])}; "
            f"collapsed: {s['collapsed']} of {s['scored']}")


# --------------------------------------------------------------------------- sweep directory


def seed_dir(sweep_dir: Path, seed: int) -> Path:
    return sweep_dir / f"seed_{seed}"


def run_finished(run_dir: Path) -> bool:
    """Training ended (not preempted, not still running): the loop's last record says so."""
    return any(r.get("event") == "finished" for r in _records(run_dir) or [])


def _records(run_dir: Path) -> list[dict[str, Any]] | None:
    """The run's metrics.jsonl records (a line cut short by a killed run is skipped), or None."""
    from distributed_tune.metrics import read_metrics  # numpy: imported only when a run is read

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else None


def sweep_seeds(sweep_dir: Path) -> list[int]:
    """The sweep's seeds: from sweep.json, else from the seed_<s> folders."""
    meta = sweep_dir / SWEEP_JSON
    if meta.is_file():
        return list(json.loads(meta.read_text())["seeds"])
    seeds = sorted(int(p.name[5:]) for p in sweep_dir.glob("seed_*") if p.is_dir() and p.name[5:].lstrip("-").isdigit())
    if not seeds:
        raise RunDirError(f"{sweep_dir}: no {SWEEP_JSON} and no seed_<s> folders; is this a sweep directory?")
    return seeds


def collect(sweep_dir: Path, seeds: list[int]) -> list[SeedResult]:
    return [seed_result(s, _records(seed_dir(sweep_dir, s)), run_finished(seed_dir(sweep_dir, s))) for s in seeds]


def write_summary(sweep_dir: Path, seeds: list[int], echo: bool = True) -> dict[str, Any]:
    """Recompute the summary from the seed folders; write the .json and .md (atomically)."""
    results = collect(sweep_dir, seeds)
    summary = summarize(results)
    payload = {"sweep_dir": str(sweep_dir), "seeds": [asdict(r) for r in results], "summary": summary}
    for name, text in ((SUMMARY_JSON, json.dumps(payload, indent=1) + "\n"),
                       (SUMMARY_MD, summary_markdown(results, summary, f"Seed sweep: {sweep_dir}"))):
        tmp = sweep_dir / f".{name}.tmp{os.getpid()}"  # two `--summarize` may run at the same time
        tmp.write_text(text)
        tmp.replace(sweep_dir / name)
    if echo:
        print_summary(results, summary, sweep_dir)
    return payload


def print_summary(results: list[SeedResult], summary: dict[str, Any], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"seed sweep {sweep_dir}")
    for col in ("seed", "best dev MCC", "step", "in-domain", "out-of-domain", "collapsed", "evals", "status"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        collapsed = "-" if r.collapsed is None else ("YES" if r.collapsed else "no")
        table.add_row(str(r.seed), _fmt(r.best_mcc), "-" if r.best_step is None else str(r.best_step),
                      _fmt(r.in_domain_mcc), _fmt(r.out_of_domain_mcc), collapsed, str(r.evaluations), r.status)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(summary_line(summary))
    console.print(f"wrote {sweep_dir / SUMMARY_JSON} and {sweep_dir / SUMMARY_MD}")


# --------------------------------------------------------------------------- running


def seed_command(args: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    """The command that trains one seed: plain `python -m distributed_tune`, or `launch --gpus N`."""
    cmd = [sys.executable, "-m", "distributed_tune"]
    if args.gpus:
        # A free port per run: another sweep may be launching on this machine too.
        cmd += ["launch", "--gpus", str(args.gpus), "--port", str(free_port())]
    if args.config:
        cmd += ["--config", args.config]
    # The sweep's own output_dir override is replaced by the seed's folder.
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    cmd += [*overrides, f"seed={seed}", f"output_dir={run_dir}"]
    if args.overwrite and run_dir.exists():
        cmd.append("--overwrite")
    elif not run_finished(run_dir) and any((run_dir / n).exists() for n in ("metrics.jsonl", "checkpoints")):
        cmd.append("--resume")  # an interrupted seed continues from its newest checkpoint
    return cmd


def run_seed(args: argparse.Namespace, sweep_dir: Path, seed: int) -> int:
    run_dir = seed_dir(sweep_dir, seed)
    if run_finished(run_dir) and not args.overwrite:
        print(f"[sweep] seed {seed}: already finished in {run_dir}; skipped (--overwrite reruns it)", flush=True)
        return 0
    cmd = seed_command(args, seed, run_dir)
    print(f"[sweep] seed {seed}: {shlex.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def array_spec(indices: list[int]) -> str:
    """SLURM's --array value: '0-4' for a contiguous list, else '1,3'."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))


def render_array(job: Any, sweep_dir: Path, seeds: list[int], indices: list[int], command_line: str) -> str:
    """The job array: task i execs seed_<seeds[i]>/job.sbatch, the seed's own batch script.

    `exec` keeps the batch shell's PID, so SLURM's `--signal=B:USR1` reaches that script's trap
    (checkpoint, requeue) exactly as for a single `submit`ted run.
    """
    from distributed_tune.slurm import sbatch_directives

    sweep_dir = sweep_dir.resolve()
    header = [
        "#!/bin/bash",
        f"# {command_line}",
        "# Seed sweep as a SLURM job array: task i trains seed SEEDS[i] with seed_<seed>/job.sbatch.",
        "# To resubmit, run the sweep command again: it leaves finished seeds out of the array.",
        *sbatch_directives(job, Path.cwd(), output=f"{sweep_dir}/slurm-%A_%a.out", array=array_spec(indices)),
    ]
    body = [
        "",
        "set -eu",
        f"SEEDS=({' '.join(map(str, seeds))})",
        'SEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}',
        'echo "[sweep.sbatch] array task $SLURM_ARRAY_TASK_ID: seed $SEED"',
        f'exec bash {shlex.quote(str(sweep_dir))}/seed_"$SEED"/job.sbatch',
        "",
    ]
    return "\n".join(header + body)


def render_slurm(args: argparse.Namespace, sweep_dir: Path, seeds: list[int], argv: list[str]) -> Path:
    """Each unfinished seed's run directory gets the launcher files and its own job.sbatch
    (slurm.py: one launcher per node, preemption -> checkpoint -> requeue, always --resume);
    sweep.sbatch is the array over them."""
    from dataclasses import replace

    from distributed_tune.config import load_config
    from distributed_tune.launcher import Topology, check_resumable, render
    from distributed_tune.slurm import SCRIPT, Job, check_header, render_script

    # The same checks as `submit`: values that become #SBATCH lines.
    check_header(argparse.Namespace(time=args.time, partition=args.partition, account=args.account, job_name=None,
                                    sbatch_option=args.sbatch_option))
    job = Job(nodes=args.nodes, gpus_per_node=max(args.gpus, 1), time=args.time, partition=args.partition,
              account=args.account, job_name=f"dt-sweep-{sweep_dir.resolve().name}", cpus_per_task=args.cpus_per_task,
              extra=tuple(args.sbatch_option))
    topo = Topology(nodes=job.nodes, gpus_per_node=job.gpus_per_node)
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    command_line = shlex.join(["python", "-m", "distributed_tune", "sweep", *argv])
    indices = []
    for i, seed in enumerate(seeds):
        run_dir = seed_dir(sweep_dir, seed)
        if run_finished(run_dir) and not args.overwrite:
            print(f"[sweep] seed {seed}: already finished in {run_dir}; not in the array (--overwrite reruns it)")
            continue
        if args.overwrite and run_dir.exists() and not args.dry_run:  # a dry run deletes nothing
            shutil.rmtree(run_dir)
        cfg = load_config(args.config, [*overrides, f"seed={seed}", f"output_dir={run_dir}"])
        check_resumable(replace(cfg, resume=True), topo.world_size)
        paths = render(cfg, topo, run_dir)
        script = run_dir / SCRIPT
        script.write_text(render_script(job, paths, run_dir, Path.cwd(), sys.executable, command_line))
        indices.append(i)
    array = sweep_dir / SBATCH
    if not indices:
        array.unlink(missing_ok=True)
        return array
    array.write_text(render_array(job, sweep_dir, seeds, indices, command_line))
    return array


def submit(script: Path, dry_run: bool) -> int:
    if not script.is_file():
        print("[sweep] every seed has finished: nothing to submit")
        return 0
    print(f"wrote {script}")
    if dry_run:
        print(f"dry run: submit with `sbatch {script}`")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(f"sbatch not found on PATH; submit {script} on a SLURM login node, or pass --dry-run")
    proc = subprocess.run([sbatch, str(script)], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    print(f"when the array is done: python -m distributed_tune sweep --summarize {script.parent}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune sweep", description=__doc__.split("\n\n")[0],
                                 epilog="Overrides: any config key as key=value (not seed: see --first-seed).")
    ap.add_argument("--config", help="training YAML (defaults if omitted)")
    ap.add_argument("--seeds", type=int, help="how many seeds")
    ap.add_argument("--first-seed", type=int, help="first seed (default: the config's seed)")
    ap.add_argument("--gpus", type=int, default=0, help="processes per run via `launch` (0: one plain process)")
    ap.add_argument("--overwrite", action="store_true", help="rerun seeds that already finished")
    ap.add_argument("--summarize", metavar="SWEEP_DIR", help="only print and write the summary of SWEEP_DIR")
    slurm = ap.add_argument_group("SLURM job array")
    slurm.add_argument("--slurm", action="store_true",
                       help="write seed_<s>/job.sbatch per seed and the array <output_dir>/sweep.sbatch; sbatch it")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per seed (--gpus per node)")
    slurm.add_argument("--dry-run", action="store_true", help="with --slurm: write the script, do not submit")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="per task, e.g. 2:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                       help="extra #SBATCH line, repeatable: --sbatch-option qos=high")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def cmd_sweep(argv: list[str]) -> int:
    from distributed_tune.config import load_config

    args = parser().parse_intermixed_args(argv)
    if args.summarize:
        sweep_dir = Path(args.summarize)
        if not sweep_dir.is_dir():
            raise RunDirError(f"--summarize {sweep_dir}: no such directory")
        write_summary(sweep_dir, sweep_seeds(sweep_dir))
        return 0
    if args.seeds is None or args.seeds < 1:
        raise ConfigError(f"--seeds must be given and at least 1 (got {args.seeds})")
    if args.gpus < 0 or args.nodes < 1:
        raise ConfigError(f"--gpus={args.gpus} must be 0 (one plain process) or more, --nodes={args.nodes} at least 1")
    for item in args.overrides:
        if item.split("=", 1)[0] in ("seed", "resume", "overwrite"):
            raise ConfigError(f"override '{item}': the sweep sets seed, resume and overwrite per run; "
                              "use --first-seed / --overwrite instead")
    cfg = load_config(args.config, args.overrides)  # validated once here, before any run starts
    first = cfg.seed if args.first_seed is None else args.first_seed
    seeds = list(range(first, first + args.seeds))
    sweep_dir = Path(cfg.output_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "gpus": args.gpus}
    (sweep_dir / SWEEP_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    if args.slurm:
        return submit(render_slurm(args, sweep_dir, seeds, argv), args.dry_run)
    if args.nodes != 1:
        raise ConfigError("--nodes > 1 needs --slurm (one launcher per node); without it, runs start on this machine")
    failed = [s for s in seeds if run_seed(args, sweep_dir, s) != 0]
    write_summary(sweep_dir, seeds)
    if failed:
        print(f"[sweep] seeds {failed} failed; their logs are above; rerun the same command to resume them",
              file=sys.stderr)
        return 1
    return 0
