"""Bounded hangs (distributed_tune/watchdog.py): a peer that stops answering ends the job within
`distributed.hang_timeout_s`, with one line naming its rank, host and pid.

    python -m pytest -q tests/test_watchdog.py        # ~10 s (fast) + ~1 min (real training over gloo)
    DT_HANG_TIMEOUT_S=default python -m pytest -q -s tests/test_watchdog.py -k real_run   # the default bound

The fast tests run the watchdog in plain processes (no torch); the last one SIGSTOPs a rank of a
real 2-process training run (`launch --gpus 2`, gloo) and measures what the hang costs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, read_jsonl, subprocess_env

from distributed_tune.watchdog import HUNG_EXIT, interval_s

PEER = """
import sys, time
from pathlib import Path
from distributed_tune.watchdog import Watchdog
folder, rank, mode, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dog = Watchdog(Path(folder), rank, 2, 3.0, token)
dog.start()
print("ready", flush=True)
if mode == "finish":
    time.sleep(1)
    dog.stop()
    sys.exit(0)
time.sleep(60)
"""


def peer(folder: Path, rank: int, mode: str = "wait", token: str = "attempt-1") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(folder), str(rank), mode, token], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def ended_within(proc: subprocess.Popen, seconds: float) -> float | None:
    """Seconds until `proc` exited, or None if it still runs after `seconds`."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


@pytest.mark.fast
def test_a_stopped_peer_ends_the_job_a_finished_one_does_not(tmp_path: Path) -> None:
    bound = 3.0 + interval_s(3.0)
    # A: rank 1 is SIGSTOPped; rank 0 gives up after the bound, names it, and kills it (same machine).
    a0, a1 = peer(tmp_path / "a", 0), peer(tmp_path / "a", 1)
    # B: rank 1 ends normally (stop() says "done"): rank 0 keeps waiting for nothing.
    b0, b1 = peer(tmp_path / "b", 0), peer(tmp_path / "b", 1, "finish")
    # C: rank 1's file is an earlier attempt's and rank 1 never comes: counted from rank 0's start.
    (tmp_path / "c" / "heartbeat").mkdir(parents=True)
    (tmp_path / "c" / "heartbeat" / "rank_00001.json").write_text(
        '{"rank": 1, "host": "old", "pid": 1, "token": "attempt-0", "state": "running", "beat": 9}')
    c0 = peer(tmp_path / "c", 0)
    try:
        os.kill(a1.pid, signal.SIGSTOP)
        took = ended_within(a0, bound + 10)
        assert took is not None and a0.returncode == HUNG_EXIT, a0.stderr.read() if took else "still running"
        err = a0.stderr.read()
        assert err.count("\n") == 1 and err.startswith(
            f"error: rank 1 on host {socket.gethostname()} (pid {a1.pid}) has not answered for "), err
        assert "(distributed.hang_timeout_s=3): it is stopped, frozen, or its host is gone; it runs on this " \
               f"machine: SIGKILLed; rank 0 on {socket.gethostname()} ends the job (exit {HUNG_EXIT})" in err, err
        assert ended_within(a1, 10) is not None and a1.returncode == -signal.SIGKILL
        assert ended_within(c0, 10) is not None and c0.returncode == HUNG_EXIT
        assert "rank 1 (it never wrote a heartbeat in this attempt) has not answered" in c0.stderr.read()
        assert ended_within(b1, 10) is not None and b1.returncode == 0
        assert ended_within(b0, 2 * bound) is None, b0.stderr.read()  # no false alarm about a finished peer
    finally:
        for proc in (a0, a1, b0, b1, c0):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_sigstopped_rank_of_a_real_run_ends_it_within_the_bound(tmp_path: Path, tiny_model: Path, cache_dir: Path,
                                                                  cola_dir: Path) -> None:
    """2 CPU processes over gloo (`launch --gpus 2`), distributed.hang_timeout_s=10; rank 1 is
    SIGSTOPped mid-training: the launcher exits non-zero within the bound plus one beat and a few
    seconds of teardown, the message names rank 1, its host and pid, and no process is left."""
    run_dir = tmp_path / "run"
    # DT_HANG_TIMEOUT_S=default measures the default bound (the key unset): ~2.5 min.
    setting = os.environ.get("DT_HANG_TIMEOUT_S", "10")
    timeout = 120 if setting == "default" else int(setting)
    mark = f"dt-watchdog-{os.getpid()}"
    cmd = [sys.executable, "-m", "distributed_tune", "launch", "--gpus", "2", "--port", str(free_port()),
           f"output_dir={run_dir}", f"model.name={tiny_model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}",
           "train.epochs=20", "train.max_steps=20000", "train.log_every=1", "train.eval_every=0",
           "train.checkpoint_every=0", "train.global_batch_size=16", "train.micro_batch_size=8",
           *([] if setting == "default" else [f"distributed.hang_timeout_s={timeout}"])]
    launcher = subprocess.Popen(cmd, env=subprocess_env(DT_TEST_MARK=mark), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or sum(
                1 for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r) < 5:
            assert launcher.poll() is None, launcher.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "no training progress after 240 s"
            time.sleep(0.2)
        victim = rank_pid(mark, 1)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        launcher.wait(timeout=timeout + 120)
        took = time.monotonic() - t0
        out, err = launcher.communicate()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    left = [pid for pid in marked(mark)]
    (line,) = [x for x in err.splitlines() if "has not answered for" in x]
    print(f"\n[watchdog] SIGSTOP of rank 1 -> launcher exit {launcher.returncode} after {took:.1f} s "
          f"(distributed.hang_timeout_s={timeout}); {line}")
    assert launcher.returncode != 0
    assert re.match(rf"error: rank 1 on host {re.escape(socket.gethostname())} \(pid {victim}\) has not answered "
                    rf"for \d+ s \(distributed.hang_timeout_s={timeout}\)", line), line
    # Silence is counted from the rank's last beat, which comes up to one interval before the SIGSTOP.
    assert timeout - interval_s(timeout) <= took < timeout + interval_s(timeout) + 15, took
    assert left == [], left


def marked(mark: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"DT_TEST_MARK={mark}".encode() in proc.joinpath("environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def rank_pid(mark: str, rank: int) -> int:
    for pid in marked(mark):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and "accelerate" not in cmdline and "torch.distributed" not in cmdline:
            return pid
    raise AssertionError(f"no training process of rank {rank}")
