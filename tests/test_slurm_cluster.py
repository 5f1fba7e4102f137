"""Our SLURM scripts on a real two-node cluster, through our commands and the README's.

    bash .ci/with-slurm.sh python -m pytest -q tests/test_slurm_cluster.py     # ~6 min on 2 cores
    eval "$(.ci/slurm-up.sh /tmp/dt-slurm)"; python -m pytest -q tests/test_slurm_cluster.py   # then .ci/slurm-down.sh /tmp/dt-slurm

Skipped, with the reason, when no cluster answers (SLURM_CONF unset, `sinfo` missing or failing,
no `cpu` partition with 2 CPUs; the two-node tests: no `two` partition with 2 nodes);
.ci/slurm-up.sh brings one up (slurm-wlm 22.05 + munge, two `slurmd -N` daemons on loopback:
partition `cpu` = n1, partition `two` = n1 + n2; no GPU, MinJobAge 300 s). The names n1 and n2
resolve nowhere: a two-node job that rendezvoused at a node *name* would not start. Every job trains the tiny BERT on the test's CoLA files; job states
come from `scontrol show job -o` (no accounting here, so no sacct). Facts the tests rely on,
measured on slurm 22.05:

* `scancel --signal=USR1 --batch JOB` reaches the batch shell the way `--signal=B:USR1@LEAD` does,
  ~0.05 s later: the tests preempt with it instead of waiting for a time limit (except one);
* a requeued job waits until EligibleTime = requeue + 121 s (Reason=BeginTime). `scontrol update
  JobId=J StartTime=now` releases it, but not within the second of the requeue (the relaunch is
  then refused and the job FAILED for good): the tests wait 2 s first;
* the warning comes LEAD..LEAD+30 s before the limit (slurmctld's ~30 s timer), so at the first
  timer pass when --time <= LEAD + 30 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from shims.harness import final_dev, losses_by_step, read_jsonl, side_by_side, write_job_config

PARTITION = "cpu"
STEPS = 300  # a 2-process job trains them in ~4 s, after a ~15 s start; dev MCC ~0.54 (not collapsed)
JOB_TIMEOUT_S = 240  # a busy 2-core machine: each process start takes 10-20 s
# Lines that must never appear in the logs of a clean preemption.
CRASH_MARKS = ("Traceback", "SignalException", "FAILED", "Killed", "forcing job termination", "error:")


def cluster_problem() -> str | None:
    """Why the tests cannot run here, or None when a cluster with a usable `cpu` partition answers."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return "SLURM_CONF is not set (bash .ci/with-slurm.sh CMD brings a one-node cluster up)"
    if not Path(conf).is_file():
        return f"SLURM_CONF={conf} is not a file"
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (apt-get install slurm-wlm munge; .ci/slurm-up.sh)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%a %c"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    fields = proc.stdout.split()
    if len(fields) < 2 or fields[0] != "up" or int(fields[1].rstrip("+")) < 2:
        return f"no partition '{PARTITION}' that is up with 2 CPUs (sinfo: {proc.stdout.strip()!r})"
    return None


PROBLEM = cluster_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"no SLURM cluster: {PROBLEM}")


# --------------------------------------------------------------------------- job states


def scontrol_job(job: str) -> dict[str, str] | None:
    """`scontrol show job -o JOB` as a dict; None once the record is gone (purged, or unknown)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return None
    assert len(lines) == 1, f"{job}: one record expected, got {len(lines)}"
    return dict(field.split("=", 1) for field in lines[0].split() if "=" in field)


def label(record: dict[str, str]) -> str:
    reason = f"({record['Reason']})" if record["Reason"] != "None" else ""
    return f"{record['JobState']}{reason} Restarts={record['Restarts']}"


class Watch:
    """Polls one job (or array task, `A_i`) and keeps the sequence of distinct states it went through."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.seen: list[str] = []
        self.record: dict[str, str] = {}

    def poll(self) -> dict[str, str]:
        record = scontrol_job(self.job)
        assert record is not None, f"job {self.job} vanished; states so far: {self.seen}"
        if not self.seen or self.seen[-1] != label(record):
            self.seen.append(label(record))
        self.record = record
        return record

    def until(self, done: Callable[[dict[str, str]], bool], what: str, timeout: float = JOB_TIMEOUT_S,
              every: float = 0.1) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while not done(self.poll()):
            assert time.monotonic() < deadline, f"job {self.job}: not {what} after {timeout} s; states {self.seen}"
            time.sleep(every)
        return self.record

    def until_state(self, *states: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        return self.until(lambda r: r["JobState"] in states, "/".join(states), timeout)

    def release_after_requeue(self) -> dict[str, str]:
        """Wait for the requeue's hold (PENDING, Reason=BeginTime), then end it as an operator would."""
        held = self.until(lambda r: r["JobState"] == "PENDING" and r["Reason"] == "BeginTime", "held after a requeue")
        time.sleep(2)  # a release within the requeue's second makes the relaunch fail
        subprocess.run(["scontrol", "update", f"JobId={self.job}", "StartTime=now"], check=True, timeout=30)
        return held


def finished(record: dict[str, str]) -> bool:
    return record["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}") and '"loss"' in line
               and '"split"' not in line and '"event"' not in line)


