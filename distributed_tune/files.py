"""Files that cannot be half-written, file hashes, and the one-writer lock of a run directory.

    atomic_write_text(path, "...")        # readers see the old file or the new one, never a mix
    with RunLock(run_dir): ...            # a second run in the same output_dir is refused

Every writer in the package goes through `atomic_write_*`: the temporary name carries the pid
(and a counter), so two processes writing the same file never share a temporary file.
Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distributed_tune.errors import RunDirError

_counter = itertools.count()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{next(_counter)}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temporary file beside `path`, then rename it over `path` (on success only)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller meant (a write error carries no file name)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    """The one-line complaint about a file that is not UTF-8: file, line, byte, the fix."""
    line = path.read_bytes()[: e.start].count(b"\n") + 1
    return f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunLock:
    """One writer per run directory: an exclusive POSIX lock on `<run_dir>/.lock`.

    The kernel drops the lock when its holder dies (crash, SIGKILL, a node that goes away), so a
    stale lock never blocks a resume; POSIX (fcntl) locks also work across nodes on NFS and
    Lustre. The file records who holds it (host, pid, start time) for the refusal message.
    Held by the main process of a run; `probe()` checks without keeping it (launch, submit).
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(
                f"output_dir={self.path.parent} is in use by a running job ({self.holder()}); "
                "wait for it to end, stop it, or choose another output_dir"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        # Written through the locked descriptor: closing any other descriptor of this file would
        # release a POSIX lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays (its content is only informative)
            self.fd = None

    def probe(self) -> None:
        """Raise RunDirError if a live process holds the lock; create nothing."""
        if not self.path.is_file():
            return
        self.acquire()
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
