"""The launcher renders accelerate / DeepSpeed files from the training config, and refuses bad setups.

    python -m pytest -q tests/test_launcher.py                      # ~10 s, no training
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_launcher.py      # rewrite tests/golden/ after a deliberate change

Every case runs the real CLI (`python -m distributed_tune launch ...`) in a subprocess. The rendered
files are compared with tests/golden/, then loaded by accelerate's own config loader (it rejects
unknown keys) and by DeepSpeed's own config parser inside a world of the rendered size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, subprocess_env

GOLDEN = Path(__file__).parent / "golden"
RUN = "run"  # output_dir, relative to the subprocess's cwd (tmp_path): the golden files stay stable

# name -> (launch arguments, world size); every case is a --dry-run.
CASES: dict[str, tuple[list[str], int]] = {
    "zero3_offload_bf16_2x8": (
        ["--nodes", "2", "--gpus", "8", "distributed.zero_stage=3", "distributed.offload_optimizer=cpu",
         "distributed.offload_params=cpu", "precision=bf16", "train.global_batch_size=64",
         "train.micro_batch_size=2", "train.max_grad_norm=0.5"],
        16,
    ),
    "zero2_fp16_1x4": (
        ["--gpus", "4", "distributed.zero_stage=2", "precision=fp16", "fp16.initial_scale_power=12",
         "fp16.loss_scale_window=500", "train.global_batch_size=32", "train.micro_batch_size=4"],
        4,
    ),
    "ddp_1x2": (["--gpus", "2", "train.global_batch_size=32", "train.micro_batch_size=16"], 2),
}


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distributed_tune", "launch", *args, f"output_dir={RUN}"],
                          cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def normalise(text: str, tmp_path: Path) -> str:
    """The YAML names ds_config.json by its absolute path; make it independent of the temp folder."""
    for prefix in {str(tmp_path.resolve()), str(tmp_path)}:
        text = text.replace(prefix, "<cwd>")
    return text


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    out = {}
    for name, (args, _) in CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        proc = launch([*args, "--dry-run"], cwd)
        assert proc.returncode == 0, proc.stderr
        out[name] = (cwd, proc)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_rendered_files_match_golden(rendered, name: str) -> None:
    cwd, proc = rendered[name]
    files = ["accelerate.yaml"] + (["ds_config.json"] if (cwd / RUN / "ds_config.json").exists() else [])
    assert files == (["accelerate.yaml", "ds_config.json"] if name != "ddp_1x2" else ["accelerate.yaml"])
    for fname in files:
        got = normalise((cwd / RUN / fname).read_text(), cwd)
        golden = GOLDEN / name / fname
        if os.environ.get("UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(got)
        assert got == golden.read_text(), f"{fname} of {name} differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    # The printed command is the one a user can paste: accelerate with the rendered files.
    assert proc.stdout.splitlines()[-1] == (
        f"{sys.executable} -m accelerate.commands.launch --config_file {RUN}/accelerate.yaml "
        f"-m distributed_tune --config {RUN}/config.yaml"
    )


def test_zero3_offload_bf16_numbers_come_from_the_config(rendered) -> None:
    cwd, _ = rendered["zero3_offload_bf16_2x8"]
    acc = yaml.safe_load((cwd / RUN / "accelerate.yaml").read_text())
    ds = json.loads((cwd / RUN / "ds_config.json").read_text())
    assert (acc["distributed_type"], acc["num_machines"], acc["num_processes"]) == ("DEEPSPEED", 2, 16)
    assert acc["use_cpu"] is False and "mixed_precision" not in acc  # precision lives in the JSON only
    assert acc["deepspeed_config"]["deepspeed_config_file"] == str((cwd / RUN / "ds_config.json").resolve())
    assert acc["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no pdsh
    # 64 = micro 2 x 16 processes x accumulation 2; clipping from train.max_grad_norm, never "auto".
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 2, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # both stay in our code
    # The training config written beside them is the one the processes read.
    cfg = yaml.safe_load((cwd / RUN / "config.yaml").read_text())
    assert cfg["distributed"] == {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu",
                                  "timeout_s": 600, "hang_timeout_s": 120}
    assert cfg["output_dir"] == RUN


def test_fp16_loss_scaling_settings_are_rendered(rendered) -> None:
    cwd, _ = rendered["zero2_fp16_1x4"]
    ds = json.loads((cwd / RUN / "ds_config.json").read_text())
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                          "hysteresis": 2, "min_loss_scale": 1.0}
    assert ds["bf16"] == {"enabled": False}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 2)


def test_accelerate_loads_every_rendered_yaml(rendered) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"zero3_offload_bf16_2x8": ("DEEPSPEED", 16, 2), "zero2_fp16_1x4": ("DEEPSPEED", 4, 1),
                "ddp_1x2": ("MULTI_GPU", 2, 1)}
    for name, (cwd, _) in rendered.items():
        loaded = load_config_from_file(str(cwd / RUN / "accelerate.yaml"))  # raises on unknown keys
        got = (loaded.distributed_type.value, loaded.num_processes, loaded.num_machines)
        assert got == expected[name], name
        assert loaded.use_cpu is False
    # The loader really is strict: one unknown key is refused.
    bad = rendered["ddp_1x2"][0] / "bad.yaml"
    data = yaml.safe_load((rendered["ddp_1x2"][0] / RUN / "accelerate.yaml").read_text())
    bad.write_text(yaml.safe_dump({**data, "num_gpus": 2}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))


# DeepSpeed's parser takes the world size from its process group; a torch "fake" process group of
# the rendered size gives it that without starting 16 processes. In a subprocess: the group is global.
DS_PARSE = """
import json, sys
import torch.distributed as tdist
from torch.testing._internal.distributed.fake_pg import FakeStore
path, world = sys.argv[1], int(sys.argv[2])
tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from deepspeed.runtime.config import DeepSpeedConfig
c = DeepSpeedConfig(path)
z = c.zero_config
print(json.dumps({"world_size": c.world_size, "train_batch_size": c.train_batch_size,
    "micro": c.train_micro_batch_size_per_gpu, "accumulation": c.gradient_accumulation_steps,
    "clipping": c.gradient_clipping, "stage": c.zero_optimization_stage,
    "offload_optimizer": z.offload_optimizer.device if z.offload_optimizer else None,
    "offload_param": z.offload_param.device if z.offload_param else None,
    "gather_on_save": z.gather_16bit_weights_on_model_save,
    "bf16": c.bfloat16_config.enabled, "fp16": c.float16_config.enabled,
    "initial_scale_power": c.float16_config.initial_scale_power, "optimizer": c.optimizer_name}))
