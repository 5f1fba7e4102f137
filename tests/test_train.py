"""End to end through the real CLI and real launchers, on the test's CoLA files and a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import evals, read_jsonl, run_cli, train_losses

from distributed_tune.model import linear_warmup_decay

# Losses of the first 8 optimizer steps of `base_args` (seed 42, dropout 0.1 re-seeded per
# micro-batch, one thread). A change here means the data order, the model set-up or the loop changed.
# (Rebuilding the tiny model's WordPiece vocabulary moves them by ~2e-6: hence rel=1e-4, not equality.)
PINNED_LOSSES = [0.69141114, 0.69082791, 0.68698749, 0.69814804, 0.68127474, 0.67605036, 0.68741137, 0.69653013]


def test_single_process_run(tmp_path: Path, base_args: list[str]) -> None:
    run = tmp_path / "run"
    run_cli([*base_args, f"output_dir={run}"])

    assert train_losses(run) == pytest.approx(PINNED_LOSSES, rel=1e-4)
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["optimizer_step"] for r in train] == list(range(1, 9))
    factor = linear_warmup_decay(warmup_steps=1, total_steps=8)  # ceil(0.1 * 8) = 1 warmup step
    assert [r["lr"] for r in train] == pytest.approx([1e-3 * factor(s) for s in range(8)])
    assert all(r["samples_per_s"] > 0 and 0 <= r["padding_fraction"] < 1 for r in train)
    first = next(r for r in records if r.get("event") == "first_step")
    assert 0 < first["startup_s"] < 60

    final = {r["split"]: r for r in evals(run) if r["optimizer_step"] == 8}
    assert {s: r["n"] for s, r in final.items()} == {"in_domain_dev": 527, "out_of_domain_dev": 516, "dev": 1043}
    assert all(r["world_size"] == 1 for r in final.values())
    assert sum(map(sum, final["dev"]["confusion_matrix"])) == 1043

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["derived"] == {
        "world_size": 1, "micro_batch_size": 8, "gradient_accumulation_steps": 2, "global_batch_size": 16,
        "train_examples": 8551, "steps_per_epoch": 534, "total_steps": 8, "warmup_steps": 1, "pad_to_multiple_of": 1,
        "epochs": 1}
    fingerprint = json.loads((run / "data_fingerprint.json").read_text())
    assert fingerprint["counts"]["train"] == 8551

    predictions = read_jsonl(run / "predictions.jsonl")
    assert len(predictions) == 1043 and [p["index"] for p in predictions] == list(range(1043))
    assert sum(p["pred"] == p["label"] for p in predictions) / 1043 == pytest.approx(final["dev"]["accuracy"])

    from transformers import pipeline

    info = json.loads((run / "model" / "training_info.json").read_text())
    assert info["selected"] == "best dev mcc" and info["metric"] == "dev/mcc" and info["task"] == "cola"
    clf = pipeline("text-classification", model=str(run / "model"), device="cpu")
    out = clf([p["sentence"] for p in predictions[:3]])
    # The exported folder reproduces the run's own last evaluation (the only one, so also the best).
    assert [o["label"] for o in out] == [p["pred_label"] for p in predictions[:3]]
    for o, p in zip(out, predictions[:3], strict=True):
        assert o["score"] == pytest.approx(p["prob"], abs=1e-5)

    # The run directory is now used: a second run without --resume/--overwrite is refused.
    before = (run / "metrics.jsonl").read_bytes()
    proc = run_cli([*base_args, f"output_dir={run}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: output_dir={run} already holds a run (metrics.jsonl, checkpoints, model, predictions.jsonl); "
        "pass --resume to continue it, --overwrite to replace it, or choose another output_dir")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_accumulation_matches_a_larger_micro_batch(tmp_path: Path, base_args: list[str]) -> None:
    """(micro 8, accumulation 1) and (micro 4, accumulation 2): the same global batches; with
    dropout off the losses agree up to float rounding (different matmul shapes)."""
    common = [*base_args, "train.global_batch_size=8", "model.dropout=0.0"]
    run_cli([*common, "train.micro_batch_size=8", f"output_dir={tmp_path / 'a'}"])
    run_cli([*common, "train.micro_batch_size=4", f"output_dir={tmp_path / 'b'}"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == 8 and a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_two_processes_equal_one_process_with_accumulation(tmp_path: Path, base_args: list[str]) -> None:
    """A real 2-process launch (accelerate launch --multi_gpu, gloo) against 1 process with
    accumulation 2: the same per-step losses bit for bit, with dropout on, over a whole epoch."""
    common = [*base_args, "train.max_steps=null", "train.global_batch_size=512", "train.micro_batch_size=256",
              "train.eval_every=8", "train.log_every=1"]
    run_cli([*common, f"output_dir={tmp_path / 'one'}"])
    run_cli([*common, f"output_dir={tmp_path / 'two'}"], nproc=2, launcher="accelerate")
    one, two = tmp_path / "one", tmp_path / "two"

    assert len(train_losses(one)) == 8551 // 512 == 16
    assert train_losses(one) == train_losses(two)  # exact

    # Disjoint shards: each rank trained on its own half, every example once.
    audit = [r for r in read_jsonl(two / "metrics.jsonl") if r.get("event") == "epoch_data"]
    assert audit == [{"event": "epoch_data", "epoch": 0, "optimizer_step": 16, "examples": 8192, "distinct": 8192,
                      "per_rank": [4096, 4096], "from_step": 0, "world_size": 2}]
    # MCC computed once per evaluation (rank 0 alone writes), on exactly every dev example.
    ev = evals(two)
    assert [(r["optimizer_step"], r["split"], r["n"]) for r in ev] == [
        (step, split, n) for step in (8, 16)
        for split, n in (("in_domain_dev", 527), ("out_of_domain_dev", 516), ("dev", 1043))]
    assert {r["world_size"] for r in ev} == {2}
    assert [(r["mcc"], r["accuracy"]) for r in ev] == [(r["mcc"], r["accuracy"]) for r in evals(one)]
    assert yaml.safe_load((two / "config.yaml").read_text())["derived"]["world_size"] == 2
    assert yaml.safe_load((one / "config.yaml").read_text())["derived"]["gradient_accumulation_steps"] == 2


def test_class_weights_under_ddp_and_zero(tmp_path: Path, base_args: list[str]) -> None:
    """train.class_weights=auto is the recipe on every engine: 2 processes (DDP) equal 1 process with
    accumulation 2 bit for bit, and ZeRO-2 on 2 processes agrees with DDP up to reduction order."""
    common = [*base_args, "train.class_weights=auto", "train.max_steps=6", "train.eval_every=0"]
    run_cli([*common, f"output_dir={tmp_path / 'one'}"])
    run_cli([*common, f"output_dir={tmp_path / 'ddp'}"], nproc=2, launcher="accelerate")
    run_cli([*common, "distributed.zero_stage=2", f"output_dir={tmp_path / 'zero2'}"], nproc=2, launcher="accelerate")
    one, ddp, zero = (train_losses(tmp_path / n) for n in ("one", "ddp", "zero2"))
    assert len(one) == 6 and one == ddp
    assert zero == pytest.approx(ddp, abs=1e-5)
    plain = tmp_path / "plain"
    run_cli([*base_args, "train.max_steps=6", "train.eval_every=0", f"output_dir={plain}"])
    assert train_losses(plain) != pytest.approx(one, rel=1e-3)  # the weights changed the loss


def test_max_steps_beyond_the_epochs_and_extending_a_finished_run(tmp_path: Path, base_args: list[str]) -> None:
    """Through the CLI: train.max_steps=10 with train.epochs=1 at 4 steps an epoch runs 10 steps (it
    decides, as in the HF Trainer); `--resume train.max_steps=14` then continues the finished run
    from its last checkpoint for 4 more steps and says so."""
    run = tmp_path / "run"
    args = [*base_args, "train.epochs=1", "train.global_batch_size=2048", "train.micro_batch_size=1024",
            "train.eval_every=0", f"output_dir={run}"]
    proc = run_cli([*args, "train.max_steps=10"])
    assert "534" not in proc.stderr and "4 optimizer steps/epoch, 10 total (2.5 epochs)" in proc.stderr
    assert [r["optimizer_step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == list(range(1, 11))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]
    proc = run_cli(["--resume", *args, "train.max_steps=14"])
    assert "extended from 10 to 14 optimizer steps: the learning rate follows the 14-step schedule from step 10 on" \
        in proc.stderr
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["optimizer_step"] for r in steps] == list(range(1, 15))
    factor = linear_warmup_decay(warmup_steps=2, total_steps=14)  # ceil(0.1 * 14)
    assert [r["lr"] for r in steps[10:]] == pytest.approx([1e-3 * factor(s) for s in range(10, 14)])
