"""Model and optimizer set-up: labels, pad tokens, weight decay groups, schedule, MCC, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_tune.config import ModelConfig, TrainConfig
from distributed_tune.errors import ModelError
from distributed_tune.metrics import classification_metrics
from distributed_tune.model import build_optimizer, linear_warmup_decay, load_model, load_tokenizer


def test_bert_gets_cola_labels_and_dropout_override(tiny_model: Path) -> None:
    cfg = ModelConfig(name=str(tiny_model), dropout=0.0)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok.pad_token_id)
    assert model.config.id2label == {0: "unacceptable", 1: "acceptable"} and model.num_labels == 2
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0


def test_gpt2_without_pad_token_gets_one_and_classifies_padded_batches(tmp_path: Path) -> None:
    from tiny_model import make_tiny_gpt2

    cfg = ModelConfig(name=str(make_tiny_gpt2(tmp_path / "gpt2")))
    tok = load_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    model = load_model(cfg, tok.pad_token_id).eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["The cat sat.", "The more we study verbs, the crazier they get."], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits[0]
        alone = model(**tok(["The cat sat."], return_tensors="pt")).logits[0]
    # The head reads the last real token, not a pad: padding does not change the prediction.
    assert torch.allclose(padded, alone, atol=1e-5)


def test_no_weight_decay_on_biases_and_layernorm(tiny_model: Path) -> None:
    model = load_model(ModelConfig(name=str(tiny_model)), 0)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.01))
    decay, skip = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and skip["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in skip["params"]}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in skipped)
    assert "bert.embeddings.LayerNorm.weight" in skipped and "classifier.bias" in skipped
    assert {names[id(p)] for p in decay["params"]} >= {"classifier.weight", "bert.embeddings.word_embeddings.weight"}
    assert len(decay["params"]) + len(skip["params"]) == len(list(model.parameters()))


def test_warmup_then_linear_decay() -> None:
    f = linear_warmup_decay(warmup_steps=3, total_steps=10)
    assert [round(f(s), 4) for s in range(11)] == [0.25, 0.5, 0.75, 1.0, 0.8571, 0.7143, 0.5714, 0.4286, 0.2857,
                                                   0.1429, 0.0]


def test_mcc_accuracy_confusion_against_hand_computed() -> None:
    # tp=1 tn=2 fp=0 fn=1: MCC = (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    m = classification_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert m["mcc"] == pytest.approx(2 / 12 ** 0.5) and m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[2, 0], [1, 1]] and not m["collapsed"]
    # tp=3 tn=1 fp=2 fn=1: (3*1 - 2*1) / sqrt(5*4*3*2)
    m = classification_metrics(np.array([1, 1, 1, 1, 0, 0, 0]), np.array([1, 1, 1, 0, 1, 1, 0]))
    assert m["mcc"] == pytest.approx(1 / 120 ** 0.5)
    collapsed = classification_metrics(np.array([1, 0, 1]), np.array([1, 1, 1]))
    assert collapsed["mcc"] == 0.0 and collapsed["collapsed"]
    assert classification_metrics(np.array([1, 0]), np.array([0, 1]))["mcc"] == pytest.approx(-1.0)


def test_missing_model_names_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model.name=/no/such/model: cannot load the tokenizer: the folder "
                                         r"/no/such/model does not exist"):
        load_tokenizer(ModelConfig(name="/no/such/model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"is not a Hugging Face model folder"):
        load_model(ModelConfig(name=str(tmp_path / "empty")), 0)


def test_hub_name_offline_says_how_to_use_a_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"model.name=bert-base-uncased: cannot load the tokenizer: 'bert-base-uncased' "
                                         r"could not be fetched from the Hugging Face hub .*set model.name to a local"):
        load_tokenizer(ModelConfig(name="bert-base-uncased"))


def test_best_model_and_early_stopping_on_a_scripted_mcc_sequence() -> None:
    from distributed_tune.train import Progress

    p = Progress()
    decisions = []
    for step, mcc in zip((50, 100, 150, 200, 250), (0.10, 0.30, 0.20, 0.25, 0.30)):
        p.optimizer_step = step
        decisions.append(p.record_evaluation(mcc, patience=3))
    # 0.30 again at step 250 is no improvement: the third evaluation without one stops the run.
    assert decisions == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert (p.best_mcc, p.best_step, p.evals_without_improvement) == (0.30, 100, 3)
    q = Progress()
    for step in (1, 2, 3, 4):  # a collapsed run, MCC 0 throughout, patience 0: never stops
        q.optimizer_step = step
        last = q.record_evaluation(0.0, patience=0)
    assert last == (False, False) and (q.best_mcc, q.best_step, q.evals_without_improvement) == (0.0, 1, 3)