"""


def ds_parse(path: Path, world: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", DS_PARSE, str(path), str(world)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deepspeed_parses_the_rendered_json(rendered) -> None:
    cwd, _ = rendered["zero3_offload_bf16_2x8"]
    assert ds_parse(cwd / RUN / "ds_config.json", 16) == {
        "world_size": 16, "train_batch_size": 64, "micro": 2, "accumulation": 2, "clipping": 0.5, "stage": 3,
        "offload_optimizer": "cpu", "offload_param": "cpu", "gather_on_save": True, "bf16": True, "fp16": False,
        "initial_scale_power": 16, "optimizer": None,
    }
    cwd, _ = rendered["zero2_fp16_1x4"]
    assert ds_parse(cwd / RUN / "ds_config.json", 4) == {
        "world_size": 4, "train_batch_size": 32, "micro": 4, "accumulation": 2, "clipping": 1.0, "stage": 2,
        "offload_optimizer": None, "offload_param": None, "gather_on_save": False, "bf16": False, "fp16": True,
        "initial_scale_power": 12, "optimizer": None,
    }


def test_world_of_one_without_deepspeed_runs_plain_python(tmp_path: Path) -> None:
    proc = launch(["--gpus", "1", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{sys.executable} -m distributed_tune --config {RUN}/config.yaml"
    assert (tmp_path / RUN / "accelerate.yaml").is_file() and not (tmp_path / RUN / "ds_config.json").exists()
    # With DeepSpeed, a world of one still goes through accelerate (which sets up its process group).
    proc = launch(["--gpus", "1", "--dry-run", "distributed.zero_stage=2", "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert " -m accelerate.commands.launch --config_file run/accelerate.yaml " in proc.stdout.splitlines()[-1]


REJECTED = {
    # name: (arguments, the whole stderr line)
    "fp16 without CUDA": (
        ["--gpus", "2", "distributed.zero_stage=2", "precision=fp16", "train.global_batch_size=16",
         "train.micro_batch_size=8"],
        "error: precision=fp16 needs a CUDA device and none is visible; use precision=bf16 or fp32 on CPU",
    ),
    "param offload without ZeRO-3": (
        ["--gpus", "2", "distributed.zero_stage=2", "distributed.offload_params=cpu", "--dry-run"],
        "error: distributed.offload_params=cpu needs distributed.zero_stage=3 (now 2); "
        "parameter offload exists only in ZeRO-3",
    ),
    "offload with stage 0": (
        ["--gpus", "2", "distributed.zero_stage=0", "distributed.offload_optimizer=cpu", "--dry-run"],
        "error: distributed.offload_optimizer=cpu needs DeepSpeed ZeRO stage 1, 2 or 3; "
        "set distributed.zero_stage (now 0)",
    ),
    "global batch the world cannot make": (
        ["--gpus", "3", "train.global_batch_size=32", "train.micro_batch_size=8", "--dry-run"],
        "error: train.global_batch_size=32 is not a multiple of train.micro_batch_size=8 x world size 3 = 24; "
        "pick a global batch that is a multiple of 24 or leave train.micro_batch_size unset (null: derived)",
    ),
    "global batch no world can split": (
        ["--gpus", "3", "train.global_batch_size=32", "--dry-run"],
        "error: train.global_batch_size=32 cannot be split over world size 3; pick a global batch that is a "
        "multiple of 3 (e.g. 33) or another number of processes",
    ),
    "unknown key": (
        ["--gpus", "2", "distributed.zero_stag=2", "--dry-run"],
        "error: override: unknown key 'distributed.zero_stag'; did you mean 'distributed.zero_stage'?",
    ),
    "ZeRO stage 4": (
        ["--gpus", "2", "distributed.zero_stage=4", "--dry-run"],
        "error: distributed.zero_stage=4 must be 0, 1, 2, 3 or null (plain DDP)",
    ),
    "no processes": (
        ["--gpus", "0", "--dry-run"],
        "error: --gpus=0 and --nodes=1 must be at least 1",
    ),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_before_anything_starts(tmp_path: Path, name: str) -> None:
    args, message = REJECTED[name]
    proc = launch(args, tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (2, message)
    assert proc.stdout == "" and not (tmp_path / RUN).exists()  # nothing rendered, nothing started


def test_unknown_key_in_a_config_file_names_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("distributed:\n  zero_stage: 2\n  offload_optimiser: cpu\n")
    proc = launch(["--config", "cfg.yaml", "--gpus", "2", "--dry-run"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: cfg.yaml: unknown key 'distributed.offload_optimiser'; did you mean 'distributed.offload_optimizer'?"
    )


def test_zero_state_of_another_world_size_is_resumable_and_a_changed_recipe_is_not(tmp_path: Path) -> None:
    """A run directory with a (sealed) checkpoint of 2 ZeRO-2 processes, relaunched with 4: with another
    learning rate refused before anything starts, nothing rendered; with its own recipe accepted (the
    processes convert the shards on load)."""
    from distributed_tune.checkpoint import ensure_key, trajectory, write_manifest
    from distributed_tune.config import load_config
    from distributed_tune.launcher import check_resumable

    args = ["distributed.zero_stage=2", "train.global_batch_size=32", "train.micro_batch_size=8"]
    ckpt = tmp_path / RUN / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    saved = trajectory(load_config(None, args))
    (ckpt / "trainer_state.json").write_text(json.dumps({"world_size": 2, "zero_stage": 2, "optimizer_step": 4,
                                                         "trajectory": saved}))
    ensure_key()  # the run that wrote it had made one
    write_manifest(ckpt)
    proc = launch(["--gpus", "4", "--resume", *args, "train.lr=1e-4"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {RUN}/checkpoints/step_00000004 cannot be resumed with a changed recipe (train.lr: 2e-05 in the "
        "checkpoint, 0.0001 now); resume with the run's own settings (its config.yaml), or start a new run in "
        "another output_dir"
    )
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["checkpoints"]  # nothing rendered
    # The same check with the run's own recipe on 4 processes passes (without starting them here).
    check_resumable(dataclasses.replace(load_config(None, [*args, f"output_dir={tmp_path / RUN}"]), resume=True))


def test_a_zero3_checkpoint_from_before_the_weight_decay_fix_is_refused(tmp_path: Path) -> None:
    """Partitioned before the optimizer saw them, ZeRO-3 parameters all looked 1-D: no weight decay at
    all. Such a checkpoint (no `weight_decay_groups` in its state) cannot continue the fixed recipe."""
    from distributed_tune.checkpoint import ensure_key, trajectory, write_manifest
    from distributed_tune.config import load_config

    args = ["distributed.zero_stage=3", "train.global_batch_size=32", "train.micro_batch_size=8"]
    ckpt = tmp_path / RUN / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"world_size": 2, "zero_stage": 3, "optimizer_step": 4,
                                                         "trajectory": trajectory(load_config(None, args))}))
    ensure_key()  # the run that wrote it had made one
    write_manifest(ckpt)
    proc = launch(["--gpus", "2", "--resume", *args], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {RUN}/checkpoints/step_00000004 was saved by ZeRO-3 before weight decay was fixed there (it decayed "
        "no parameter; weight matrices are decayed now, as under DDP and ZeRO 1/2): it cannot continue the same "
        "recipe; start a new run in another output_dir"
    )
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["checkpoints"]  # nothing rendered


def test_the_micro_batch_follows_the_number_of_processes(tmp_path: Path) -> None:
    """The shipped config's global batch 32 on 4 and 8 processes (the README's commands): no
    arithmetic for the user to redo; accumulation only above the per-device cap."""
    for gpus, micro, accumulation in (("4", 8, 1), ("8", 4, 1), ("1", 32, 1)):
        proc = launch(["--config", str(REPO / "configs" / "cola_bert_base.yaml"), "--gpus", gpus,
                       "distributed.zero_stage=2", "--dry-run", "--overwrite"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        ds = json.loads((tmp_path / RUN / "ds_config.json").read_text())
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accumulation)
    proc = launch(["--gpus", "1", "train.max_micro_batch_size=8", "distributed.zero_stage=2", "--dry-run",
                   "--overwrite"], tmp_path)
    ds = json.loads((tmp_path / RUN / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4)


def test_dry_run_on_a_used_run_directory_leaves_the_run_alone(tmp_path: Path) -> None:
    run = tmp_path / RUN
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"optimizer_step": 4, "loss": 0.6}\n')
    (run / "config.yaml").write_text("seed: 1\n")
    proc = launch(["--gpus", "2", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "config.yaml").read_text() == "seed: 1\n"
    assert (run / "dry-run" / "accelerate.yaml").is_file()
    assert f"({RUN} holds a run: the dry run wrote into {RUN}/dry-run; a real one needs --resume or --overwrite)" \
        in proc.stdout
    proc = launch(["--gpus", "2"], tmp_path)  # the real launch is refused
    assert proc.returncode == 2 and "already holds a run (metrics.jsonl)" in proc.stderr


def test_a_run_directory_in_use_is_refused(tmp_path: Path) -> None:
    from distributed_tune.files import RunLock

    (tmp_path / RUN).mkdir()
    with RunLock(tmp_path / RUN):
        proc = launch(["--gpus", "1", "--overwrite"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: output_dir={RUN} is in use by a running job (host ")
    assert f"pid {os.getpid()}" in proc.stderr and not (tmp_path / RUN / "config.yaml").exists()
