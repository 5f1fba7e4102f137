"""Faults that must lose nothing and hang nothing, and bad input that must be refused in one line.

    python -m pytest -q tests/test_faults.py          # ~40 s

* a training process killed mid-training (SIGKILL, through the SLURM script): the job exits
  non-zero within seconds instead of hanging at a collective;
* a non-finite loss (an absurd learning rate): exit 2, the message names the optimizer step and
  the last good checkpoint, which is intact;
* SIGTERM (scancel / preemption) inside a SLURM job: saves and exits 0, not requeued;
* a full disk while saving, made with RLIMIT_FSIZE (`ulimit -f`: Python ignores SIGXFSZ, so a
  write past the limit fails with EFBIG "File too large"; no tmpfs is mountable here): exit 2,
  a clear message, the previous checkpoint intact, no half-written one left;
* the bad-input matrix: malformed TSV rows, empty and missing files, a missing model folder, an
  unknown key, a YAML syntax error, a used run directory, impossible batch arithmetic. Each: exit 2,
  one line naming the file:line or key, and not one byte or mtime of an existing run changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import limit_file_size, run_cli, snapshot, subprocess_env
from shims.harness import Cluster, flat, job_id_with_free_port, loss_steps, read_jsonl, submit_cmd, write_job_config

from distributed_tune import checkpoint
from distributed_tune.cli import main


def training_processes(root: int) -> dict[int, psutil.Process]:
    """rank -> training process, among the descendants of `root` (the batch shell)."""
    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "distributed_tune" in p.cmdline() and "RANK" in (env := p.environ()):
                out[int(env["RANK"])] = p
        except psutil.NoSuchProcess:
            pass
    return out


def test_killed_rank_ends_the_job_quickly(tmp_path: Path, tiny_model: Path, cache_dir: Path, cola_dir: Path) -> None:
    cluster = Cluster(tmp_path / "slurm")
    config = write_job_config(tmp_path / "job.yaml", tiny_model, cache_dir, cola_dir, max_steps=400,
                              checkpoint_every=2)
    job_id = job_id_with_free_port()
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(submit_cmd(["--config", str(config), "--nodes", "1", "--gpus-per-node", "2",
                                        "output_dir=runs/killed"]),
                            env=cluster.env(job_id), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        while loss_steps(run_dir) < 3:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        ranks = training_processes(cluster.batch_pid())
        assert sorted(ranks) == [0, 1]
        ranks[1].kill()  # SIGKILL: no handler, no goodbye
        killed_at = time.monotonic()
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    took = time.monotonic() - killed_at
    out = (run_dir / f"slurm-{job_id}.out").read_text()
    err = (run_dir / f"slurm-{job_id}.err").read_text()
    status = int(re.search(r"job step exited with status (\d+)", out).group(1))
    print(f"rank 1 killed at step >= 3: job ended {took:.1f} s later, status {status}")
    assert proc.returncode == status != 0, out + err[-3000:]
    # torchrun sees the dead worker and stops the other one: far below distributed.timeout_s=60.
    assert took < 30, took
    assert "Signal 9 (SIGKILL) received by PID" in err or "exitcode  : -9" in err, err[-3000:]
    # Nothing of the job is left running.
    config_path = str(run_dir.resolve() / "config.yaml")
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if config_path in (p.info["cmdline"] or [])]
    # Whatever periodic checkpoint was complete is intact; a half-written one is never picked.
    good = checkpoint.latest_good(run_dir, warn=lambda _: None)
    assert good is None or checkpoint.verify(good) is None


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, base_args: list[str]) -> None:
    run_dir = tmp_path / "nan"
    proc = run_cli([*base_args, f"output_dir={run_dir}", "train.lr=1e30", "train.max_grad_norm=0",
                    "train.checkpoint_every=1", "train.eval_every=0", "train.max_steps=20"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    print(error)
    # Step 1 moves every weight by ~lr/3 (AdamW, warmup): step 2's activations overflow to inf/NaN.
    assert error == (
        f"error: non-finite loss at optimizer step 2 (epoch 0); last good checkpoint: {run_dir}/checkpoints/"
        "step_00000001; lower train.lr, check the model weights, or use bf16/fp32 instead of fp16"
    )
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_00000001"]
    assert checkpoint.verify(run_dir / "checkpoints" / "step_00000001") is None
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 1 and 0.6 < losses[0] < 0.8  # the NaN step was not logged as a result
    assert not (run_dir / "model").exists()

    # Checked every 10 steps by default (no host sync per step): still the first bad step is named.
    proc = run_cli([*base_args, f"output_dir={tmp_path / 'nan10'}", "train.lr=1e30", "train.max_grad_norm=0",
                    "train.eval_every=0", "train.max_steps=20"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: non-finite loss at optimizer step 2 (epoch 0); last good checkpoint: none;")


def test_sigterm_saves_without_requeue_then_disk_full_keeps_previous(tmp_path: Path, base_args: list[str]) -> None:
    run_dir = tmp_path / "run"
    cluster = Cluster(tmp_path / "slurm")
    env = cluster.env(job_id=777)
    env["SLURM_JOB_ID"] = "777"  # inside a SLURM job (the single-process form of the script)
    args = [*base_args, f"output_dir={run_dir}", "train.max_steps=400", "train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "distributed_tune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while loss_steps(run_dir) < 3:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = flat(err)
    assert proc.returncode == 0, err[-3000:]
    k = int(re.search(r"stop signal 15 \(SIGTERM\): checkpoint saved at optimizer step (\d+)", err).group(1))
    assert cluster.requeued() == []  # the training process itself never requeues
    assert json.loads((run_dir / "STOPPED").read_text())["signal"] == "SIGTERM"
    previous = run_dir / "checkpoints" / f"step_{k:08d}"
    assert checkpoint.verify(previous) is None
    before = snapshot(previous)

    # Resume with every file limited to 40 kB: the next checkpoint's model weights (57 kB) cannot
    # be written; small files (metrics, config) still can.
    proc2 = subprocess.run([sys.executable, "-m", "distributed_tune", *args, "train.checkpoint_every=1", "--resume"],
                           env=subprocess_env(), capture_output=True, text=True, timeout=120,
                           preexec_fn=limit_file_size)
    assert proc2.returncode == 2, proc2.stderr[-3000:]
    error = proc2.stderr.strip().splitlines()[-1]
    print(error)
    assert re.fullmatch(
        rf"error: could not save checkpoint {run_dir}/checkpoints/step_{k + 1:08d} \(.*File too large.*; \d+ MiB free "
        rf"there\); the previous checkpoint {previous} is kept; raise the limit \(ulimit -f\) or free disk space and resume "
        r"with --resume", error), error
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [previous.name]  # no .tmp-step_ left
    assert snapshot(previous) == before


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def used_run(tmp_path: Path) -> Path:
    """A run directory holding a previous run's results."""
    run = tmp_path / "used"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"weights" * 100)
    checkpoint.ensure_key()  # the run that wrote it had made one
    checkpoint.write_manifest(run / "checkpoints" / "step_00000004")
    (run / "metrics.jsonl").write_text('{"optimizer_step": 4, "loss": 0.61}\n')
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "model").mkdir()
    (run / "model" / "model.safetensors").write_bytes(b"final")
    (run / "predictions.jsonl").write_text('{"index": 0}\n')
    return run


