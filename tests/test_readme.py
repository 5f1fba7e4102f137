"""Every command shown in README.md, and in the header comments of configs/*.yaml, runs as written.

    python -m pytest -q tests/test_readme.py        # ~4 min on 2 cores

The commands are read from the files themselves (README's ```bash blocks; `#   ` lines of the
config headers), so the documentation cannot drift from the code: a command no rule below knows
fails the test. They run in order, in a scratch folder holding a copy of configs/ and launch/
(relative paths such as runs/cola_bert_base behave as in a checkout). Where a command needs what
this machine lacks, the substitution is stated in its rule: the tiny test model and the test data
replace the hub model and the CoLA download (`key=value` overrides appended, which win), training is
cut to a few steps, GPU-sized launches get `--dry-run`, and the GPU benchmarks must refuse in one
line. Install, test and CI lines are checked against .ci/run, which runs them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, read_jsonl, subprocess_env

from distributed_tune import records

README = REPO / "README.md"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def readme_commands() -> list[str]:
    """The commands of README's ```bash blocks, continuation lines joined, trailing comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def header_commands(path: Path) -> list[str]:
    """The `#   command` lines at the top of a config file."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            out.append(" ".join(line[4:].split()))
    return out


@dataclass
class Env:
    work: Path
    model: Path
    cola: Path
    cache: Path
    glue: Path
    custom: dict[str, Path]

    def data(self, *extra: str) -> list[str]:
        """The test model and data, a run of a few steps (overrides: appended, they win)."""
        return [f"model.name={self.model}", f"data.cache_dir={self.cache}", "train.max_steps=3", "train.eval_every=0",
                "train.log_every=1", *extra]


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    if cmd[0] == "python":
        cmd = [sys.executable, *cmd[1:]]
    elif cmd[0] == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:]]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess, cmd: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def ci_line(command: str) -> None:
    """Install, test and CI lines: .ci/run runs them (the install with -q)."""
    ci = (REPO / ".ci" / "run").read_text()
    if command == "python -m pytest -q -m fast tests":  # a subset of the full suite, which CI runs
        command = "python -m pytest -q -n 2 tests"
    wanted = command.replace("pip install ", "pip install -q ")
    assert command in ci or wanted in ci or (command.startswith("bash .ci/with-slurm.sh") and
                                             "bash .ci/with-slurm.sh python -m pytest -q -n 2 tests" in ci), command


def run_readme_command(command: str, env: Env, cwd: Path) -> str:
    """Run one README/header command by its rule; returns what was done (for the printed table)."""
    argv = shlex.split(command)
    if command.startswith(("pip install", "python -m pytest", "bash .ci/", "ruff check")):
        ci_line(command)
        return "run by .ci/run"
    if argv[0] == "sbatch":
        ok(subprocess.run(["bash", "-n", str(cwd / "launch" / "single_node.sbatch")], capture_output=True,
                          text=True), command)
        gpus = re.search(r"--gpus-per-node=(\d+)", command)
        if gpus is None or gpus.group(1) != "0" or shutil.which("sbatch") is None or \
                subprocess.run(["sinfo"], capture_output=True).returncode != 0:
            return "bash -n (GPU partition, or no SLURM here; tests/test_slurm_cluster.py submits it on CPU)"
        ok(subprocess.run([*argv[:1], "--test-only", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=60), command)
        return "sbatch --test-only on the cluster"
    if "benchmarks/gpu_check.py" in command or "benchmarks/gpu_suite.py" in command:
        proc = run(argv, cwd)
        assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr, proc.stderr[-2000:]
        return "refuses without a GPU, in one line"
    if "benchmarks/scale.py" in command:
        ok(run([*argv, "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
                "--vocab", "100", "--steps", "1", "--worlds", "1"], cwd), command)
        return "a tiny shape, 1 step, 1 process"
    if "benchmarks/bench_vs_trainer.py" in command:
        ok(run([*argv[:2], "--data", str(env.cola), "--model", str(env.model), "--cache", str(env.cache),
                "--quick", "--quick-steps", "2", "--seeds", "42", "--setups", "ours", *argv[2:][2:]], cwd), command)
        return "test data and model, --quick 2 steps, ours only"
    if argv[3:4] == ["push"]:
        proc = run(argv, cwd)  # HF_HUB_OFFLINE=1 (subprocess_env): there is no hub here
        assert proc.returncode == 2 and proc.stderr.startswith("error: push needs the Hugging Face Hub") and \
            len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
        return "refuses without network, in one line"
    # distributed_tune commands
    if "--gpus 8" in command or ("submit" in argv and "--dry-run" not in argv):
        argv.append("--dry-run")  # a GPU machine's launch, or a real cluster's submission
        ok(run([*argv, f"data.cache_dir={env.cache}"], cwd), command)
        return "--dry-run (GPUs)"
    if argv[:2] == ["accelerate", "launch"] and "--config_file" in argv:
        # Rendered for 8 GPUs above: render the same for 2 CPU processes, then run the line as written.
        rendered = argv[argv.index("--config") + 1]
        out = str(Path(rendered).parent)
        from conftest import free_port

        ok(run(["python", "-m", "distributed_tune", "launch", "--config", "configs/cola_bert_base.yaml", "--gpus",
                "2", "--port", str(free_port()), "distributed.zero_stage=3", "distributed.offload_optimizer=cpu", "distributed.offload_params=cpu",
                "precision=bf16", f"output_dir={out}", *env.data(f"data.source={env.cola}"), "--dry-run",
                "--overwrite"], cwd), command)
        ok(run(argv, cwd), command)
        assert len(read_jsonl(cwd / out / "metrics.jsonl")) > 0
        return "rendered for 2 CPU processes, then as written"
    if any(a in argv for a in ("config", "--help")) or "--dry-run" in argv or any(
            a in argv for a in ("evaluate", "predict", "report", "--summarize")):
        ok(run(argv, cwd), command)
        return "as written"
    # Training (and sweeps): the test model and data.
    data = f"data.source={env.cola}"
    if "task=sst2" in command:
        data = f"data.source={env.glue / 'SST-2'}"
    if "task=mnli" in command:
        data = f"data.source={env.glue / 'MNLI'}"
    extra = env.data() if "custom" in command else env.data(data)
    if "configs/custom_csv.yaml" in command:
        files = ("jsonl", "text", "rating") if "jsonl" in command else ("csv", "claim", "verdict")
        extra += [f"custom.train_file={env.custom[files[0] + '_train']}",
                  f"custom.validation_file={env.custom[files[0] + '_validation']}"]
        extra += ["custom.text_fields=[text]", "custom.label_field=rating", "custom.regression=true"] if files[0] == "jsonl" \
            else ["custom.text_fields=[claim, evidence]", "custom.label_field=verdict"]
    ok(run([*argv, *extra], cwd), command)
    return "test model and data, 3 steps"


@pytest.fixture(scope="module")
def env(tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    from glue_data import write_custom, write_glue

    root = tmp_path_factory.mktemp("readme")
    return Env(work=root, model=tiny_model, cola=cola_dir, cache=cache_dir, glue=write_glue(root / "glue"),
               custom=write_custom(root / "custom"))


def scratch(env: Env, name: str) -> Path:
    cwd = env.work / name
    for folder in ("configs", "launch", "benchmarks"):
        shutil.copytree(REPO / folder, cwd / folder)
    (cwd / "mine.tsv").write_text("gj04\t1\t\tThe cat slept.\nswb04\t0\t*\tHim saw she.\n")
    (cwd / "sentences.txt").write_text("The sailors rode the breeze clear of the rocks.\n\nHim saw she.\n")
    return cwd


def test_every_readme_command_runs(env: Env) -> None:
    cwd = scratch(env, "readme")
    done = []
    commands = readme_commands()
    assert len(commands) >= 30, commands
    for command in commands:
        if command.startswith("accelerate launch --multi_gpu --num_processes 4"):
            continue  # the config header's line: test_every_config_header_command_runs
        done.append((command, run_readme_command(command, env, cwd)))
    print("\n".join(f"{how:60s} {cmd}" for cmd, how in done))
    # What the commands left is what the README says they leave.
    assert (cwd / "runs" / "cola_bert_base" / "eval" / "metrics.json").is_file()
    assert json.loads((cwd / "runs" / "cola_bert_base" / "results.json").read_text())["status"] == "finished"
    from huggingface_hub import ModelCard

    assert ModelCard.load(cwd / "runs" / "cola_bert_base" / "model" / "README.md").data.eval_results
    assert (cwd / "runs" / "cola_bert_base" / "eval" / "mine" / "metrics.json").is_file()
    assert len(read_jsonl(cwd / "predictions.jsonl")) == 2
    assert {p.name for p in (cwd / "submission").iterdir()} == {"MNLI-m.tsv", "MNLI-mm.tsv"}
    assert (cwd / "runs" / "cola_sweep" / "report" / "report.md").is_file()
    assert (cwd / "runs" / "cola_bert_base_zero2" / "ds_config.json").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_header_command_runs(env: Env, config: Path) -> None:
    commands = header_commands(config)
    assert commands, f"{config.name} opens with no command"
    for i, command in enumerate(commands):
        cwd = scratch(env, f"header-{config.stem}-{i}")  # each line as if alone in a checkout
        how = run_readme_command(command, env, cwd)
        print(f"{how:60s} {command}")
        if "--num_processes 4" in command:
            logged = records.evaluations(read_jsonl(cwd / "runs" / "cola_bert_base" / "metrics.jsonl"))
            assert {r["world_size"] for r in logged} == {4} and {r["n"] for r in logged} == {527, 516, 1043}
