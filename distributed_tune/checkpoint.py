"""Resumable checkpoints that cannot be half-written or silently swapped, and the run directory's
own files.

A checkpoint is written as ``checkpoints/.tmp-step_XXXXXXXX``, gets a ``COMPLETE`` manifest (every
file's size and sha256, sealed with an HMAC under this user's checkpoint key) and is renamed to
``checkpoints/step_XXXXXXXX``. Older ones are deleted only after their successor is complete. On
resume, the newest checkpoint whose files match its sealed manifest is used; a damaged or foreign
one is reported by name and skipped, before DeepSpeed or accelerate unpickle anything from it.

Trust boundary: DeepSpeed loads its ``*_model_states.pt`` / ``*_optim_states.pt`` with
``torch.load(weights_only=False)``, so a checkpoint folder can run code when it is loaded
(accelerate 1.16 loads its RNG states and optimizer.bin with weights_only=True). The seal is an
HMAC-SHA256 keyed by ``~/.config/distributed_tune/checkpoint.key`` (mode 0600, created by a fresh
run; ``DT_CHECKPOINT_KEY`` names another file; on a cluster every node must see the same key): whoever can write the run directory but cannot read the key cannot make a
checkpoint that is loaded. Model exports (``model/``) are safetensors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from distributed_tune import records
from distributed_tune.config import LENGTH_KEYS, TRAJECTORY_KEYS, Config, flat_dict
from distributed_tune.errors import RunDirError
from distributed_tune.files import WriteError, atomic_write_json, make_dirs, remove, sha256_file, write_problem, writing

MANIFEST = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
KEY_ENV = "DT_CHECKPOINT_KEY"
# Recorded in every checkpoint: parameter groups (decay / no decay) judged by full parameter shapes.
# ZeRO-3 checkpoints without it come from runs that, partitioned, decayed nothing (refused on resume).
DECAY_GROUPS = "full_shape"

# What a run writes into its directory (and all that `--overwrite` may delete).
RUN_FILES = ("config.yaml", "metrics.jsonl", "predictions.jsonl", "data_fingerprint.json", "results.json", "STOPPED",
             "STOP_REQUESTED", ".lock", "accelerate.yaml", "ds_config.json", "job.sbatch")
RUN_DIRS = ("checkpoints", "model", ".tmp-model", "trackers", "heartbeat")
# Written by `evaluate` / `report` into these folders; only these names are ever deleted there.
DERIVED_FILES = {"eval": ("metrics.json", "predictions.jsonl"),
                 "report": ("report.md", "training.png", "evaluation.png", "confusion.png")}
# What marks a run directory as used: a new run refuses it unless resume/overwrite is set.
RESULTS = ("metrics.jsonl", "checkpoints", "model", "predictions.jsonl")

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- sealing


MIN_KEY_BYTES = 32


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "distributed_tune" / "checkpoint.key")


class KeyMissing(RunDirError):
    """The checkpoint key file does not exist (only a fresh run creates one)."""


def read_key() -> bytes:
    """This user's checkpoint key. Refused (RunDirError, one line): a missing key (KeyMissing), an
    empty or short one (an HMAC under a short key can be forged), one that group or others can
    read (whoever reads it can seal a checkpoint that this user then unpickles; refused, not
    warned: a warning scrolls by unseen in a batch job's log)."""
    path = key_path()
    try:
        st = path.stat()
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise KeyMissing(f"checkpoint key {path} does not exist") from None
    except IsADirectoryError:
        raise RunDirError(f"checkpoint key {path} is a folder; point {KEY_ENV} at the key file") from None
    except OSError as e:
        raise RunDirError(f"checkpoint key {path} cannot be read ({e.strerror}); fix its permissions (chmod 600 "
                          f"{path}) or point {KEY_ENV} at a readable key file") from None
    if st.st_mode & 0o077:
        raise RunDirError(
            f"checkpoint key {path} can be read by group or others (mode {st.st_mode & 0o777:04o}): whoever reads it can "
            f"seal a checkpoint that this user loads (its pickles run code); chmod 600 {path}")
    if len(key) < MIN_KEY_BYTES:
        raise RunDirError(
            f"checkpoint key {path} is {'empty' if not key else f'too short ({len(key)} bytes)'}: a seal under it can be "
            f"forged; it needs at least {MIN_KEY_BYTES} bytes: point {KEY_ENV} at the key the run's checkpoints were "
            "sealed with, or delete the file and start a fresh run (it creates a new key)")
    return key


def ensure_key() -> None:
    """A fresh run (nothing to resume): create the key if there is none, atomically (the whole key
    appears at once under its name, mode 0600, or another process's key stays), then check it."""
    path = key_path()
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if it exists: never replaces a key
            except FileExistsError:  # another rank or run made it first
                pass
        finally:
            tmp.unlink(missing_ok=True)
    read_key()


def _seal(files: dict[str, list[Any]], key: bytes) -> str:
    body = json.dumps(files, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    manifest = {str(p.relative_to(folder)): [p.stat().st_size, sha256_file(p)] for p in _files(folder)}
    atomic_write_json(folder / MANIFEST, {"files": manifest, "hmac": _seal(manifest, read_key())})


UNSEALED = "not sealed with this user's checkpoint key"


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete, intact and sealed with this user's key, else what is
    wrong with it. Every file in the folder must be in the manifest (an added file fails). A
    problem starting with UNSEALED: the files match the manifest, only the seal does not (another
    key, or none readable)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no COMPLETE manifest (interrupted while saving)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files, seal = manifest["files"], manifest["hmac"]
        listed = {rel: (int(size), str(digest)) for rel, (size, digest) in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        return "unreadable COMPLETE manifest"
    for rel, (size, digest) in listed.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} is truncated ({p.stat().st_size} of {size} bytes)"
        if sha256_file(p) != digest:
            return f"{rel} is corrupted (sha256 mismatch)"
    unlisted = [str(p.relative_to(folder)) for p in _files(folder) if str(p.relative_to(folder)) not in listed]
    if unlisted:
        return f"{unlisted[0]} is not in its manifest (added after it was sealed)"
    try:
        key = read_key()
    except RunDirError as e:
        return f"{UNSEALED}: {e}"
    if not isinstance(seal, str) or not hmac.compare_digest(seal, _seal(files, key)):
        return (f"{UNSEALED} ({key_path()}): written elsewhere or edited; it is not loaded (its pickles could run "
                "code)")
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step_*")) if folder.is_dir() else []


def latest_good(run_dir: Path, warn: Callable[[str], None] = print, resuming: bool = False) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported and skipped (never deleted).
    `resuming`: when none verifies but some are complete and only their seal cannot be checked
    (the key is missing, another, unusable), refuse in one line instead of returning None: a
    resume must never start fresh over them."""
    unsealed = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        if problem.startswith(UNSEALED):
            unsealed.append((ckpt, problem))
        warn(f"checkpoint {ckpt} is damaged: {problem}; trying the previous one")
    if resuming and unsealed:
        names = ", ".join(c.name for c, _ in reversed(unsealed))
        try:
            read_key()
            why = "sealed with another key"
        except RunDirError as e:
            why = str(e)
        raise RunDirError(
            f"resume: the complete checkpoints {names} in {run_dir / 'checkpoints'} cannot be verified with the "
            f"checkpoint key {key_path()} ({why}); nothing was started and they are kept: point {KEY_ENV} at the key "
            "they were sealed with (on a cluster every node must see the same key), or start fresh with --overwrite "
            "instead of --resume (that deletes them)")
    return None


def _set_aside(ckpt: Path) -> Path:
    """A checkpoint that did not verify, in the way of a new one of the same step: renamed to
    checkpoints/damaged-step_XXXXXXXX[-N], kept for inspection, never loaded, rotated or overwritten."""
    for n in itertools.count():
        aside = ckpt.with_name(f"damaged-{ckpt.name}" + (f"-{n}" if n else ""))
        if not os.path.lexists(aside):
            ckpt.rename(aside)
            return aside
    raise AssertionError("unreachable")


def save(
    accelerator: Any, run_dir: Path, step: int, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Collective: every rank writes its part (DeepSpeed shards), rank 0 seals and renames."""
    parent = run_dir / "checkpoints"
    final = parent / checkpoint_name(step)
    tmp = parent / f".tmp-{checkpoint_name(step)}"
    try:
        if accelerator.is_main_process:
            remove(run_dir, [tmp], "saving a checkpoint")
            make_dirs(parent)
        accelerator.wait_for_everyone()
        with writing(tmp):
            accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / TRAINER_STATE, trainer_state)
            write_manifest(tmp)
            if os.path.lexists(final):
                if verify(final) is None:  # a re-run of the same step (after a resume): replace it whole
                    remove(run_dir, [final], "saving a checkpoint")
                else:  # the damaged one a resume skipped: kept, out of the way
                    _set_aside(final)
            tmp.replace(final)
            # Rotate only what is older than the checkpoint just sealed: a newer one can exist
            # (damaged, skipped on resume) and must not push the new one out.
            older = [c for c in list_checkpoints(run_dir) if c.name < final.name]
            remove(run_dir, older[: max(0, len(older) - (keep - 1))], "rotating checkpoints")
    except (WriteError, OSError, RuntimeError, SafetensorError) as e:
        # A full disk (or file size limit) surfaces as OSError from our writes, RuntimeError from
        # torch.save and SafetensorError from safetensors.
        if isinstance(e, RunDirError) and not isinstance(e, WriteError):
            raise  # the deleter's refusal, already one line
        if accelerator.is_main_process:
            with contextlib.suppress(OSError, RunDirError):
                remove(run_dir, [tmp], "cleaning up")
        reason, fix = (e.reason, e.fix) if isinstance(e, WriteError) else write_problem(e, tmp)
        try:
            free = f"; {shutil.disk_usage(parent).free // 2**20} MiB free there"
        except OSError:
            free = ""
        previous = latest_good(run_dir, warn=lambda _: None)
        raise RunDirError(
            f"could not save checkpoint {final} ({reason}{free}); the previous checkpoint "
            f"{previous or '(none)'} is kept; {fix} and resume with --resume"
        ) from None
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


# --------------------------------------------------------------------------- resume checks


def trajectory(cfg: Config, fingerprint: dict[str, str] | None = None) -> dict[str, Any]:
    """The config values (and data file hashes) that decide what is trained; saved with every
    checkpoint, compared on resume."""
    flat = flat_dict(cfg)
    out = {k: flat[k] for k in TRAJECTORY_KEYS}
    if fingerprint is not None:
        out["data.sha256"] = dict(sorted(fingerprint.items()))
    return out


def check_resumable(ckpt: Path, state: dict[str, Any], cfg: Config, fingerprint: dict[str, str] | None = None,
                    total_steps: int | None = None) -> tuple[int, int] | None:
    """Refuse a resume that would not continue the saved run: another recipe (one line naming each
    changed key with both values), a shorter run. Another number of processes is not refused: the
    layout is converted on load (reshard.py); the global batch, a recipe key, stays. With
    `total_steps` (the run's length now), returns (length before, length now) when the resume makes
    the run longer."""
    saved = state.get("trajectory", {})
    now = trajectory(cfg, fingerprint)
    changed = [k for k in now if k in saved and saved[k] != now[k] and (k != "data.sha256" or fingerprint)
               and k not in LENGTH_KEYS]

    def show(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, str) else v

    if changed:
        def diff(k: str) -> str:
            if k != "data.sha256":
                return f"{k}: {show(saved[k])} in the checkpoint, {show(now[k])} now"
            files = sorted(set(saved[k]) | set(now[k]))
            return "; ".join(f"data file {f}: sha256 {saved[k].get(f, 'none')[:12]}... in the checkpoint, "
                             f"{now[k].get(f, 'none')[:12]}... now" for f in files if saved[k].get(f) != now[k].get(f))

        diffs = "; ".join(diff(k) for k in changed)
        raise RunDirError(
            f"{ckpt} cannot be resumed with a changed recipe ({diffs}); resume with the run's own settings "
            "(its config.yaml), or start a new run in another output_dir"
        )
    if state.get("zero_stage") == 3 and state.get("weight_decay_groups") != DECAY_GROUPS:
        raise RunDirError(
            f"{ckpt} was saved by ZeRO-3 before weight decay was fixed there (it decayed no parameter; weight "
            "matrices are decayed now, as under DDP and ZeRO 1/2): it cannot continue the same recipe; start a new "
            "run in another output_dir"
        )
    extension = None
    length = [k for k in LENGTH_KEYS if k in saved and saved[k] != now[k]]
    if length and total_steps is not None:
        before = state.get("total_steps", state["optimizer_step"])
        diffs = "; ".join(f"{k}: {show(saved[k])} in the checkpoint, {show(now[k])} now" for k in length)
        if total_steps < before:
            raise RunDirError(f"{ckpt} cannot be resumed with a shorter run ({diffs}: {before} -> {total_steps} "
                              "optimizer steps); a resume may make a run longer, never shorter: resume with the run's "
                              "own length, or start a new run in another output_dir")
        extension = (before, total_steps) if total_steps > before else None
    return extension


# --------------------------------------------------------------------------- the run directory


def check_output_dir(run_dir: Path) -> None:
    """Fail before anything loads if output_dir cannot be a writable folder (a file, under a file, a
    folder this user cannot write, a read-only file system): a probe file is created and removed in
    the nearest existing folder."""
    import tempfile

    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == run_dir else f"is under {parent}, which is a file"
                raise RunDirError(f"output_dir={run_dir} {what}; choose a folder path for output_dir")
            try:
                fd, probe = tempfile.mkstemp(prefix=".dt-write-probe-", dir=parent)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise RunDirError(f"output_dir={run_dir}: cannot write in {parent} ({e.strerror}); choose another "
                                  "output_dir or fix the permissions") from None
            return


def run_finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and records.finished(records.read(path))


def refuse_used_run_dir(cfg: Config) -> Path:
    """Refuse to clobber a used run directory unless resume/overwrite says what to do, and refuse
    an --overwrite that would delete what the run needs or what is not a run's."""
    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir)
    refuse_symlinks(run_dir)
    used = [name for name in RESULTS if (run_dir / name).exists()]
    if used and not (cfg.resume or cfg.overwrite):
        raise RunDirError(
            f"output_dir={run_dir} already holds a run ({', '.join(used)}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another output_dir"
        )
    if cfg.overwrite and run_dir.is_dir():
        if not looks_like_a_run(run_dir):
            raise RunDirError(
                f"--overwrite: output_dir={run_dir} does not look like a run directory (no config.yaml or "
                "metrics.jsonl) and is not empty; nothing was deleted; choose another output_dir"
            )
        model = Path(cfg.model.name).expanduser()
        if model.exists() and any(_inside(model, run_dir / d) for d in ("model", "checkpoints", ".tmp-model")):
            raise RunDirError(
                f"--overwrite would delete model.name={cfg.model.name}, the model being fine-tuned; copy it out of "
                f"{run_dir} first or choose another output_dir"
            )
    return run_dir


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def looks_like_a_run(run_dir: Path) -> bool:
    """A folder a run (or `launch`) wrote into, or an empty one."""
    others = [p for p in run_dir.iterdir() if p.name != ".lock"]
    return not others or any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl"))


