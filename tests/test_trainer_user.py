"""What a user coming from the HF Trainer expects, through the real CLI on the tiny BERT: the data
splits that exist are evaluated, offline problems are said at once, every evaluation has its loss,
results.json and the model card are written, `push` refuses without network, and a collapsed
model is flagged in the final block, by `predict` and in a sweep's summary.

    python -m pytest -q tests/test_trainer_user.py
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
from conftest import REPO, evals, free_port, read_jsonl, run_cli, snapshot, subprocess_env
from test_evaluate import make_decisive_model

from distributed_tune.summary import pick_winner
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
def one_class(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with its head biased to 'acceptable' by 10 logits: every run of a few small
    steps predicts one class (CoLA's classic collapse, MCC 0)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("one-class") / "model"
    shutil.copytree(tiny_model, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def healthy(decisive: Path, cola_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, evaluations at 4 and 8, a held-out tenth of train selecting, model/ = the last weights."""
    run = tmp_path_factory.mktemp("healthy") / "run"
    run_cli(args(decisive, cola_dir, cache_dir, run, "data.heldout_fraction=0.1", "train.select_best=false"))
    return run


@pytest.fixture(scope="module")
def collapsed(one_class: Path, cola_dir: Path, cache_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("collapsed") / "run"
    return run, run_cli(args(one_class, cola_dir, cache_dir, run, "train.max_steps=4", "train.eval_every=2",
                             "train.lr=1e-5"))


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


def steps_per_epoch(run: Path) -> int:
    return yaml.safe_load((run / "config.yaml").read_text())["derived"]["steps_per_epoch"]


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


def test_results_json_says_how_the_run_ended_and_what_model_holds(healthy: Path) -> None:
    results = json.loads((healthy / "results.json").read_text())
    final = {r["split"]: {k: v for k, v in r.items() if k not in ("split", "optimizer_step", "epoch", "world_size")}
             for r in evals(healthy) if r["optimizer_step"] == 8}
    assert (results["status"], results["outcome"], results["task"], results["optimizer_step"], results["epoch"],
            results["selection"]) == ("finished", "done", "cola", 8, round(8 / steps_per_epoch(healthy), 4), "heldout/mcc")
    assert results["model"] == {"path": str(healthy / "model"), "optimizer_step": 8, "selected": "final",
                                "collapsed": False, "eval": final}
    assert results["last_evaluation"] == {"optimizer_step": 8, "eval": final}
    summary = next(r for r in read_jsonl(healthy / "metrics.jsonl") if r.get("event") == "train_summary")
    assert results["train"] == {k: v for k, v in summary.items() if k != "event"}
    assert "resume" not in results


def test_results_json_after_a_stop_and_after_the_resumed_end(decisive: Path, cola_dir: Path, cache_dir: Path,
                                                             tmp_path: Path) -> None:
    """A stop request found at start (the SLURM warning's file): the run stops at its first check
    (step 4, before evaluating), results.json says so and how to resume; the resumed run replaces it."""
    run = tmp_path / "run"
    stop = tmp_path / "STOP_REQUESTED"
    stop.write_text("")
    run_cli(args(decisive, cola_dir, cache_dir, run), env=subprocess_env(DT_STOP_FILE=str(stop)))
    results = json.loads((run / "results.json").read_text())
    assert (run / "STOPPED").is_file()
    assert results == {"status": "stopped", "outcome": "stopped", "task": "cola", "optimizer_step": 4,
                       "epoch": round(4 / steps_per_epoch(run), 4), "selection": None, "model": None, "last_evaluation": None,
                       "train": results["train"],
                       "resume": f"python -m distributed_tune --config {run / 'config.yaml'} --resume"}
    assert results["train"]["optimizer_steps"] == 4
    run_cli([*args(decisive, cola_dir, cache_dir, run), "--resume"])
    results = json.loads((run / "results.json").read_text())
    assert (results["status"], results["outcome"], results["optimizer_step"]) == ("finished", "done", 8)
    end = read_jsonl(run / "metrics.jsonl")[-1]
    assert results["model"]["optimizer_step"] == end["best_step"] and results["last_evaluation"]["optimizer_step"] == 8


def test_results_json_after_early_stopping(decisive: Path, cola_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli(args(decisive, cola_dir, cache_dir, run, "train.max_steps=40", "train.eval_every=1",
                 "train.early_stopping_patience=1", "train.lr=1e-3"))
    end = read_jsonl(run / "metrics.jsonl")[-1]
    results = json.loads((run / "results.json").read_text())
    assert end["outcome"] == "early_stop" and end["optimizer_step"] < 40
    assert (results["status"], results["outcome"], results["optimizer_step"]) == ("finished", "early_stop",
                                                                                  end["optimizer_step"])
    assert results["model"]["optimizer_step"] == end["best_step"]


# --------------------------------------------------------------------------- the model card, push


def test_the_model_card_parses_as_a_hub_model_card(healthy: Path, cola_raw: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from distributed_tune import model_card
    from distributed_tune.files import sha256_file

    card = ModelCard.load(healthy / "model" / "README.md")
    meta = card.data.to_dict()
    assert (meta["pipeline_tag"], meta["library_name"], meta["datasets"]) == (
        "text-classification", "transformers", ["nyu-mll/glue"])
    assert "base_model" not in meta  # a local folder: its hub id is unknown
    final = {r["split"]: r for r in evals(healthy) if r["optimizer_step"] == 8}
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    want = {(split, hub): round(final[split][ours], 6) for split in final
            for ours, hub in (("mcc", "matthews_correlation"), ("accuracy", "accuracy"), ("eval_loss", "loss"))}
    assert got == want
    assert {r.dataset_type for r in card.data.eval_results} == {"nyu-mll/glue"}
    text = card.text
    for line in ("These are the weights of optimizer step 8 (final) of a run that ended at step 8 (done).",
                 "| seed | 42 |", "| world size | 1 (world 1 x micro 16 x accumulation 1 = global batch 16) |",
                 f"| in_domain_train.tsv | `{sha256_file(cola_raw / 'in_domain_train.tsv')}` |",
                 f'classifier = pipeline("text-classification", model="{(healthy / "model").resolve()}")'):
        assert line in text.splitlines(), line
    assert "| training time |" in text and "**Collapsed:**" not in text
    # A hub model's id becomes base_model.
    copy = tmp_path / "run"
    shutil.copytree(healthy, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["name"] = "bert-base-uncased"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    model_card.write(copy / "model", copy, repo_id="you/tiny-cola")
    card = ModelCard.load(copy / "model" / "README.md")
    assert card.data.base_model == "bert-base-uncased" and card.data.model_name == "tiny-cola"
    assert 'classifier = pipeline("text-classification", model="you/tiny-cola")' in card.text


def test_push_is_refused_without_network_in_one_line(healthy: Path, tmp_path: Path) -> None:
    before = snapshot(healthy)
    proc = run_cli(["push", str(healthy), "--repo-id", "you/tiny-cola"], check=False)  # HF_HUB_OFFLINE=1
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: push needs the Hugging Face Hub, and it cannot be used here (HF_HUB_OFFLINE is set); push from a "
        f"machine with network, or upload {healthy / 'model'} as it is (its README.md is the model card)"]
    endpoint = f"http://127.0.0.1:{free_port()}"  # online, but the hub's address does not answer
    proc = run_cli(["push", str(healthy), "--repo-id", "you/tiny-cola"], check=False,
                   env=subprocess_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: push needs the Hugging Face Hub, and it cannot be used here ({endpoint} cannot be reached: "
        f"Connection refused); push from a machine with network, or upload {healthy / 'model'} as it is (its "
        "README.md is the model card)"]
    proc = run_cli(["push", str(tmp_path), "--repo-id", "you/tiny-cola"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a run directory with an exported model (config.yaml, model/training_info.json); "
        "push the output_dir of a run that has evaluated at least once"]
    assert snapshot(healthy) == before


# --------------------------------------------------------------------------- a collapsed model, flagged


def test_the_final_block_flags_a_collapsed_model(collapsed: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = collapsed
    lines = [line.removeprefix("[distributed_tune] ") for line in proc.stderr.splitlines()]
    assert ("model/ = step 2 (best dev mcc): mcc in_domain_dev 0.0000, out_of_domain_dev 0.0000, dev 0.0000"
            + COLLAPSED) in lines
    assert ("last evaluation (step 4, the honest number when model/ was selected on the reported split): mcc "
            "in_domain_dev 0.0000, out_of_domain_dev 0.0000, dev 0.0000" + COLLAPSED) in lines
    info = json.loads((run / "model" / "training_info.json").read_text())
    assert info["collapsed"] is True and info["evaluation"]["dev"]["confusion_matrix"] == [[0, 324], [0, 719]]
    assert json.loads((run / "results.json").read_text())["model"]["collapsed"] is True
    assert "**Collapsed:** at this step the model predicted a single class on dev (mcc 0.0000)" in \
        (run / "model" / "README.md").read_text()


def test_predict_warns_once_on_a_collapsed_model(collapsed: tuple[Path, subprocess.CompletedProcess],
                                                 healthy: Path, tmp_path: Path) -> None:
    run, _ = collapsed
    warning = (f"warning: {run / 'model'} is collapsed: at optimizer step 2 it predicted a single class on dev "
               "(mcc 0.0000); its labels carry no information: train it again (another train.lr or seed)")
    proc = run_cli(["predict", str(run), "The sailors rode the breeze clear of the rocks.", "Him saw she."])
    assert proc.stderr.strip().splitlines() == [warning]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["acceptable", "acceptable"]
    # The flag travels with the folder: a copy of model/ alone warns too.
    shutil.copytree(run / "model", tmp_path / "copied")
    proc = run_cli(["predict", str(tmp_path / "copied"), "--file", str(REPO / "README.md"),
                    "--out", str(tmp_path / "p.jsonl")])
    assert proc.stderr.strip().splitlines() == [warning.replace(str(run / "model"), str(tmp_path / "copied"))]
    # An export from before the field existed: the run's metrics.jsonl says it.
    info = json.loads((run / "model" / "training_info.json").read_text())
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "model" / "training_info.json").write_text(json.dumps(
        {k: v for k, v in info.items() if k not in ("collapsed", "evaluation")}))
    proc = run_cli(["predict", str(old), "Him saw she."])
    assert proc.stderr.strip().splitlines() == [warning.replace(str(run / "model"), str(old / "model"))]
    proc = run_cli(["predict", str(healthy), "Him saw she."])
    assert proc.stderr.strip() == "" and len(proc.stdout.splitlines()) == 1


def test_a_sweep_whose_runs_all_collapsed_names_no_winner(one_class: Path, cola_dir: Path, cache_dir: Path,
                                                          tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["sweep", "--seeds", "1", "--grid", "train.lr=1e-5,2e-5",
                    *args(one_class, cola_dir, cache_dir, sweep, "train.max_steps=4", "train.eval_every=2")])
    reason = ("every finished run of every setting collapsed (predicted a single class): their value is no signal "
              "of which setting is better; try another train.lr, more steps or more seeds")
    payload = json.loads((sweep / "sweep_summary.json").read_text())
    assert (payload["winner"], payload["no_winner"]) == (None, reason)
    assert [s["summary"]["final"]["median"] for s in payload["settings"].values()] == [0.0, 0.0]
    assert [(s["summary"]["collapsed_final"], s["summary"]["scored"]) for s in payload["settings"].values()] == [
        (1, 1), (1, 1)]
    md = (sweep / "sweep_summary.md").read_text()
    assert f"no winner: {reason}" in md.splitlines() and "(winner)" not in md
    assert f"no winner: {reason}" in proc.stdout


def test_winner_rules_on_scripted_settings() -> None:
    def settings(**medians_collapsed: tuple[float | None, int]) -> dict:
        return {name.replace("_", "="): {"final": {"median": m}, "selected_dev": {"median": m}, "collapsed_final": c,
                                         "collapsed_selected": c, "scored": 0 if m is None else 3}
                for name, (m, c) in medians_collapsed.items()}

    # A setting that always collapsed does not beat a poor one that learned something.
    assert pick_winner(settings(lr_1=(0.0, 3), lr_2=(-0.02, 0)), heldout=False) == ("lr=2", None)
    assert pick_winner(settings(lr_1=(0.31, 1), lr_2=(0.30, 0)), heldout=True) == ("lr=1", None)
    assert pick_winner(settings(lr_1=(0.3, 0), lr_2=(0.3, 1)), heldout=False) == (
        None, "lr=1 and lr=2 tie at median 0.3000")
    assert pick_winner(settings(lr_1=(None, 0)), heldout=False) == (None, None)  # nothing finished yet
    assert pick_winner({"": settings(x=(0.0, 3))["x"]}, heldout=False)[1].startswith(
        "every finished run of the sweep collapsed")
    assert pick_winner({"": settings(x=(0.2, 0))["x"]}, heldout=False) == ("", None)


def test_results_and_the_card_are_rendered_without_the_network(healthy: Path) -> None:
    """results.json and the model card come from the run's own files: with every socket connection
    refused, both render (huggingface_hub only formats the card's metadata here)."""
    code = f"""
import json, socket
from pathlib import Path
def refuse(*args, **kwargs):
    raise AssertionError("a network connection was tried")
socket.socket.connect = refuse
from distributed_tune import model_card, summary
run = Path({str(healthy)!r})
summary.run_results(run)
model_card.render(run, json.loads((run / "model" / "training_info.json").read_text()), "x", "x")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(HF_HUB_OFFLINE="0"), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