def bad_data(tmp_path: Path, cola_raw: Path, name: str, edit: dict[str, str | None]) -> Path:
    """A copy of the CoLA folder with some files replaced (None: removed)."""
    folder = tmp_path / name
    shutil.copytree(cola_raw, folder)
    for fname, text in edit.items():
        if text is None:
            (folder / fname).unlink()
        else:
            (folder / fname).write_text(text)
    return folder


def test_bad_input_matrix(tmp_path: Path, tiny_model: Path, cache_dir: Path, cola_raw: Path, used_run: Path,
                          capsys: pytest.CaptureFixture[str], fresh_accelerate_state: None) -> None:
    train = (cola_raw / "in_domain_train.tsv").read_text().splitlines(keepends=True)
    dev = (cola_raw / "in_domain_dev.tsv").read_text().splitlines(keepends=True)

    def rows(lines: list[str], lineno: int, replacement: str) -> str:
        return "".join(lines[: lineno - 1] + [replacement] + lines[lineno:])

    folders = {
        "columns": bad_data(tmp_path, cola_raw, "columns", {"in_domain_train.tsv": rows(train, 3, "gj04\t1\tno mark column\n")}),
        "label": bad_data(tmp_path, cola_raw, "label", {"in_domain_train.tsv": rows(train, 5, "gj04\t2\t\tA sentence.\n")}),
        "sentence": bad_data(tmp_path, cola_raw, "sentence", {"in_domain_dev.tsv": rows(dev, 7, "gj04\t1\t\t  \n")}),
        "empty": bad_data(tmp_path, cola_raw, "empty", {"out_of_domain_dev.tsv": ""}),
        "missing": bad_data(tmp_path, cola_raw, "missing", {"in_domain_dev.tsv": None}),
    }
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: 2e-5\n  epochs: [3\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lrr: 2e-5\n")
    good = [f"model.name={tiny_model}", f"data.source={cola_raw}", f"data.cache_dir={cache_dir}",
            "train.global_batch_size=16", "train.micro_batch_size=8"]
    run = f"output_dir={used_run}"

    # name -> (arguments, the message: file:line or key, and what to do)
    cases: dict[str, tuple[list[str], str]] = {
        "wrong column count": (["--resume", *good, run, f"data.source={folders['columns']}"],
                               f"{folders['columns']}/in_domain_train.tsv:3: expected 4 tab-separated columns "
                               "(source, label, mark, sentence), got 3; fix or remove the line"),
        "label not 0/1": (["--resume", *good, run, f"data.source={folders['label']}"],
                          f"{folders['label']}/in_domain_train.tsv:5: label must be 0 or 1, got '2'"),
        "empty sentence": (["--resume", *good, run, f"data.source={folders['sentence']}"],
                           f"{folders['sentence']}/in_domain_dev.tsv:7: empty text; fix or remove the line"),
        "empty file": (["--resume", *good, run, f"data.source={folders['empty']}"],
                       f"{folders['empty']}/out_of_domain_dev.tsv: file is empty"),
        "missing file": (["--resume", *good, run, f"data.source={folders['missing']}"],
                         f"data.source={folders['missing']}: missing in_domain_dev.tsv"),
        "missing data folder": (["--resume", *good, run, f"data.source={tmp_path}/nowhere"],
                                f"data.source={tmp_path}/nowhere: no such folder"),
        "missing model folder": (["--overwrite", *good, run, f"model.name={tmp_path}/no-model"],
                                 f"model.name={tmp_path}/no-model: cannot load the tokenizer: the folder "
                                 f"{tmp_path}/no-model does not exist"),
        "unknown key (file)": (["--config", str(unknown), "--resume", *good, run],
                               f"{unknown}: unknown key 'train.lrr'; did you mean 'train.lr'?"),
        "unknown key (override)": (["--resume", *good, run, "train.warmup=0.1"],
                                   "override: unknown key 'train.warmup'; did you mean 'train.warmup_steps'?"),
        "YAML syntax error": (["--config", str(bad_yaml), *good, run], f"{bad_yaml}:4: YAML syntax error: "),
        "missing config file": (["--config", str(tmp_path / "nope.yaml"), *good, run],
                                f"config file {tmp_path}/nope.yaml does not exist"),
        "used run dir": ([*good, run], f"output_dir={used_run} already holds a run (metrics.jsonl, checkpoints, "
                                       "model, predictions.jsonl); pass --resume to continue it, --overwrite"),
        "batch arithmetic": (["--resume", *good, run, "train.global_batch_size=30"],
                             "train.global_batch_size=30 is not a multiple of train.micro_batch_size=8 x world size "
                             "1 = 8; pick a global batch that is a multiple of 8"),
        "max_length beyond the model": (["--resume", *good, run, "data.max_length=512"],
                                        f"data.max_length=512 is more than model.name={tiny_model} takes (128 "
                                        "positions); set data.max_length=128 or less"),
        "batch larger than data": (["--resume", *good, run, "train.global_batch_size=16384",
                                    "train.micro_batch_size=16384"],
                                   "train.global_batch_size=16384 is larger than the training set (8551 examples)"),
    }
    before = snapshot(used_run)
    seen = []
    for name, (args, message) in cases.items():
        code = main(args)
        out, err = capsys.readouterr()
        line = err.strip().splitlines()[-1] if err.strip() else ""
        seen.append(f"{name:24s} exit {code}  {line}")
        assert code == 2, (name, err[-2000:])
        assert line.startswith("error: ") and message in line, (name, line)
        assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [line], (name, err)
        assert snapshot(used_run) == before, f"{name}: the existing run directory was modified"
    print("\n".join(seen))


@pytest.fixture()
def fresh_accelerate_state():
    """The matrix builds Accelerators in this process: start from, and leave, no singleton state."""
    from accelerate.state import AcceleratorState, PartialState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        os.environ.pop("ACCELERATE_USE_CPU", None)

    reset()
    yield
    reset()
