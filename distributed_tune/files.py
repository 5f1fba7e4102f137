"""Files that cannot be half-written, file hashes, and the one-writer lock of a run directory.

    atomic_write_text(path, "...")        # readers see the old file or the new one, never a mix
    with writing(path): ...               # any error of any library while writing -> one WriteError line
    remove(run_dir, [paths])              # the one deleter: checks every path first, never through a symlink
    with RunLock(run_dir): ...            # a second run in the same output_dir is refused

Every writer in the package goes through `atomic_write_*` or `writing()`: the temporary name carries
the pid (and a counter), so two processes writing the same file never share a temporary file, and
a failed write is one line that says why and what to do (`write_problem`). Every deletion of the
package goes through `remove`. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distributed_tune.errors import RunDirError

_counter = itertools.count()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{next(_counter)}")


# errno -> (what it means, what to do). Anything else: the library's own words, "check the disk".
_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free disk space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free disk space (or raise the quota)"),
    errno.EFBIG: ("a file size limit is reached", "raise the limit (ulimit -f) or free disk space"),
    errno.EROFS: ("the file system is read-only", "make it writable or choose a writable place"),
    errno.EACCES: ("permission denied", "make it writable for this user or choose another place"),
    errno.EPERM: ("operation not permitted", "make it writable for this user or choose another place"),
    errno.ENOENT: ("a folder on the way is missing", "create it or choose another place"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "choose another place"),
    errno.EISDIR: ("a folder stands where the file goes", "move it away or choose another place"),
    errno.EEXIST: ("a file stands where the folder goes", "move it away or choose another place"),
    errno.EIO: ("an I/O error of the disk", "check the disk"),
}


def error_number(e: BaseException) -> int | None:
    """The errno of a write error from any library: OSError's own, or the `os error N` / `code: N`
    a Rust io::Error (safetensors, tokenizers) prints in its message."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    found = re.search(r"(?:code: |os error |\[Errno )(\d+)", str(e))
    return int(found.group(1)) if found else None


def _likely_errno(path: str | Path | None) -> int | None:
    """For an error that carries no errno (torch.save: "unexpected pos 64 vs 0"): a disk with no
    room left where `path` goes, or a file size limit on this process, is the likely cause."""
    import resource

    if path is not None:
        for folder in [Path(path), *Path(path).parents]:
            if folder.is_dir():
                with contextlib.suppress(OSError):
                    if shutil.disk_usage(folder).free < 1 << 20:
                        return errno.ENOSPC
                break
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None


def write_problem(e: BaseException, path: str | Path | None = None) -> tuple[str, str]:
    """(why the write failed, what to do) for any exception raised while writing `path`."""
    number = error_number(e) or _likely_errno(path)
    if number in _ADVICE:
        what, fix = _ADVICE[number]
        return f"{os.strerror(number)}: {what}", fix
    words = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip().splitlines()
    return (words[0][:200] if words else type(e).__name__), "check that the disk has space and is writable"


class WriteError(RunDirError):
    """A write of the package failed: names the file, why, and the fix."""

    def __init__(self, path: str | Path, e: BaseException) -> None:
        self.path, self.errno = Path(path), error_number(e)
        self.reason, self.fix = write_problem(e, path)
        super().__init__(f"could not write {path} ({self.reason}); {self.fix}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Whatever goes wrong while writing `path` (OSError, a safetensors or torch error...) becomes
    one WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 - a write may fail as any library's exception type
        raise WriteError(path, e) from None


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
        raise WriteError(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def make_dirs(path: str | Path) -> Path:
    """mkdir -p, a failure said as a WriteError."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def remove(root: str | Path, targets: Iterable[str | Path], why: str) -> list[Path]:
    """The one deleter. Every target must lie inside `root` with no symlink between `root` and
    it; a target that is itself a symlink loses only the link. Every target is checked before
    anything is deleted: one that is not safe raises RunDirError and nothing is deleted. `why`
    names the caller in that line (e.g. "--overwrite"). Returns what was removed."""
    root = Path(root)
    plan = []
    for target in map(Path, targets):
        if not os.path.lexists(target):
            continue
        try:
            rel = target.relative_to(root)
        except ValueError:
            raise RunDirError(f"{why}: {target} is not inside {root}; nothing was deleted") from None
        if not rel.parts or ".." in rel.parts:
            raise RunDirError(f"{why}: {target} is not inside {root}; nothing was deleted")
        on_the_way = root
        for part in rel.parts[:-1]:
            on_the_way = on_the_way / part
            if on_the_way.is_symlink():
                raise RunDirError(
                    f"{why}: {on_the_way} is a symlink (to {os.readlink(on_the_way)}); nothing is deleted through a "
                    f"symlink and nothing was deleted; replace it with a folder or choose another output_dir")
        plan.append(target)
    for target in plan:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    return plan


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

    def __init__(self, run_dir: str | Path, name: str = NAME) -> None:
        self.path = Path(run_dir) / name
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
