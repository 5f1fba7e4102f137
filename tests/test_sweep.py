"""Seed sweeps: the summary arithmetic on a scripted list, and a real 2-seed sweep whose first seed
runs sequentially and whose second runs as a SLURM array task (sbatch/srun/scontrol are the
project's shims, which really run the rendered scripts here).

    pytest tests/test_sweep.py -x -q
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
from conftest import COLA_DIR, REPO, evals, run_cli, subprocess_env
from test_evaluate import make_decisive_model

from distributed_tune.cli import main
from distributed_tune.sweep import SeedResult, seed_result, summarize

SHIMS = REPO / "tests" / "shims"


def dev(step: int, mcc: float, collapsed: bool = False) -> dict:
    return {"split": "dev", "optimizer_step": step, "mcc": mcc, "accuracy": 0.7, "collapsed": collapsed}


def test_summary_arithmetic_on_a_scripted_list() -> None:
    train = {"optimizer_step": 10, "loss": 0.6, "lr": 1e-5}
    scripted = {
        1: [train, dev(10, 0.30), dev(20, 0.50), dev(30, 0.50)],  # tie: the earlier step is the best
        2: [dev(10, 0.40)],
        3: [dev(10, 0.0, collapsed=True), dev(20, 0.0, collapsed=True)],  # never left one class
        4: [dev(10, 0.20), dev(30, 0.60), {"split": "in_domain_dev", "optimizer_step": 30, "mcc": 0.9}],
        5: [{"split": "in_domain_dev", "optimizer_step": 10, "mcc": 0.99}, dev(10, 0.45),
            {"event": "first_step", "startup_s": 3.0}],
        6: None,  # never started
    }
    results = [seed_result(s, records, finished=s != 5) for s, records in scripted.items()]
    assert [(r.seed, r.best_mcc, r.best_step, r.collapsed, r.status) for r in results] == [
        (1, 0.50, 20, False, "done"), (2, 0.40, 10, False, "done"), (3, 0.0, 10, True, "done"),
        (4, 0.60, 30, False, "done"), (5, 0.45, 10, False, "incomplete"), (6, None, None, None, "missing"),
    ]
    assert results[3].in_domain_mcc == 0.9 and results[0].evaluations == 3
    s = summarize(results)
    # By hand: values 0.5 0.4 0 0.6 0.45; mean 1.95/5 = 0.39; squared deviations
    # .0121 .0001 .1521 .0441 .0036 sum .212; sample variance .212/4 = .053; median 0.45.
    assert s["mean"] == pytest.approx(0.39, abs=1e-12)
    assert s["std"] == pytest.approx(math.sqrt(0.053), abs=1e-12) == pytest.approx(0.2302172887, abs=1e-9)
    assert s["median"] == 0.45 and (s["min"], s["max"]) == (0.0, 0.6)
    assert (s["seeds"], s["scored"], s["collapsed"], s["unscored_seeds"]) == (6, 5, 1, [6])
    one = summarize([SeedResult(7, "done", best_mcc=0.3, best_step=5, collapsed=False)])
    assert (one["mean"], one["std"], one["median"]) == (0.3, None, 0.3)  # no std from a single seed


# sbatch for a job array, on top of the project's SLURM shims (tests/shims: sbatch runs a batch
# script here, srun runs its step, scontrol answers): each array task runs now, one after another.
ARRAY_SBATCH = """#!/bin/bash
set -eu
script="${@: -1}"
spec=$(sed -n 's/^#SBATCH --array=//p' "$script")
IFS=, read -ra parts <<< "$spec"
for part in "${parts[@]}"; do
  for ((i=${part%-*}; i<=${part#*-}; i++)); do
    SLURM_ARRAY_JOB_ID=1001 SLURM_ARRAY_TASK_ID=$i SHIM_JOB_ID=$((2000 + i)) "$SHIMS/sbatch" "$script"
  done
done
"""


def test_sweep_runs_seeds_in_turn_and_as_a_slurm_array(tiny_model: Path, cache_dir: Path, tmp_path: Path,
                                                       capsys) -> None:
    model = make_decisive_model(tiny_model, tmp_path / "decisive")
    sweep_dir = tmp_path / "sweep"
    overrides = [f"model.name={model}", f"data.source={COLA_DIR}", f"data.cache_dir={cache_dir}",
                 "train.max_steps=6", "train.eval_every=2", "train.log_every=1", "train.global_batch_size=16",
                 "train.micro_batch_size=8", "train.lr=1e-4", f"output_dir={sweep_dir}"]

    proc = run_cli(["sweep", "--seeds", "1", *overrides])  # seed 42 (the config's seed), sequentially
    assert "best dev MCC over 1 of 1 seeds" in " ".join(proc.stdout.split())

    # Then 2 seeds as a SLURM array: seed 42 has finished, so the array holds task 1 (seed 43) only.
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "sbatch").write_text(ARRAY_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = subprocess_env(PATH=os.pathsep.join([str(bin_dir), str(SHIMS), os.environ["PATH"]]),
                         SHIMS=str(SHIMS), SHIM_STATE_DIR=str(state))
    proc = run_cli(["sweep", "--seeds", "2", "--slurm", "--partition", "debug", "--time", "0:10:00", *overrides],
                   env=env)
    assert "seed 42: already finished" in proc.stdout and "Submitted batch job 2001" in proc.stdout
    array = (sweep_dir / "sweep.sbatch").read_text().splitlines()
    for line in ("#SBATCH --array=1", "#SBATCH --partition=debug", "#SBATCH --time=0:10:00", "#SBATCH --nodes=1",
                 "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "SEEDS=(42 43)",
                 f"exec bash {sweep_dir.resolve()}/seed_\"$SEED\"/job.sbatch"):
        assert line in array
    assert not (sweep_dir / "seed_42" / "job.sbatch").exists()
    seed_script = (sweep_dir / "seed_43" / "job.sbatch").read_text()  # slurm.py's script for one run
    assert "srun --kill-on-bad-exit=1" in seed_script and "--resume" in seed_script
    assert "array task 1: seed 43" in (sweep_dir / "slurm-%A_%a.out").read_text()  # the shim does not expand %A
    assert (sweep_dir / "seed_43" / "model" / "config.json").is_file()

    assert main(["sweep", "--summarize", str(sweep_dir)]) == 0
    payload = json.loads((sweep_dir / "sweep_summary.json").read_text())
    best = {}
    for seed in (42, 43):
        dev_evals = [r for r in evals(sweep_dir / f"seed_{seed}") if r["split"] == "dev"]
        assert [r["optimizer_step"] for r in dev_evals] == [2, 4, 6]
        best[seed] = max(dev_evals, key=lambda r: (r["mcc"], -r["optimizer_step"]))
    assert [(r["seed"], r["status"], r["best_mcc"], r["best_step"], r["collapsed"]) for r in payload["seeds"]] == [
        (s, "done", best[s]["mcc"], best[s]["optimizer_step"], best[s]["collapsed"]) for s in (42, 43)]
    mccs = [best[42]["mcc"], best[43]["mcc"]]
    s = payload["summary"]
    assert s["mean"] == pytest.approx(statistics.fmean(mccs), abs=1e-12)
    assert s["std"] == pytest.approx(statistics.stdev(mccs), abs=1e-12)
    assert s["median"] == pytest.approx(statistics.median(mccs), abs=1e-12)
    assert s["collapsed"] == sum(best[x]["collapsed"] for x in best) and s["scored"] == 2
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert f"| 43 | {best[43]['mcc']:.4f} | {best[43]['optimizer_step']} |" in md
    out = " ".join(capsys.readouterr().out.split())
    assert f"mean {s['mean']:.4f} ± {s['std']:.4f} (sample std), median {s['median']:.4f}" in out

    # Everything finished: a second submission has nothing to do.
    proc = run_cli(["sweep", "--seeds", "2", "--slurm", *overrides], env=env)
    assert "every seed has finished: nothing to submit" in proc.stdout


def test_sweep_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["sweep", "--seeds", "0"]) == 2
    assert "--seeds must be given and at least 1" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "seed=7"]) == 2
    assert "use --first-seed" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["sweep", "--summarize", str(tmp_path)]) == 2
    assert "no sweep.json and no seed_<s> folders" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    args = ["sweep", "--seeds", "3", "--slurm", "--gpus", "4", f"output_dir={tmp_path / 's'}"]
    assert main(args) == 2
    assert "train.global_batch_size=32 is not a multiple of" in capsys.readouterr().err
    args.append("train.micro_batch_size=8")
    assert main(args) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err
    assert main([*args, "--dry-run", "--time", "2h"]) == 2
    assert "--time='2h' is not a SLURM time limit" in capsys.readouterr().err
    assert main([*args, "--dry-run"]) == 0  # writes the scripts only
    script = (tmp_path / "s" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gpus-per-node=4" in script
    for seed in (42, 43, 44):
        run = tmp_path / "s" / f"seed_{seed}"
        assert {p.name for p in run.iterdir()} == {"config.yaml", "accelerate.yaml", "job.sbatch"}
        assert f"seed: {seed}\n" in (run / "config.yaml").read_text()
        assert "--num_processes 4" in (run / "job.sbatch").read_text()
