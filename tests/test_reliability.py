"""Runs you can trust: a resume refuses a changed recipe, one writer per run directory, the user's
files are never deleted, every mistake is one line, Ctrl-C and a dead launcher end cleanly, and a
checkpoint nobody sealed is never unpickled.

    python -m pytest -q tests/test_reliability.py        # ~3 min on 2 cores

Every case runs the real CLI on the tiny BERT and the test data, checks the exit code and the one
line printed, and compares the bytes and mtimes of what was on disk before (the run directory's
`.lock` records the holder of each attempt and is left out of the comparisons).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, limit_file_size, mounted, read_jsonl, run_cli, snapshot, subprocess_env, train_losses
from shims.harness import loss_steps

from distributed_tune import checkpoint

LOCK = (".lock",)  # left out of snapshots: the run lock records each holder, refused ones too


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def args_for(tiny_model: Path, cola_dir: Path, cache_dir: Path, run: Path, *extra: str) -> list[str]:
    return [f"model.name={tiny_model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}",
            "train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "train.log_every=1",
            "train.global_batch_size=16", "train.lr=1e-3", f"output_dir={run}", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    run_cli(args_for(tiny_model, cola_dir, cache_dir, run))
    return run


def interrupted_copy(finished: Path, copy: Path) -> Path:
    """The run as if killed right after its step-4 checkpoint."""
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    for name in ("model", "predictions.jsonl"):
        p = copy / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = [r for r in read_jsonl(copy / "metrics.jsonl") if r.get("optimizer_step", 0) <= 4 and "event" not in r]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return copy


# --------------------------------------------------------------------------- silent wrong results


def test_a_model_folder_without_its_tokenizer_is_refused(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, folder)
    for name in ("tokenizer.json", "vocab.txt"):  # transformers then builds a 5-token tokenizer
        (folder / name).unlink(missing_ok=True)
    run = tmp_path / "run"
    proc = run_cli([*args_for(folder, cola_dir, cache_dir, run)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc) == (
        f"error: model.name={folder}: its tokenizer maps 100% of the training tokens to [UNK]; the tokenizer files "
        "(tokenizer.json / vocab.txt) are missing or belong to another model; copy the model's own tokenizer "
        "files into the folder")
    assert not run.exists()


@pytest.mark.parametrize("change, line", [
    (["train.lr=5e-3"], "train.lr: 0.001 in the checkpoint, 0.005 now"),
    (["seed=7"], "seed: 42 in the checkpoint, 7 now"),
    (["train.class_weights=auto"], "train.class_weights: none in the checkpoint, auto now"),
    (["data.max_length=64"], "data.max_length: 128 in the checkpoint, 64 now"),
    (["train.lr=5e-3", "train.warmup_steps=3"],
     "train.lr: 0.001 in the checkpoint, 0.005 now; train.warmup_steps: null in the checkpoint, 3 now"),
])
def test_resume_refuses_a_changed_recipe(finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                         tmp_path: Path, change: list[str], line: str) -> None:
    run = interrupted_copy(finished, tmp_path / "run")
    # as a run stopped by a signal leaves it: a refused resume must keep this marker too
    (run / "STOPPED").write_text('{"signal": "SIGTERM", "optimizer_step": 4}')
    before = snapshot(run, LOCK)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run), *change], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    ckpt = run / "checkpoints" / "step_00000004"
    assert last_line(proc) == (f"error: {ckpt} cannot be resumed with a changed recipe ({line}); resume with the run's "
                               "own settings (its config.yaml), or start a new run in another output_dir")
    assert snapshot(run, LOCK) == before


def test_resume_refuses_a_shorter_run(finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                      tmp_path: Path) -> None:
    """train.max_steps may grow on resume (an extension), never shrink: refused, nothing touched."""
    run = interrupted_copy(finished, tmp_path / "run")
    before = snapshot(run, LOCK)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run), "train.max_steps=6"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    ckpt = run / "checkpoints" / "step_00000004"
    assert last_line(proc) == (
        f"error: {ckpt} cannot be resumed with a shorter run (train.max_steps: 8 in the checkpoint, 6 now: 8 -> 6 "
        "optimizer steps); a resume may make a run longer, never shorter: resume with the run's own length, or start "
        "a new run in another output_dir")
    assert snapshot(run, LOCK) == before


def test_resume_refuses_other_data_and_another_model(finished: Path, tiny_model: Path, cola_dir: Path,
                                                     cache_dir: Path, tmp_path: Path) -> None:
    run = interrupted_copy(finished, tmp_path / "run")
    data = tmp_path / "data"
    shutil.copytree(cola_dir, data)
    train = data / "raw" / "in_domain_train.tsv"
    train.write_text(train.read_text().replace("\t1\t\t", "\t0\t*\t", 1))  # one label flipped
    proc = run_cli(["--resume", *args_for(tiny_model, data, cache_dir, run)], check=False)
    assert proc.returncode == 2
    assert f"cannot be resumed with a changed recipe (data.source: {cola_dir} in the checkpoint, {data} now; " \
        "data file in_domain_train.tsv: sha256 " in last_line(proc)
    # The same folder whose file changed since the checkpoint: only the sha256 tells (here the
    # checkpoint's record is edited and sealed again, as if the file had been edited after it).
    run3 = interrupted_copy(finished, tmp_path / "run3")
    ckpt = run3 / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["trajectory"]["data.sha256"]["in_domain_dev.tsv"] = "0" * 64
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(ckpt)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run3)], check=False)
    assert proc.returncode == 2
    assert "cannot be resumed with a changed recipe (data file in_domain_dev.tsv: sha256 000000000000... in the " \
        "checkpoint, " in last_line(proc)
    run2 = interrupted_copy(finished, tmp_path / "run2")
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model, other_model)
    proc = run_cli(["--resume", *args_for(other_model, cola_dir, cache_dir, run2)], check=False)
    assert proc.returncode == 2
    assert f"(model.name: {tiny_model} in the checkpoint, {other_model} now)" in last_line(proc)


def test_harmless_changes_resume_to_the_same_losses(finished: Path, tiny_model: Path, cola_dir: Path,
                                                    cache_dir: Path, tmp_path: Path) -> None:
    """Logging, evaluation and checkpoint frequency, early stopping, timeouts may change."""
    run = interrupted_copy(finished, tmp_path / "run")
    run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run), "train.log_every=2", "train.eval_every=8",
             "train.keep_checkpoints=3", "distributed.timeout_s=120", "train.early_stopping_patience=4"])
    want = {r["optimizer_step"]: r["loss"] for r in read_jsonl(finished / "metrics.jsonl") if "loss" in r}
    got = {r["optimizer_step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert got[6] == pytest.approx((want[5] + want[6]) / 2, abs=1e-12) and got[8] == pytest.approx(
        (want[7] + want[8]) / 2, abs=1e-12)


def test_resume_of_a_finished_run_changes_nothing(finished: Path, tiny_model: Path, cola_dir: Path,
                                                  cache_dir: Path) -> None:
    before = snapshot(finished, LOCK)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, finished)])
    assert f"output_dir={finished} holds a finished run (train.max_steps=8): nothing to resume; resume with a larger " \
           "train.max_steps (or train.epochs) to train it longer, or --overwrite to train it again" in proc.stderr
    assert snapshot(finished, LOCK) == before
    assert sum(r.get("event") == "finished" for r in read_jsonl(finished / "metrics.jsonl")) == 1


def test_resume_without_a_checkpoint_starts_a_clean_log(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"optimizer_step": 3, "loss": 0.9}\n{"event": "first_step"}\n')
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run)])
    assert f"resume: no complete checkpoint in {run}; starting fresh" in proc.stderr
    steps = [r["optimizer_step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # no record of the lost attempt


def test_two_runs_in_one_output_dir_the_second_is_refused(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = args_for(tiny_model, cola_dir, cache_dir, run, "train.max_steps=100000", "train.checkpoint_every=0",
                    "train.eval_every=0")
    # stderr goes to a file, not a pipe: nobody reads a pipe while the run trains, and a full pipe
    # (64 KiB of progress lines) would block the run in write() so that it could never see SIGTERM
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen([sys.executable, "-m", "distributed_tune", *args], env=subprocess_env(), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=sink, text=True)
    try:
        deadline = time.monotonic() + 300
        while loss_steps(run) < 2:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        before = (run / "config.yaml").read_bytes()
        second = run_cli(["--overwrite", *args], check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert last_line(second).startswith(f"error: output_dir={run} is in use by a running job (host ")
        assert f"pid {first.pid}, since " in last_line(second)
        assert (run / "config.yaml").read_bytes() == before and first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0, log.read_text()[-2000:]  # SIGTERM: saved and stopped
    from distributed_tune.files import RunLock

    RunLock(run).probe()  # the lock died with its holder: nothing blocks a resume


# --------------------------------------------------------------------------- the user's files


def test_overwrite_deletes_only_what_a_run_wrote(finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "report").mkdir()
    (run / "report" / "thesis.docx").write_bytes(b"years of work")
    (run / "report" / "report.md").write_text("# an old report\n")
    (run / "eval").mkdir()
    (run / "eval" / "notes.txt").write_text("mine")
    (run / "eval" / "metrics.json").write_text("{}")
    old = sorted(p.name for p in (run / "checkpoints").iterdir())
    run_cli(["--overwrite", *args_for(tiny_model, cola_dir, cache_dir, run), "train.max_steps=4"])
    assert (run / "report" / "thesis.docx").read_bytes() == b"years of work"
    assert (run / "eval" / "notes.txt").read_text() == "mine"
    assert not (run / "report" / "report.md").exists() and not (run / "eval" / "metrics.json").exists()
    assert old == ["step_00000004", "step_00000008"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    assert [r["optimizer_step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_the_model_being_tuned(
        finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "thesis"
    (folder / "report").mkdir(parents=True)
    (folder / "report" / "thesis.docx").write_bytes(b"years of work")
    proc = run_cli(["--overwrite", *args_for(tiny_model, cola_dir, cache_dir, folder)], check=False)
    assert proc.returncode == 2
    assert last_line(proc) == (f"error: --overwrite: output_dir={folder} does not look like a run directory (no "
                               "config.yaml or metrics.jsonl) and is not empty; nothing was deleted; choose another "
                               "output_dir")
    assert (folder / "report" / "thesis.docx").read_bytes() == b"years of work"

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run, LOCK)
    proc = run_cli(["--overwrite", *args_for(run / "model", cola_dir, cache_dir, run)], check=False)
    assert proc.returncode == 2
    assert last_line(proc) == (f"error: --overwrite would delete model.name={run}/model, the model being fine-tuned; "
                               f"copy it out of {run} first or choose another output_dir")
    assert snapshot(run, LOCK) == before


@pytest.mark.parametrize("name", ["eval", "report", "checkpoints", "model", "metrics.jsonl"])
def test_nothing_is_deleted_or_written_through_a_symlinked_folder_of_the_run(
        finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path, name: str) -> None:
    """--overwrite once deleted eval/metrics.json through a symlinked eval/ (outside output_dir),
    and with checkpoints/ or model/ a symlink it failed after deleting metrics.jsonl."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    for file in ("metrics.json", "predictions.jsonl", "report.md", "training.png"):
        (outside / file).write_text("the user's")
    real = run / name
    if real.exists():
        shutil.move(real, outside / name)
    real.symlink_to(outside / name if (outside / name).exists() else outside)
    before, before_outside = snapshot(run, LOCK), snapshot(outside)
    for flag in ("--overwrite", "--resume"):
        proc = run_cli([flag, *args_for(tiny_model, cola_dir, cache_dir, run)], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc) == (
            f"error: output_dir={run}: {name} is a symlink (to {os.readlink(real)}); a run's own files and folders are "
            "never written or deleted through a symlink; nothing was touched: replace it with the real file or folder, "
            "or choose another output_dir")
        assert snapshot(run, LOCK) == before and snapshot(outside) == before_outside
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints"])
def test_a_run_file_that_is_a_folder_or_a_run_folder_that_is_a_file_is_refused(
        finished: Path, tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path, name: str) -> None:
    """Found by the issue-20 pass: a folder named metrics.jsonl failed only after config.yaml was rewritten."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    p = run / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    p.mkdir() if name == "metrics.jsonl" else p.write_text("x")
    before = snapshot(run, LOCK)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    a, b = ("folder", "file") if name == "metrics.jsonl" else ("file", "folder")
    assert last_line(proc) == (f"error: output_dir={run}: {name} is a {a}, where a run keeps its {b} {name}; nothing "
                               "was touched: move it away or choose another output_dir")
    assert snapshot(run, LOCK) == before and "Traceback" not in proc.stderr


def test_the_deleter_checks_every_path_before_deleting_any(tmp_path: Path) -> None:
    from distributed_tune.errors import RunDirError
    from distributed_tune.files import remove

    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "a" / "f").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "g").write_text("y")
    (run / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunDirError, match=f"{run}/link is a symlink .*nothing was deleted"):
        remove(run, [run / "a", run / "link" / "g"], "test")
    with pytest.raises(RunDirError, match="is not inside"):
        remove(run, [run / "a", tmp_path / "elsewhere"], "test")
    assert (run / "a" / "f").exists() and (tmp_path / "elsewhere" / "g").exists()
    assert remove(run, [run / "link"], "test") == [run / "link"]  # a symlink itself: only the link goes
    assert (tmp_path / "elsewhere" / "g").exists()


def test_a_full_disk_during_the_export_is_one_line_and_leaves_no_tmp_model(tiny_model: Path, cola_dir: Path,
                                                                           cache_dir: Path, tmp_path: Path) -> None:
    """A real small disk (tmpfs) sized to fill up in the middle of model/."""
    args = args_for(tiny_model, cola_dir, cache_dir, tmp_path / "warm", "train.max_steps=4")
    run_cli(args)  # the same run on a big disk: how much it writes
    warm = tmp_path / "warm"

    def pages(folder: Path) -> int:
        return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())

    # The best model is exported at the evaluation, before the step's checkpoint is saved.
    size = pages(warm) - pages(warm / "checkpoints") - pages(warm / "model") // 2
    disk = tmp_path / "disk"
    with mounted(disk, "tmpfs", size=str(size)) as ok:
        if not ok:
            pytest.skip("cannot mount a tmpfs here")
        run = disk / "run"
        proc = run_cli([*args, f"output_dir={run}"], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc) == (f"error: could not export the model to {run}/model (No space left on device: the disk "
                                   "is full); free disk space and resume with --resume")
        assert "Traceback" not in proc.stderr
        assert not (run / ".tmp-model").exists() and not (run / "model").exists()
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "data_fingerprint.json", "metrics.jsonl",
                                                         "predictions.jsonl"]


@pytest.mark.parametrize("disk", ["read-only", "full"])
def test_predict_and_evaluate_out_on_a_disk_that_takes_nothing(finished: Path, tmp_path: Path, disk: str) -> None:
    place = tmp_path / "place"
    source = tmp_path / "source"
    source.mkdir()
    (source / "kept.txt").write_text("the user's")
    with mounted(place, "ro" if disk == "read-only" else "tmpfs", size="64k", source=source) as ok:
        if not ok:
            pytest.skip("cannot mount here")
        if disk == "full":
            with contextlib.suppress(OSError):
                (place / "filler").write_bytes(b"x" * 200_000)
        before = snapshot(place)
        why = ("Read-only file system: the file system is read-only); make it writable or choose a writable place"
               if disk == "read-only" else "No space left on device: the disk is full); free disk space")
        proc = run_cli(["predict", str(finished), "a sentence", "--out", str(place / "p.jsonl")], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc) == f"error: could not write {place}/p.jsonl ({why}"
        proc = run_cli(["evaluate", str(finished), "--out", str(place / "eval")], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc).startswith(f"error: could not write {place}/eval"), last_line(proc)
        assert last_line(proc).endswith(f"({why}"), last_line(proc)
        assert snapshot(place) == before and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- one line, not a traceback


def test_bad_files_and_folders_are_one_line(tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "latin1"
    shutil.copytree(cola_dir, data)
    train = data / "raw" / "in_domain_train.tsv"
    lines = train.read_text().splitlines(keepends=True)
    train.write_bytes("".join(lines[:4]).encode() + "gj04\t1\t\tCaf\xe9 au lait.\n".encode("latin-1") +
                      "".join(lines[5:]).encode())
    offset = len("".join(lines[:4]).encode()) + len("gj04\t1\t\tCaf")
    file = tmp_path / "a-file"
    file.write_text("x")
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    cases = {
        "non-UTF-8 TSV": ([f"data.source={data}"], f"{train}:5: not UTF-8 text (byte {offset}); save the file as UTF-8"),
        "output_dir is a file": ([f"output_dir={file}"], f"output_dir={file} is a file; choose a folder path for "
                                                         "output_dir"),
        "output_dir under a file": ([f"output_dir={file}/run"], f"output_dir={file}/run is under {file}, which is a "
                                                                "file; choose a folder path for output_dir"),
        "read-only place": (["output_dir=/proc/dt-run"], "output_dir=/proc/dt-run: cannot write in /proc ("),
        "truncated weights": ([f"model.name={broken}"], f"model.name={broken}: cannot load the model weights: a "
                                                        f"weights file in {broken} cannot be read: truncated or "
                                                        "corrupt; copy the model again"),
    }
    for name, (extra, message) in cases.items():
        run = tmp_path / f"run-{name.replace(' ', '-')}"
        proc = run_cli([*args_for(tiny_model, cola_dir, cache_dir, run), *extra], check=False)
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert last_line(proc).startswith(f"error: {message}"), (name, last_line(proc))
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])


def test_a_model_folder_with_only_a_pickled_bin_is_one_line(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                           tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    before = snapshot(folder)
    why = ("the folder holds only pickled weights (pytorch_model.bin), and model folders are loaded from safetensors "
           "only (a pickle can run code when it is loaded); convert them where you trust them (transformers: "
           "from_pretrained(folder, use_safetensors=False) then save_pretrained(folder)), or use the model's "
           "model.safetensors")
    run = tmp_path / "run"
    for args, key in ((args_for(folder, cola_dir, cache_dir, run), f"model.name={folder}"),
                      (["predict", str(folder), "a sentence"], str(folder)),
                      (["evaluate", str(folder), f"data.source={cola_dir}"], str(folder))):
        proc = run_cli(args, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc) == f"error: {key}: {why}" and "Traceback" not in proc.stderr
    assert not run.exists() and snapshot(folder) == before


def test_a_full_disk_after_training_is_one_line_and_leaves_no_half_file(tiny_model: Path, cola_dir: Path,
                                                                        cache_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = args_for(tiny_model, cola_dir, cache_dir, run, "train.checkpoint_every=0", "train.eval_every=0")
    run_cli([*args, f"output_dir={tmp_path / 'warm'}"])  # the tokenized cache exists now

    proc = subprocess.run([sys.executable, "-m", "distributed_tune", *args], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)  # predictions (~150 kB) cannot be written
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc) == (
        f"error: could not write {run}/predictions.jsonl (File too large: a file size limit is reached); the newest "
        "complete checkpoint (none yet) is kept; raise the limit (ulimit -f) or free disk space and resume with --resume")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "data_fingerprint.json", "metrics.jsonl"]


# --------------------------------------------------------------------------- signals


def start_long_run(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = [*(launcher or [sys.executable]), "-m", "distributed_tune", *args]
    return subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.monotonic() + 300
    while loss_steps(run) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.05)


def test_ctrl_c_saves_and_a_second_ctrl_c_aborts(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = args_for(tiny_model, cola_dir, cache_dir, run, "train.max_steps=100000", "train.checkpoint_every=0",
                    "train.eval_every=0")
    proc = start_long_run(args)
    wait_for_steps(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Ctrl-C: stopping at the next optimizer step and saving a checkpoint (resume with --resume)" in err
    assert "stop signal 2 (SIGINT): checkpoint saved at optimizer step" in err and "Traceback" not in err
    assert checkpoint.latest_good(run, warn=lambda _: None) is not None

    # The second Ctrl-C must come while the first one's stop is still under way: optimizer steps of
    # 2048 micro-batches (4 s each on an idle 2-core machine, 1.5 s at the very least anywhere this
    # runs), and the first Ctrl-C right after a step ends, so the stop waits for a whole step.
    run2 = tmp_path / "run2"
    proc = start_long_run([*args[:-1], f"output_dir={run2}", "train.global_batch_size=8192",
                           "train.micro_batch_size=4", "train.epochs=20"])
    wait_for_steps(proc, run2, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # a person's second Ctrl-C, not torchrun's echo of the first
    assert proc.poll() is None, "the run stopped before the second Ctrl-C: make its optimizer steps longer"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted (Ctrl-C): stopped at once; completed checkpoints are kept "
                                            "(resume with --resume)")
    assert "Traceback" not in err


def test_ranks_end_when_their_launcher_dies(tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    from conftest import free_port

    run = tmp_path / "run"
    args = args_for(tiny_model, cola_dir, cache_dir, run, "train.max_steps=100000", "train.checkpoint_every=0",
                    "train.eval_every=0")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port())]
    proc = start_long_run(args, launcher)
    wait_for_steps(proc, run, 3)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "distributed_tune" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher dies without a word
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, f"ranks still running after their launcher died: {[p.pid for p in alive]}"
    # They stopped like after SIGTERM: a checkpoint at the step where both agreed to stop.
    assert checkpoint.latest_good(run, warn=lambda _: None) is not None
    assert json.loads((run / "STOPPED").read_text())["signal"] == "SIGTERM"


# --------------------------------------------------------------------------- checkpoint trust


class Payload:
    """A pickle that runs code when loaded (it would create `path`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (Path.write_text, (self.path, "the checkpoint ran code"))


def test_a_checkpoint_sealed_by_someone_else_is_never_loaded(finished: Path, tiny_model: Path, cola_dir: Path,
                                                             cache_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = interrupted_copy(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    # An attacker who can write the run directory replaces a pickled state and seals the manifest
    # again, with a key of their own (they cannot read ours).
    marker = tmp_path / "pwned"
    target = next(p for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt"))
    target.write_bytes(pickle.dumps(Payload(marker)))
    monkeypatch.setenv(checkpoint.KEY_ENV, str(tmp_path / "attacker.key"))
    checkpoint.ensure_key()
    checkpoint.write_manifest(ckpt)
    monkeypatch.delenv(checkpoint.KEY_ENV)
    before = snapshot(run, LOCK)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"checkpoint {ckpt} is damaged: its manifest is not sealed with this user's checkpoint key "
            f"({checkpoint.key_path()})") not in proc.stderr  # the old wording
    assert last_line(proc) == unverifiable_line(run, "step_00000004", checkpoint.key_path(), "sealed with another key")
    assert not marker.exists() and snapshot(run, LOCK) == before  # nothing unpickled, nothing started over it
    # Sealed with our own key, the same bytes would be trusted: the seal, not the sha256, decides.
    assert checkpoint.verify(finished / "checkpoints" / "step_00000004") is None


def unverifiable_line(run: Path, names: str, key: Path, why: str) -> str:
    return (f"error: resume: the complete checkpoints {names} in {run}/checkpoints cannot be verified with the "
            f"checkpoint key {key} ({why}); nothing was started and they are kept: point DT_CHECKPOINT_KEY at the key "
            "they were sealed with (on a cluster every node must see the same key), or start fresh with --overwrite "
            "instead of --resume (that deletes them)")


@pytest.mark.parametrize("key", ["another", "missing"])
def test_a_resume_under_another_or_no_key_stops_and_keeps_the_run(finished: Path, tiny_model: Path, cola_dir: Path,
                                                                  cache_dir: Path, tmp_path: Path, key: str) -> None:
    """SLURM always passes --resume: a node whose key differs (or lacks it) must not start the run over."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "model")  # as if stopped before the end: there is something to resume
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(metrics) if "event" not in r))
    key_file = tmp_path / "keys" / "checkpoint.key"
    if key == "another":
        key_file.parent.mkdir()
        key_file.write_text("f" * 64)
        key_file.chmod(0o600)
    before = snapshot(run, LOCK)
    env = subprocess_env(DT_CHECKPOINT_KEY=str(key_file))
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run)], check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    why = "sealed with another key" if key == "another" else f"checkpoint key {key_file} does not exist"
    assert last_line(proc) == unverifiable_line(run, "step_00000004, step_00000008", key_file, why)
    assert snapshot(run, LOCK) == before and "Traceback" not in proc.stderr
    assert key_file.exists() == (key == "another")  # a resume never creates a key
    # launch says the same before it starts anything
    proc = run_cli(["launch", "--resume", *args_for(tiny_model, cola_dir, cache_dir, run)], check=False, env=env)
    assert proc.returncode == 2 and last_line(proc) == unverifiable_line(run, "step_00000004, step_00000008",
                                                                         key_file, why)
    assert snapshot(run, LOCK) == before


@pytest.mark.parametrize("content, mode, line", [
    ("", 0o600, "is empty: a seal under it can be forged; it needs at least 32 bytes"),
    ("0123456789abcdef", 0o600, "is too short (16 bytes): a seal under it can be forged; it needs at least 32 bytes"),
    ("f" * 64, 0o644, "can be read by group or others (mode 0644): whoever reads it can seal a checkpoint that this "
                      "user loads (its pickles run code); chmod 600 "),
])
def test_an_unusable_key_is_refused_before_anything_is_written(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                               tmp_path: Path, content: str, mode: int,
                                                               line: str) -> None:
    key_file = tmp_path / "checkpoint.key"
    key_file.write_text(content)
    key_file.chmod(mode)
    run = tmp_path / "run"
    proc = run_cli(args_for(tiny_model, cola_dir, cache_dir, run), check=False,
                   env=subprocess_env(DT_CHECKPOINT_KEY=str(key_file)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc).startswith(f"error: checkpoint key {key_file} {line}"), last_line(proc)
    assert not run.exists() and key_file.read_text() == content and "Traceback" not in proc.stderr


def test_a_fresh_run_creates_its_key_whole_and_private(tiny_model: Path, cola_dir: Path, cache_dir: Path,
                                                       tmp_path: Path) -> None:
    key_file = tmp_path / "new" / "checkpoint.key"
    run_cli([*args_for(tiny_model, cola_dir, cache_dir, tmp_path / "run"), "train.max_steps=4"],
            env=subprocess_env(DT_CHECKPOINT_KEY=str(key_file)))
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text()) == 64
    assert [p.name for p in key_file.parent.iterdir()] == ["checkpoint.key"]  # no temporary file left


def test_a_file_added_to_a_checkpoint_fails_it_and_the_damaged_one_is_kept(finished: Path, tiny_model: Path,
                                                                         cola_dir: Path, cache_dir: Path,
                                                                         tmp_path: Path) -> None:
    run = interrupted_copy(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    (ckpt / "extra.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    damaged = snapshot(ckpt)
    proc = run_cli(["--resume", *args_for(tiny_model, cola_dir, cache_dir, run)])
    assert (f"checkpoint {ckpt} is damaged: extra.pkl is not in its manifest (added after it was sealed); trying the "
            "previous one") in proc.stderr
    assert f"resume: no complete checkpoint in {run}; starting fresh" in proc.stderr
    assert not (tmp_path / "pwned").exists()
    # The fresh start reached step 4 again: its new checkpoint did not overwrite the damaged one.
    aside = run / "checkpoints" / "damaged-step_00000004"
    assert snapshot(aside) == damaged
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step_00000004", "step_00000004", "step_00000008"]
    assert train_losses(run) == train_losses(finished)
