"""The other eight GLUE tasks: SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI.

Sources (``data.source``):
  * ``hub`` (the default): ``nyu-mll/glue`` through ``datasets``;
  * a folder of GLUE's own TSV files as released (``train.tsv``, ``dev.tsv``, ``test.tsv``; MNLI:
    ``dev_matched.tsv``, ``dev_mismatched.tsv``, ``test_matched.tsv``, ``test_mismatched.tsv``), or
    the ``glue_data`` folder above the task folders (``SST-2/``, ``MRPC/``, ...);
  * a ``datasets`` folder written by ``DatasetDict.save_to_disk`` with GLUE's schema.

Split names follow ``datasets``: ``validation`` (MNLI: ``validation_matched`` and
``validation_mismatched``), and ``test`` (``test_matched`` / ``test_mismatched``) for the unlabeled
test sets that `predict --glue` turns into the benchmark's submission files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distributed_tune.errors import DataError
from distributed_tune.files import sha256_file
from distributed_tune.tasks.base import (
    DataSource,
    Example,
    Label,
    Task,
    TaskData,
    check_text,
    class_label,
    column,
    float_label,
    read_rows,
    records_from_hub,
)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class TsvLayout:
    """Where GLUE's released TSV files keep a task's columns."""

    folder: str  # the task's folder name in glue_data/
    text: tuple[str, ...]  # text columns (header names)
    label: str  # label column (train/dev files)
    test_text: tuple[str, ...] | None = None  # test-file text columns when they differ
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
    label_by_name: bool = False  # labels written as names (MNLI, QNLI, RTE), else as 0/1 (or a score)


LAYOUTS = {
    "sst2": TsvLayout("SST-2", ("sentence",), "label"),
    "mrpc": TsvLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "qqp": TsvLayout("QQP", ("question1", "question2"), "is_duplicate"),
    "stsb": TsvLayout("STS-B", ("sentence1", "sentence2"), "score"),
    "mnli": TsvLayout("MNLI", ("sentence1", "sentence2"), "gold_label", files=(
        ("train", "train.tsv"), ("validation_matched", "dev_matched.tsv"),
        ("validation_mismatched", "dev_mismatched.tsv"), ("test_matched", "test_matched.tsv"),
        ("test_mismatched", "test_mismatched.tsv")), label_by_name=True),
    "qnli": TsvLayout("QNLI", ("question", "sentence"), "label", label_by_name=True),
    "rte": TsvLayout("RTE", ("sentence1", "sentence2"), "label", label_by_name=True),
    "wnli": TsvLayout("WNLI", ("sentence1", "sentence2"), "label"),
}


def is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _index_column(head: list[str]) -> int | None:
    for name in ("index", "id"):
        if name in head:
            return head.index(name)
    return None


def read_glue_tsv(path: Path, task: Task, layout: TsvLayout, split: str) -> list[Example]:
    """One GLUE TSV file (header row, tab-separated, no quoting); test files have no label column."""
    head, rows = read_rows(path, "\t", header=True)
    assert head is not None
    labeled = not split.startswith("test")
    names = layout.text if labeled or layout.test_text is None else layout.test_text
    text_cols = [column(path, head, n) for n in names]
    label_col = column(path, head, layout.label) if labeled else None
    index_col = _index_column(head)
    examples = []
    for lineno, row in rows:
        # Exactly the header's count: a row with more columns (a tab inside a sentence, a broken
        # line) would shift every column after it, and the label read would be another column.
        if len(row) != len(head):
            raise DataError(f"{path}:{lineno}: expected {len(head)} tab-separated columns ({', '.join(head)}), "
                            f"got {len(row)}; fix or remove the line")
        text = tuple(check_text(path, lineno, row[c]) for c in text_cols)
        label: Label = None
        if label_col is not None:
            raw = row[label_col]
            label = float_label(path, lineno, raw) if task.regression else class_label(
                path, lineno, raw, task.label_names)
        idx = len(examples)
        if index_col is not None:  # the id a GLUE submission line must carry: never guessed
            raw_idx = row[index_col].strip()
            if not raw_idx.isdigit():
                raise DataError(f"{path}:{lineno}: {head[index_col]} {raw_idx!r} is not a whole number")
            idx = int(raw_idx)
        examples.append(Example(text, label, split, "", idx))
    return examples


def load_tsv_folder(task: Task, folder: Path) -> TaskData:
    layout = LAYOUTS[task.name]
    if (folder / layout.folder).is_dir():
        folder = folder / layout.folder
    files = dict(layout.files)
    missing = [f for s, f in files.items() if not s.startswith("test") and not (folder / f).is_file()]
    if missing:
        raise DataError(f"data.source={folder}: missing {', '.join(missing)} for {task.name} "
                        f"(GLUE's {layout.folder}/ folder); point data.source at it, or use 'hub'")
    splits = {s: read_glue_tsv(folder / f, task, layout, s) for s, f in files.items() if (folder / f).is_file()}
    used = [f for f in files.values() if (folder / f).is_file()]
    return TaskData(
        train=splits["train"],
        eval=[e for s in task.eval_splits for e in splits[s]],
        test={s: ex for s, ex in splits.items() if s.startswith("test")},
        label_names=task.label_names,
        fingerprint={f: sha256_file(folder / f) for f in used},
    )


def load_hub(task: Task, cfg: DataSource) -> TaskData:
    """`nyu-mll/glue` from the hub (data.source=hub) or a local `save_to_disk` folder."""
    name = task.name
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("data.source=hub needs the `datasets` package: pip install datasets") from None
    source = cfg.source or "hub"
    try:
        if source == "hub":
            ds = datasets.load_dataset(HUB_DATASET, name, cache_dir=str(Path(cfg.cache_dir).expanduser() / "hub"))
        else:
            ds = datasets.load_from_disk(str(Path(source).expanduser()))
    except Exception as e:  # datasets raises many types for "no network" / a bad folder
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = f"the hub dataset {HUB_DATASET}/{name}" if source == "hub" else f"the datasets folder {source}"
        raise DataError(f"could not load {where} ({reason}); without network, set data.source to a local folder "
                        f"of GLUE's {task.name} files") from None
    needed = ["train", *task.eval_splits]
    missing = [s for s in needed if s not in ds]
    if missing:
        raise DataError(f"data.source={source}: no split {', '.join(missing)} (has {', '.join(ds)}); "
                        f"{task.name} needs {', '.join(needed)}")
    for split in needed:
        absent = [f for f in (*task.text_fields, "label") if f not in ds[split].column_names]
        if absent:
            raise DataError(f"data.source={source}: split {split} has no column {', '.join(absent)} "
                            f"(has {', '.join(ds[split].column_names)})")
    labels = ds["train"].features["label"]
    if not task.regression and getattr(labels, "names", None) and tuple(labels.names) != task.label_names:
        raise DataError(f"data.source={source}: labels {labels.names} are not {task.name}'s {list(task.label_names)}")

    def rows(split: str) -> list[Example]:
        return records_from_hub(ds[split], task.text_fields, split, task.regression,
                                "data.source=hub" if source == "hub" else f"datasets folder {source}")

    test_splits = [s for s in task.submission if s in ds]
    return TaskData(
        train=rows("train"),
        eval=[e for s in task.eval_splits for e in rows(s)],
        test={s: [Example(e.text, None, s, "", e.idx) for e in rows(s)] for s in test_splits},
        label_names=task.label_names,
        fingerprint={"hub" if source == "hub" else str(source): f"{HUB_DATASET}/{name}@"
                     + getattr(ds["train"], "_fingerprint", "?")},
    )


def load(task: Task, cfg: DataSource) -> TaskData:
    source = cfg.source or "hub"
    path = Path(source).expanduser()
    if source == "hub" or is_datasets_folder(path):
        return load_hub(task, cfg)
    if not path.is_dir():
        raise DataError(f"data.source={source}: no such folder; use GLUE's {LAYOUTS[task.name].folder}/ folder, "
                        "a datasets folder (save_to_disk), or 'hub'")
    return load_tsv_folder(task, path)


def spell(task: Task, pred: float | int, names: tuple[str, ...]) -> str:
    """A prediction as GLUE's submission files spell it: a score (STS-B, clipped to 0..5), a label
    name where GLUE's own files write names (MNLI, QNLI, RTE), else the label index."""
    if task.regression:
        return f"{min(5.0, max(0.0, float(pred))):.3f}"
    layout = LAYOUTS.get(task.name)
    return task.label_names[int(pred)] if layout is not None and layout.label_by_name else str(int(pred))


