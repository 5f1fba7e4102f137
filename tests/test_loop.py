"""The loop's decisions, in this process: the step boundary as a pure function, and `Recipe` runs
on the tiny BERT (no subprocess, no process group: seconds each).

    python -m pytest -q -m fast tests         # the quick tier (this file and the other unit tests)

The same runs through the real CLI and launchers are tests/test_train.py, test_resume.py, ...;
the first test here checks that an in-process run is that run (the same pinned losses).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import evals, read_jsonl, train_losses
from test_train import PINNED_LOSSES

from distributed_tune import checkpoint, records, signals
from distributed_tune.config import Derived, TrainConfig, load_config
from distributed_tune.errors import ConfigError, RunDirError, TrainingError
from distributed_tune.train import CONSENSUS_EVERY, Outcome, Recipe, boundary

pytestmark = pytest.mark.fast


def derived(steps_per_epoch: int, total_steps: int) -> Derived:
    return Derived(world_size=1, micro_batch_size=32, gradient_accumulation_steps=1, global_batch_size=32,
                   train_examples=32 * steps_per_epoch, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   warmup_steps=0, pad_to_multiple_of=1, epochs=-(-total_steps // steps_per_epoch))


def test_the_step_boundary_is_a_function_of_progress_and_config() -> None:
    t = TrainConfig(eval_every=50, checkpoint_every=0, log_every=10)
    d = derived(steps_per_epoch=267, total_steps=3 * 267)

    def at(step: int) -> tuple[bool, ...]:
        b = boundary(step, (step - 1) % 267 + 1, t, d)
        return b.check, b.log, b.evaluate, b.save, b.epoch_end, b.done

    assert at(7) == (False,) * 6
    assert at(CONSENSUS_EVERY) == (True, True, False, False, False, False)
    assert at(50) == (True, True, True, False, False, False)
    assert at(267) == (True, False, True, True, True, False)  # an epoch end: evaluate and save
    assert at(300) == (True, True, True, False, False, False)
    assert at(801) == (True, True, True, True, True, True)  # the last step is logged and evaluated
    saving = TrainConfig(eval_every=0, checkpoint_every=4, log_every=3)
    assert [s for s in range(1, 13) if boundary(s, s, saving, d).save] == [4, 8, 12]
    assert [s for s in range(1, 13) if boundary(s, s, saving, d).evaluate] == []

    b = boundary(267, 267, t, d)
    assert (b.outcome(stopping=False, early_stop=False), b.outcome(False, True), b.outcome(True, True)) == (
        Outcome.EPOCH_END, Outcome.EARLY_STOP, Outcome.STOPPED)
    assert boundary(5, 5, t, d).outcome(False, False) is None
    assert boundary(801, 267, t, d).outcome(False, False) is Outcome.DONE


@pytest.fixture()
def in_process(tiny_model: Path, cola_dir: Path, cache_dir: Path):
    """Run `Recipe` here: the tiny model, the test data, one thread (as the CLI tests' processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(run_dir: Path, *overrides: str) -> dict:
        cfg = load_config(None, [f"model.name={tiny_model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}",
                                 "train.epochs=1", "train.max_steps=8", "train.log_every=1",
                                 "train.global_batch_size=16", "train.micro_batch_size=8", "train.lr=1e-3",
                                 f"output_dir={run_dir}", *overrides])
        return Recipe(cfg).run()

    yield run
    signals.reset()
    torch.set_num_threads(threads)


def test_an_in_process_run_is_the_cli_run(in_process, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert in_process(run, "train.eval_every=4", "train.checkpoint_every=4") == {"optimizer_step": 8, "outcome": "done"}
    assert train_losses(run) == pytest.approx(PINNED_LOSSES, rel=1e-4)
    assert [(r["optimizer_step"], r["split"]) for r in evals(run)] == [
        (step, split) for step in (4, 8) for split in ("in_domain_dev", "out_of_domain_dev", "dev")]
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [records.kind(r) for r in rows][-2:] == [records.TRAIN_SUMMARY, records.FINISHED]
    assert records.events(rows, records.FINISHED)[0]["outcome"] == "done"


def test_a_stop_signal_saves_at_the_next_check_and_the_resume_is_exact(in_process, tmp_path: Path) -> None:
    """A stop asked before the first step (as a SLURM warning during start-up) is seen at the first
    check, step CONSENSUS_EVERY: checkpoint there, STOPPED, outcome stopped; the resumed run logs the
    uninterrupted run's losses."""
    common = ("train.max_steps=16", "train.eval_every=0", "model.dropout=0.1")
    whole = tmp_path / "whole"
    in_process(whole, *common)
    stopped = tmp_path / "stopped"
    signals.request(signal.SIGUSR1)
    result = in_process(stopped, *common)
    assert result == {"optimizer_step": CONSENSUS_EVERY, "outcome": "stopped", "signal": "SIGUSR1"}
    assert (stopped / "STOPPED").is_file()
    assert [c.name for c in checkpoint.list_checkpoints(stopped)] == [checkpoint.checkpoint_name(CONSENSUS_EVERY)]
    assert not (stopped / "model").exists()
    signals.reset()
    assert in_process(stopped, *common, "resume=true")["outcome"] == "done"
    assert not (stopped / "STOPPED").exists()
    assert train_losses(stopped) == train_losses(whole)  # bit for bit
    assert in_process(stopped, *common, "resume=true")["outcome"] == "already_finished"


def test_a_stop_at_an_evaluation_step_evaluates_first_on_resume(in_process, tmp_path: Path) -> None:
    """A stop saves at once, before the step's evaluation; the resumed run evaluates that step first:
    the same evaluations (steps, values) as a run that was never stopped."""
    common = ("train.max_steps=20", "train.eval_every=10")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    in_process(whole, *common)
    signals.request(signal.SIGTERM)
    assert in_process(stopped, *common)["optimizer_step"] == 10
    assert evals(stopped) == []
    signals.reset()
    in_process(stopped, *common, "resume=true")

    def shown(run: Path) -> list[tuple]:
        return [(r["optimizer_step"], r["split"], r["mcc"], r["eval_loss"]) for r in evals(run)]

    assert shown(stopped) == shown(whole) and {r[0] for r in shown(whole)} == {10, 20}
    assert train_losses(stopped) == train_losses(whole)


def test_max_steps_and_epoch_ends_decide_evaluations_and_checkpoints(in_process, tmp_path: Path) -> None:
    """16 sentences a step over 8551: 534 steps an epoch; max_steps ends the run after 6, with one
    evaluation at the end only (eval_every=0), and the last step is saved (checkpoint_every=0)."""
    run = tmp_path / "run"
    in_process(run, "train.max_steps=6", "train.eval_every=0", "train.log_every=4")
    assert [r["optimizer_step"] for r in records.train_steps(read_jsonl(run / "metrics.jsonl"))] == [4, 6]
    assert {r["optimizer_step"] for r in evals(run)} == {6}
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_00000006"]
    info = (run / "model" / "training_info.json").read_text()
    assert '"optimizer_step": 6' in info


def test_max_steps_decides_the_length_over_epochs(in_process, tmp_path: Path) -> None:
    """As in the HF Trainer: train.max_steps=10 with train.epochs=1 and 4 steps an epoch trains 10
    steps, over 3 passes of the data (the third cut short), each full epoch audited."""
    run = tmp_path / "run"
    result = in_process(run, "train.epochs=1", "train.max_steps=10", "train.global_batch_size=2048",
                        "train.micro_batch_size=1024", "train.eval_every=0")
    assert result == {"optimizer_step": 10, "outcome": "done"}
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["optimizer_step"] for r in records.train_steps(rows)] == list(range(1, 11))
    assert [(r["epoch"], r["examples"]) for r in records.events(rows, records.EPOCH_DATA)] == [(0, 8192), (1, 8192)]
    assert [r["epoch"] for r in records.train_steps(rows)][-1] == 2.5
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert (derived["steps_per_epoch"], derived["total_steps"], derived["epochs"]) == (4, 10, 3)


def test_a_finished_run_is_extended_by_a_larger_max_steps(in_process, tmp_path: Path) -> None:
    """--resume with train.max_steps 6 -> 12 continues from the final checkpoint (step 6): the same
    first 6 losses, then 6 more steps whose learning rates are the 12-step schedule's (the HF
    Trainer's rule) and whose batches are an uninterrupted 12-step run's; recorded as `extended`."""
    from distributed_tune.model import linear_warmup_decay

    run, whole = tmp_path / "run", tmp_path / "whole"
    in_process(run, "train.max_steps=6", "train.eval_every=3")
    six = train_losses(run)
    same = in_process(run, "train.max_steps=6", "resume=true")
    assert same == {"optimizer_step": None, "outcome": "already_finished"}
    with pytest.raises(RunDirError, match=r"cannot be resumed with a shorter run \(train.max_steps: 6 in the checkpoint, "
                                          r"4 now: 6 -> 4 optimizer steps\); a resume may make a run longer, never shorter"):
        in_process(run, "train.max_steps=4", "resume=true")
    assert in_process(run, "train.max_steps=12", "train.eval_every=3", "resume=true") == {
        "optimizer_step": 12, "outcome": "done"}
    rows = read_jsonl(run / "metrics.jsonl")
    assert records.events(rows, records.EXTENDED) == [
        {"event": "extended", "optimizer_step": 6, "from_steps": 6, "to_steps": 12}]
    assert len(records.events(rows, records.FINISHED)) == 1
    steps = records.train_steps(rows)
    assert [r["optimizer_step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps[:6]] == six
    factor = linear_warmup_decay(warmup_steps=2, total_steps=12)  # ceil(0.1 * 12) = 2
    assert [r["lr"] for r in steps[6:]] == pytest.approx([1e-3 * factor(s) for s in range(6, 12)])
    in_process(whole, "train.max_steps=12", "train.eval_every=3")
    assert [r["lr"] for r in records.train_steps(read_jsonl(whole / "metrics.jsonl"))[6:]] == pytest.approx(
        [r["lr"] for r in steps[6:]])
    assert {r["optimizer_step"] for r in evals(run)} == {3, 6, 9, 12}


def test_a_non_finite_loss_names_the_first_bad_step(in_process, tmp_path: Path) -> None:
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"^non-finite loss at optimizer step 2 \(epoch 0\); last good checkpoint: "
                                            rf"{run}/checkpoints/step_00000001;"):
        in_process(run, "train.lr=1e30", "train.max_grad_norm=0", "train.checkpoint_every=1", "train.eval_every=0",
                   "train.max_steps=20")


def test_a_used_run_directory_is_refused_before_anything_loads(in_process, tmp_path: Path) -> None:
    run = tmp_path / "run"
    in_process(run, "train.max_steps=2", "train.eval_every=0")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run"):
        in_process(run, "train.max_steps=2")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_class_weights(in_process, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Equal weights are the unweighted loss (the weighted mean divides by the weights' sum); auto
    weighs the rarer class up by n / (classes x count); a wrong count or a regression is one line."""
    plain, equal, auto = tmp_path / "plain", tmp_path / "equal", tmp_path / "auto"
    in_process(plain, "train.eval_every=0")
    in_process(equal, "train.eval_every=0", "train.class_weights=[2.0, 2.0]")
    assert train_losses(equal) == pytest.approx(train_losses(plain), rel=1e-6)
    capsys.readouterr()
    in_process(auto, "train.eval_every=0", "train.class_weights=auto")
    # The test data: 8551 training sentences, 6023 acceptable (as the release).
    assert f"class weights (train.class_weights=auto): unacceptable {8551 / (2 * 2528):.4f}, acceptable " \
           f"{8551 / (2 * 6023):.4f}" in capsys.readouterr().err
    assert train_losses(auto) != pytest.approx(train_losses(plain), rel=1e-3)
    with pytest.raises(ConfigError, match=r"^train.class_weights=\[1.0, 2.0, 3.0\] has 3 weight\(s\) but the task has 2 "
                                          r"classes \(unacceptable, acceptable\); give one weight per class, in that order$"):
        in_process(tmp_path / "three", "train.class_weights=[1, 2, 3]")
    assert not (tmp_path / "three").exists()
    with pytest.raises(ConfigError, match=r"^override: train.class_weights must be 'none' \| 'auto' \| list of float, "
                                          r"got 'balanced'$"):
        in_process(tmp_path / "bad", "train.class_weights=balanced")
