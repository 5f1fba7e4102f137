"""SLURM batch scripts: golden renderings, submit's refusals, and a real preempt -> requeue -> resume.

    python -m pytest -q tests/test_slurm.py                       # ~1 min: 3 two-process jobs
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_slurm.py -k golden    # accept a deliberate change

The rendering tests call the CLI in-process (`submit --dry-run` imports no torch). The job test
puts the sbatch/srun/scontrol shims of tests/shims/ on PATH: `submit` renders the script and calls
`sbatch`, which really runs it here with SLURM's variables set (one node, 2 CPU processes under
`accelerate launch`); the test sends SIGUSR1 to the batch shell mid-epoch, as `--signal=B:USR1@90`
would, and the job must save, record `scontrol requeue`, and exit 0; starting it again must reach
the same per-step losses, MCC, predictions and model bytes as a job that was never interrupted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from shims.harness import (
    Cluster,
    final_dev,
    flat,
    job_id_with_free_port,
    losses_by_step,
    run_job,
    side_by_side,
    submit_cmd,
    write_job_config,
)

from distributed_tune.cli import main

GOLDEN = Path(__file__).parent / "golden"

# golden name -> (config shipped in configs/, submit arguments)
CASES: dict[str, tuple[str, list[str]]] = {
    "slurm_2x8_zero2": ("cola_bert_base_zero2.yaml", [
        "--nodes", "2", "--gpus-per-node", "8", "--time", "02:00:00", "--partition", "gpu", "--account", "A",
        "train.micro_batch_size=2", "output_dir=runs/zero2"]),
    "slurm_1x4_ddp": ("cola_bert_base.yaml", [
        "--nodes", "1", "--gpus-per-node", "4", "--time", "1-00:00:00", "--partition", "gpu", "--job-name",
        "cola-ddp", "--cpus-per-task", "32", "--sbatch-option", "qos=high", "train.micro_batch_size=8",
        "output_dir=runs/ddp"]),
    "slurm_1gpu": ("cola_bert_base.yaml", ["--gpus-per-node", "1", "--time", "45", "output_dir=runs/one"]),
}


def normalise(text: str, cwd: Path) -> str:
    for prefix in {str(cwd.resolve()), str(cwd)}:
        text = text.replace(prefix, "<cwd>")
    return text.replace(sys.executable, "<python>")


def submit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["submit", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(CASES))
def test_golden_rendering(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    config, args = CASES[name]
    shutil.copy(REPO / "configs" / config, tmp_path / config)
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(["--config", config, *args, "--dry-run"], capsys)
    assert code == 0, err
    run_dir = tmp_path / re.search(r"output_dir=(\S+)", " ".join(args)).group(1)
    script = run_dir / "job.sbatch"
    assert out.splitlines()[-1] == f"dry run: submit with `sbatch {script.relative_to(tmp_path)}`"
    text = normalise(script.read_text(), tmp_path)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{script} differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    for path in (script, REPO / "launch" / "single_node.sbatch"):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path

    # The conventions, independently of the golden text.
    lines = text.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives and "#SBATCH --requeue" in directives
    assert "#SBATCH --signal=B:USR1@90" in directives and "#SBATCH --open-mode=append" in directives
    assert f"#SBATCH --output=<cwd>/{run_dir.relative_to(tmp_path)}/slurm-%j.out" in directives
    assert "pdsh" not in text and "ssh " not in text
    assert text.count("--resume") == 1
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1
    world = int(args[args.index("--gpus-per-node") + 1]) * (int(args[args.index("--nodes") + 1])
                                                             if "--nodes" in args else 1)
    if world == 1:
        assert srun[0] == 'srun --kill-on-bad-exit=1 "$DT_PYTHON" -m distributed_tune --config "$DT_TRAIN_CONFIG" --resume &'
        assert (run_dir / "accelerate.yaml").exists() and not (run_dir / "ds_config.json").exists()
    else:
        assert f"--num_processes {world}" in text
    if name == "slurm_2x8_zero2":
        # The node rank must reach each node unexpanded: it sits inside the single-quoted bash -c.
        quoted = text[text.index("bash -c '") + len("bash -c '"):]
        quoted = quoted[: quoted.index("'")]
        assert '--machine_rank "$SLURM_NODEID"' in quoted and '--main_process_ip "$DT_MAIN_IP"' in quoted
        assert 'DT_MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
        ds = (run_dir / "ds_config.json").read_text()
        assert '"train_micro_batch_size_per_gpu": 2' in ds and '"stage": 2' in ds
        for header in ("--partition=gpu", "--account=A", "--time=02:00:00", "--nodes=2", "--gpus-per-node=8",
                       "--job-name=dt-zero2"):
            assert f"#SBATCH {header}" in directives
    else:
        assert "SLURM_NODEID" not in text and "scontrol show" not in text
    # The job requeues itself (an array task: only itself) after the step has exited.
    assert 'scontrol requeue "$DT_JOB"' in text and text.index('scontrol requeue "$DT_JOB"') > text.index('wait "$step"')
    if name == "slurm_1x4_ddp":
        assert "#SBATCH --qos=high" in directives and "#SBATCH --cpus-per-task=32" in directives
        assert not any(d.startswith("#SBATCH --account") for d in directives)


def test_submit_refusals_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Bad submissions: exit 2, one line naming the option/key and the fix, no file touched."""
    monkeypatch.chdir(tmp_path)
    zero2 = str(REPO / "configs" / "cola_bert_base_zero2.yaml")
    # A run directory that holds a run (results + its launch files).
    used = tmp_path / "runs" / "used"
    (used / "checkpoints" / "step_00000004").mkdir(parents=True)
    (used / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"weights")
    (used / "metrics.jsonl").write_text('{"optimizer_step": 4, "loss": 0.6}\n')
    (used / "job.sbatch").write_text("#!/bin/bash\n# the previous job\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in used.rglob("*") if p.is_file()}

    cases = {
        # micro 4 x 16 processes cannot make a global batch of 32
        "batch arithmetic": (["--config", zero2, "--nodes", "2", "--gpus-per-node", "8", "--time", "02:00:00",
                              "--partition", "gpu", "train.micro_batch_size=4", "output_dir=runs/new"],
                             "train.global_batch_size=32 is not a multiple of train.micro_batch_size=4 x world size 16 = 64"),
        "time too short for the lead": (["--config", zero2, "--time", "00:01:30", "output_dir=runs/new"],
                                        "--time=00:01:30 (SLURM rounds it up to 2 min) with --signal-lead=90 s: the "
                                        "warning signal can come 30 s early, i.e. at the start; raise --time above "
                                        "2 min or lower --signal-lead"),
        "lead too short": (["--config", zero2, "--signal-lead", "5", "output_dir=runs/new"],
                           "--signal-lead=5 s leaves too little time to reach a stop check and save a checkpoint"),
        "time format": (["--config", zero2, "--time", "2h", "output_dir=runs/new"], "--time='2h' is not a SLURM time limit"),
        "no nodes": (["--config", zero2, "--nodes", "0", "output_dir=runs/new"], "--nodes=0 must be at least 1"),
        "header injection": (["--config", zero2, "--partition", "gpu\n#SBATCH --exclusive", "output_dir=runs/new"],
                             "--partition='gpu\\n#SBATCH --exclusive' must be one word without spaces"),
        "unknown key": (["--config", zero2, "train.lrr=1e-5", "output_dir=runs/new"],
                        "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        "used run dir": (["--config", zero2, "train.micro_batch_size=32", "output_dir=runs/used"],
                         "output_dir=runs/used already holds a run (metrics.jsonl, checkpoints); pass --resume"),
    }
    for name, (args, message) in cases.items():
        code, out, err = submit(args, capsys)
        assert code == 2, (name, out, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "runs" / "new").exists(), name
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in used.rglob("*") if p.is_file()}
    assert after == before

    # No sbatch on PATH: the files are rendered (a dry run's worth), the error says what to do.
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = submit(["--config", zero2, "train.micro_batch_size=32", "output_dir=runs/nosbatch"], capsys)
    assert code == 2 and "sbatch not found on PATH" in err and "--dry-run" in err
    assert (tmp_path / "runs" / "nosbatch" / "job.sbatch").is_file()