def _pair(name: str, fields: tuple[str, str], labels: tuple[str, ...], metrics: tuple[str, ...], file: str,
          description: str, regression: bool = False) -> Task:
    return Task(name=name, text_fields=fields, label_names=labels, eval_splits=("validation",), metrics=metrics,
                selection_split="validation", load=load, default_source="hub", regression=regression,
                submission={"test": file}, description=description, spell=spell,
                hub_dataset=HUB_DATASET, dataset_name=f"GLUE {name.upper()}")


TASKS = {
    "sst2": Task(name="sst2", text_fields=("sentence",), label_names=("negative", "positive"),
                 eval_splits=("validation",), metrics=("accuracy",), selection_split="validation",
                 load=load, default_source="hub", submission={"test": "SST-2.tsv"}, spell=spell,
                 hub_dataset=HUB_DATASET, dataset_name="GLUE SST2",
                 description="Stanford Sentiment Treebank: positive or negative; accuracy"),
    "mrpc": _pair("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
                  "MRPC.tsv", "Microsoft Research Paraphrase Corpus: paraphrase or not; F1 and accuracy"),
    "qqp": _pair("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
                 "QQP.tsv", "Quora Question Pairs: duplicate or not; F1 and accuracy"),
    "stsb": _pair("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "STS-B.tsv",
                  "Semantic Textual Similarity: a score 0-5 (regression); Pearson and Spearman", regression=True),
    "mnli": Task(name="mnli", text_fields=("premise", "hypothesis"),
                 label_names=("entailment", "neutral", "contradiction"),
                 eval_splits=("validation_matched", "validation_mismatched"), metrics=("accuracy",),
                 selection_split="validation_matched", load=load, default_source="hub",
                 submission={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}, spell=spell,
                 hub_dataset=HUB_DATASET, dataset_name="GLUE MNLI",
                 description="Multi-Genre NLI: 3 labels; matched and mismatched accuracy"),
    "qnli": _pair("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "QNLI.tsv",
                  "Question NLI: does the sentence answer the question; accuracy"),
    "rte": _pair("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE.tsv",
                 "Recognizing Textual Entailment; accuracy"),
    "wnli": _pair("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "WNLI.tsv",
                  "Winograd NLI; accuracy"),
}
