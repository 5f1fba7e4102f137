"""The run directory while a run owns it: one writer (the lock), the STOPPED marker a batch script
requeues on, and a full disk said in one line.

    run_dir = RunDir(cfg)                  # refuses a used output_dir without --resume / --overwrite
    with run_dir.owned():                  # a full disk anywhere inside: one RunDirError line
        ...; run_dir.claim(accelerator)     # rank 0 takes the lock; every rank learns if it got it
        ...; run_dir.mark_stopped(...)      # the run stopped for a signal with a checkpoint

The lock is released when `owned()` ends, whatever happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed_tune import checkpoint, summary
from distributed_tune.config import Config
from distributed_tune.errors import RunDirError
from distributed_tune.files import RunLock, WriteError, atomic_write_json, remove

STOPPED = "STOPPED"  # marker: the run stopped for a signal with a checkpoint; a batch script requeues


class RunDir:
    def __init__(self, cfg: Config) -> None:
        self.path = checkpoint.refuse_used_run_dir(cfg)  # before anything loads or is written
        self.lock: RunLock | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """A write that fails anywhere inside (a full disk, a read-only file system, any library's
        error while writing) ends the run with one line: the file, why, the checkpoint kept, the fix."""
        try:
            yield
        except (OSError, WriteError) as e:
            failed = e if isinstance(e, WriteError) else WriteError(e.filename or "a file", e)
            last = checkpoint.latest_good(self.path, warn=lambda _: None)
            raise RunDirError(
                f"could not write {failed.path} ({failed.reason}); the newest complete checkpoint ({last or 'none yet'}) "
                f"is kept; {failed.fix} and resume with --resume") from None
        finally:
            if self.lock is not None:
                self.lock.release()

    def claim(self, accelerator: Any) -> None:
        """Rank 0 holds the run directory's lock; every rank learns whether it got it."""
        from accelerate.utils import broadcast_object_list

        problem = [None]
        if accelerator.is_main_process:
            try:
                self.lock = RunLock(self.path).acquire()
            except RunDirError as e:
                problem = [str(e)]
        if accelerator.num_processes > 1:
            broadcast_object_list(problem, from_process=0)
        if problem[0]:
            raise RunDirError(problem[0])

    def new_attempt(self) -> None:
        """Rank 0, once the attempt is accepted: how the last attempt ended (STOPPED, results.json)
        no longer holds."""
        remove(self.path, [self.path / STOPPED, self.path / summary.RESULTS_JSON], "a new attempt")

    def mark_stopped(self, signal_name: str, optimizer_step: int) -> None:
        """Rank 0: the run stopped for a signal, with this step's checkpoint (what a batch script requeues on)."""
        ckpt = self.path / "checkpoints" / checkpoint.checkpoint_name(optimizer_step)
        atomic_write_json(self.path / STOPPED, {"signal": signal_name, "optimizer_step": optimizer_step,
                                                "checkpoint": str(ckpt)})
