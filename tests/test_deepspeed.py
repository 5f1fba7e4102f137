"""DeepSpeed ZeRO 1/2/3 (fp32, bf16, optimizer offload) for real: 2 CPU processes over gloo, started
by the project's own launcher, on the test's CoLA files with the tiny BERT.

    python -m pytest -q tests/test_deepspeed.py        # ~7 minutes on 2 cores

One module-scoped set of runs (8 optimizer steps, micro 8 x 2 processes = global 16, a checkpoint
every 4 steps, dropout off) serves every assertion:
  * DeepSpeed really ran: its ZeRO shard files, one per rank, are in the checkpoints;
  * every one of the 1043 dev sentences was predicted once (527 + 516), by a world of 2;
  * the exported `model/` folder loads with `from_pretrained` and reproduces predictions.jsonl;
  * a copy of the run cut back to its step-4 checkpoint and resumed logs the same losses for 5..8;
  * the losses agree with plain DDP's;
  * DDP and each ZeRO stage (and ZeRO-3 with offload) resume on 1 process from the 2-process
    step-4 checkpoint, and back on 2 from the 1-process step-6 one, with the uninterrupted losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, evals, free_port, read_jsonl, run_cli, subprocess_env, train_losses

STEPS, HALF = 8, 4

# run name -> overrides on top of the common ones (ZeRO-1 runs micro 4: accumulation 2 under DeepSpeed).
RUNS: dict[str, list[str]] = {
    "ddp": [],
    "zero1": ["distributed.zero_stage=1", "train.micro_batch_size=4"],
    "zero2": ["distributed.zero_stage=2"],
    "zero3": ["distributed.zero_stage=3"],
    "zero3_bf16": ["distributed.zero_stage=3", "precision=bf16"],
    "zero2_offload": ["distributed.zero_stage=2", "distributed.offload_optimizer=cpu"],
}
ZERO = [name for name in RUNS if name != "ddp"]

# What each rank writes under checkpoints/step_*/pytorch_model/ (DeepSpeed's own file names).
SHARDS = {
    "zero1": {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"},
    "zero3": {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
              "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"},
}
SHARDS["zero2"] = SHARDS["zero2_offload"] = SHARDS["zero1"]
SHARDS["zero3_bf16"] = {f.replace("zero_pp", "bf16_zero_pp") if "optim" in f else f for f in SHARDS["zero3"]}

# DDP vs DeepSpeed: the same arithmetic in another order (measured: ~1e-7 at first).
LOSS_TOL_FP32 = 1e-5
LOSS_TOL_BF16 = 2e-2  # bf16 weights and activations against an fp32 run


def common_args(tiny_model: Path, cache_dir: Path, run_dir: Path, cola_dir: Path) -> list[str]:
    return [
        f"output_dir={run_dir}", f"model.name={tiny_model}", "model.dropout=0", f"data.source={cola_dir}",
        f"data.cache_dir={cache_dir}", "train.epochs=1", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.eval_every=0", f"train.checkpoint_every={HALF}", "train.global_batch_size=16",
        "train.micro_batch_size=8", "train.lr=1e-3",
    ]


def launch(args: list[str], gpus: int = 2) -> subprocess.CompletedProcess:
    """`python -m distributed_tune launch --gpus N`: renders the files and runs `accelerate launch`."""
    cmd = [sys.executable, "-m", "distributed_tune", "launch", "--gpus", str(gpus), "--port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["optimizer_step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def cut_back_to(run_dir: Path, copy: Path, step: int) -> None:
    """A copy of the run as if it had been killed right after its checkpoint at `step`."""
    shutil.copytree(run_dir, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("model", "predictions.jsonl"):
        p = copy / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = [r for r in read_jsonl(copy / "metrics.jsonl") if r.get("optimizer_step", 0) <= step and "split" not in r]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.fixture(scope="module")
def runs(tiny_model: Path, cache_dir: Path, cola_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run of the module; `<name>` ran 8 steps, `<name>_resumed` resumed a copy from step 4."""
    root = tmp_path_factory.mktemp("deepspeed")
    out = {}
    for name, extra in RUNS.items():
        out[name] = root / name
        launch([*common_args(tiny_model, cache_dir, out[name], cola_dir), *extra])
        if name in ZERO:
            resumed = out[f"{name}_resumed"] = root / f"{name}_resumed"
            cut_back_to(out[name], resumed, HALF)
            launch(["--resume", *common_args(tiny_model, cache_dir, resumed, cola_dir), *extra])
    return out


