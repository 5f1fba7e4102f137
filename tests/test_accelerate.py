"""accelerate's own settings are honoured or refused, never dropped; experiment trackers; what a user
reads in a log file.

    python -m pytest -q tests/test_accelerate.py        # ~2-3 min on 2 cores

Every case is a real `accelerate launch` (its flags or a config file of its own format, as
`accelerate config` writes it), one CPU process where possible. What ran is read from the run:
the precision from config.yaml and the losses, DeepSpeed from the ZeRO shard files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, read_jsonl, run_cli, subprocess_env, train_losses


def accelerate(args: list[str], train: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args,
           "-m", "distributed_tune", *train]
    return subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    return next((ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")), "")


@pytest.fixture()
def train_args(tiny_model: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> list[str]:
    return [f"model.name={tiny_model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=4",
            "train.log_every=1", "train.eval_every=0", "train.global_batch_size=16", "train.lr=1e-3",
            f"output_dir={tmp_path / 'run'}"]


def ran(tmp_path: Path) -> dict:
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    model_dir = ckpts[-1] / "pytorch_model" if ckpts else None
    shards = sorted(p.name for p in model_dir.iterdir()) if model_dir is not None and model_dir.is_dir() else []
    return {"precision": cfg["precision"], "zero_stage": cfg["distributed"]["zero_stage"], "shards": shards,
            "derived": cfg["derived"], "losses": train_losses(tmp_path / "run")}


def test_mixed_precision_flag_applies_when_the_config_leaves_it(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--mixed_precision", "bf16", "--num_processes", "1"], train_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16 = ran(tmp_path)
    assert bf16["precision"] == "bf16" and bf16["derived"]["pad_to_multiple_of"] == 8
    fp32 = run_cli([*train_args, f"output_dir={tmp_path / 'fp32'}"])
    assert fp32.returncode == 0
    # bf16 autocast really ran: the losses differ from fp32's beyond float rounding, by bf16's ~1e-3.
    diffs = [abs(a - b) for a, b in zip(bf16["losses"], train_losses(tmp_path / "fp32"))]
    assert max(diffs) > 1e-4 and max(diffs) < 5e-2, diffs


def test_a_default_accelerate_config_file_applies_too(train_args: list[str], tmp_path: Path) -> None:
    config = tmp_path / "default_config.yaml"  # what `accelerate config` writes
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO",
                                      "mixed_precision": "bf16", "num_processes": 1, "num_machines": 1,
                                      "use_cpu": False, "machine_rank": 0, "main_training_function": "main",
                                      "downcast_bf16": "no", "rdzv_backend": "static", "same_network": True}))
    proc = accelerate(["--config_file", str(config)], train_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(tmp_path)["precision"] == "bf16"


def test_both_set_and_different_is_one_line(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--mixed_precision", "bf16", "--num_processes", "1"], [*train_args, "precision=fp32"])
    assert proc.returncode != 0
    assert error_line(proc) == ("error: precision=fp32 in the config but accelerate (its config file or launch flags) "
                                "says bf16; make them agree or remove one")
    assert not (tmp_path / "run").exists()


def test_deepspeed_flags_run_deepspeed(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--use_deepspeed", "--zero_stage", "2", "--num_processes", "1",
                       "--gradient_accumulation_steps", "2"], [*train_args, "train.checkpoint_every=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = ran(tmp_path)
    assert r["zero_stage"] == 2 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in r["shards"]
    # accelerate's accumulation applies: global batch 16 = micro 8 x accumulation 2 on one process.
    assert (r["derived"]["micro_batch_size"], r["derived"]["gradient_accumulation_steps"]) == (8, 2)
    assert "deepspeed_config_file" not in proc.stderr


def test_deepspeed_in_an_accelerate_config_file(train_args: list[str], tmp_path: Path) -> None:
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                      "deepspeed_config": {"zero_stage": 1, "gradient_clipping": 0.5,
                                                           "offload_optimizer_device": "none"},
                                      "mixed_precision": "no", "num_processes": 1, "num_machines": 1,
                                      "use_cpu": False, "machine_rank": 0, "main_training_function": "main"}))
    proc = accelerate(["--config_file", str(config)], [*train_args, "train.checkpoint_every=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = ran(tmp_path)
    assert r["zero_stage"] == 1 and r["shards"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_grad_norm"] == 0.5


def test_deepspeed_stage_conflicts_and_agreements(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--use_deepspeed", "--zero_stage", "2", "--num_processes", "1"],
                      [*train_args, "distributed.zero_stage=3"])
    assert proc.returncode != 0
    assert error_line(proc) == ("error: distributed.zero_stage=3 in the config but accelerate (its config file or "
                                "launch flags) says 2; make them agree or remove one")
    # The same stage on both sides: no complaint (accelerate's deepspeed_config_file variables).
    proc = accelerate(["--use_deepspeed", "--zero_stage", "2", "--num_processes", "1"],
                      [*train_args, "distributed.zero_stage=2", "train.checkpoint_every=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(tmp_path)["zero_stage"] == 2


def test_several_processes_without_multi_gpu_on_cpu_are_refused(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--num_processes", "2"], train_args)
    assert proc.returncode != 0
    assert error_line(proc) == ("error: accelerate launch started 1 process for --num_processes > 1: on a machine "
                                "without GPUs add --multi_gpu (accelerate's CPU launcher starts one process), e.g. "
                                "accelerate launch --multi_gpu --num_processes 2 -m distributed_tune ...")
    assert not (tmp_path / "run").exists()


def test_fsdp_is_refused(train_args: list[str], tmp_path: Path) -> None:
    proc = accelerate(["--use_fsdp", "--num_processes", "1"], train_args)
    assert proc.returncode != 0
    assert error_line(proc).startswith("error: accelerate is set up for FSDP, which distributed_tune does not run")


# --------------------------------------------------------------------------- trackers


def test_tensorboard_records_what_metrics_jsonl_records(train_args: list[str], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli([*train_args, "report_to=[tensorboard]", "train.eval_every=2"])
    run = tmp_path / "run"
    events = sorted((run / "trackers").rglob("events.out.tfevents.*"))
    assert events, list((run / "trackers").rglob("*"))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    records = read_jsonl(run / "metrics.jsonl")
    losses = [(r["optimizer_step"], r["loss"]) for r in records if "loss" in r]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["train/loss"]] == losses
    dev = [(r["optimizer_step"], r["mcc"]) for r in records if r.get("split") == "dev"]
    assert [(s, pytest.approx(v, abs=1e-6)) for s, v in scalars["eval/dev/mcc"]] == dev
    assert {"eval/in_domain_dev/accuracy", "eval/out_of_domain_dev/mcc", "train/lr"} <= set(scalars)
    # The resolved config is recorded as hyperparameters (TensorBoard's hparams plugin).
    hparams = [p for p in (run / "trackers").rglob("*") if p.is_file() and "hparams" in p.read_bytes().decode(
        "latin-1")]
    assert hparams


def test_wandb_offline(train_args: list[str], tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    env = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"), WANDB_SILENT="true")
    run_cli([*train_args, "report_to=[wandb]"], env=env)
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.wandb")), list(runs[0].rglob("*"))


# --------------------------------------------------------------------------- what a user reads


def test_a_log_file_gets_plain_progress_lines_and_no_third_party_noise(train_args: list[str], tmp_path: Path) -> None:
    proc = run_cli([*train_args, "train.max_steps=20", "train.log_every=5", "train.eval_every=10"])
    err = proc.stderr  # not a terminal: what a SLURM job's log shows
    progress = [ln for ln in err.splitlines() if " step " in ln and "/20 (" in ln]
    assert [ln.split(" step ")[1].split(" ")[0] for ln in progress] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(" loss " in ln and " lr " in ln and " samples/s " in ln and " ETA " in ln for ln in progress)
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT", "Setting accelerator to CPU",
                  "torch_dtype", "\r"):
        assert noise not in err, noise
    lines = err.strip().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("[distributed_tune] finished (done) after 20 "))
    final = lines[start:]
    info = json.loads((tmp_path / "run" / "model" / "training_info.json").read_text())
    assert final[1].startswith(f"[distributed_tune] model/ = step {info['optimizer_step']} (best dev mcc): mcc "
                               "in_domain_dev ")
    if info["optimizer_step"] != 20:  # selected on dev: the last evaluation is said too, as the honest number
        assert final[2].startswith("[distributed_tune] last evaluation (step 20, ")
    assert final[-2].startswith(f"[distributed_tune] model:    {tmp_path / 'run' / 'model'}")
    assert final[-1] == f"[distributed_tune] evaluate: python -m distributed_tune evaluate {tmp_path / 'run'}"
    assert all(len(ln) < 400 for ln in lines)  # nothing glued together, nothing wrapped at 80


def test_select_best_false_keeps_the_final_models_predictions(train_args: list[str], tmp_path: Path) -> None:
    run_cli([*train_args, "train.select_best=false"])
    rows = read_jsonl(tmp_path / "run" / "model" / "dev_predictions.jsonl")
    assert len(rows) == 1043 and rows == read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert json.loads((tmp_path / "run" / "model" / "training_info.json").read_text())["selected"] == "final"