def wait_for_steps(run_dir: Path, watch: Watch, steps: int, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while logged_steps(run_dir) < steps:
        assert watch.poll()["JobState"] in ("PENDING", "RUNNING"), f"job ended before step {steps}: {watch.seen}"
        assert time.monotonic() < deadline, f"no training progress in {run_dir} after {timeout} s"
        time.sleep(0.05)


def usr1(job: str) -> None:
    """SLURM's warning, now: the same path as --signal=B:USR1 (the batch shell only)."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)


def stopped_at(log: str, signal_name: str = "SIGUSR1") -> list[int]:
    return [int(k) for k in re.findall(rf"stop signal \d+ \({signal_name}\): checkpoint saved at optimizer step (\d+)",
                                       " ".join(log.split()))]


def assert_clean(*logs: str) -> None:
    for log in logs:
        for mark in CRASH_MARKS:
            assert mark not in log, f"{mark!r} in the job's log:\n{log[-3000:]}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture()
def say(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print to the terminal even under pytest's capture: the state sequences belong in CI's log.
    Under pytest-xdist a worker's terminal is not shown: the text travels with the test's report
    and conftest's pytest_runtest_logreport prints it in the main process."""
    def _say(text: str) -> None:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            request.node.user_properties.append(("ci_log", text))
        else:
            with capsys.disabled():
                print(text, flush=True)
    return _say


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest, say: Callable[[str], None]) -> Iterator[None]:
    start = time.monotonic()
    yield
    say(f"\n[slurm cluster] {request.node.name}: {time.monotonic() - start:.0f} s")


@pytest.fixture()
def jobs() -> Iterator[list[str]]:
    """Job ids a test submits: cancelled at its end, so that a failed test leaves the node free."""
    submitted: list[str] = []
    yield submitted
    for job in submitted:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def job_config(workdir: Path, tiny_model: Path, cache_dir: Path, cola_dir: Path) -> Path:
    """The jobs' training config: STEPS optimizer steps, a checkpoint every 100, one evaluation at the end."""
    return write_job_config(workdir / "job.yaml", tiny_model, cache_dir, cola_dir, max_steps=STEPS,
                            checkpoint_every=100)


def job_env(**extra: str) -> dict[str, str]:
    # sbatch passes the submitting environment on to the job (--export=ALL): offline, one thread.
    return subprocess_env(DT_PYTHON=sys.executable, **extra)