@pytest.mark.parametrize("name", ZERO)
def test_deepspeed_ran_with_zero_shards_per_rank(runs, name: str) -> None:
    run = runs[name]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"]
    for ckpt in ckpts:
        shards = {p.name for p in (run / "checkpoints" / ckpt / "pytorch_model").iterdir()}
        assert shards == SHARDS[name], ckpt
        assert (run / "checkpoints" / ckpt / "COMPLETE").is_file()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert ds["gradient_accumulation_steps"] == (2 if name == "zero1" else 1)
    assert ds["zero_optimization"].get("offload_optimizer", {}).get("device") == (
        "cpu" if name == "zero2_offload" else None)
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert (derived["world_size"], derived["global_batch_size"]) == (2, 16)


@pytest.mark.parametrize("name", ["zero3", "zero3_bf16"])
def test_zero3_decays_the_weight_matrices_as_ddp_does(runs, name: str) -> None:
    """Under ZeRO-3 the model is loaded partitioned: judged by what the optimizer saw (1-D
    placeholders), no parameter was decayed. Judged by the full shapes, the decayed group holds the
    weight matrices, the other the biases and LayerNorm weights: each rank's flat partition holds
    half of every parameter (rounded up)."""
    import math

    import torch
    from safetensors.torch import load_file

    shapes = {k: v.shape for k, v in load_file(runs[name] / "model" / "model.safetensors").items()}
    matrices = sum(math.ceil(math.prod(s) / 2) for k, s in shapes.items() if len(s) >= 2 and not k.endswith(".bias"))
    vectors = sum(math.ceil(math.prod(s) / 2) for k, s in shapes.items() if len(s) < 2 or k.endswith(".bias"))
    for rank in (0, 1):
        folder = runs[name] / "checkpoints" / "step_00000008" / "pytorch_model"
        sd = torch.load(next(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")), weights_only=False)
        base = sd["optimizer_state_dict"]["optimizer_state_dict"]
        got = [(g["weight_decay"], base["state"][i]["exp_avg"].numel()) for i, g in enumerate(base["param_groups"])]
        assert got == [(0.01, matrices), (0.0, vectors)], got


def test_ddp_run_is_not_deepspeed(runs) -> None:
    ckpt = runs["ddp"] / "checkpoints" / "step_00000008"
    assert not (ckpt / "pytorch_model").exists() and not (runs["ddp"] / "ds_config.json").exists()
    assert (ckpt / "model.safetensors").is_file()


@pytest.mark.parametrize("name", RUNS)
def test_gathered_evaluation_counts_every_dev_sentence_once(runs, name: str) -> None:
    final = {r["split"]: r for r in evals(runs[name])}
    assert {s: r["n"] for s, r in final.items()} == {"in_domain_dev": 527, "out_of_domain_dev": 516, "dev": 1043}
    assert {r["world_size"] for r in final.values()} == {2}
    assert {r["optimizer_step"] for r in final.values()} == {STEPS}
    assert sum(map(sum, final["dev"]["confusion_matrix"])) == 1043
    preds = read_jsonl(runs[name] / "predictions.jsonl")
    assert [p["index"] for p in preds] == list(range(1043))
    assert -1.0 <= final["dev"]["mcc"] <= 1.0


@pytest.fixture(scope="module")
def dev_encoding(runs):
    """The dev sentences of predictions.jsonl, tokenized by the exported tokenizer (the same in every run)."""
    from transformers import AutoTokenizer

    sentences = [p["sentence"] for p in read_jsonl(runs["ddp"] / "predictions.jsonl")]
    tok = AutoTokenizer.from_pretrained(runs["ddp"] / "model")
    return tok(sentences, truncation=True, max_length=128, padding=True, return_tensors="pt")


def export_probs(model_dir: Path, enc, dtype) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=enc["input_ids"][i : i + 256],
                                  attention_mask=enc["attention_mask"][i : i + 256]).logits
                            for i in range(0, len(enc["input_ids"]), 256)])
    return torch.softmax(logits.float(), dim=-1)[:, 1].numpy()


