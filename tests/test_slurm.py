"""SLURM batch scripts without a cluster: golden renderings, submit's refusals, the shims.

    python -m pytest -q tests/test_slurm.py                       # ~10 s
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_slurm.py -k golden    # accept a deliberate change

The rendering tests call the CLI in-process (`submit --dry-run` imports no torch). What the
scripts do on a real cluster (CPU partition, USR1 -> checkpoint -> requeue -> resume, time limit,
scancel, arrays, launch/single_node.sbatch) is tests/test_slurm_cluster.py; the multi-node form
runs through the shims of tests/shims/ in tests/test_resume.py.
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
from shims.harness import Cluster

from distributed_tune.cli import main
from distributed_tune.slurm import STEP_AND_REQUEUE, WARNING_TRAP

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
    "slurm_cpu_1x2": ("cola_bert_base.yaml", ["--gpus-per-node", "0", "--processes-per-node", "2", "--time", "30",
                                              "--partition", "cpu", "output_dir=runs/cpu"]),
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
    # Every training command resumes (the re-render for another shape, too: it writes into the run).
    starts = [line for line in text.splitlines() if "-m distributed_tune " in line and not line.startswith("#")]
    assert starts and all("--resume" in line for line in starts), starts
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1
    gpus = int(args[args.index("--gpus-per-node") + 1])
    per_node = int(args[args.index("--processes-per-node") + 1]) if "--processes-per-node" in args else gpus
    world = per_node * (int(args[args.index("--nodes") + 1]) if "--nodes" in args else 1)
    # Every launcher, and Python itself before its handler is installed, ignores the warning.
    assert srun[0] == ('srun --nodes="$DT_NODES" --ntasks="$DT_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
                       "bash -c 'trap \"\" USR1")
    # The shape comes from the allocation at run time, the rendered one is the default.
    assert f"export DT_NODES=${{SLURM_JOB_NUM_NODES:-{world // per_node}}}" in lines
    assert ('export DT_PER_NODE=${DT_PROCESSES_PER_NODE:-' + (f"${{SLURM_GPUS_ON_NODE:-{gpus}}}}}" if gpus
                                                             else f"{per_node}}}")) in lines
    assert '  --num_machines "$DT_NODES" --num_processes "$DT_WORLD" --main_process_port "$DT_MAIN_PORT" \\' in lines
    deepspeed = (run_dir / "ds_config.json").exists()
    one = 'if [ "$DT_WORLD" -eq 1 ]; then exec "$DT_PYTHON" -m distributed_tune --config "$DT_TRAIN_CONFIG" --resume; fi'
    assert (one in lines) == (not deepspeed)
    accelerate = (run_dir / "accelerate.yaml").read_text()
    assert f"num_processes: {world}\n" in accelerate and f"num_machines: {world // per_node}\n" in accelerate
    if name == "slurm_2x8_zero2":
        # The node rank must reach each node unexpanded: it sits inside the single-quoted bash -c.
        quoted = text[text.index("bash -c '") + len("bash -c '"):]
        quoted = quoted[: quoted.index("'")]
        assert '--machine_rank "$SLURM_NODEID"' in quoted and '--main_process_ip "$DT_MAIN_IP"' in quoted
        # The rendezvous is the first node's address as SLURM knows it, not its name.
        assert '  DT_MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
        assert any("scontrol show node \"$DT_MAIN_NODE\"" in line and "NodeAddr=" in line for line in lines)
        ds = (run_dir / "ds_config.json").read_text()
        assert '"train_micro_batch_size_per_gpu": 2' in ds and '"stage": 2' in ds
        for header in ("--partition=gpu", "--account=A", "--time=02:00:00", "--nodes=2", "--gpus-per-node=8",
                       "--job-name=dt-zero2"):
            assert f"#SBATCH {header}" in directives
    # The job requeues itself (an array task: only itself) after the step has exited.
    assert 'scontrol requeue "$DT_JOB"' in text and text.index('scontrol requeue "$DT_JOB"') > text.index('wait "$step"')
    # A CPU partition has no GPU resource: a GPU line would be refused ("Invalid generic resource").
    assert any(d.startswith("#SBATCH --gpus-per-node") for d in directives) == (gpus > 0)
    # Every script asks for CPUs: GPUs x 4 (--cpus-per-gpu's default) unless given; a CPU job one per process.
    cpus = {"slurm_2x8_zero2": 32, "slurm_1x4_ddp": 32, "slurm_1gpu": 4, "slurm_cpu_1x2": 2}[name]
    assert [d for d in directives if d.startswith("#SBATCH --cpus-per-task=")] == [f"#SBATCH --cpus-per-task={cpus}"]
    assert lines[4].startswith(f"# CPUs: --cpus-per-task={cpus} per node, ")
    if name == "slurm_cpu_1x2":
        assert "#SBATCH --cpus-per-task=2" in directives and "#SBATCH --partition=cpu" in directives
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
        "no CPUs per GPU": (["--config", zero2, "--cpus-per-gpu", "0", "output_dir=runs/new"],
                            "--cpus-per-gpu=0 must be at least 1"),
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


def test_cpus_per_gpu_scales_the_cpus_of_a_gpu_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--cpus-per-gpu N`: --cpus-per-task = GPUs per node x N, said in the header; --cpus-per-task wins."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "cola_bert_base.yaml")
    for args, want, why in (
            (["--gpus-per-node", "2", "--cpus-per-gpu", "6"], 12, "2 GPU(s) x 6 (submit --cpus-per-gpu N"),
            (["--gpus-per-node", "2", "--cpus-per-gpu", "6", "--cpus-per-task", "5"], 5, "as given (--cpus-per-task)"),
            (["--gpus-per-node", "8"], 32, "8 GPU(s) x 4 ")):
        out_dir = f"runs/c{want}"
        code, _, err = submit(["--config", config, *args, "--dry-run", "train.micro_batch_size=2",
                               f"output_dir={out_dir}"], capsys)
        assert code == 0, err
        text = (tmp_path / out_dir / "job.sbatch").read_text()
        assert f"\n#SBATCH --cpus-per-task={want}\n" in text and text.count("--cpus-per-task=") == 2
        assert f"# CPUs: --cpus-per-task={want} per node, {why}" in text


def test_single_node_script_shares_the_rendered_signal_handling() -> None:
    """launch/single_node.sbatch is a static file: its warning trap and its step/requeue tail must be
    the rendered scripts' own (slurm.py), word for word, so that a fix reaches both."""
    text = (REPO / "launch" / "single_node.sbatch").read_text()
    name = "single_node.sbatch"
    assert WARNING_TRAP.format(name=name).strip("\n") in text
    before, after = STEP_AND_REQUEUE.split("{step}")
    assert before.format(name=name) in text
    assert after.format(name=name, script="[options] launch/single_node.sbatch $*") in text
    # No GPU resource unless asked: the header's one GPU is the default, a CPU partition says 0.
    assert "#SBATCH --gpus-per-node=1" in text and "--gpus-per-node=0 --cpus-per-task=2" in text
    # A GPU job asks for CPUs: 4 for the header's one GPU (a command line's --cpus-per-task wins).
    assert "#SBATCH --cpus-per-task=4" in text and "--gpus-per-node=4 --cpus-per-task=16" in text
    assert 'gpus=${SLURM_GPUS_ON_NODE:-0}' in text and "${SLURM_CPUS_PER_TASK:-1}" in text


def test_shims_answer_like_slurm(tmp_path: Path) -> None:
    """The shims stand in for what one machine cannot be (several nodes: test_resume.py)."""
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
