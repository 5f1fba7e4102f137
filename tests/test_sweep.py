"""Sweeps: the summary arithmetic on a scripted list; a real grid x seeds sweep whose runs go in turn,
then as a SLURM array (sbatch/srun/scontrol are the project's shims, which really run the rendered
scripts here); reruns that must be refused.

    pytest tests/test_sweep.py -x -q
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
from conftest import REPO, evals, run_cli, subprocess_env
from test_evaluate import make_decisive_model

from distributed_tune.cli import main
from distributed_tune.summary import result_from_records, stats, summarize
from distributed_tune.tasks import get_task

SHIMS = REPO / "tests" / "shims"
COLA = get_task("cola")


def dev(step: int, mcc: float, collapsed: bool = False, split: str = "dev") -> dict:
    return {"split": split, "optimizer_step": step, "mcc": mcc, "accuracy": 0.7, "collapsed": collapsed}


@pytest.mark.fast
def test_summary_arithmetic_on_a_scripted_list() -> None:
    train = {"optimizer_step": 10, "loss": 0.6, "lr": 1e-5}
    done = {"event": "finished"}
    scripted = {
        1: [train, dev(10, 0.30), dev(20, 0.50), dev(30, 0.50), done],  # tie: the earlier step is the best
        2: [dev(10, 0.40), done],
        3: [dev(10, 0.0, collapsed=True), dev(20, 0.0, collapsed=True), done],  # never left one class
        4: [dev(10, 0.20), dev(30, 0.60), dev(30, 0.9, split="in_domain_dev"), dev(40, 0.55), done],
        5: [dev(10, 0.99, split="in_domain_dev"), dev(10, 0.45), {"event": "first_step", "startup_s": 3.0}, done],
        6: [dev(10, 0.95)],  # still running (or killed): its "final" is not final, and it is not counted
    }
    results = [result_from_records(records, COLA, f"seed {s}") for s, records in scripted.items()]
    assert [(r.label, r.best_value, r.best_step, r.best_collapsed, r.final_value, r.final_step, r.status)
            for r in results] == [
        ("seed 1", 0.50, 20, False, 0.50, 30, "done"), ("seed 2", 0.40, 10, False, 0.40, 10, "done"),
        ("seed 3", 0.0, 10, True, 0.0, 20, "done"), ("seed 4", 0.60, 30, False, 0.55, 40, "done"),
        ("seed 5", 0.45, 10, False, 0.45, 10, "done"), ("seed 6", 0.95, 10, False, 0.95, 10, "incomplete")]
    assert results[3].splits_at_best == {"dev": 0.6, "in_domain_dev": 0.9} and results[0].evaluations == 3
    assert results[2].first_non_collapsed_step is None and results[0].first_non_collapsed_step == 10
    s = summarize(results)
    # Selected, by hand: 0.5 0.4 0 0.6 0.45; mean 1.95/5 = 0.39; squared deviations .0121 .0001 .1521
    # .0441 .0036, sum .212; sample variance .212/4 = .053; median 0.45.
    assert s["selected"]["mean"] == pytest.approx(0.39, abs=1e-12)
    assert s["selected"]["std"] == pytest.approx(math.sqrt(0.053), abs=1e-12)
    assert (s["selected"]["median"], s["selected"]["min"], s["selected"]["max"]) == (0.45, 0.0, 0.6)
    # Final: 0.5 0.4 0 0.55 0.45 -> median 0.45, mean 0.38.
    assert s["final"]["mean"] == pytest.approx(0.38, abs=1e-12) and s["final"]["median"] == 0.45
    assert (s["runs"], s["scored"], s["collapsed_selected"], s["collapsed_final"]) == (6, 5, 1, 1)
    assert s["unscored"] == ["seed 6"]
    assert stats([0.3]) == {"n": 1, "mean": 0.3, "std": None, "median": 0.3, "min": 0.3, "max": 0.3}
    # Selection on a held-out slice: the reported value is dev at the held-out best step.
    held = result_from_records([dev(10, 0.2, split="heldout"), dev(10, 0.31), dev(20, 0.5, split="heldout"),
                                dev(20, 0.28), dev(30, 0.4, split="heldout"), dev(30, 0.35), done], COLA, "h")
    assert (held.selection_split, held.best_value, held.best_step, held.selected_dev, held.final_value) == (
        "heldout", 0.5, 20, 0.28, 0.35)


def test_early_stopping_report_replays_both_rules(tmp_path: Path) -> None:
    """benchmarks/early_stopping_report.py on a scripted run: one class for 4 evaluations, then it
    learns. At patience 3 the old rule (counted from the first evaluation) stops in the one-class
    start and keeps MCC 0; the package's rule waits for two classes, then stops after 3 evaluations
    without a better value."""
    import subprocess
    import sys

    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"early_stopping_patience": 3}}))
    mccs = [0.0, 0.0, 0.0, 0.0, 0.10, 0.30, 0.25, 0.28, 0.29]
    records = [dev(50 * (i + 1), m, collapsed=i < 4) for i, m in enumerate(mccs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records, {"event": "finished", "outcome": "early_stop"}]))
    proc = subprocess.run([sys.executable, "benchmarks/early_stopping_report.py", str(run), "--strip", str(tmp_path)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr  # the replay matches the logged end
    lines = proc.stdout.splitlines()
    assert lines[2] == ("| run | 4 (50..200) | 3 | stops at 200: 0.0000 | stops at 450: 0.3000 | "
                        "0.3000, 0.2900 @ 450 |"), proc.stdout
    assert lines[-1] == ("1 finished runs, 1 began predicting one class; the model kept has dev MCC 0 (one class) "
                         "in 1 under the old rule, in 0 under this rule.")


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


@pytest.fixture(scope="module")
def model(tiny_model: Path, cola_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_decisive_model(tiny_model, tmp_path_factory.mktemp("sweep") / "decisive", cola_raw)


def sweep_args(model: Path, cola_dir: Path, cache_dir: Path, sweep_dir: Path) -> list[str]:
    return [f"model.name={model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=6",
            "train.eval_every=2", "train.log_every=1", "train.global_batch_size=16", f"output_dir={sweep_dir}"]


def test_grid_sweep_in_turn_then_as_an_array(model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    overrides = sweep_args(model, cola_dir, cache_dir, sweep_dir)
    grid = ["--grid", "train.lr=1e-4,3e-3"]
    proc = run_cli(["sweep", "--seeds", "1", *grid, *overrides])  # seed 42 (the config's), sequentially
    runs = {lr: sweep_dir / f"train.lr={lr}" / "seed_42" for lr in ("1e-4", "3e-3")}
    for lr, run in runs.items():
        cfg = (run / "config.yaml").read_text()
        assert f"lr: {float(lr)}\n" in cfg and "seed: 42\n" in cfg
    payload = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert set(payload["settings"]) == {"train.lr=1e-4", "train.lr=3e-3"} and payload["metric"] == "dev mcc"
    finals = {}
    for lr, run in runs.items():
        dev_evals = [r for r in evals(run) if r["split"] == "dev"]
        assert [r["optimizer_step"] for r in dev_evals] == [2, 4, 6]
        best = max(dev_evals, key=lambda r: (r["mcc"], -r["optimizer_step"]))
        entry = payload["settings"][f"train.lr={lr}"]
        (r,) = entry["runs"]
        assert (r["best_value"], r["best_step"], r["final_value"], r["final_step"]) == (
            best["mcc"], best["optimizer_step"], dev_evals[-1]["mcc"], 6)
        finals[lr] = dev_evals[-1]["mcc"]
        assert entry["summary"]["final"]["median"] == finals[lr]
    assert payload["winner"] == f"train.lr={max(finals, key=finals.get)}"
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "| setting | runs | selected: mean ± std (median, min..max) | final:" in md
    assert f"winner (median of the final value): {payload['winner']}" in " ".join(proc.stdout.split())

    # Then 2 seeds as a SLURM array: seed 42 has finished in both settings, so the array holds the
    # two seed-43 runs (tasks 1 and 3 of [lr1 s42, lr1 s43, lr2 s42, lr2 s43]).
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "sbatch").write_text(ARRAY_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = subprocess_env(PATH=os.pathsep.join([str(bin_dir), str(SHIMS), os.environ["PATH"]]),
                         SHIMS=str(SHIMS), SHIM_STATE_DIR=str(state))
    proc = run_cli(["sweep", "--seeds", "2", *grid, "--slurm", "--partition", "debug", "--time", "0:10:00",
                    "--gpus-per-node", "0", *overrides], env=env, check=False)
    assert proc.returncode == 2 and "holds another sweep (seeds: [42] before, [42, 43] now)" in proc.stderr
    seeds_again = ["sweep", "--seeds", "2", *grid, "--slurm", "--partition", "debug", "--time", "0:10:00",
                   "--gpus-per-node", "0", "--overwrite", *overrides]
    # --overwrite starts it over: only the sweep's own run folders go.
    (sweep_dir / "notes.txt").write_text("mine")
    proc = run_cli(seeds_again, env=env)
    assert (sweep_dir / "notes.txt").read_text() == "mine"
    assert "Submitted batch job 2000" in proc.stdout and "Submitted batch job 2003" in proc.stdout
    array = (sweep_dir / "sweep.sbatch").read_text().splitlines()
    for line in ("#SBATCH --array=0-3", "#SBATCH --partition=debug", "#SBATCH --time=0:10:00", "#SBATCH --nodes=1",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue"):
        assert line in array
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in array)  # a CPU partition
    for lr in ("1e-4", "3e-3"):
        for seed in (42, 43):
            assert (sweep_dir / f"train.lr={lr}" / f"seed_{seed}" / "model" / "config.json").is_file()
    assert main(["sweep", "--summarize", str(sweep_dir)]) == 0
    payload = json.loads((sweep_dir / "sweep_summary.json").read_text())
    for entry in payload["settings"].values():
        finals = [r["final_value"] for r in entry["runs"]]
        assert len(finals) == 2 and entry["summary"]["final"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert entry["summary"]["final"]["std"] == pytest.approx(statistics.stdev(finals))

    # Everything finished: a second submission has nothing to do.
    proc = run_cli(["sweep", "--seeds", "2", *grid, "--slurm", "--gpus-per-node", "0", *overrides], env=env)
    assert "every run has finished: nothing to submit" in proc.stdout


def test_a_rerun_with_other_settings_is_refused(model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "s"
    overrides = sweep_args(model, cola_dir, cache_dir, sweep_dir)
    run_cli(["sweep", "--seeds", "1", *overrides, "train.lr=3e-3"])
    summary = (sweep_dir / "sweep_summary.json").read_bytes()
    proc = run_cli(["sweep", "--seeds", "1", *overrides, "train.lr=1e-5"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {sweep_dir} holds another sweep (overrides: train.lr=3e-3 before, train.lr=1e-5 now); use another "
        "output_dir, or --overwrite to start it over")
    assert (sweep_dir / "sweep_summary.json").read_bytes() == summary
    assert "lr: 0.003" in (sweep_dir / "seed_42" / "config.yaml").read_text()
    # A run folder that does not hold what the sweep asks for is never passed off as its result.
    (sweep_dir / "sweep.json").unlink()
    proc = run_cli(["sweep", "--seeds", "1", *overrides, "train.lr=1e-5"], check=False)
    assert proc.returncode == 2 and (f"{sweep_dir / 'seed_42'} was trained with other settings (train.lr: 0.003 in "
                                     "the run, 1e-05 now)") in proc.stderr


def test_sweep_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["sweep", "--seeds", "0"]) == 2
    assert "--seeds must be given and at least 1" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "seed=7"]) == 2
    assert "use --first-seed" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "--grid", "train.lr=1e-5,x"]) == 2
    assert "train.lr must be float, got 'x'" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "3", "--grid", "seed=1,2"]) == 2
    assert "the sweep sets seed itself" in capsys.readouterr().err
    assert main(["sweep", "--summarize", str(tmp_path)]) == 2
    assert "no sweep.json; is this a sweep directory?" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    args = ["sweep", "--seeds", "3", "--slurm", "--gpus", "4", f"output_dir={tmp_path / 's'}",
            "train.micro_batch_size=16"]
    assert main(args) == 2
    assert "train.global_batch_size=32 is not a multiple of" in capsys.readouterr().err
    args[-1] = "train.max_micro_batch_size=8"
    assert main([*args, "--overwrite"]) == 2
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
        assert "# 1 node(s) x 4 process(es) (4 GPU(s) per node)" in (run / "job.sbatch").read_text()
        assert "num_processes: 4\n" in (run / "accelerate.yaml").read_text()


def test_a_stop_signal_to_the_sweep_stops_it_after_the_run_saved(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    """`kill PID` of a sweep (SIGTERM to the sweep alone, as a scheduler or a user sends it): the run
    in progress gets it too, saves at its next step; the sweep then stops instead of starting the
    next seed, and the same command resumes it."""
    import signal
    import subprocess
    import sys
    import time

    sweep_dir = tmp_path / "s"
    # micro-batches of 2: ~65 optimizer steps/s, so the run is still training when the signal comes
    cmd = [sys.executable, "-m", "distributed_tune", "sweep", "--seeds", "2", f"model.name={tiny_model}",
           f"data.source={cola_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=600", "train.eval_every=0",
           "train.log_every=1", "train.global_batch_size=16", "train.micro_batch_size=2", f"output_dir={sweep_dir}"]
    log = tmp_path / "sweep.log"
    with log.open("w") as sink:  # a file, not a pipe that nobody reads while the run trains
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
    metrics = sweep_dir / "seed_42" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.is_file() or metrics.read_text().count('"loss"') < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert json.loads((sweep_dir / "seed_42" / "STOPPED").read_text())["signal"] == "SIGTERM"
    assert "[sweep] SIGTERM during seed 42: it saved and stopped (exit 0); the next runs were not started; rerun " \
           "the same command to resume" in out, out[-3000:]
    assert not (sweep_dir / "seed_43").exists()
    stopped_at = json.loads((sweep_dir / "seed_42" / "STOPPED").read_text())["optimizer_step"]
    assert 3 <= stopped_at < 600

    rerun = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {sweep_dir}/seed_42/checkpoints/step_{stopped_at:08d}" in " ".join(rerun.stderr.split())
    for seed in (42, 43):
        steps = [r["optimizer_step"] for r in evals(sweep_dir / f"seed_{seed}") if r["split"] == "dev"]
        assert steps[-1] == 600, (seed, steps)


def test_two_identical_sweeps_at_once_the_second_is_refused_and_the_first_finishes(
        tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Both used to exit 1 though every seed finished: each found the other's run locked."""
    import subprocess
    import sys
    import time

    sweep_dir = tmp_path / "s"
    cmd = [sys.executable, "-m", "distributed_tune", "sweep", "--seeds", "2", f"model.name={tiny_model}",
           f"data.source={cola_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=4", "train.eval_every=0",
           "train.global_batch_size=16", f"output_dir={sweep_dir}"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (sweep_dir / "sweep.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().startswith(f"error: output_dir={sweep_dir} is in use by a running sweep (host ")
    assert second.stderr.strip().endswith("wait for it to end (rerun the same command then: finished runs are "
                                          "skipped), stop it, or choose another output_dir")
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2, again.stdout