@pytest.mark.parametrize("name", RUNS)
def test_export_round_trip_reproduces_the_in_training_predictions(runs, dev_encoding, tiny_model, name: str) -> None:
    """model/ (gathered from the ZeRO-3 shards where needed) loads on CPU in this process and gives
    the dev predictions the training processes wrote: probabilities within 1e-5 (fp32; the file rounds
    to 6 decimals; seen 5e-7) or, for bf16 loaded in bf16, within 1e-3 (bf16 arithmetic in another
    batching order; seen 6e-5), and the same predicted class wherever the margin exceeds that."""
    import torch
    from safetensors.torch import load_file

    bf16 = name.endswith("bf16")
    # The tensor names of the model we started from (under ZeRO-3, transformers 5.24 would otherwise
    # write its legacy LayerNorm names gamma/beta; save_model prevents that).
    weights = load_file(runs[name] / "model" / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")
    assert set(weights) == set(initial)  # the full model, not empty ZeRO-3 placeholders
    assert all(weights[k].shape == initial[k].shape for k in initial)
    # One rule for every backend: the export is fp32 (bf16 training: bf16 values, stored in fp32).
    assert {t.dtype for t in weights.values()} == {torch.float32}
    if bf16:
        assert all(torch.equal(w.bfloat16().float(), w) for w in weights.values())
    assert not torch.equal(weights["classifier.weight"].float(), initial["classifier.weight"])  # trained
    written = read_jsonl(runs[name] / "predictions.jsonl")
    want_probs = np.array([p["probs"][1] for p in written])
    want_preds = np.array([p["pred"] for p in written])
    probs = export_probs(runs[name] / "model", dev_encoding, torch.bfloat16 if bf16 else torch.float32)
    tol = 1e-3 if bf16 else 1e-5
    assert np.abs(probs - want_probs).max() < tol
    sure = np.abs(want_probs - 0.5) > tol
    assert ((probs > 0.5).astype(int)[sure] == want_preds[sure]).all()
    assert sure.sum() > 1000
    # ... and these are the trained weights: the untouched tiny model predicts visibly otherwise.
    assert np.abs(export_probs(tiny_model, dev_encoding, torch.float32) - want_probs).max() > 5e-3


@pytest.mark.parametrize("name", ZERO)
def test_resumed_run_continues_with_the_same_losses(runs, name: str) -> None:
    """Resuming from the step-4 sharded checkpoint gives bitwise the losses of steps 5..8 and the
    same final predictions (the checkpoint is saved before any eval iterator draws random numbers)."""
    full, resumed = losses_by_step(runs[name]), losses_by_step(runs[f"{name}_resumed"])
    assert sorted(full) == sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(HALF + 1, STEPS + 1)] == [full[s] for s in range(HALF + 1, STEPS + 1)]
    a = [p["probs"] for p in read_jsonl(runs[name] / "predictions.jsonl")]
    b = [p["probs"] for p in read_jsonl(runs[f"{name}_resumed"] / "predictions.jsonl")]
    assert a == b
    ckpts = sorted(p.name for p in (runs[f"{name}_resumed"] / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"]


@pytest.mark.parametrize("name", ZERO)
def test_zero_losses_agree_with_ddp(runs, name: str) -> None:
    ddp, zero = train_losses(runs["ddp"]), train_losses(runs[name])
    assert len(ddp) == len(zero) == STEPS
    tol = LOSS_TOL_BF16 if name.endswith("bf16") else LOSS_TOL_FP32
    assert np.abs(np.array(ddp) - np.array(zero)).max() < tol


# --------------------------------------------------------------------------- another number of processes
#
# Each 2-process run above, cut back to its step-4 checkpoint, resumed on 1 process (accumulation
# doubled; checkpoints every 2 steps there), then that run cut back to its own step-6 checkpoint
# (written by the 1-process engine) and resumed on 2: 2 -> 1 and 1 -> 2 in one chain of two
# runs. ZeRO-3 + optimizer offload: the ZeRO-3 run resumed with offload on both legs (offload is a
# layout setting, free on resume). Every step's loss is compared with the uninterrupted run's.
RESHARD = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "zero3_offload": "zero3"}
OFFLOAD = ["distributed.offload_optimizer=cpu"]
# The conversion rebuilds every fp32 master and Adam moment exactly (bitwise, by construction); the
# steps after it run DeepSpeed's reductions over another partition. Measured on CPU / gloo, fp32:
# max |loss difference| 0.0 for every engine, both ways. DDP is asserted bitwise, ZeRO within this.
RESHARD_TOL_ZERO = 1e-6


@pytest.fixture(scope="module")
def resharded(runs, tiny_model: Path, cache_dir: Path, cola_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path, str]]:
    """name -> (uninterrupted 2-process run, resumed 2 -> 1, resumed 2 -> 1 -> 2, what the 2 -> 1 leg said)."""
    root = tmp_path_factory.mktemp("reshard")
    out = {}
    for name, full in RESHARD.items():
        extra = [*RUNS[full], *(OFFLOAD if name.endswith("offload") else [])]
        on1, on2 = root / f"{name}_on1", root / f"{name}_on1_on2"
        cut_back_to(runs[full], on1, HALF)
        said = launch(["--resume", *common_args(tiny_model, cache_dir, on1, cola_dir), *extra,
                       "train.checkpoint_every=2"], gpus=1).stderr
        cut_back_to(on1, on2, HALF + 2)
        launch(["--resume", *common_args(tiny_model, cache_dir, on2, cola_dir), *extra], gpus=2)
        out[name] = (runs[full], on1, on2, said)
    return out


