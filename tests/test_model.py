"""Model and optimizer set-up: labels, heads, pad tokens, weight decay groups, schedule, metrics,
early stopping, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_tune.config import ModelConfig, TrainConfig
from distributed_tune.errors import ModelError
from distributed_tune.metrics import classification_metrics, regression_metrics
from distributed_tune.model import build_optimizer, linear_warmup_decay, load_model, load_tokenizer

pytestmark = pytest.mark.fast  # in this process, no launcher: the quick tier

COLA = ("unacceptable", "acceptable")


def load(cfg: ModelConfig, labels: tuple[str, ...] = COLA, regression: bool = False, max_length: int = 64):
    tok = load_tokenizer(cfg)
    return load_model(cfg, labels, regression, tok.pad_token_id, max_length, tok)


def test_bert_gets_the_tasks_labels_a_new_head_and_the_dropout_override(tiny_model: Path) -> None:
    model, notes = load(ModelConfig(name=str(tiny_model), dropout=0.0))
    assert model.config.id2label == {0: "unacceptable", 1: "acceptable"} and model.num_labels == 2
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    assert notes == []  # the tiny model was saved with a 2-label head: nothing new to say


def test_a_head_of_another_size_is_replaced_and_said_once(tiny_model: Path) -> None:
    model, notes = load(ModelConfig(name=str(tiny_model)), ("entailment", "neutral", "contradiction"))
    assert model.num_labels == 3 and model.classifier.out_features == 3
    assert notes == [f"model.name={tiny_model} had a 2-output head; it was replaced by a new 3-output head "
                     "(classifier.bias, classifier.weight) for this task"]
    score, _ = load(ModelConfig(name=str(tiny_model)), (), regression=True)
    assert score.num_labels == 1 and score.config.problem_type == "regression"


def test_an_encoder_without_a_head_gets_one_quietly(tiny_model: Path, tmp_path: Path, capfd) -> None:
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(tiny_model).save_pretrained(tmp_path / "encoder")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "encoder")
    capfd.readouterr()
    _, notes = load(ModelConfig(name=str(tmp_path / "encoder")))
    assert notes == ["a new 2-output classification head was initialised (classifier.bias, classifier.weight): "
                     "expected when fine-tuning a pretrained encoder"]
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err


def test_a_half_precision_checkpoint_trains_from_fp32_weights(tiny_model: Path, tmp_path: Path) -> None:
    """transformers 5 keeps a checkpoint's dtype; the master weights must be fp32 all the same."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    model, _ = load(ModelConfig(name=str(tmp_path)))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_max_length_beyond_the_models_positions_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match=r"data.max_length=256 is more than model.name=.* takes \(128 positions\); "
                                         r"set data.max_length=128 or less"):
        load(ModelConfig(name=str(tiny_model)), max_length=256)


def test_gpt2_without_pad_token_gets_one_and_classifies_padded_batches(tmp_path: Path, cola_dir: Path) -> None:
    from tiny_model import make_tiny_gpt2

    cfg = ModelConfig(name=str(make_tiny_gpt2(tmp_path / "gpt2", cola_dir)))
    tok = load_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    model, _ = load_model(cfg, COLA, False, tok.pad_token_id, 64, tok)
    model.eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["The cat sat.", "The more we study verbs, the crazier they get."], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits[0]
        alone = model(**tok(["The cat sat."], return_tensors="pt")).logits[0]
    # The head reads the last real token, not a pad: padding does not change the prediction.
    assert torch.allclose(padded, alone, atol=1e-5)


def test_the_exported_tokenizer_pads_on_the_right(tiny_model: Path, tmp_path: Path) -> None:
    import json

    tok = load_tokenizer(ModelConfig(name=str(tiny_model)))
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["padding_side"] == "right"


def test_no_weight_decay_on_biases_and_layernorm(tiny_model: Path) -> None:
    model, _ = load(ModelConfig(name=str(tiny_model)))
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


