"""What a user coming from the HF Trainer expects, through the real CLI on the tiny BERT: the data
splits that exist are evaluated, offline problems are said at once, every evaluation has its loss,
results.json and the model card are written, `push` refuses without network, and a collapsed
model is flagged in the final block, by `predict` and in a sweep's summary.

    python -m pytest -q tests/test_trainer_user.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import evals, free_port, run_cli, subprocess_env
from test_evaluate import make_decisive_model

from distributed_tune.tasks import get_task

COLLAPSED = "  (collapsed: one class predicted)"


def args(model: Path, cola: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model}", f"data.source={cola}", f"data.cache_dir={cache}", "train.max_steps=8",
            "train.eval_every=4", "train.log_every=2", "train.global_batch_size=16", "train.lr=1e-4",
            f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def decisive(tiny_model: Path, cola_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose predictions depend on the sentence (two classes predicted)."""
    return make_decisive_model(tiny_model, tmp_path_factory.mktemp("decisive") / "model", cola_raw)


@pytest.fixture(scope="module")
def healthy(decisive: Path, cola_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, evaluations at 4 and 8, a held-out tenth of train selecting, model/ = the last weights."""
    run = tmp_path_factory.mktemp("healthy") / "run"
    run_cli(args(decisive, cola_dir, cache_dir, run, "data.heldout_fraction=0.1", "train.select_best=false"))
    return run


# --------------------------------------------------------------------------- data a Trainer user brings


def test_glue_dev_without_out_of_domain_rows_evaluates_the_splits_it_has(tiny_model: Path, cola_raw: Path,
                                                                         cache_dir: Path, tmp_path: Path) -> None:
    """GLUE's CoLA layout whose dev.tsv holds only in-domain rows: the run says once that
    out_of_domain_dev has no examples, evaluates in_domain_dev and dev (then the same rows), selects
    on dev, and exports model/ (it used to die at the first evaluation: KeyError, exit 1)."""
    glue = tmp_path / "CoLA"
    glue.mkdir()
    shutil.copy(cola_raw / "in_domain_train.tsv", glue / "train.tsv")
    shutil.copy(cola_raw / "in_domain_dev.tsv", glue / "dev.tsv")
    run = tmp_path / "run"
    proc = run_cli(args(tiny_model, glue, cache_dir, run))
    assert proc.stderr.count("out_of_domain_dev: no examples") == 1
    assert (f"[distributed_tune] out_of_domain_dev: no examples in data.source={glue}; not evaluated "
            "(dev is the other splits only)") in proc.stderr.splitlines()
    records = evals(run)
    assert [(r["optimizer_step"], r["split"], r["n"]) for r in records] == [
        (4, "in_domain_dev", 527), (4, "dev", 527), (8, "in_domain_dev", 527), (8, "dev", 527)]
    for a, b in zip(records[::2], records[1::2]):
        assert {k: v for k, v in a.items() if k != "split"} == {k: v for k, v in b.items() if k != "split"}
    info = json.loads((run / "model" / "training_info.json").read_text())
    assert info["metric"] == "dev/mcc" and (run / "model" / "model.safetensors").is_file()
    block = next(line for line in proc.stderr.splitlines() if line.startswith("[distributed_tune] model/ = step"))
    assert " (best dev mcc): mcc in_domain_dev " in block and "out_of_domain_dev" not in block


def test_header_only_dev_file_is_refused_before_anything_is_written(tiny_model: Path, cache_dir: Path,
                                                                    tmp_path: Path) -> None:
    """No selection split, nothing to select on: one line, exit 2, no run directory (it used to be a
    ValueError traceback from the tokenizer)."""
    from glue_data import write_glue_task

    sst2 = write_glue_task(tmp_path / "glue", "sst2")
    (sst2 / "dev.tsv").write_text((sst2 / "dev.tsv").read_text().splitlines()[0] + "\n")
    run = tmp_path / "run"
    proc = run_cli(["task=sst2", *args(tiny_model, sst2, cache_dir, run)], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: data.source={sst2}: no validation examples (an empty or header-only evaluation file?); sst2 "
        "scores and selects the best model on validation: add its rows"]
    assert not run.exists()


def test_offline_default_run_names_the_data_and_the_model_at_once(tiny_model: Path, cola_dir: Path,
                                                                  tmp_path: Path) -> None:
    """No network (HF_HUB_OFFLINE=1, a CoLA URL nothing listens at): one error naming data.source and
    model.name and both fixes, exit 2, nothing written. It used to take two attempts."""
    url = f"http://127.0.0.1:{free_port()}/cola_public_1.1.zip"
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"))  # no cached bert-base-uncased either
    run = tmp_path / "run"
    base = ["--config", "configs/cola_bert_base.yaml", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={run}"]
    proc = run_cli([*base, f"data.source={url}"], env=env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"error: 2 problems: (1) could not download CoLA from {url} ([Errno 111] Connection refused); without "
        "network, set data.source to a local folder holding the raw CoLA TSVs; (2) model.name=bert-base-uncased: "
        "cannot load the tokenizer: 'bert-base-uncased' could not be fetched from the Hugging Face hub (no "
        "network, or no such model); set model.name to a local save_pretrained folder"), lines[0]
    assert not run.exists() and not (tmp_path / "cache" / "cola_public_1.1.zip").exists()
    # One problem is one problem: a local model and the unreachable URL name the data only...
    proc = run_cli([*base, f"data.source={url}", f"model.name={tiny_model}"], env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: could not download CoLA from {url} ([Errno 111] Connection refused); without network, set "
        "data.source to a local folder holding the raw CoLA TSVs"]
    # ... and local data with the hub model names the model only.
    proc = run_cli([*base, f"data.source={cola_dir}"], env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "error: model.name=bert-base-uncased: cannot load the tokenizer:") and "2 problems" not in proc.stderr
    assert not run.exists()


# --------------------------------------------------------------------------- eval loss, results.json


def hand_cross_entropy(model_dir: Path, sentences: list[str], labels: list[int]) -> float:
    """Mean cross-entropy of the exported model by torch's own cross_entropy, in float64; sentences
    of one token length go through together (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = [tokenizer(s)["input_ids"] for s in sentences]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    total = 0.0
    with torch.no_grad():
        for rows in by_length.values():
            logits = model(input_ids=torch.tensor([ids[i] for i in rows])).logits.double()
            target = torch.tensor([labels[i] for i in rows])
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return total / len(sentences)


def test_every_evaluation_logs_its_loss_equal_to_a_hand_computed_cross_entropy(healthy: Path, cola_raw: Path) -> None:
    from distributed_tune.data import split_heldout
    from distributed_tune.tasks.cola import read_tsv

    records = evals(healthy)
    assert [(r["optimizer_step"], r["split"]) for r in records] == [
        (s, split) for s in (4, 8) for split in ("in_domain_dev", "out_of_domain_dev", "dev", "heldout")]
    assert all(r["eval_loss"] > 0 and "loss" not in r for r in records)  # `loss` names training records
    final = {r["split"]: r for r in records if r["optimizer_step"] == 8}
    dev = read_tsv(cola_raw / "in_domain_dev.tsv", "in_domain_dev") + read_tsv(cola_raw / "out_of_domain_dev.tsv",
                                                                              "out_of_domain_dev")
    _, heldout = split_heldout(read_tsv(cola_raw / "in_domain_train.tsv", "train"), 0.1, False)
    sets = {"in_domain_dev": [e for e in dev if e.split == "in_domain_dev"],
            "out_of_domain_dev": [e for e in dev if e.split == "out_of_domain_dev"], "dev": dev, "heldout": heldout}
    for split, examples in sets.items():
        assert final[split]["n"] == len(examples)
        want = hand_cross_entropy(healthy / "model", [e.text[0] for e in examples], [e.label for e in examples])
        assert final[split]["eval_loss"] == pytest.approx(want, rel=1e-6), split  # float32 logits: ~1e-8 here
    # The loss moved between the two evaluations (it is this evaluation's, not a constant).
    assert {r["split"]: r["eval_loss"] for r in records if r["optimizer_step"] == 4} != \
        {s: r["eval_loss"] for s, r in final.items()}


def test_eval_loss_arithmetic() -> None:
    from distributed_tune.metrics import cross_entropy, score

    # Regression: the MSE. Labels 1, 2, 3, 4 and predictions 1, 3, 2, 4: squared errors 0, 1, 1, 0.
    m = score(get_task("stsb"), np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]), 1, np.array([[1.0], [3], [2], [4]]))
    assert m["eval_loss"] == m["mse"] == 0.5
    # Classes, from the logits: [0, 200] for gold 0 costs 200 nats, where the probability (e^-200)
    # underflows to 0 in float32 and has no logarithm; [ln 3, 0] for gold 0: ln(4/3).
    assert cross_entropy(np.array([[0.0, 200.0]]), np.array([0])) == 200.0
    assert cross_entropy(np.array([[np.log(3.0), 0.0], [0.0, 200.0]]), np.array([0, 0])) == pytest.approx(
        (np.log(4 / 3) + 200.0) / 2, abs=1e-12)


# --------------------------------------------------------------------------- the model card, push


# --------------------------------------------------------------------------- a collapsed model, flagged


