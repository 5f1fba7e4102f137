"""`predict` and `evaluate` on a model trained with DeepSpeed ZeRO-3 on 2 processes, run on 1 CPU
process: the exported folder reproduces the run's predictions, and predict agrees with evaluate.

    pytest tests/test_predict.py -x -q

One real 2-process ZeRO-3 run (4 optimizer steps of a tiny BERT) serves the whole module.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import evals, read_jsonl, run_cli
from test_evaluate import make_decisive_model, one_thread, run_args

from distributed_tune.cli import main


@pytest.fixture(scope="module")
def zero3_run(tiny_model: Path, cola_dir: Path, cola_raw: Path, cache_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("predict")
    model = make_decisive_model(tiny_model, tmp / "decisive", cola_raw)
    run_cli(run_args(model, cola_dir, cache_dir, tmp / "run", "distributed.zero_stage=3", "train.max_steps=4"),
            nproc=2, launcher="accelerate")
    return tmp / "run"


@pytest.fixture()
def evaluated(zero3_run: Path) -> list[dict]:
    """evaluate on one plain CPU process."""
    if not (zero3_run / "eval" / "predictions.jsonl").is_file():
        with one_thread():
            assert main(["evaluate", str(zero3_run)]) == 0
    return read_jsonl(zero3_run / "eval" / "predictions.jsonl")


def test_zero3_model_evaluates_to_the_runs_own_numbers_on_one_cpu_process(zero3_run: Path, evaluated) -> None:
    info = json.loads((zero3_run / "model" / "training_info.json").read_text())
    assert info["optimizer_step"] == 4
    logged = {r["split"]: r for r in evals(zero3_run)}
    assert logged["dev"]["world_size"] == 2 and not logged["dev"]["collapsed"]
    result = json.loads((zero3_run / "eval" / "metrics.json").read_text())
    assert result["world_size"] == 1
    for split, m in result["splits"].items():
        for key in ("n", "mcc", "accuracy", "confusion_matrix", "collapsed"):
            assert m[key] == logged[split][key], (split, key)
        # The run evaluated sharded over 2 ZeRO-3 ranks, in other batches: equal to rounding.
        assert m["eval_loss"] == pytest.approx(logged[split]["eval_loss"], rel=1e-6), split
    theirs = read_jsonl(zero3_run / "predictions.jsonl")
    assert len(evaluated) == len(theirs) == 1043
    assert [r["pred"] for r in evaluated] == [r["pred"] for r in theirs]
    # The run evaluated sharded over 2 ZeRO-3 ranks, in other batches: equal to rounding.
    assert np.allclose([r["probs"] for r in evaluated], [r["probs"] for r in theirs], atol=2e-6)


def test_predict_agrees_with_evaluate_from_arguments_file_and_stdin(zero3_run: Path, evaluated, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    picked = evaluated[:25] + evaluated[527:540]  # in-domain and out-of-domain sentences
    assert {r["pred"] for r in picked} == {0, 1}

    # Arguments -> one printed line per sentence: label, probability of that label, sentence.
    capsys.readouterr()
    assert main(["predict", str(zero3_run), *(r["sentence"] for r in picked[:3])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, r in zip(lines, picked[:3]):
        label, prob, sentence = line.split("\t")
        assert (label, sentence) == (r["pred_label"], r["sentence"])
        assert float(prob) == pytest.approx(r["prob"], abs=1e-4)

    # A file with blank lines, several batches of 5 -> jsonl; line numbers kept.
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(r["sentence"] for r in picked[:20]) + "\n\n  \n" +
                         "\n".join(r["sentence"] for r in picked[20:]) + "\n")
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(zero3_run / "model"), "--file", str(sentences), "--out", str(out),
                 "--batch-size", "5"]) == 0
    n_ok = sum(r["pred"] for r in picked)
    assert capsys.readouterr().out.strip() == (f"wrote {len(picked)} predictions to {out} "
                                                f"({len(picked) - n_ok} unacceptable, {n_ok} acceptable)")
    rows = read_jsonl(out)
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in picked]
    assert [r["line"] for r in rows] == list(range(1, 21)) + list(range(23, 23 + len(picked) - 20))
    assert [r["pred"] for r in rows] == [r["pred"] for r in picked]
    assert [r["pred_label"] for r in rows] == [r["pred_label"] for r in picked]
    assert np.allclose([r["probs"] for r in rows], [r["probs"] for r in picked], atol=2e-6)

    # stdin, default batch size: the same labels.
    monkeypatch.setattr(sys, "stdin", io.StringIO(sentences.read_text()))
    assert main(["predict", str(zero3_run)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in printed] == [r["pred_label"] for r in picked]


def test_sentences_may_follow_options(zero3_run: Path, evaluated, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.jsonl"
    assert main(["predict", str(zero3_run), "--out", str(out), evaluated[0]["sentence"], "Him saw she."]) == 0
    assert [r["sentence"] for r in read_jsonl(out)] == [evaluated[0]["sentence"], "Him saw she."]


def test_predict_help_imports_no_torch() -> None:
    """`--help` parses arguments before torch (seconds) is imported."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "distributed_tune", "predict", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--glue-submission" in proc.stdout
    probe = subprocess.run([sys.executable, "-X", "importtime", "-m", "distributed_tune", "predict", "--help"],
                           capture_output=True, text=True, timeout=60)
    assert "| torch" not in probe.stderr, "predict --help imports torch"


def test_predict_bad_input(zero3_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(zero3_run), "fine", ""]) == 2
    assert capsys.readouterr().err.strip() == "error: sentence argument 2 is empty; remove it or put text in it"
    assert main(["predict", str(zero3_run), "--file", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n \n")
    assert main(["predict", str(zero3_run), "--file", str(tmp_path / "blank.txt")]) == 2
    assert "only blank lines" in capsys.readouterr().err