def test_metrics_against_hand_computed() -> None:
    # tp=1 tn=2 fp=0 fn=1: MCC = (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12); F1 = 2/(2+0+1)
    m = classification_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert m["mcc"] == pytest.approx(2 / 12 ** 0.5) and m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]] and not m["collapsed"]
    # tp=3 tn=1 fp=2 fn=1: (3*1 - 2*1) / sqrt(5*4*3*2); F1 = 6 / (6 + 2 + 1)
    m = classification_metrics(np.array([1, 1, 1, 1, 0, 0, 0]), np.array([1, 1, 1, 0, 1, 1, 0]))
    assert m["mcc"] == pytest.approx(1 / 120 ** 0.5) and m["f1"] == pytest.approx(6 / 9)
    collapsed = classification_metrics(np.array([1, 0, 1]), np.array([1, 1, 1]))
    assert collapsed["mcc"] == 0.0 and collapsed["collapsed"]
    assert classification_metrics(np.array([1, 0]), np.array([0, 1]))["mcc"] == pytest.approx(-1.0)
    # 3 classes: macro F1 = mean of per-class F1 (1, 2/3, 0) = 5/9; confusion rows are gold labels.
    m = classification_metrics(np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1]), num_labels=3)
    assert m["f1"] == pytest.approx((1 + 0.8 + 0) / 3) and m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 1, 0]]
    # Regression: labels 1,2,3,4 and predictions 1,3,2,4. Pearson = 0.8 (centred: -1.5,-.5,.5,1.5 vs
    # -1.5,.5,-.5,1.5: dot 4, norms 5); Spearman on the ranks: the same 0.8; MSE = (0+1+1+0)/4.
    r = regression_metrics(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))
    assert (r["pearson"], r["spearman"], r["mse"]) == (pytest.approx(0.8), pytest.approx(0.8), 0.5)
    assert regression_metrics(np.array([1.0, 2]), np.array([3.0, 3.0]))["collapsed"]


def test_missing_model_names_the_key_and_the_fix(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ModelError, match=r"model.name=/no/such/model: cannot load the tokenizer: the folder "
                                         r"/no/such/model does not exist"):
        load_tokenizer(ModelConfig(name="/no/such/model"))
    (tmp_path / "empty").mkdir()
    tok = load_tokenizer(ModelConfig(name=str(tiny_model)))
    with pytest.raises(ModelError, match=r"is not a Hugging Face model folder"):
        load_model(ModelConfig(name=str(tmp_path / "empty")), COLA, False, 0, 64, tok)


def test_hub_name_offline_says_how_to_use_a_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"model.name=bert-base-uncased: cannot load the tokenizer: 'bert-base-uncased' "
                                         r"could not be fetched from the Hugging Face hub .*set model.name to a local"):
        load_tokenizer(ModelConfig(name="bert-base-uncased"))


def test_best_model_and_early_stopping_on_a_scripted_sequence() -> None:
    from distributed_tune.train import Progress

    p = Progress()
    decisions = []
    for step, mcc in zip((50, 100, 150, 200, 250), (0.10, 0.30, 0.20, 0.25, 0.30)):
        p.optimizer_step = step
        decisions.append(p.record_evaluation(mcc, collapsed=False, patience=3))
    # 0.30 again at step 250 is no improvement: the third evaluation without one stops the run.
    assert decisions == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert (p.best_value, p.best_step, p.evals_without_improvement) == (0.30, 100, 3)


def test_early_stopping_waits_for_the_end_of_the_one_class_start() -> None:
    """Patience counts only once an evaluation predicted two classes: a slow starter that predicts one
    class for 7 evaluations (CoLA's usual start, MCC 0) is not stopped with patience 3."""
    from distributed_tune.train import Progress

    p = Progress()
    seq = [(0.0, True)] * 7 + [(0.12, False), (0.25, False), (0.20, False), (0.22, False), (0.24, False)]
    decisions = []
    for step, (mcc, collapsed) in enumerate(seq, 1):
        p.optimizer_step = step * 50
        decisions.append(p.record_evaluation(mcc, collapsed=collapsed, patience=3))
    assert [stop for _, stop in decisions] == [False] * 11 + [True]
    assert (p.best_value, p.best_step, p.counting) == (0.25, 450, True)
    q = Progress()
    for step in (1, 2, 3, 4):  # a collapsed run, MCC 0 throughout, patience 0: never stops
        q.optimizer_step = step
        last = q.record_evaluation(0.0, collapsed=True, patience=0)
    assert last == (False, False) and (q.best_value, q.best_step, q.evals_without_improvement) == (0.0, 1, 0)
