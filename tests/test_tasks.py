"""Every task end to end, on data in the real formats of each source (tests/glue_data.py): GLUE's
released TSV files for the nine tasks, the `datasets` hub schema (MNLI, STS-B), your own CSV /
JSON Lines / TSV files.

    python -m pytest -q -s tests/test_tasks.py      # ~3-4 minutes on 2 cores; -s prints the table

One module-scoped set of real runs, two at a time, serves every assertion (a tiny BERT, hidden
size 32, initialised at std 0.1 so that 80 steps suffice, with a fixed WordPiece vocabulary of
every fixture word; 4 epochs of 20 optimizer steps, global batch 16):
  * each task and `custom` trains on 1 process (accumulation 2) and on 2 processes (`accelerate
    launch`, gloo): the same 80 losses bit for bit, each evaluation example gathered once;
  * ZeRO-2 on 2 processes for each kind of task: single sentence (SST-2), pair (MRPC), 3 labels
    (MNLI, from a `datasets` folder), regression (STS-B, from a `datasets` folder);
  * the logged metrics equal the ones computed here by hand from predictions.jsonl (accuracy, F1,
    MCC, Pearson/Spearman, matched/mismatched accuracy), and the gold labels in it are the fixture's;
  * `predict --glue-submission` writes GLUE's files (names, `index<TAB>prediction`, label spelling);
  * the exported model/ loads in `transformers.pipeline` with the task's label names;
  * an MNLI run cut back to a mid-epoch checkpoint resumes to the same losses;
  * bad rows in each format are one line naming the file and the line.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, evals, free_port, read_jsonl, run_cli, subprocess_env, train_losses
from glue_data import (
    CUSTOM_LABELS,
    FOLDERS,
    LABELS,
    NAMED_LABELS,
    SIZES,
    SPLITS,
    SUBMISSIONS,
    all_texts,
    task_rows,
    write_custom,
    write_datasets,
    write_glue,
)
from test_deepspeed import cut_back_to
from test_evaluate import one_thread

from distributed_tune.cli import main

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
CUSTOM = ["custom_csv", "custom_jsonl", "custom_tsv"]
TWO_PROCESSES = [*GLUE, "custom_csv"]  # trained on 1 and on 2 processes
STEPS, RESUME_AT = 80, 30  # 4 epochs x 20 steps; the resumed copy starts mid-epoch 2
# One ZeRO-2 run per kind of task (single sentence, pair, 3 labels, regression): task -> data it reads.
ZERO2 = {"sst2": "sst2", "mrpc": "mrpc", "mnli": "mnli_hub", "stsb": "stsb_hub"}
REGRESSION = {"stsb", "stsb_hub", "custom_jsonl"}
# The evaluation splits of each data set, in order, and their sizes.
EVAL_SPLITS = {name: [s for s in SPLITS[name] if s.startswith("validation")] for name in GLUE}
EVAL_SPLITS["cola"] = ["in_domain_dev", "out_of_domain_dev"]
for _name in CUSTOM:
    EVAL_SPLITS[_name] = ["validation"]
SPLIT_SIZES = {**SIZES, "in_domain_dev": 53, "out_of_domain_dev": 48, "dev": 101}
# What model/ is selected on: the task's first metric on its selection split.
SELECTION = {"cola": "dev/mcc", "sst2": "validation/accuracy", "mrpc": "validation/f1", "qqp": "validation/f1",
             "stsb": "validation/pearson", "mnli": "validation_matched/accuracy", "qnli": "validation/accuracy",
             "rte": "validation/accuracy", "wnli": "validation/accuracy", "custom_csv": "validation/accuracy",
             "custom_jsonl": "validation/pearson", "custom_tsv": "validation/accuracy"}


def data_args(name: str, root: Path) -> list[str]:
    """The overrides that point a run at one data set."""
    custom = root / "custom"
    if name == "rte":  # the glue_data/ folder above the task folders
        return ["task=rte", f"data.source={root / 'glue_data'}"]
    if name in GLUE:
        return [f"task={name}", f"data.source={root / 'glue_data' / FOLDERS[name]}"]
    if name.endswith("_hub"):
        task = name[:-4]
        return [f"task={task}", f"data.source={root / 'datasets' / task}"]
    files = {"custom_csv": ("csv", "[claim, evidence]", "verdict"), "custom_jsonl": ("jsonl", "[text]", "rating"),
             "custom_tsv": ("tsv", "[review]", "stars")}
    ext, fields, label = files[name]
    args = ["task=custom", f"custom.train_file={custom / f'train.{ext}'}",
            f"custom.validation_file={custom / f'validation.{ext}'}", f"custom.text_fields={fields}",
            f"custom.label_field={label}"]
    if name == "custom_csv":
        args.append(f"custom.test_file={custom / 'test.csv'}")
    if name == "custom_jsonl":
        args.append("custom.regression=true")
    return args


def common_args(model: Path, cache: Path, run_dir: Path) -> list[str]:
    return [f"model.name={model}", f"data.cache_dir={cache}", f"output_dir={run_dir}", "train.epochs=4",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.lr=5e-3", "train.log_every=1",
            "train.eval_every=0"]


def fixture_name(run: str) -> str:
    """'mnli_hub/z2' -> 'mnli_hub'; 'sst2/1' -> 'sst2'."""
    return run.split("/")[0]


class Runs:
    """Every run of the module, by name: '<data>/1', '<data>/2', '<data>/z2', 'mnli/resumed'."""

    def __init__(self, root: Path, model: Path, cache: Path) -> None:
        self.root, self.model, self.cache = root, model, cache
        self.dirs: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def args(self, run: str, run_dir: Path) -> list[str]:
        name = fixture_name(run)
        extra = ["train.checkpoint_every=10", "train.keep_checkpoints=10"] if name == "mnli" else []
        return [*data_args(name, self.root), *common_args(self.model, self.cache, run_dir), *extra]

    def start(self, run: str) -> None:
        t0 = time.perf_counter()
        run_dir = self.dirs[run] = self.root / "runs" / run.replace("/", "-")
        mode = run.split("/")[1]
        if mode == "1":
            run_cli(self.args(run, run_dir))
        elif mode == "2":
            run_cli(self.args(run, run_dir), nproc=2, launcher="accelerate")
        else:  # ZeRO-2 through the project's own launcher (accelerate + a rendered DeepSpeed config)
            cmd = [sys.executable, "-m", "distributed_tune", "launch", "--gpus", "2", "--port", str(free_port()),
                   *self.args(run, run_dir), "distributed.zero_stage=2"]
            proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
            assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr[-6000:]}"
        self.seconds[run] = time.perf_counter() - t0
        if run == "mnli/2":  # killed right after its step-30 checkpoint, then resumed
            t0 = time.perf_counter()
            copy = self.dirs["mnli/resumed"] = self.root / "runs" / "mnli-resumed"
            cut_back_to(run_dir, copy, RESUME_AT)
            run_cli(["--resume", *self.args(run, copy)], nproc=2, launcher="accelerate")
            self.seconds["mnli/resumed"] = time.perf_counter() - t0

    def __getitem__(self, run: str) -> Path:
        return self.dirs[run]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_glue(root)
    write_datasets(root / "datasets" / "mnli", "mnli")
    write_datasets(root / "datasets" / "stsb", "stsb")
    write_custom(root / "custom")
    return root


@pytest.fixture(scope="module")
def runs(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    from tiny_model import make_tiny_bert

    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    model = make_tiny_bert(root / "tiny-bert", None, hidden=32, texts=all_texts(), init_range=0.1)
    r = Runs(root, model, tmp_path_factory.mktemp("tasks-cache"))
    # Longest first (DeepSpeed starts, then 2-process runs), two at a time on the 2 cores.
    order = [f"{name}/z2" for name in ZERO2.values()] + [f"{n}/2" for n in TWO_PROCESSES] + \
            [f"{n}/1" for n in (*TWO_PROCESSES, "custom_jsonl", "custom_tsv")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(r.start, run) for run in order]:
            future.result()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(f"\n{len(r.seconds)} runs in {time.perf_counter() - t0:.1f} s wall, {cpu:.1f} s CPU (children):")
    for run, s in sorted(r.seconds.items()):
        print(f"  {run:20s} {s:6.1f} s")
    return r


def last_evals(run_dir: Path) -> dict[str, dict]:
    return {r["split"]: r for r in evals(run_dir) if r["optimizer_step"] == STEPS}


def expected_eval_rows(name: str) -> list[tuple[str, tuple[str, ...], object]]:
    """(split, texts, gold label) of every evaluation example, in the order the run evaluates them."""
    rows = task_rows(name.removesuffix("_hub"))
    if name == "cola":
        dev = rows["validation"]
        return [("in_domain_dev" if i < 53 else "out_of_domain_dev", r.text, r.label) for i, r in enumerate(dev)]
    return [(split, r.text, r.label) for split in EVAL_SPLITS[name.removesuffix("_hub")] for r in rows[split]]


def texts_of(row: dict) -> tuple[str, ...]:
    return tuple(row["text"]) if "text" in row else (row["sentence"],)


def check_gathered_once(run_dir: Path, name: str, world_size: int) -> None:
    """Every evaluation record counts its whole split; predictions.jsonl holds each example once."""
    sizes = {s: SPLIT_SIZES[s] for s in EVAL_SPLITS[name.removesuffix("_hub")]}
    if name == "cola":
        sizes["dev"] = 101
    steps = sorted({r["optimizer_step"] for r in evals(run_dir)})
    assert steps == [20, 40, 60, 80]  # an evaluation at each epoch end
    for step in steps:
        at = {r["split"]: r for r in evals(run_dir) if r["optimizer_step"] == step}
        assert {s: r["n"] for s, r in at.items()} == sizes
        assert {r["world_size"] for r in at.values()} == {world_size}
    preds = read_jsonl(run_dir / "predictions.jsonl")
    n = sum(SPLIT_SIZES[s] for s in EVAL_SPLITS[name.removesuffix("_hub")])
    assert [p["index"] for p in preds] == list(range(n))
    expected = expected_eval_rows(name)
    assert [(p["split"], texts_of(p)) for p in preds] == [(s, t) for s, t, _ in expected]
    assert [p["label"] for p in preds] == pytest.approx([label for _, _, label in expected], abs=1e-6)


# --------------------------------------------------------------------------- 1 and 2 processes


@pytest.mark.parametrize("name", TWO_PROCESSES)
def test_one_process_with_accumulation_equals_two_processes(runs: Runs, name: str) -> None:
    one, two = runs[f"{name}/1"], runs[f"{name}/2"]
    assert len(train_losses(one)) == STEPS
    assert train_losses(one) == train_losses(two)  # bit for bit
    d1 = yaml.safe_load((one / "config.yaml").read_text())["derived"]
    d2 = yaml.safe_load((two / "config.yaml").read_text())["derived"]
    assert (d1["world_size"], d1["gradient_accumulation_steps"]) == (1, 2)
    assert (d2["world_size"], d2["gradient_accumulation_steps"]) == (2, 1)
    assert d1["train_examples"] == d2["train_examples"] == 320
    audit = [r for r in read_jsonl(two / "metrics.jsonl") if r.get("event") == "epoch_data"]
    assert [(r["examples"], r["distinct"], r["per_rank"]) for r in audit] == [(320, 320, [160, 160])] * 4

    check_gathered_once(one, name, 1)
    check_gathered_once(two, name, 2)
    # The same evaluations: class metrics to the bit, correlations to float rounding (the two
    # worlds predict in other batches).
    for a, b in zip(evals(one), evals(two), strict=True):
        assert (a["optimizer_step"], a["split"], a["n"]) == (b["optimizer_step"], b["split"], b["n"])
        if "pearson" in a:  # predictions equal to ~1e-7; early on they spread by ~1e-4 only
            assert a["mse"] == pytest.approx(b["mse"], rel=1e-5)
            assert (a["pearson"], a["spearman"]) == pytest.approx((b["pearson"], b["spearman"]), abs=2e-3)
        else:
            assert [a[k] for k in ("accuracy", "f1", "mcc", "confusion_matrix")] == \
                   [b[k] for k in ("accuracy", "f1", "mcc", "confusion_matrix")], a["split"]


# --------------------------------------------------------------------------- metrics by hand


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def by_hand(rows: list[dict], regression: bool) -> dict[str, float]:
    y = np.array([r["label"] for r in rows], dtype=np.float64)
    p = np.array([r["pred"] for r in rows], dtype=np.float64)
    if regression:
        return {"pearson": pearson(y, p), "spearman": pearson(ranks(y), ranks(p)), "mse": float(((y - p) ** 2).mean())}
    out = {"accuracy": float((y == p).mean())}
    tp, fp = int(((p == 1) & (y == 1)).sum()), int(((p == 1) & (y != 1)).sum())
    fn, tn = int(((p != 1) & (y == 1)).sum()), int(((p != 1) & (y != 1)).sum())
    if set(y) <= {0, 1}:
        out["f1"] = 2 * tp / (2 * tp + fp + fn)
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / den if den else 0.0
    return out


@pytest.mark.parametrize("run", [f"{n}/2" for n in TWO_PROCESSES] + [f"{n}/1" for n in ("custom_jsonl", "custom_tsv")]
                         + [f"{n}/z2" for n in ZERO2.values()])
def test_logged_metrics_equal_the_hand_computed_ones(runs: Runs, run: str) -> None:
    name = fixture_name(run)
    regression = name in REGRESSION
    preds = read_jsonl(runs[run] / "predictions.jsonl")  # the last evaluation's (step 80)
    logged = last_evals(runs[run])
    groups = {s: [p for p in preds if p["split"] == s] for s in EVAL_SPLITS[name.removesuffix("_hub")]}
    if name == "cola":
        groups["dev"] = preds  # in-domain and out-of-domain together
    for split, rows in groups.items():
        mine = by_hand(rows, regression)
        assert logged[split]["n"] == len(rows)
        for key, value in mine.items():
            assert logged[split][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, key)
        if not regression:  # the probability of the predicted class, and its name
            names = (CUSTOM_LABELS if name == "custom_csv" else ("1", "2", "3") if name == "custom_tsv"
                     else LABELS[name.removesuffix("_hub")])
            assert all(r["pred_label"] == names[r["pred"]] and r["prob"] == max(r["probs"]) for r in rows)
    info = json.loads((runs[run] / "model" / "training_info.json").read_text())
    assert info["metric"] == SELECTION[name.removesuffix("_hub")]
    split, metric = info["metric"].split("/")
    best = max(evals(runs[run]), key=lambda r: (r["split"] == split, r[metric]))
    assert info["optimizer_step"] == best["optimizer_step"] and info["value"] == pytest.approx(best[metric])


@pytest.mark.fast
def test_each_glue_task_reports_the_benchmarks_metrics() -> None:
    """GLUE's metrics per task (the first one selects the best model), its evaluation splits, and
    its submission files, against the seam's Task specs."""
    from distributed_tune.tasks import get_task

    glue = {"cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
            "stsb": ("pearson", "spearman"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
            "wnli": ("accuracy",)}
    for name, metrics in glue.items():
        task = get_task(name)
        assert task.metrics[: len(metrics)] == metrics, name
        assert f"{task.selection_split}/{task.main_metric}" == SELECTION[name]
        assert task.eval_splits == tuple(EVAL_SPLITS[name]) and task.submission == SUBMISSIONS[name]
        assert task.label_names == LABELS[name] and task.regression == (name == "stsb")


# --------------------------------------------------------------------------- ZeRO-2


@pytest.mark.parametrize("kind", list(ZERO2))
def test_zero2_on_two_processes(runs: Runs, kind: str) -> None:
    name = ZERO2[kind]
    run = runs[f"{name}/z2"]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    shards = {p.name for p in (run / "checkpoints" / "step_00000080" / "pytorch_model").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards
    check_gathered_once(run, name, 2)
    # Against plain DDP on the same rows (MNLI and STS-B read the TSV files there, the datasets
    # folder here): the same arithmetic in another order, so equal to rounding (seen: < 3e-7 over
    # 80 steps for the classifiers; STS-B's regressor amplifies it to ~1e-2 by step 80).
    ddp, zero = train_losses(runs[f"{kind}/2"]), train_losses(run)
    assert len(zero) == STEPS
    assert zero[:40] == pytest.approx(ddp[:40], rel=1e-5)
    split, metric = SELECTION[kind].split("/")
    assert last_evals(run)[split][metric] == pytest.approx(last_evals(runs[f"{kind}/2"])[split][metric], abs=0.03)


# --------------------------------------------------------------------------- resume


def test_mnli_resumed_from_a_mid_epoch_checkpoint_logs_the_same_losses(runs: Runs) -> None:
    whole, resumed = runs["mnli/2"], runs["mnli/resumed"]
    assert train_losses(resumed) == train_losses(whole)  # steps 31..80 ran again, to the bit
    again = [r for r in evals(resumed) if r["optimizer_step"] > RESUME_AT]
    assert again == [r for r in evals(whole) if r["optimizer_step"] > RESUME_AT]
    assert read_jsonl(resumed / "predictions.jsonl") == read_jsonl(whole / "predictions.jsonl")


# --------------------------------------------------------------------------- GLUE submission files


def index_column(root: Path, task: str, split: str) -> list[int]:
    """The first column (index, or QQP's id) of one of the fixture's GLUE test files."""
    path = root / "glue_data" / FOLDERS[task] / SPLITS[task][split]
    return [int(line.split("\t")[0]) for line in path.read_text(encoding="utf-8").split("\n")[1:] if line]


@pytest.fixture(scope="module")
def submissions(runs: Runs, root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`predict RUN --glue-submission DIR` for every 1-process run and the datasets-folder runs."""
    out = {}
    with one_thread():
        for run in [f"{n}/1" for n in (*GLUE, "custom_csv")] + ["mnli_hub/z2", "stsb_hub/z2"]:
            out[run] = tmp_path_factory.mktemp("submission")
            assert main(["predict", str(runs[run]), "--glue-submission", str(out[run])]) == 0
    return out


@functools.cache
def text_classifier(model: Path):
    from transformers import pipeline

    return pipeline("text-classification", model=str(model), device="cpu")


def pipeline_predictions(model: Path, texts: list[tuple[str, ...]]) -> list[dict]:
    """The exported model's pipeline, one text (pair) at a time. One thread: with two, each tiny
    forward pass waited ~0.15 s for the thread pool on a busy 2-core machine."""
    inputs = [t[0] if len(t) == 1 else {"text": t[0], "text_pair": t[1]} for t in texts]
    with one_thread():
        return text_classifier(model)(inputs)


@pytest.mark.parametrize("run", [f"{n}/1" for n in GLUE] + ["mnli_hub/z2", "stsb_hub/z2"])
def test_glue_submission_files(runs: Runs, root: Path, submissions: dict[str, Path], run: str) -> None:
    task = fixture_name(run).removesuffix("_hub")
    out = submissions[run]
    assert sorted(p.name for p in out.iterdir()) == sorted(SUBMISSIONS[task].values())
    for split, file in SUBMISSIONS[task].items():
        text = (out / file).read_text()
        lines = text.split("\n")
        assert lines[0] == "index\tprediction" and text.endswith("\n")
        rows = [line.split("\t") for line in lines[1:-1]]
        assert all(len(r) == 2 for r in rows)
        assert [int(r[0]) for r in rows] == index_column(root, task, split) == list(range(SIZES[split]))
        values = [r[1] for r in rows]
        tests = task_rows(task)[split]
        theirs = pipeline_predictions(runs[run] / "model", [t.text for t in tests])
        if task == "stsb":
            assert all(len(v.split(".")[1]) == 3 and 0.0 <= float(v) <= 5.0 for v in values)
            assert [float(v) for v in values] == pytest.approx(
                [min(5.0, max(0.0, o["score"])) for o in theirs], abs=1.5e-3)
            assert {o["label"] for o in theirs} == {"score"}
        elif task in NAMED_LABELS:  # GLUE writes MNLI, QNLI and RTE labels as names
            assert set(values) <= set(LABELS[task])
            assert values == [o["label"] for o in theirs]
        else:  # and the others as 0/1
            assert set(values) <= {"0", "1"}
            assert values == [str(LABELS[task].index(o["label"])) for o in theirs]


def test_custom_test_file_predictions_carry_the_label_names(runs: Runs, submissions: dict[str, Path]) -> None:
    lines = (submissions["custom_csv/1"] / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 37
    assert [int(line.split("\t")[0]) for line in lines[1:]] == list(range(37))
    theirs = pipeline_predictions(runs["custom_csv/1"] / "model", [t.text for t in task_rows("custom_csv")["test"]])
    assert [line.split("\t")[1] for line in lines[1:]] == [o["label"] for o in theirs]


def test_predict_reads_tab_separated_pairs(runs: Runs, submissions: dict[str, Path], tmp_path: Path) -> None:
    tests = task_rows("rte")["test"]
    (tmp_path / "pairs.txt").write_text("".join(f"{a}\t{b}\n" for a, b in (t.text for t in tests)))
    with one_thread():
        assert main(["predict", str(runs["rte/1"]), "--file", str(tmp_path / "pairs.txt"),
                     "--out", str(tmp_path / "out.jsonl")]) == 0
    ours = [r["pred_label"] for r in read_jsonl(tmp_path / "out.jsonl")]
    submitted = [line.split("\t")[1] for line in (submissions["rte/1"] / "RTE.tsv").read_text().splitlines()[1:]]
    assert ours == submitted


# --------------------------------------------------------------------------- the exported model


@pytest.mark.parametrize("name", [*GLUE, *CUSTOM])
def test_exported_model_loads_in_a_pipeline_with_the_label_names(runs: Runs, name: str) -> None:
    model = runs[f"{name}/1"] / "model"
    config = json.loads((model / "config.json").read_text())
    names = {"custom_csv": CUSTOM_LABELS, "custom_tsv": ("1", "2", "3")}.get(name, LABELS.get(name, ()))
    if name in REGRESSION:
        assert config["id2label"] == {"0": "score"} and config["problem_type"] == "regression"
    else:
        assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
        assert config["label2id"] == {n: i for i, n in enumerate(names)}
    rows = read_jsonl(model / "dev_predictions.jsonl")[:8]  # the exported weights' own dev predictions
    theirs = pipeline_predictions(model, [texts_of(r) for r in rows])
    for o, r in zip(theirs, rows, strict=True):
        if name in REGRESSION:
            assert o["score"] == pytest.approx(r["pred"], abs=1e-5)
        else:
            assert o["label"] == r["pred_label"] and o["score"] == pytest.approx(r["prob"], abs=1e-5)


@pytest.mark.parametrize("name", ["mnli", "stsb", "custom_csv"])
def test_evaluate_reproduces_the_runs_own_numbers(runs: Runs, name: str) -> None:
    run = runs[f"{name}/1"]
    with one_thread():
        assert main(["evaluate", str(run)]) == 0
    result = json.loads((run / "eval" / "metrics.json").read_text())
    step = json.loads((run / "model" / "training_info.json").read_text())["optimizer_step"]
    logged = {r["split"]: r for r in evals(run) if r["optimizer_step"] == step}
    assert set(result["splits"]) == set(logged)
    for split, m in result["splits"].items():
        for key in ("n", "accuracy", "f1", "pearson", "spearman"):
            if key in logged[split]:
                assert m[key] == pytest.approx(logged[split][key], rel=1e-6), (split, key)
    assert read_jsonl(run / "eval" / "predictions.jsonl") == read_jsonl(run / "model" / "dev_predictions.jsonl")


# --------------------------------------------------------------------------- the sources agree


@pytest.mark.fast
@pytest.mark.parametrize("task", ["mnli", "stsb"])
def test_tsv_files_and_datasets_folder_give_the_same_examples(root: Path, task: str) -> None:
    from distributed_tune.config import load_config

    def read(source: Path):
        cfg = load_config(None, [f"task={task}", f"data.source={source}"])
        return cfg.task_spec.read(cfg.data)

    tsv, hub = read(root / "glue_data" / FOLDERS[task]), read(root / "datasets" / task)
    assert tsv.label_names == hub.label_names == LABELS[task]
    for a, b in ((tsv.train, hub.train), (tsv.eval, hub.eval)):
        assert [(e.text, e.split) for e in a] == [(e.text, e.split) for e in b]
        assert [e.label for e in a] == pytest.approx([e.label for e in b], abs=1e-6)  # float32 on the hub
    assert {s: [(e.text, e.idx, e.label) for e in ex] for s, ex in tsv.test.items()} == \
           {s: [(e.text, e.idx, e.label) for e in ex] for s, ex in hub.test.items()}
    assert set(tsv.test) == set(SUBMISSIONS[task])


# --------------------------------------------------------------------------- bad input


def edit(path: Path, line: int, change) -> None:
    """Replace 1-based `line` of a file by change(old line)."""
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    lines[line - 1] = change(lines[line - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


BAD = {
    # name: (data set, file, line, change, message after "<file>:")
    "missing column": ("sst2", "train.tsv", 1, lambda s: "sentence\tpolarity",
                       "1: no column 'label' (columns: sentence, polarity)"),
    "unknown label": ("mnli", "dev_matched.tsv", 5, lambda s: s.rsplit("\t", 1)[0] + "\t-",
                      "5: label '-' is not one of entailment, neutral, contradiction (or 0..2)"),
    "short row": ("qnli", "train.tsv", 7, lambda s: s.rsplit("\t", 1)[0],
                  "7: expected 4 tab-separated columns (index, question, sentence, label), got 3; fix or remove the line"),
    "long row": ("stsb", "dev.tsv", 3, lambda s: s + "\textra",
                 "3: expected 10 tab-separated columns (index, genre, filename, year, old_index, source1, source2, "
                 "sentence1, sentence2, score), got 11; fix or remove the line"),
    "score not a number": ("stsb", "train.tsv", 9, lambda s: s.rsplit("\t", 1)[0] + "\thigh",
                           "9: label 'high' is not a number"),
    "MRPC label": ("mrpc", "dev.tsv", 2, lambda s: "2" + s[1:], "2: label '2' is not one of not_equivalent, "
                   "equivalent (or 0..1)"),
    "test index": ("qqp", "test.tsv", 4, lambda s: "x" + s, "4: id 'x2' is not a whole number"),
    "CoLA test row": ("cola", "test.tsv", 3, lambda s: s.split("\t")[0],
                      "3: expected 2 tab-separated columns (index, sentence), got 1; fix or remove the line"),
    "CoLA label": ("cola", "train.tsv", 6, lambda s: s.replace("\t1\t", "\tyes\t").replace("\t0\t", "\tyes\t"),
                   "6: label must be 0 or 1, got 'yes'"),
    "empty text": ("rte", "dev.tsv", 4, lambda s: "\t".join([*s.split("\t")[:2], " ", s.split("\t")[3]]),
                   "4: empty text; fix or remove the line"),
    "custom unknown label": ("custom_csv", "validation.csv", 3, lambda s: s.rsplit(",", 1)[0] + ",maybe",
                             "3: label 'maybe' does not occur in the training file (labels: agree, disagree, "
                             "unrelated)"),
    "custom columns": ("custom_csv", "train.csv", 5, lambda s: s + ",extra",
                       "5: 4 columns, the header has 3; fix or remove the line"),
    "custom label column": ("custom_tsv", "train.tsv", 1, lambda s: "review\tscore",
                            "1: no label column 'stars' (columns: review, score); set custom.label_field"),
    "custom JSON field": ("custom_jsonl", "validation.jsonl", 2, lambda s: s.replace('"text"', '"txt"'),
                          "2: no field 'text' (has 'txt', 'rating', 'id'); set custom.text_fields"),
    "custom regression": ("custom_jsonl", "train.jsonl", 8, lambda s: s.replace('"rating": ', '"rating": "x" ,"r": '),
                          "8: label 'x' is not a number"),
}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_are_one_line_naming_file_and_line(root: Path, tmp_path: Path, case: str) -> None:
    from distributed_tune.config import load_config
    from distributed_tune.errors import DataError

    name, file, line, change, message = BAD[case]
    copy = tmp_path / "data"
    shutil.copytree(root / ("custom" if name in CUSTOM else Path("glue_data") / FOLDERS[name]),
                    copy / ("custom" if name in CUSTOM else Path("glue_data") / FOLDERS[name]))
    folder = copy / ("custom" if name in CUSTOM else Path("glue_data") / FOLDERS[name])
    edit(folder / file, line, change)
    cfg = load_config(None, data_args(name, copy))
    with pytest.raises(DataError) as e:
        cfg.task_spec.read(cfg.data)
    assert str(e.value) == f"{folder / file}:{message}"


def test_bad_row_through_the_cli(root: Path, runs: Runs, tmp_path: Path) -> None:
    folder = tmp_path / "QNLI"
    shutil.copytree(root / "glue_data" / "QNLI", folder)
    edit(folder / "dev.tsv", 12, lambda s: s.replace("\tentailment", "\tentails").replace("\tnot_entailment", "\tentails"))
    proc = run_cli(["task=qnli", f"data.source={folder}", f"model.name={runs.model}",
                    f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'dev.tsv'}:12: label 'entails' is not one of entailment, not_entailment (or 0..1)")
    assert not (tmp_path / "run").exists()


@pytest.mark.fast
def test_mrpc_header_byte_order_mark_and_qqp_line_separator_are_read(root: Path) -> None:
    """GLUE's MRPC header starts with U+FEFF; a QQP question may hold U+2028 (not a line end)."""
    from distributed_tune.config import load_config

    assert (root / "glue_data" / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    cfg = load_config(None, data_args("qqp", root))
    data = cfg.task_spec.read(cfg.data)
    assert len(data.train) == 320 and sum("\u2028" in e.text[0] for e in data.train) == 7
    assert [e.text for e in data.train] == [r.text for r in task_rows("qqp")["train"]]


# --------------------------------------------------------------------------- the table


def test_sentence_pairs_carry_their_segment_ids(runs: Runs) -> None:
    """Pairs are trained and evaluated with the tokenizer's token_type_ids (what a pipeline gives
    the exported model); single sentences without (all 0, BERT's default)."""
    from transformers import AutoTokenizer

    from distributed_tune.data import collate, tokenize
    from distributed_tune.tasks import Example

    tok = AutoTokenizer.from_pretrained(runs.model)
    pairs = [Example(("The cat sleeps.", "A dog barks loudly."), 0, "x"), Example(("Kim sang.", "Lee laughs."), 1, "x")]
    data = tokenize(pairs, tok, 32, None)
    for i, e in enumerate(pairs):
        want = tok(*e.text)["token_type_ids"]
        assert data.type_ids[i, : len(want)].tolist() == want and 1 in want
    batch = collate(data, np.array([1, 0]), 1)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert tokenize([Example(("The cat sleeps.",), 0, "x")], tok, 32, None).type_ids is None


REPORTED = {"cola": ["mcc"], "mrpc": ["f1", "accuracy"], "qqp": ["f1", "accuracy"], "stsb": ["pearson", "spearman"],
            "custom_jsonl": ["pearson", "spearman"]}


def test_every_task_learned_something_and_the_table(runs: Runs, submissions: dict[str, Path]) -> None:
    """Each task's last evaluation predicts more than one class and scores above 0.5 (the data is
    learnable: a label or text column read wrongly shows here); prints the closing table: the main metric of each run's last evaluation,
    the task's GLUE metrics, and the submission files."""
    lines = ["| task | 1 proc | 2 procs | ZeRO-2 | metrics (last evaluation, 2 procs) | submission |",
             "|---|---|---|---|---|---|"]
    for name in [*GLUE, *CUSTOM]:
        split, metric = SELECTION[name].split("/")
        cells = []
        for mode in ("1", "2", "z2"):
            run = f"{ZERO2[name] if mode == 'z2' and name in ZERO2 else name}/{mode}"
            cells.append(f"{metric} {last_evals(runs[run])[split][metric]:.3f}" if run in runs.dirs else "-")
        shown = runs[f"{name}/2"] if f"{name}/2" in runs.dirs else runs[f"{name}/1"]
        values = ", ".join(f"{s} {k} {r[k]:.3f}" for s, r in last_evals(shown).items()
                           for k in REPORTED.get(name, ["accuracy"]))
        sub = submissions.get(f"{name}/1")
        files = ", ".join(sorted(p.name for p in sub.iterdir())) if sub else "-"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {values} | {files} |")
        last = last_evals(runs[f"{name}/1"])[split]
        assert not last["collapsed"] and last[metric] > 0.5, (name, last[metric])
        if name in REGRESSION:  # a regressor near its mean has a correlation of noise
            assert np.std([r["pred"] for r in read_jsonl(runs[f"{name}/1"] / "predictions.jsonl")]) > 0.2, name
    print("\n" + "\n".join(lines))
