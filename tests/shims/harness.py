"""A fake SLURM cluster on this machine, for tests: the sbatch/srun/scontrol shims in this folder
on PATH, a state folder where they record submissions and requeues, and helpers to start a job,
signal its batch shell mid-training and compare runs.

    from shims.harness import Cluster          # tests/ is on sys.path (conftest.py)
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import REPO, subprocess_env

SHIMS = Path(__file__).resolve().parent
PORT_BASE = 15000  # distributed_tune.slurm.PORT_BASE: the rendered script's port is base + id % base


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def job_id_with_free_port() -> int:
    """A job id whose rendezvous port (15000 + id % 15000) is free right now."""
    while True:
        job = random.randrange(100_000, 900_000)
        if _port_free(PORT_BASE + job % PORT_BASE):
            return job


@dataclass
class Cluster:
    state: Path  # where the shims record: submitted, requeued, batch.pid

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)

    def env(self, job_id: int, restart: int = 0) -> dict[str, str]:
        return subprocess_env(PATH=f"{SHIMS}{os.pathsep}{os.environ['PATH']}", SHIM_STATE_DIR=str(self.state),
                              SHIM_JOB_ID=str(job_id), SHIM_RESTART_COUNT=str(restart))

    def requeued(self) -> list[int]:
        path = self.state / "requeued"
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def batch_pid(self) -> int:
        return int((self.state / "batch.pid").read_text())


def loss_steps(run_dir: Path) -> int:
    """Training records written so far (a line being written is not counted)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}") and is_train_record(json.loads(line)))


def is_train_record(record: dict) -> bool:
    """A logged optimizer step (not an evaluation, not an event such as the run summary)."""
    return "loss" in record and "optimizer_step" in record and "split" not in record and "event" not in record


def run_job(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 240, *,
            run_dir: Path | None = None, signal_after: int = 0, signum: int = signal.SIGUSR1,
            cluster: Cluster | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` (submit or sbatch through the shims); with `signal_after`, send `signum` to the
    batch shell (SLURM's `--signal=B:...`) once that many optimizer steps are logged.
    Returns the finished process and the seconds from the signal to its end."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signalled = None
    try:
        if signal_after:
            assert run_dir is not None and cluster is not None
            deadline = time.monotonic() + timeout
            while loss_steps(run_dir) < signal_after:
                assert proc.poll() is None, f"job ended before step {signal_after}:\n{proc.stdout.read()}"
                assert time.monotonic() < deadline, "no training progress"
                time.sleep(0.02)
            os.kill(cluster.batch_pid(), signum)
            signalled = time.monotonic()
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        raise
    elapsed = time.monotonic() - signalled if signalled is not None else 0.0
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), elapsed


def submit_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "distributed_tune", "submit", *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """optimizer_step -> loss; fails on a step logged twice (a resume that replayed steps)."""
    out: dict[int, float] = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if is_train_record(r):
            assert r["optimizer_step"] not in out, f"step {r['optimizer_step']} logged twice in {run_dir}"
            out[r["optimizer_step"]] = r["loss"]
    return out


def final_dev(run_dir: Path) -> dict:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "dev"][-1]


def side_by_side(reference: dict[int, float], resumed: dict[int, float], resumed_from: int) -> str:
    """The two loss sequences as a table: step, uninterrupted, interrupted+resumed, difference."""
    lines = [f"{'step':>5} {'uninterrupted':>22} {'preempted+resumed':>22} {'diff':>10}"]
    for step in sorted(set(reference) | set(resumed)):
        a, b = reference.get(step), resumed.get(step)
        diff = f"{b - a:+.1e}" if a is not None and b is not None else "missing"
        mark = "  <- resumed here" if step == resumed_from + 1 else ""
        lines.append(f"{step:>5} {a!r:>22} {b!r:>22} {diff:>10}{mark}")
    return "\n".join(lines)


def flat(log: str) -> str:
    """The log with rich's line wrapping (80 columns in a batch log) undone."""
    return " ".join(log.split())


def write_job_config(path: Path, tiny_model: Path, cache_dir: Path, cola_dir: Path, **train: object) -> Path:
    """A tiny, fast job: the tiny BERT on the test's CoLA files, losses logged every step."""
    cfg = {
        "seed": 7,
        "model": {"name": str(tiny_model)},
        "data": {"source": str(cola_dir), "cache_dir": str(cache_dir)},
        "train": {"epochs": 1, "max_steps": 40, "global_batch_size": 16, "micro_batch_size": 8, "lr": 1e-3,
                  "log_every": 1, "eval_every": 0, "checkpoint_every": 10, "keep_checkpoints": 2, **train},
        "distributed": {"timeout_s": 60},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


__all__ = ["REPO", "Cluster", "job_id_with_free_port", "run_job", "submit_cmd", "losses_by_step",
           "final_dev", "side_by_side", "loss_steps", "read_jsonl", "flat", "write_job_config"]