def derived_accumulation(run_dir: Path) -> int:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["derived"]["gradient_accumulation_steps"]


def converted(run_dir: Path) -> list[tuple[int, int, int]]:
    return [(r["optimizer_step"], r["from_world_size"], r["to_world_size"])
            for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "converted"]


@pytest.mark.parametrize("name", RESHARD)
def test_a_run_resumes_on_another_number_of_processes_with_the_same_losses(resharded, name: str) -> None:
    """2 -> 1 and 1 -> 2: the model, Adam's moments and step, the schedule and the data position
    carry over; each resumed run logs every step of the uninterrupted one with its loss."""
    full, on1, on2, said = resharded[name]
    want = losses_by_step(full)
    diffs = {}
    for run, world in ((on1, 1), (on2, 2)):
        got = losses_by_step(run)
        assert sorted(got) == list(range(1, STEPS + 1))
        diffs[world] = max(abs(got[s] - want[s]) for s in got)
        print(f"{name}: resumed on {world} process(es): max |loss difference| over steps 1..{STEPS}: {diffs[world]:.3g}")
        if name == "ddp":
            assert got == want  # the invariance: bitwise
        else:
            assert diffs[world] <= RESHARD_TOL_ZERO
        derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
        assert (derived["world_size"], derived["gradient_accumulation_steps"]) == (
            world, (2 if world == 1 else 1) * (2 if name == "zero1" else 1))
    assert converted(on1) == [(HALF, 2, 1)]
    engine = "DDP" if name == "ddp" else f"ZeRO-{RUNS[RESHARD[name]][0][-1]}"
    seconds = next(r["seconds"] for r in read_jsonl(on1 / "metrics.jsonl") if r.get("event") == "converted")
    print(f"{name}: converted 2 -> 1 in {seconds} s")
    assert (f"resumed on 1 process from a checkpoint of 2 ({engine}, accumulation "
            f"{derived_accumulation(on1)}): converted on load in {seconds:.1f} s") in said
    assert converted(on2) == [(HALF, 2, 1), (HALF + 2, 1, 2)]
    # The 1 -> 2 leg resumed from a checkpoint the 1-process engine wrote (one shard per rank).
    step6 = {p.name for p in (on1 / "checkpoints" / "step_00000006").rglob("*_states.pt")}
    if name != "ddp":
        assert len([f for f in step6 if "optim_states" in f]) == 1, step6
    final = {r["split"]: r for r in evals(on2)}
    assert final["dev"]["world_size"] == 2 and final["dev"]["n"] == 1043


