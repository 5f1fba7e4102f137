"""`evaluate` reproduces a run's own dev evaluation, on 1 and 2 processes, on user TSVs, and
reports a collapsed model as such.

    pytest tests/test_evaluate.py -x -q

One real training run (8 optimizer steps of a tiny BERT, one dev evaluation at the end) serves
the whole module.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import evals, read_jsonl, run_cli

from distributed_tune.cli import main

N_IN, N_OUT = 527, 516


def make_decisive_model(tiny_model: Path, out: Path, cola_raw: Path) -> Path:
    """The tiny BERT re-initialised with large weights, so that its predictions depend on the
    sentence (the default init gives every sentence the same probability to 4 decimals), and its
    bias centred so that about half the dev sentences fall on each side of 0.5. A few steps of
    small-LR training keep it that way: evaluations with two classes predicted, far from 0.5."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sentences = [line.split("\t")[3] for line in (cola_raw / "in_domain_dev.tsv").read_text().splitlines()]
    with torch.no_grad():
        logits = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
        model.classifier.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """In-process evaluation with the thread count of the run (OMP_NUM_THREADS=1 in subprocesses):
    the same kernels, so the same floating-point sums."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_args(model: Path, cola_dir: Path, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}", "train.epochs=1",
            "train.max_steps=8", "train.log_every=1", "train.global_batch_size=16", "train.micro_batch_size=8",
            "train.lr=1e-4", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def run(tiny_model: Path, cola_dir: Path, cola_raw: Path, cache_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    model = make_decisive_model(tiny_model, tmp / "decisive", cola_raw)
    run_cli(run_args(model, cola_dir, cache_dir, tmp / "run"))
    return tmp / "run"


def test_evaluate_reproduces_the_runs_own_dev_evaluation(run: Path, capsys) -> None:
    with one_thread():
        assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    logged = {r["split"]: r for r in evals(run)}
    assert len(evals(run)) == 3 and logged["dev"]["optimizer_step"] == 8  # one evaluation, at the end
    assert not logged["dev"]["collapsed"] and 0 < logged["dev"]["confusion_matrix"][0][0]  # both classes predicted
    result = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(result["splits"]) == ["in_domain_dev", "out_of_domain_dev", "dev"]
    for split, m in result["splits"].items():
        for key in ("n", "mcc", "accuracy", "confusion_matrix", "collapsed", "eval_loss"):
            assert m[key] == logged[split][key], (split, key)
    assert [result["splits"][s]["n"] for s in result["splits"]] == [N_IN, N_OUT, N_IN + N_OUT]
    # Same model, same batches, same process count: the very same rows as the run's own file.
    assert (run / "eval" / "predictions.jsonl").read_text() == (run / "predictions.jsonl").read_text()
    assert result["training_info"]["optimizer_step"] == 8 and result["world_size"] == 1

    # Per source book: 17 in-domain and 6 out-of-domain sources, counts and accuracies add up,
    # and each MCC is the MCC of that source's rows (None where one class only).
    from sklearn.metrics import matthews_corrcoef

    rows = read_jsonl(run / "predictions.jsonl")
    by_source = result["by_source"]
    assert len(by_source["in_domain_dev"]) == 17 and len(by_source["out_of_domain_dev"]) == 6
    for split, n in (("in_domain_dev", N_IN), ("out_of_domain_dev", N_OUT)):
        assert sum(m["n"] for m in by_source[split].values()) == n
        correct = sum(r["pred"] == r["label"] for r in rows if r["split"] == split)
        assert round(sum(m["n"] * m["accuracy"] for m in by_source[split].values())) == correct
        for source, m in by_source[split].items():
            mine = [r for r in rows if r["split"] == split and r["source"] == source]
            y, p = [r["label"] for r in mine], [r["pred"] for r in mine]
            assert m["n"] == len(mine)
            if len(set(y)) == 2 and len(set(p)) == 2:
                assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)
            else:
                assert m["mcc"] is None
    assert sum(m["mcc"] is None for by in by_source.values() for m in by.values()) >= 1  # small sources exist

    assert "out_of_domain_dev" in out and "ks08" in out and "swb04" in out
    assert f"{logged['dev']['mcc']:.4f}" in out
    assert f"the run logged dev mcc {logged['dev']['mcc']:.4f} at optimizer step 8" in " ".join(out.split())


def test_two_processes_predict_each_dev_sentence_exactly_once(run: Path, tmp_path: Path) -> None:
    run_cli(["evaluate", str(run), "--out", str(tmp_path)], nproc=2, launcher="accelerate")
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["world_size"] == 2
    mine, theirs = read_jsonl(tmp_path / "predictions.jsonl"), read_jsonl(run / "predictions.jsonl")
    assert [r["index"] for r in mine] == list(range(N_IN + N_OUT))
    assert [r["pred"] for r in mine] == [r["pred"] for r in theirs]
    # Other batches (each rank's shard), so other float sums: equal to rounding.
    assert np.allclose([r["probs"] for r in mine], [r["probs"] for r in theirs], atol=2e-6)
    logged = {r["split"]: r for r in evals(run)}
    for split, m in result["splits"].items():
        assert (m["n"], m["mcc"], m["confusion_matrix"]) == (logged[split]["n"], logged[split]["mcc"],
                                                            logged[split]["confusion_matrix"])


def test_user_tsv_files_are_splits_named_after_the_files(run: Path, cola_raw: Path, tmp_path: Path, capsys) -> None:
    in_lines = (cola_raw / "in_domain_dev.tsv").read_text().splitlines()[:40]
    out_lines = (cola_raw / "out_of_domain_dev.tsv").read_text().splitlines()[:30]
    (tmp_path / "mine_a.tsv").write_text("\n".join(in_lines) + "\n")
    (tmp_path / "mine_b.tsv").write_text("\n".join(out_lines))  # no final newline, like the original
    out = tmp_path / "out"
    assert main(["evaluate", str(run), "--tsv", str(tmp_path / "mine_a.tsv"), str(tmp_path / "mine_b.tsv"),
                 "--out", str(out), "--batch-size", "7"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert {s: m["n"] for s, m in result["splits"].items()} == {"mine_a": 40, "mine_b": 30, "combined": 70}
    rows = read_jsonl(out / "predictions.jsonl")
    theirs = read_jsonl(run / "predictions.jsonl")
    expected = theirs[:40] + theirs[N_IN : N_IN + 30]
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in expected]
    assert [(r["split"], r["index"]) for r in rows] == [("mine_a", i) for i in range(40)] + [("mine_b", i) for i in range(30)]
    assert [r["pred"] for r in rows] == [r["pred"] for r in expected]
    assert np.allclose([r["probs"] for r in rows], [r["probs"] for r in expected], atol=2e-6)
    assert "mine_b" in capsys.readouterr().out
    # Without --out, a TSV evaluation gets its own folder: the dev evaluation's files stay.
    dev_before = (run / "eval" / "metrics.json").read_bytes() if (run / "eval" / "metrics.json").is_file() else None
    assert main(["evaluate", str(run), "--tsv", str(tmp_path / "mine_a.tsv")]) == 0
    assert json.loads((run / "eval" / "mine_a" / "metrics.json").read_text())["splits"]["mine_a"]["n"] == 40
    if dev_before is not None:
        assert (run / "eval" / "metrics.json").read_bytes() == dev_before


def test_a_model_predicting_one_class_is_reported_collapsed(tiny_model: Path, cola_dir: Path, tmp_path: Path,
                                                            capsys) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "always-acceptable"
    shutil.copytree(tiny_model, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0]))
    model.save_pretrained(folder)
    assert main(["evaluate", str(folder), f"data.source={cola_dir}"]) == 0
    result = json.loads((folder / "eval" / "metrics.json").read_text())  # a model folder: MODEL/eval
    dev = result["splits"]["dev"]
    assert dev["collapsed"] and dev["mcc"] == 0.0
    assert dev["confusion_matrix"] == [[0, 324], [0, 719]]  # dev: 324 unacceptable, 719 acceptable
    assert all(m["collapsed"] for m in result["splits"].values())
    assert all(m["mcc"] is None for by in result["by_source"].values() for m in by.values())
    assert result["run_logged"] is None and result["run_dir"] is None
    out = capsys.readouterr().out
    assert "YES" in out and "collapsed: the model predicts a single class" in " ".join(out.split())


def test_predictions_of_a_run_and_its_export_agree_with_a_pipeline(run: Path) -> None:
    from transformers import pipeline

    rows = read_jsonl(run / "model" / "dev_predictions.jsonl")
    clf = pipeline("text-classification", model=str(run / "model"), device="cpu")
    out = clf([r["sentence"] for r in rows[:5]])
    assert [o["label"] for o in out] == [r["pred_label"] for r in rows[:5]]
    assert [o["score"] for o in out] == pytest.approx([r["prob"] for r in rows[:5]], abs=1e-5)


def test_bad_input_is_one_line_naming_the_problem(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "neither a run directory" in capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 1\n")
    assert main(["evaluate", str(unfinished)]) == 2
    assert "without a model/ folder" in capsys.readouterr().err

    bad = tmp_path / "bad.tsv"
    bad.write_text("gj04\t1\t\tFine sentence.\ngj04\tyes\t\tBad label.\n")
    assert main(["evaluate", str(run), "--tsv", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2: label must be 0 or 1, got 'yes'"
    assert not (tmp_path / "o").exists()

    assert main(["evaluate", str(run), "--batch-size", "0"]) == 2
    assert "--batch-size=0 must be at least 1" in capsys.readouterr().err