def sbatch(cmd: list[str], cwd: Path, jobs: list[str]) -> str:
    """Run a submitting command (ours or sbatch); the job id it printed."""
    proc = subprocess.run(cmd, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    found = re.findall(r"Submitted batch job (\d+)", proc.stdout)
    assert len(found) == 1, proc.stdout
    jobs.append(found[0])
    return found[0]


def submit(args: list[str], cwd: Path, jobs: list[str]) -> str:
    return sbatch([sys.executable, "-m", "distributed_tune", "submit", *args], cwd, jobs)


CPU_2 = ["--gpus-per-node", "0", "--processes-per-node", "2", "--partition", PARTITION, "--time", "10"]


@pytest.fixture(scope="module")
def reference(workdir: Path, job_config: Path) -> dict:
    """An uninterrupted 2-process CPU job, submitted as the README says; other tests compare with it."""
    jobs: list[str] = []
    start = time.monotonic()
    try:
        job = submit(["--config", str(job_config), *CPU_2, "output_dir=runs/reference"], workdir, jobs)
        watch = Watch(job)
        record = watch.until(finished, "finished")
    finally:
        for j in jobs:
            subprocess.run(["scancel", j], capture_output=True, timeout=30)
    run_dir = workdir / "runs" / "reference"
    return {"job": job, "run_dir": run_dir, "record": record, "seen": watch.seen, "seconds": time.monotonic() - start}


# --------------------------------------------------------------------------- the tests


def test_submit_on_a_cpu_partition_trains_two_processes(reference: dict, say: Callable[[str], None]) -> None:
    """(a) `submit --gpus-per-node 0 --processes-per-node 2`: no GPU line, 2 CPUs, 2 processes, COMPLETED."""
    job, run_dir, record = reference["job"], reference["run_dir"], reference["record"]
    err = (run_dir / f"slurm-{job}.err").read_text()
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "0", "0:0"), \
        f"{label(record)} ExitCode={record['ExitCode']}\n{err[-4000:]}"
    # One task with the node's 2 CPUs for the launcher and its 2 training processes; no GPU asked for.
    assert (record["NumCPUs"], record["NumTasks"], record["CPUs/Task"]) == ("2", "1", "2")
    assert "gpu" not in record.get("TresPerNode", "") and "gpu" not in record["TRES"]
    directives = [line for line in (run_dir / "job.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --cpus-per-task=2" in directives and not any("--gpus" in d for d in directives)
    losses = losses_by_step(run_dir)
    assert list(losses) == list(range(1, STEPS + 1))
    dev = final_dev(run_dir)
    assert (dev["n"], dev["world_size"], dev["optimizer_step"]) == (1043, 2, STEPS)
    assert [r["world_size"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "first_step"] == [2]
    assert "[job.sbatch] job step exited with status 0" in (run_dir / f"slurm-{job}.out").read_text()
    assert_clean(err)
    say(f"\n(a) job {job}: {' -> '.join(reference['seen'])}; ExitCode={record['ExitCode']}; "
        f"dev n={dev['n']} MCC {dev['mcc']:.4f}, world_size {dev['world_size']}; the job took "
        f"{reference['seconds']:.0f} s (in the module's fixture, not in this test's time)")


def test_usr1_preemption_requeues_and_resumes_exactly(reference: dict, workdir: Path, job_config: Path,
                                                      jobs: list[str], say: Callable[[str], None]) -> None:
    """(b) USR1 mid-training -> checkpoint -> the step exits 0 -> the batch shell requeues -> held ->
    released -> resumes: COMPLETED, Restarts=1, ExitCode=0:0, the uninterrupted job's losses bit for bit."""
    run_dir = workdir / "runs" / "preempted"
    job = submit(["--config", str(job_config), *CPU_2, "output_dir=runs/preempted"], workdir, jobs)
    watch = Watch(job)
    wait_for_steps(run_dir, watch, 5)
    usr1(job)
    held = watch.release_after_requeue()
    assert (held["Restarts"], held["ExitCode"], held["BatchFlag"]) == ("1", "0:0", "1")
    record = watch.until(finished, "finished")
    out, err = (run_dir / f"slurm-{job}.out").read_text(), (run_dir / f"slurm-{job}.err").read_text()
    say(f"\n(b) job {job}: {' -> '.join(watch.seen)}\n    final: " + " ".join(
        f"{k}={record[k]}" for k in ("JobState", "Reason", "Requeue", "Restarts", "BatchFlag", "ExitCode", "RunTime")))
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"), err[-4000:]
    assert not any(s.startswith("FAILED") for s in watch.seen)

    (k,) = stopped_at(err)
    assert 5 <= k < STEPS, k
    # The shell requeued after the step had exited 0: the step was never killed by the requeue.
    assert out.index("job step exited with status 0") < out.index(f"requeueing job {job}: it resumes")
    assert f"job {job} (restart 0)" in out and f"job {job} (restart 1)" in out  # --open-mode=append
    assert f"STEP {job}.0 ON" not in err and f"resumed from runs/preempted/checkpoints/step_{k:08d}" in " ".join(err.split())
    assert_clean(out, re.sub(rf"slurmstepd.*JOB {job} ON .* CANCELLED AT .* DUE TO JOB REQUEUE \*\*\*\n", "", err))
    assert not (run_dir / "STOPPED").exists() and not (run_dir / "STOP_REQUESTED").exists()

    want, got = losses_by_step(reference["run_dir"]), losses_by_step(run_dir)
    table = side_by_side(want, got, k)
    assert list(got) == list(range(1, STEPS + 1)), table
    assert got == want, table  # same world size: bitwise
    ref_dev, dev = final_dev(reference["run_dir"]), final_dev(run_dir)
    assert (dev["mcc"], dev["n"], dev["world_size"]) == (ref_dev["mcc"], 1043, 2)
    assert (run_dir / "predictions.jsonl").read_bytes() == (reference["run_dir"] / "predictions.jsonl").read_bytes()
    lines = table.splitlines()
    say("\n".join([lines[0], *lines[k - 1:k + 3]]) + f"\n    ... all {STEPS} steps equal bitwise; dev MCC {dev['mcc']!r} in both")


def test_time_limit_warning_stops_requeues_and_resumes(workdir: Path, job_config: Path, jobs: list[str],
                                                       say: Callable[[str], None]) -> None:
    """(c) A real time limit: `sbatch --time=1` on a script rendered with --signal-lead 30. 60 s <= 30 + 30,
    so SLURM's own warning comes at its first timer pass, 0-30 s after the start, maybe while the
    processes are still importing: the run must stop at its first check all the same, save,
    requeue, and resume. Such a --time is what `submit` refuses (every attempt would be warned at
    once); the resumed attempt gets 10 minutes, as an operator would give it."""
    refused = subprocess.run([sys.executable, "-m", "distributed_tune", "submit", "--config", str(job_config),
                              "--time", "1", "--signal-lead", "30", "output_dir=runs/refused"],
                             cwd=workdir, env=job_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --time=1 (SLURM rounds it up to 1 min) "
                                                                 "with --signal-lead=30 s"), refused.stderr
    run_dir = workdir / "runs" / "time_limit"
    # One process (a quicker start) on micro-batches of 2 (accumulation 8: ~65 steps/s on an idle
    # machine, 200 with the harness's micro-batch of 8): 3000 steps are ~46 s of training, still
    # under way 30 s after the start, when the warning has come at the latest.
    steps = 3000
    overrides = [f"train.max_steps={steps}", "train.epochs=6", "train.micro_batch_size=2",
                 "train.checkpoint_every=1000", "train.eval_every=100000"]
    rendered = subprocess.run([sys.executable, "-m", "distributed_tune", "submit", "--config", str(job_config),
                               "--gpus-per-node", "0", "--processes-per-node", "1", "--partition", PARTITION,
                               "--time", "10", "--signal-lead", "30", "--dry-run", "output_dir=runs/time_limit",
                               *overrides], cwd=workdir, env=job_env(), capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert "#SBATCH --signal=B:USR1@30" in (run_dir / "job.sbatch").read_text()
    job = sbatch(["sbatch", "--time=1", str(run_dir / "job.sbatch")], workdir, jobs)
    watch = Watch(job)
    started = watch.until_state("RUNNING")
    t0 = time.monotonic()
    assert started["TimeLimit"] == "00:01:00"
    held = watch.until(lambda r: r["JobState"] == "PENDING" and r["Reason"] == "BeginTime", "held after a requeue",
                       timeout=120)
    warned_after = time.monotonic() - t0
    assert (held["Restarts"], held["ExitCode"]) == ("1", "0:0")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10"], check=True, timeout=30)
    record = watch.until(finished, "finished")
    out, err = (run_dir / f"slurm-{job}.out").read_text(), (run_dir / f"slurm-{job}.err").read_text()
    say(f"\n(c) job {job} (--time=1, --signal=B:USR1@30): {' -> '.join(watch.seen)}; requeued {warned_after:.0f} s "
        f"after the start; final ExitCode={record['ExitCode']}")
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"), err[-4000:]
    # Stopped by SLURM's warning, before the limit: nobody else sent USR1, nothing was killed.
    assert out.count("USR1: the training stops at its next check") == 1
    assert warned_after < 60 and "DUE TO TIME LIMIT" not in err
    (k,) = stopped_at(err)
    assert k < steps and f"resumed from runs/time_limit/checkpoints/step_{k:08d}" in " ".join(err.split())
    assert list(losses_by_step(run_dir)) == list(range(1, steps + 1))
    assert_clean(out, re.sub(rf"slurmstepd.*JOB {job} ON .* CANCELLED AT .* DUE TO JOB REQUEUE \*\*\*\n", "", err))
    say(f"    stopped at optimizer step {k} by the warning, resumed there, finished {steps} steps")


def test_scancel_saves_without_requeue(workdir: Path, job_config: Path, jobs: list[str],
                                       say: Callable[[str], None]) -> None:
    """(d) Plain `scancel`: SIGTERM to every process; the training saves and is not requeued: CANCELLED."""
    run_dir = workdir / "runs" / "cancelled"
    job = submit(["--config", str(job_config), *CPU_2, "output_dir=runs/cancelled", "train.max_steps=2000",
                  "train.epochs=4"], workdir, jobs)
    watch = Watch(job)
    wait_for_steps(run_dir, watch, 5)
    subprocess.run(["scancel", job], check=True, timeout=30)
    watch.until_state("CANCELLED")
    # The processes save within KillWait (5 s here) after the SIGTERM; the job must stay ended.
    deadline = time.monotonic() + 60
    while not (run_dir / "STOPPED").exists() or subprocess.run(
            ["squeue", "-h", "-j", job, "-t", "COMPLETING,PENDING,RUNNING", "-o", "%T"], capture_output=True,
            text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline, f"the cancelled job did not save: {watch.seen}"
        time.sleep(0.2)
    time.sleep(3)
    record = watch.poll()
    err = (run_dir / f"slurm-{job}.err").read_text()
    say(f"\n(d) job {job}: {' -> '.join(watch.seen)}; ExitCode={record['ExitCode']}")
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0")
    (k,) = stopped_at(err, "SIGTERM")
    assert json.loads((run_dir / "STOPPED").read_text())["signal"] == "SIGTERM"
    assert (run_dir / "checkpoints" / f"step_{k:08d}" / "COMPLETE").is_file()
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "requeueing" not in out and "(restart 1)" not in out
    say(f"    saved a complete checkpoint at optimizer step {k} on SIGTERM; not requeued")


def test_sweep_array_requeues_only_the_preempted_task(workdir: Path, job_config: Path, jobs: list[str],
                                                      say: Callable[[str], None]) -> None:
    """(e) `sweep --slurm` with 4 seeds, one CPU each: tasks 0-1 run, then 2-3. USR1 to task 3 (it
    carries the array's own job id: the case that used to requeue the whole array) while task 2
    runs and tasks 0-1 have finished: only task 3 requeues and resumes; no sibling is touched,
    no finished seed runs again."""
    sweep_dir = workdir / "sweep"
    array = sbatch([sys.executable, "-m", "distributed_tune", "sweep", "--config", str(job_config), "--seeds", "4",
                    "--slurm", "--gpus-per-node", "0", "--processes-per-node", "1", "--partition", PARTITION,
                    "--time", "10", "output_dir=sweep"], workdir, jobs)
    assert "#SBATCH --array=0-3" in (sweep_dir / "sweep.sbatch").read_text()
    tasks = [Watch(f"{array}_{i}") for i in range(4)]
    runs = [sweep_dir / f"seed_{7 + i}" for i in range(4)]
    last = tasks[3]

    def poll_all_until(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not done():
            for t in tasks:
                t.poll()
            assert time.monotonic() < deadline, f"array {array}: not {what}: {[t.seen for t in tasks]}"
            time.sleep(0.1)

    poll_all_until(lambda: logged_steps(runs[3]) >= 5, "task 3 training")
    assert last.record["JobId"] == array, "SLURM gave the last task a new id: the dangerous case is not tested"
    siblings_then = [label(t.poll()) for t in tasks[:3]]
    assert siblings_then == ["COMPLETED Restarts=0", "COMPLETED Restarts=0", "RUNNING Restarts=0"], siblings_then
    usr1(f"{array}_3")
    last.release_after_requeue()
    poll_all_until(lambda: all(finished(t.record) for t in tasks), "finished")
    say(f"\n(e) array {array}: when task 3 was warned: {siblings_then}")
    for t in tasks:
        say(f"    {t.job} (JobId {t.record['JobId']}): {' -> '.join(t.seen)}; ExitCode={t.record['ExitCode']}")
    assert [(t.record["JobState"], t.record["Restarts"], t.record["ExitCode"]) for t in tasks] == [
        ("COMPLETED", "0", "0:0")] * 3 + [("COMPLETED", "1", "0:0")]
    for i, run in enumerate(runs):
        log = (sweep_dir / f"slurm-{array}_{i}.out").read_text()
        starts = 2 if i == 3 else 1  # the others ran once: not restarted by the requeue
        assert log.count(f"[sweep.sbatch] array task {array}_{i}: ") == starts, log
        assert [r["event"] for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "finished"] == ["finished"]
        assert list(losses_by_step(run)) == list(range(1, STEPS + 1))
    log3 = (sweep_dir / f"slurm-{array}_3.out").read_text()
    assert f"requeueing job {array}_3: it resumes from the checkpoint" in log3

    summary = subprocess.run([sys.executable, "-m", "distributed_tune", "sweep", "--summarize", "sweep"], cwd=workdir,
                             env=job_env(), capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    payload = json.loads((sweep_dir / "sweep_summary.json").read_text())
    (entry,) = payload["settings"].values()
    assert [r["status"] for r in entry["runs"]] == ["done"] * 4 and entry["summary"]["runs"] == 4
    assert [r["final_value"] for r in entry["runs"]] == [final_dev(run)["mcc"] for run in runs]
    say(f"    summary: final dev MCC {[round(r['final_value'], 4) for r in entry['runs']]}")


def test_single_node_script_on_a_cpu_partition(reference: dict, workdir: Path, job_config: Path, jobs: list[str],
                                               say: Callable[[str], None]) -> None:
    """(f) The README's `sbatch --gpus-per-node=0 --cpus-per-task=2 launch/single_node.sbatch CONFIG`:
    2 CPU processes. Warned the moment it starts (as with --time <= lead + 30 s), before any
    training process listens: the processes learn it from the stop file, stop at their first check,
    save; the job requeues (its launchers must not die of the signal), resumes, and ends with the
    submitted job's losses, bit for bit."""
    run_dir = workdir / "runs" / "single_node"
    job = sbatch(["sbatch", "--gpus-per-node=0", "--cpus-per-task=2", f"--partition={PARTITION}", "--time=10",
                  str(REPO / "launch" / "single_node.sbatch"), str(job_config), "output_dir=runs/single_node"],
                 workdir, jobs)
    watch = Watch(job)
    watch.until_state("RUNNING")
    in_batch_shell(job, watch)
    usr1(job)
    watch.release_after_requeue()
    record = watch.until(finished, "finished")
    out = (workdir / f"slurm-distributed_tune-{job}.out").read_text()
    err = (workdir / f"slurm-distributed_tune-{job}.err").read_text()
    say(f"\n(f) job {job}: {' -> '.join(watch.seen)}; ExitCode={record['ExitCode']}")
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"), err[-4000:]
    assert (record["NumCPUs"], record["CPUs/Task"]) == ("2", "2")
    for restart in (0, 1):
        assert f"job {job} (restart {restart}) on {record['NodeList']}: 2 process(es)" in out
    (k,) = stopped_at(err)
    assert k == 10, k  # the first check: the warning was there before the training started
    # Both in the first attempt: its launcher files rendered ("wrote ...", a foreground step, after
    # which bash runs the USR1 trap) and the warning, before its job step exits.
    first_exit = out.index("job step exited with status 0")
    assert out.index("wrote runs/single_node/accelerate.yaml") < first_exit
    assert out.index("USR1: the training stops") < first_exit
    assert_clean(out, re.sub(rf"slurmstepd.*JOB {job} ON .* CANCELLED AT .* DUE TO JOB REQUEUE \*\*\*\n", "", err))
    dev = final_dev(run_dir)
    assert (dev["world_size"], dev["n"]) == (2, 1043)
    assert losses_by_step(run_dir) == losses_by_step(reference["run_dir"])
    say(f"    2 processes, warned at the start, stopped at optimizer step {k}, resumed; losses equal to the "
        "submitted job's")


# --------------------------------------------------------------------------- two nodes (partition `two`)

TWO = "two"  # .ci/slurm-up.sh: n1 and n2, two slurmd on this machine; n1/n2 resolve only through NodeAddr
ONE_PER_NODE = ["--gpus-per-node", "0", "--processes-per-node", "1", "--time", "10"]


def two_nodes_problem() -> str | None:
    proc = subprocess.run(["sinfo", "-h", "-p", TWO, "-o", "%D %a"], capture_output=True, text=True, timeout=30)
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) < 2 or fields[1] != "up" or int(fields[0]) < 2:
        return f"no partition '{TWO}' that is up with 2 nodes (sinfo: {proc.stdout.strip()!r}): .ci/slurm-up.sh makes one"
    return None


def in_batch_shell(job: str, watch: Watch) -> None:
    """Wait until a RUNNING job's batch shell runs. RUNNING comes before it does, and a USR1 then
    kills it (WTERMSIG 10, seen on a loaded machine): wait for its process, and the few
    milliseconds bash needs to reach the trap."""
    watch.until(lambda r: any("slurm_script" in cmd for _, cmd in job_processes(job)), "in its batch shell")
    time.sleep(0.2)


def requeue_on_one_node(job: str, run_dir: Path, watch: Watch) -> None:
    """Warn a running 2-node job (USR1) after 5 steps, wait for its requeue, and release it on ONE
    node: what a user does to continue on whatever is free."""
    wait_for_steps(run_dir, watch, 5)
    usr1(job)
    watch.until(lambda r: r["JobState"] == "PENDING" and r["Reason"] == "BeginTime", "held after a requeue")
    time.sleep(2)
    # NumNodes=1 alone moves only the minimum (the scheduler still gives 2 when both are free), and
    # 2 tasks (one per node) would need 2 nodes: both bounds and the task count.
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1", "StartTime=now"], check=True,
                   timeout=30)


def needs_two_nodes() -> None:
    problem = two_nodes_problem()
    if problem:
        pytest.skip(problem)


def job_processes(job: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process on this machine (both nodes) that belongs to the job."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = proc.joinpath("environ").read_bytes().split(b"\0")
            cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env:
            found.append((int(proc.name), cmdline))
    return found


def training_pid(job: str, node_rank: int) -> int:
    """The training process (not a launcher) of one node of the job."""
    for pid, cmdline in job_processes(job):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if (f"SLURM_NODEID={node_rank}".encode() in env and "-m distributed_tune --config" in cmdline
                and "accelerate" not in cmdline and b"LOCAL_RANK=0" in env):
            return pid
    raise AssertionError(f"no training process of job {job} on node rank {node_rank}: {job_processes(job)}")


def test_two_nodes_equal_one_process_accumulating_two(reference: dict, workdir: Path, job_config: Path,
                                                      jobs: list[str], say: Callable[[str], None]) -> None:
    """(g) `submit --nodes 2` on two real nodes (1 process each, rendezvous at n1's NodeAddr: the
    name n1 resolves nowhere) and a 1-process job (accumulation 2): the same 300 losses, bit for
    bit, and the same as the 2-process one-node job."""
    needs_two_nodes()
    with pytest.raises(OSError):
        __import__("socket").getaddrinfo("n1", None)
    runs = {"two_nodes": ["--nodes", "2", "--partition", TWO], "one_process": ["--partition", PARTITION]}
    ids = {name: submit(["--config", str(job_config), *ONE_PER_NODE, *args, f"output_dir=runs/{name}"], workdir, jobs)
           for name, args in runs.items()}
    for name, job in ids.items():
        watch = Watch(job)
        record = watch.until(finished, "finished")
        run_dir = workdir / "runs" / name
        err = (run_dir / f"slurm-{job}.err").read_text()
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), f"{label(record)}\n{err[-4000:]}"
        out = (run_dir / f"slurm-{job}.out").read_text()
        say(f"\n(g) {name}: job {job} on {record['NodeList']}: {' -> '.join(watch.seen)}; RunTime={record['RunTime']}")
        if name == "two_nodes":
            assert record["NodeList"] == "n[1-2]" and record["NumNodes"] == "2"
            assert f"on n[1-2]: 2 node(s) x 1 process(es); rendezvous 127.0.0.1:{15000 + int(job) % 15000}" in out
        assert_clean(err)
    want = losses_by_step(reference["run_dir"])
    two, one = (losses_by_step(workdir / "runs" / name) for name in ("two_nodes", "one_process"))
    assert list(two) == list(range(1, STEPS + 1))
    assert two == one == want, side_by_side(one, two, 1)
    dev2, dev1 = final_dev(workdir / "runs" / "two_nodes"), final_dev(workdir / "runs" / "one_process")
    assert (dev2["world_size"], dev1["world_size"]) == (2, 1) and dev2["mcc"] == dev1["mcc"]
    say(f"    2 nodes x 1 process == 1 process x accumulation 2 == 1 node x 2 processes: all {STEPS} losses bitwise; "
        f"dev MCC {dev2['mcc']!r}")


def test_two_nodes_preempted_requeued_on_one_node_then_two(reference: dict, workdir: Path, job_config: Path,
                                                           jobs: list[str], say: Callable[[str], None]) -> None:
    """(h) A 2-node job warned (USR1): both nodes stop, the step exits 0, the job requeues. Released
    on ONE node (`scontrol update NumNodes=1-1 NumTasks=1`: whatever is free), the same script takes its shape
    from the allocation (1 process, accumulation 2) and resumes; warned again, requeued, cancelled
    (at once, while it starts) and continued by `submit --resume --nodes 2`: 300 losses equal to the uninterrupted job, bitwise."""
    needs_two_nodes()
    run_dir = workdir / "runs" / "reshaped"
    job = submit(["--config", str(job_config), *ONE_PER_NODE, "--nodes", "2", "--partition", TWO,
                  "output_dir=runs/reshaped"], workdir, jobs)
    watch = Watch(job)
    requeue_on_one_node(job, run_dir, watch)
    watch.until(lambda r: r["JobState"] == "RUNNING" and r["NumNodes"] == "1", "running on one node")
    in_batch_shell(job, watch)
    usr1(job)  # at once: the stop file stops it at its first check after the resume
    held = watch.until(lambda r: r["JobState"] == "PENDING" and r["Reason"] == "BeginTime", "held after a requeue")
    assert held["Restarts"] == "2"
    subprocess.run(["scancel", job], check=True, timeout=30)
    watch.until_state("CANCELLED")
    out, err = (run_dir / f"slurm-{job}.out").read_text(), (run_dir / f"slurm-{job}.err").read_text()
    # Attempt 0 on both nodes, attempt 1 on n1 alone: 1 process, the launcher files rendered for it.
    assert f"job {job} (restart 0) on n[1-2]: 2 node(s) x 1 process(es); rendezvous 127.0.0.1:" in out
    assert f"job {job} (restart 1) on n1: 1 node(s) x 1 process(es)" in out
    assert out.count("this allocation: 1 node(s) x 1 process(es); rendering the launcher files for it") == 1
    assert out.count("job step exited with status 0") == 2 and out.count(f"requeueing job {job}") == 2
    k1, k2 = stopped_at(err)
    assert 5 <= k1 < k2 < STEPS

    again = submit(["--config", str(job_config), *ONE_PER_NODE, "--nodes", "2", "--partition", TWO, "--resume",
                    "output_dir=runs/reshaped"], workdir, jobs)
    watch2 = Watch(again)
    record = watch2.until(finished, "finished")
    out2, err2 = (run_dir / f"slurm-{again}.out").read_text(), (run_dir / f"slurm-{again}.err").read_text()
    say(f"\n(h) job {job}: {' -> '.join(watch.seen)}; stopped at steps {k1} (2 nodes) and {k2} (1 node)\n"
        f"    submit --resume --nodes 2: job {again}: {' -> '.join(watch2.seen)}; ExitCode={record['ExitCode']}")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), err2[-4000:]
    assert f"resumed from runs/reshaped/checkpoints/step_{k2:08d}" in " ".join(err2.split())
    assert "rendering the launcher files" not in out2  # submit rendered them for its own shape
    for text in (out, out2):
        assert_clean(text)
    assert_clean(re.sub(rf"slurmstepd.*JOB {job} ON .* CANCELLED AT .* DUE TO JOB REQUEUE \*\*\*\n", "", err), err2)
    layout = r"world (\d+) x micro \d+ x accumulation (\d+)"
    starts = [(int(w), int(a)) for text in (err, err2) for w, a in re.findall(layout, " ".join(text.split()))]
    assert starts == [(2, 1), (1, 2), (2, 1)], starts
    want, got = losses_by_step(reference["run_dir"]), losses_by_step(run_dir)
    assert list(got) == list(range(1, STEPS + 1)) and got == want, side_by_side(want, got, k1)
    say(f"    (world size, accumulation) per attempt {starts}; all {STEPS} losses equal to the uninterrupted job, bitwise")


def test_a_rank_killed_on_node_two_fails_the_job(workdir: Path, job_config: Path, jobs: list[str],
                                                 say: Callable[[str], None]) -> None:
    """(i) SIGKILL of node 2's training process: the job ends FAILED within seconds (srun
    --kill-on-bad-exit), is not requeued, and no process of it is left on either node."""
    needs_two_nodes()
    run_dir = workdir / "runs" / "killed"
    job = submit(["--config", str(job_config), *ONE_PER_NODE, "--nodes", "2", "--partition", TWO,
                  "output_dir=runs/killed", "train.max_steps=3000", "train.epochs=6"], workdir, jobs)
    watch = Watch(job)
    wait_for_steps(run_dir, watch, 5)
    victim = training_pid(job, 1)
    os.kill(victim, 9)
    t0 = time.monotonic()
    record = watch.until(finished, "finished", timeout=60)
    ended = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = job_processes(job)
    time.sleep(3)
    record = watch.poll()
    say(f"\n(i) job {job}: {' -> '.join(watch.seen)}; SIGKILL of node 2's rank (pid {victim}) -> "
        f"{record['JobState']} after {ended:.1f} s; ExitCode={record['ExitCode']}; processes left: {len(left)}")
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0")
    assert ended < 30 and left == []
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "requeueing" not in out and "(restart 1)" not in out


def test_a_rank_stopped_on_node_two_fails_the_job_within_the_hang_bound(workdir: Path, job_config: Path,
                                                                        jobs: list[str],
                                                                        say: Callable[[str], None]) -> None:
    """(j) SIGSTOP of node 2's training process (alive, silent: no crash for srun to see) with
    distributed.hang_timeout_s=10: node 1's rank names it and exits 3, the job ends FAILED within
    the bound plus a few seconds, is not requeued, and no process of it is left."""
    needs_two_nodes()
    run_dir = workdir / "runs" / "stopped"
    job = submit(["--config", str(job_config), *ONE_PER_NODE, "--nodes", "2", "--partition", TWO,
                  "output_dir=runs/stopped", "train.max_steps=3000", "train.epochs=6",
                  "distributed.hang_timeout_s=10"], workdir, jobs)
    watch = Watch(job)
    wait_for_steps(run_dir, watch, 5)
    victim = training_pid(job, 1)
    os.kill(victim, 19)  # SIGSTOP
    t0 = time.monotonic()
    record = watch.until(finished, "finished", timeout=120)
    ended = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = job_processes(job)
    for pid, _ in left:
        os.kill(pid, 9)
    time.sleep(3)
    record = watch.poll()
    err = (run_dir / f"slurm-{job}.err").read_text()
    (line,) = [x for x in err.splitlines() if "has not answered for" in x]
    say(f"\n(j) job {job}: {' -> '.join(watch.seen)}; SIGSTOP of node 2's rank (pid {victim}) -> "
        f"{record['JobState']} after {ended:.1f} s (hang_timeout_s=10); ExitCode={record['ExitCode']}; "
        f"processes left: {len(left)}\n    {line}")
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0")
    assert line.startswith(f"error: rank 1 on host n2 (pid {victim}) has not answered for ")
    assert 10 <= ended < 30 and left == []
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "requeueing" not in out and "(restart 1)" not in out


# Resharding rebuilds the fp32 masters and Adam moments exactly; later steps reduce over another
# partition (tests/test_deepspeed.py measured 0.0 on CPU / gloo and asserts this bound).
RESHARD_TOL_ZERO = 1e-6


def test_a_zero2_two_node_job_resumes_on_one_node(workdir: Path, job_config: Path, jobs: list[str],
                                                   say: Callable[[str], None]) -> None:
    """(k) ZeRO-2 over two nodes, warned (USR1), requeued and released on ONE node: the script
    renders DeepSpeed's files for a world of one, the sharded state is converted on load, and the
    300 losses match a 1-process ZeRO-2 job of the same recipe (run beside it on n1) within
    RESHARD_TOL_ZERO; the max difference is printed."""
    needs_two_nodes()
    zero = ["distributed.zero_stage=2"]
    run_dir, ref_dir = workdir / "runs" / "zero2_reshaped", workdir / "runs" / "zero2_one"
    job = submit(["--config", str(job_config), *ONE_PER_NODE, "--nodes", "2", "--partition", TWO,
                  "output_dir=runs/zero2_reshaped", *zero], workdir, jobs)
    ref = submit(["--config", str(job_config), *ONE_PER_NODE, "--partition", PARTITION, "output_dir=runs/zero2_one",
                  *zero], workdir, jobs)
    watch = Watch(job)
    requeue_on_one_node(job, run_dir, watch)
    record = watch.until(finished, "finished")
    ref_record = Watch(ref).until(finished, "finished")
    out, err = (run_dir / f"slurm-{job}.out").read_text(), (run_dir / f"slurm-{job}.err").read_text()
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "1", "0:0"), err[-4000:]
    assert ref_record["JobState"] == "COMPLETED", (ref_dir / f"slurm-{ref}.err").read_text()[-4000:]
    assert f"job {job} (restart 1) on {record['NodeList']}: 1 node(s) x 1 process(es)" in out
    assert "this allocation: 1 node(s) x 1 process(es); rendering the launcher files for it" in out
    (k,) = stopped_at(err)
    converted = [(r["optimizer_step"], r["from_world_size"], r["to_world_size"])
                 for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "converted"]
    assert converted == [(k, 2, 1)], converted
    want, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert list(got) == list(range(1, STEPS + 1)) and list(want) == list(got)
    diff = max(abs(got[s] - want[s]) for s in got)
    say(f"\n(k) job {job}: {' -> '.join(watch.seen)}; ZeRO-2 stopped at step {k} on 2 nodes, converted 2 -> 1, "
        f"finished on {record['NodeList']}; max |loss difference| vs the 1-process job over {STEPS} steps: {diff:.3g}")
    assert diff <= RESHARD_TOL_ZERO, side_by_side(want, got, k)