def test_a_changed_recipe_is_still_refused_on_another_number_of_processes(runs, tmp_path: Path, tiny_model,
                                                                         cache_dir, cola_dir) -> None:
    """Another world size is layout; the learning rate is recipe: refused in one line, nothing touched."""
    copy = tmp_path / "zero2"
    cut_back_to(runs["zero2"], copy, HALF)
    cmd = [sys.executable, "-m", "distributed_tune", "launch", "--gpus", "1", "--port", str(free_port()), "--resume",
           *common_args(tiny_model, cache_dir, copy, cola_dir), "distributed.zero_stage=2", "train.lr=2e-3"]
    before = sorted(p.name for p in copy.rglob("*"))
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    ckpt = copy / "checkpoints" / "step_00000004"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt} cannot be resumed with a changed recipe (train.lr: 0.001 in the checkpoint, 0.002 now); "
        "resume with the run's own settings (its config.yaml), or start a new run in another output_dir")
    assert sorted(p.name for p in copy.rglob("*")) == before


def test_single_process_deepspeed_fallback_from_plain_python(runs, tmp_path: Path, tiny_model, cache_dir,
                                                            cola_dir) -> None:
    """`python -m distributed_tune ... distributed.zero_stage=2 distributed.offload_optimizer=cpu`, no
    launcher: a DeepSpeed world of one (accumulation 2 instead of 2 processes)."""
    run = tmp_path / "single"
    run_cli([*common_args(tiny_model, cache_dir, run, cola_dir), "distributed.zero_stage=2",
             "distributed.offload_optimizer=cpu"])
    shards = {p.name for p in (run / "checkpoints" / "step_00000008" / "pytorch_model").iterdir()}
    assert shards == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    final = {r["split"]: (r["n"], r["world_size"]) for r in evals(run)}
    assert final == {"in_domain_dev": (527, 1), "out_of_domain_dev": (516, 1), "dev": (1043, 1)}
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert (derived["world_size"], derived["gradient_accumulation_steps"]) == (1, 2)
    assert np.abs(np.array(train_losses(run)) - np.array(train_losses(runs["ddp"]))).max() < LOSS_TOL_FP32


def test_zero_stage_with_deepspeed_switched_off_by_accelerate_fails_loudly(tmp_path: Path, tiny_model,
                                                                           cache_dir, cola_dir) -> None:
    """`accelerate launch --cpu` sets ACCELERATE_USE_CPU, which silently turns DeepSpeed off."""
    run = tmp_path / "cpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "-m",
           "distributed_tune", *common_args(tiny_model, cache_dir, run, cola_dir), "distributed.zero_stage=2"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert ("error: distributed.zero_stage=2 is set but accelerate runs MULTI_CPU, not DeepSpeed; "
            "do not pass --cpu / use_cpu with DeepSpeed") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()


def test_hand_edited_deepspeed_file_is_refused(runs, tmp_path: Path) -> None:
    """ds_config.json is generated from config.yaml; an edit to it would be ignored, so it is refused."""
    run = tmp_path / "edited"
    shutil.copytree(runs["zero2"], run, ignore=shutil.ignore_patterns("checkpoints", "model", "*.jsonl"))
    ds = json.loads((run / "ds_config.json").read_text())
    ds["zero_optimization"]["stage"] = 3
    (run / "ds_config.json").write_text(json.dumps(ds))
    acc = yaml.safe_load((run / "accelerate.yaml").read_text())
    acc["main_process_port"] = free_port()
    acc["deepspeed_config"]["deepspeed_config_file"] = str(run / "ds_config.json")
    (run / "accelerate.yaml").write_text(yaml.safe_dump(acc))
    cfg = (run / "config.yaml").read_text().replace(str(runs["zero2"]), str(run))
    (run / "config.yaml").write_text(cfg)
    # The command `launch` printed for the original run, pointed at the copy.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run / "accelerate.yaml"),
           "-m", "distributed_tune", "--config", str(run / "config.yaml")]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert (f"error: distributed.zero_stage=2 in the config but the DeepSpeed file {run / 'ds_config.json'} says 3; "
            "make them agree or remove one") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()
    # A change our config has no key for is refused too, naming the keys.
    ds["zero_optimization"]["stage"] = 2
    ds["steps_per_print"] = 5
    (run / "ds_config.json").write_text(json.dumps(ds))
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert (f"error: {run / 'ds_config.json'} differs from what the training config renders (keys: "
            "steps_per_print); DeepSpeed settings come from the training config (distributed.*, precision, "
            "train.*): set them there and launch again") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()