def test_shims_answer_like_slurm(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "state")
    env = cluster.env(job_id=123)
    env["SLURM_JOB_NODELIST"] = "localhost,127.0.0.2"
    hosts = subprocess.run(["scontrol", "show", "hostnames"], env=env, capture_output=True, text=True, check=True)
    assert hosts.stdout.split() == ["localhost", "127.0.0.2"]
    subprocess.run(["scontrol", "requeue", "123"], env=env, check=True)
    assert cluster.requeued() == [123]
    # srun runs one task per node with its own SLURM_NODEID, expanded by the task's own shell.
    script = tmp_path / "nodes.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=3\n#SBATCH --output=" + str(tmp_path) + "/out-%j.txt\n"
                      "srun --kill-on-bad-exit=1 bash -c 'echo node $SLURM_NODEID of $SLURM_NNODES on $SLURMD_NODENAME'\n")
    proc = subprocess.run(["sbatch", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "Submitted batch job 123\n"
    assert sorted((tmp_path / "out-123.txt").read_text().splitlines()) == [
        "node 0 of 3 on localhost", "node 1 of 3 on 127.0.0.2", "node 2 of 3 on 127.0.0.3"]


def test_preempt_requeue_resume_matches_uninterrupted(tmp_path: Path, tiny_model: Path, cache_dir: Path,
                                                     cola_dir: Path) -> None:
    cluster = Cluster(tmp_path / "slurm")
    config = write_job_config(tmp_path / "job.yaml", tiny_model, cache_dir, cola_dir)
    common = ["--config", str(config), "--nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00",
              "--partition", "debug"]

    # The uninterrupted job: the ready-made script of launch/, given the GPUs on the command line.
    ref_id = job_id_with_free_port()
    env = {**cluster.env(ref_id), "DT_PYTHON": sys.executable}
    proc, _ = run_job(["sbatch", "--gpus-per-node=2", str(REPO / "launch" / "single_node.sbatch"), str(config),
                       "output_dir=runs/reference"], env, tmp_path)
    reference = tmp_path / "runs" / "reference"
    log = tmp_path / f"slurm-distributed_tune-{ref_id}"
    assert proc.returncode == 0, proc.stdout + Path(f"{log}.err").read_text()[-4000:]
    assert proc.stdout == f"Submitted batch job {ref_id}\n" and cluster.requeued() == []
    assert "job step exited with status 0" in Path(f"{log}.out").read_text()
    assert "num_processes: 2" in (reference / "accelerate.yaml").read_text()

    # Attempt 1: SIGUSR1 to the batch shell once 4 optimizer steps are logged (epoch 0 has 534).
    job_id = job_id_with_free_port()
    run_dir = tmp_path / "runs" / "preempted"
    proc, stop_s = run_job(submit_cmd([*common, "output_dir=runs/preempted"]), cluster.env(job_id), tmp_path,
                           run_dir=run_dir, signal_after=4, cluster=cluster)
    err1 = flat((run_dir / f"slurm-{job_id}.err").read_text())
    assert proc.returncode == 0, proc.stdout + err1[-4000:]
    stopped = re.search(r"stop signal 10 \(SIGUSR1\): checkpoint saved at optimizer step (\d+)", err1)
    assert stopped, err1[-4000:]
    k = int(stopped.group(1))
    assert 4 <= k < 40, k
    assert cluster.requeued() == [job_id]  # scontrol requeue "$SLURM_JOB_ID", once, after the step ended
    assert f"[job.sbatch] requeueing job {job_id}: it resumes from the checkpoint" in \
        (run_dir / f"slurm-{job_id}.out").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == f"step_{k:08d}"
    assert not (run_dir / "model").exists()  # training did not finish
    assert "job step exited with status 0" in (run_dir / f"slurm-{job_id}.out").read_text()
    print(f"preempted at optimizer step {k}, {stop_s:.1f} s after SIGUSR1")

    # Damage on disk that resume must survive: a truncated newer checkpoint and an unsealed one.
    damaged = run_dir / "checkpoints" / f"step_{k + 1:08d}"
    shutil.copytree(run_dir / "checkpoints" / f"step_{k:08d}", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(run_dir / "checkpoints" / f"step_{k:08d}", run_dir / "checkpoints" / f".tmp-step_{k + 2:08d}")

    # Attempt 2: SLURM starts the requeued job again (same id, SLURM_RESTART_COUNT=1).
    proc, _ = run_job(["sbatch", str(run_dir / "job.sbatch")], cluster.env(job_id, restart=1), tmp_path)
    err = flat((run_dir / f"slurm-{job_id}.err").read_text())
    assert proc.returncode == 0, err[-4000:]
    assert f"checkpoint runs/preempted/checkpoints/step_{k + 1:08d} is damaged: model.safetensors is truncated" in err
    assert f"resumed from runs/preempted/checkpoints/step_{k:08d}" in err
    out = (run_dir / f"slurm-{job_id}.out").read_text()  # --open-mode=append: both attempts
    assert f"job {job_id} (restart 0)" in out and f"job {job_id} (restart 1)" in out
    assert cluster.requeued() == [job_id]

    want, got = losses_by_step(reference), losses_by_step(run_dir)
    table = side_by_side(want, got, k)
    print(table)
    assert list(got) == list(range(1, 41)), table
    # Same process count, same arithmetic: DDP resume is bitwise exact.
    assert got == want, table
    ref_dev, dev = final_dev(reference), final_dev(run_dir)
    print(f"final dev MCC: uninterrupted {ref_dev['mcc']!r}, preempted+resumed {dev['mcc']!r}")
    assert dev["mcc"] == ref_dev["mcc"] and dev["confusion_matrix"] == ref_dev["confusion_matrix"]
    assert (run_dir / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert (run_dir / "model" / "model.safetensors").read_bytes() == \
        (reference / "model" / "model.safetensors").read_bytes()
