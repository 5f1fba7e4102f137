"""Stop requests, caught from the first moment of the process.

    signals.install()          # in __main__, before torch/transformers are imported
    signals.requested()        # None, or the first stop signal (USR1, TERM, INT)
    with signals.stoppable():  # the training loop: Ctrl-C asks for a stop instead of aborting

* SIGUSR1: SLURM's warning before the time limit (`--signal=B:USR1@N`); SIGTERM: `scancel`,
  preemption, a dying launcher. Both ask the loop to stop at the next optimizer-step boundary,
  save a checkpoint and exit 0 (the batch script then requeues after USR1).
* Ctrl-C (SIGINT): while training, the same as SIGTERM, said on the terminal; a second Ctrl-C
  aborts at once. Before training starts (imports, loading) there is nothing to save: it aborts.
* A SLURM batch script that got the warning creates the file named by $DT_STOP_FILE before it
  passes USR1 on: a process that was still starting (under a launcher that ignores USR1) and missed
  the signal finds the file when it installs its handlers, and stops the same way.
* Processes started by a launcher (torchrun, accelerate launch) ask the kernel for SIGTERM when
  their launcher dies, so that no rank trains on as an orphan.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

STOP_FILE_ENV = "DT_STOP_FILE"

# The handlers' state (a signal handler can only reach module state); read and changed through
# the functions below.
received: int | None = None
training = False  # inside stoppable(): there is something to save, Ctrl-C stops instead of aborting
_installed = False
_first_sigint = 0.0
# Ctrl-C reaches every process of the terminal's process group, and torchrun forwards it to its
# workers once more a moment later: a second SIGINT within this window is that copy, not the user.
SIGINT_ECHO_S = 1.0


def _handle(signum: int, _frame: Any) -> None:
    global received, _first_sigint
    if signum == signal.SIGINT:
        now = time.monotonic()
        if received == signal.SIGINT and now - _first_sigint < SIGINT_ECHO_S:
            return
        if not training or received == signal.SIGINT:
            raise KeyboardInterrupt
        _first_sigint = now
        if os.environ.get("RANK", "0") == "0":
            print("\nCtrl-C: stopping at the next optimizer step and saving a checkpoint "
                  "(resume with --resume); Ctrl-C again aborts at once", file=sys.stderr, flush=True)
    if received is None or signum == signal.SIGINT:
        received = signum


def requested() -> int | None:
    """The stop signal this process received (or was told of by `request`), else None."""
    return received


def request(signum: int) -> None:
    """Another rank received `signum`: stop here too (the loop's consensus), unless a stop is already asked."""
    global received
    if received is None:
        received = signum


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """While training: a stop signal (Ctrl-C included) is answered at the next step boundary with a
    checkpoint; outside, Ctrl-C aborts at once (there is nothing to save yet, or it is saved)."""
    global training
    training = True
    try:
        yield
    finally:
        training = False


def install() -> None:
    """Route USR1, TERM and INT to the stop flag; tie launcher-started ranks to their launcher."""
    global _installed, received
    if _installed:
        return
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handle)
    # After the handlers: a warning sent from here on is caught; one sent before (and missed) left
    # the file, which the batch script creates before it signals.
    stop_file = os.environ.get(STOP_FILE_ENV)
    if received is None and stop_file and os.path.exists(stop_file):
        received = signal.SIGUSR1
    if "LOCAL_RANK" in os.environ and sys.platform.startswith("linux"):
        _die_with_parent()
    _installed = True


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the parent (the launcher) exits; if it is already gone
    (reparented), stop now."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def reset() -> None:
    """Forget a received signal (tests; a new run in the same process)."""
    global received, training
    received, training = None, False
