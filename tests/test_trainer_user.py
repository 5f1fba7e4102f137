"""What a user coming from the HF Trainer expects, through the real CLI on the tiny BERT: the data
splits that exist are evaluated, offline problems are said at once, every evaluation has its loss,
results.json and the model card are written, `push` refuses without network, and a collapsed
model is flagged in the final block, by `predict` and in a sweep's summary.

    python -m pytest -q tests/test_trainer_user.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import evals, run_cli
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