def clear_results(run_dir: Path) -> list[Path]:
    """--overwrite: remove what a previous run (and `evaluate` / `report`) wrote; the rendered
    launch files stay, and a file the package did not write is never touched. Everything is
    checked before anything goes (files.remove). Returns what was removed."""
    keep = ("accelerate.yaml", "ds_config.json", "job.sbatch", ".lock", "config.yaml")  # rendered by launch/submit, or held
    targets = [run_dir / n for n in RUN_FILES if n not in keep] + [run_dir / n for n in RUN_DIRS]
    targets += [run_dir / folder / name for folder, names in DERIVED_FILES.items() for name in names]
    removed = remove(run_dir, targets, "--overwrite")
    for folder in DERIVED_FILES:
        with_nothing_else = run_dir / folder
        if with_nothing_else.is_dir() and not with_nothing_else.is_symlink() and not any(with_nothing_else.iterdir()):
            with_nothing_else.rmdir()
    return removed


def refuse_symlinks(run_dir: Path) -> None:
    """A run's own files and folders are never symlinks: nothing is written or deleted through one
    (a symlinked eval/ would let --overwrite delete outside output_dir, a symlinked metrics.jsonl
    be appended to wherever it points)."""
    for name in (*RUN_FILES, *RUN_DIRS, *DERIVED_FILES):
        p = run_dir / name
        folder = name not in RUN_FILES
        if p.exists() and not p.is_symlink() and p.is_dir() != folder:
            raise RunDirError(
                f"output_dir={run_dir}: {name} is a {'file' if folder else 'folder'}, where a run keeps its "
                f"{'folder' if folder else 'file'} {name}; nothing was touched: move it away or choose another "
                "output_dir")
        if p.is_symlink():
            raise RunDirError(
                f"output_dir={run_dir}: {name} is a symlink (to {os.readlink(p)}); a run's own files and folders are "
                "never written or deleted through a symlink; nothing was touched: replace it with the real "
                "file or folder, or choose another output_dir")
