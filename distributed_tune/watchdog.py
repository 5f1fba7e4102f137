"""Bounded hangs: a peer that stops answering ends the job within `distributed.hang_timeout_s`.

    dog = Watchdog(run_dir, rank, world_size, hang_timeout_s, token)   # after the process group is up
    dog.start()
    ...
    dog.stop()                                                          # a rank that ends normally says so

Every rank of a multi-process run has a daemon thread that rewrites its heartbeat file,
``<run_dir>/heartbeat/rank_<r>.json`` (rank, host, pid, a counter), every few seconds, and reads
its peers' files. A peer whose file has not changed for `hang_timeout_s`, measured on this rank's
own monotonic clock (the nodes' clocks need not agree, and a shared file system's mtimes need not
either), is stopped (SIGSTOP, a frozen host) or gone: the rank prints one line naming the peer's
rank, host and pid and leaves with HUNG_EXIT at once (``os._exit``: its main thread may be waiting
in a collective that would never return). A peer on this same machine (the same boot id) is
SIGKILLed first: a stopped process ignores the launcher's SIGTERM, and torchrun would wait 30 s
before its SIGKILL. The launcher then ends the other processes; under SLURM
``srun --kill-on-bad-exit`` ends the step, the batch script exits with the status and the job ends
FAILED, and is not requeued (the scripts requeue only a run that stopped for the warning).

A rank that is alive but waits in a collective its peers never join (every heartbeat thread still
runs) is what `distributed.timeout_s`, the collective timeout, ends. The run directory is already
shared by every node (checkpoints, ZeRO shards), so the heartbeats need nothing else. `token`
tells this attempt's files from an earlier attempt's: a peer whose file still carries another
token has not answered yet, and counts from the moment this rank started watching.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

HUNG_EXIT = 3  # not 0 (a clean stop requeues), not 2 (bad input)
FOLDER = "heartbeat"


def host_name() -> str:
    """The node as SLURM names it (several nodes may share one machine), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def machine_id() -> str:
    """This machine, whatever SLURM calls it: a peer with the same id runs here (its pid means something)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def interval_s(hang_timeout_s: float) -> float:
    """How often a rank beats and looks: a sixth of the bound, between 0.5 and 10 s."""
    return max(0.5, min(10.0, hang_timeout_s / 6))


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, hang_timeout_s: float, token: str) -> None:
        self.dir = Path(run_dir) / FOLDER
        self.rank, self.world_size, self.timeout, self.token = rank, world_size, float(hang_timeout_s), token
        self.interval = interval_s(hang_timeout_s)
        self.host, self.machine, self.pid, self.beats = host_name(), machine_id(), os.getpid(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distributed_tune-watchdog", daemon=True)
        # peer -> (what its file said, when it last changed on this rank's clock)
        self._seen: dict[int, tuple[str, float]] = {}

    def path(self, rank: int) -> Path:
        return self.dir / f"rank_{rank:05d}.json"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat("running")
        now = time.monotonic()
        self._seen = {peer: ("", now) for peer in range(self.world_size) if peer != self.rank}
        self._thread.start()

    def stop(self) -> None:
        """This rank ends normally: peers stop watching it."""
        if not self._stop.is_set():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(timeout=self.interval + 5)
            self._beat("done")

    def _beat(self, state: str) -> None:
        self.beats += 1
        record = {"rank": self.rank, "host": self.host, "pid": self.pid, "machine": self.machine, "token": self.token,
                  "state": state, "beat": self.beats}
        tmp = self.path(self.rank).with_suffix(f".tmp{self.pid}")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path(self.rank))
        except OSError:
            pass  # a full or vanished disk is reported by the writers that matter

    def _read(self, peer: int) -> str:
        try:
            return self.path(peer).read_text()
        except OSError:
            return ""

    def check(self, now: float) -> tuple[int, dict, float] | None:
        """The first peer silent for longer than the bound: (rank, its last record, seconds), else None."""
        for peer, (before, since) in list(self._seen.items()):
            text = self._read(peer)
            try:
                record = json.loads(text) if text else {}
            except ValueError:
                record = {}  # caught mid-write on a file system without atomic rename: look again later
            if record.get("token") == self.token and record.get("state") == "done":
                del self._seen[peer]
                continue
            if text != before and record.get("token") == self.token:
                self._seen[peer] = (text, now)
            elif now - since > self.timeout:
                return peer, record if record.get("token") == self.token else {}, now - since
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat("running")
            hung = self.check(time.monotonic())
            if hung is not None:
                self._give_up(*hung)

    def _give_up(self, peer: int, record: dict, silent_s: float) -> None:
        where = (f"rank {peer} on host {record['host']} (pid {record['pid']})" if record
                 else f"rank {peer} (it never wrote a heartbeat in this attempt)")
        killed = ""
        if record and record.get("machine") == self.machine and record.get("pid") not in (None, self.pid):
            try:
                os.kill(int(record["pid"]), signal.SIGKILL)
                killed = "; it runs on this machine: SIGKILLed"
            except OSError:
                pass
        print(f"error: {where} has not answered for {silent_s:.0f} s (distributed.hang_timeout_s="
              f"{self.timeout:g}): it is stopped, frozen, or its host is gone{killed}; rank {self.rank} on "
              f"{self.host} ends the job (exit {HUNG_EXIT}) instead of waiting for it", file=sys.stderr, flush=True)
        os._exit(HUNG_EXIT)
