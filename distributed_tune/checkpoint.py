"""Resumable checkpoints that cannot be half-written.

A checkpoint is written as ``checkpoints/.tmp-step_XXXXXXXX``, gets a ``COMPLETE`` manifest
(every file's size and sha256) and is renamed to ``checkpoints/step_XXXXXXXX``. Older ones are
deleted only after their successor is complete. On resume, the newest checkpoint whose files
match its manifest is used; a damaged one is reported by name and skipped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from distributed_tune.config import Config
from distributed_tune.data import sha256_file
from distributed_tune.errors import RunDirError

MANIFEST = "COMPLETE"
# What marks a run directory as used: a new run refuses it unless resume/overwrite is set.
RESULTS = ("metrics.jsonl", "checkpoints", "model", "predictions.jsonl")
# Derived from a run's results by `evaluate` / `report`; stale once the run is replaced.
DERIVED_OUTPUTS = ("eval", "report")
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): [p.stat().st_size, sha256_file(p)] for p in files}
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no COMPLETE manifest (interrupted while saving)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "unreadable COMPLETE manifest"
    for rel, (size, digest) in manifest.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} is truncated ({p.stat().st_size} of {size} bytes)"
        if sha256_file(p) != digest:
            return f"{rel} is corrupted (sha256 mismatch)"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step_*")) if folder.is_dir() else []


def latest_good(run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported and skipped (never deleted)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt} is damaged: {problem}; trying the previous one")
    return None


def save(
    accelerator: Any, run_dir: Path, step: int, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Collective: every rank writes its part (DeepSpeed shards), rank 0 seals and renames."""
    parent = run_dir / "checkpoints"
    final = parent / checkpoint_name(step)
    tmp = parent / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
            if final.exists():  # a re-run of the same step (after a resume): replace it whole
                shutil.rmtree(final)
            tmp.replace(final)
            # Rotate only what is older than the checkpoint just sealed: a newer one can exist
            # (damaged, skipped on resume) and must not push the new one out.
            older = [c for c in list_checkpoints(run_dir) if c.name < final.name]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(old)
    except (OSError, RuntimeError, SafetensorError) as e:
        # A full disk (or file size limit) surfaces as OSError from our writes, RuntimeError from
        # torch.save and SafetensorError from safetensors.
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:200]
        free_mb = shutil.disk_usage(parent).free // 2**20
        previous = latest_good(run_dir, warn=lambda _: None)
        raise RunDirError(
            f"could not save checkpoint {final} ({reason}; {free_mb} MiB free there); the previous checkpoint "
            f"{previous or '(none)'} is kept; free disk space and resume with --resume"
        ) from None
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def check_resumable(ckpt: Path, state: dict[str, Any], zero_stage: int | None, world_size: int,
                    global_batch_size: int, here: str) -> None:
    """Refuse a resume that cannot continue the saved run: another ZeRO stage, ZeRO shards over
    another number of processes, or another global batch (the data order would change). `here`
    describes the new world, e.g. "this run has 4"."""
    if state["zero_stage"] != zero_stage:
        raise RunDirError(
            f"{ckpt} was saved with distributed.zero_stage={state['zero_stage']} but this run uses "
            f"{zero_stage}; resume with the same stage, or start a new run from its weights"
        )
    if zero_stage is not None and state["world_size"] != world_size:
        raise RunDirError(
            f"{ckpt} holds ZeRO state sharded over {state['world_size']} processes but {here}; "
            f"resume with {state['world_size']} processes, or start a new run from consolidated weights "
            f"(DeepSpeed's zero_to_fp32.py in {ckpt})"
        )
    if state["global_batch_size"] != global_batch_size:
        raise RunDirError(
            f"{ckpt} was trained with train.global_batch_size={state['global_batch_size']}; "
            f"resume with the same global batch (now {global_batch_size})"
        )


def refuse_used_run_dir(cfg: Config) -> Path:
    """Refuse to clobber a used run directory unless resume/overwrite says what to do."""
    run_dir = Path(cfg.output_dir)
    used = [name for name in RESULTS if (run_dir / name).exists()]
    if used and not (cfg.resume or cfg.overwrite):
        raise RunDirError(
            f"output_dir={run_dir} already holds a run ({', '.join(used)}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another output_dir"
        )
    return run_dir


def clear_results(run_dir: Path) -> None:
    """--overwrite: remove the previous run's results (the rendered launch files stay)."""
    for name in RESULTS + DERIVED_OUTPUTS:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
