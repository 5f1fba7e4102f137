"""Your own data: CSV, TSV or JSON Lines files for train and validation (run_glue's `train_file` /
`validation_file`), with the text column(s) and the label column named in the config.

    task: custom
    custom:                              # this task's own config section (CustomOptions)
      train_file: data/train.csv         # .csv, .tsv or .jsonl (.json: JSON Lines too)
      validation_file: data/dev.csv
      test_file: data/test.csv           # optional, unlabeled is fine (predict writes its predictions)
      text_fields: [premise, hypothesis] # one or two columns
      label_field: label                 # strings or integers; custom.regression=true: a number
      regression: false

Label names are the distinct training labels, sorted (strings as written, integers as their
digits); the exported model's `id2label` keeps them. CSV follows RFC 4180 quoting; TSV files are
split on tabs only. Every row is validated; an error names the file and the line.

Labels are taken exactly as written or refused, never converted by a guess: a classification
label is a string or an integer (JSONL: an integer or a string; CSV/TSV: the text of the field);
refused: an empty or missing one, one that spells a missing value (NaN, NA, null, None, ...),
spaces around it, a float or boolean in JSONL, and a file whose labels mix integers and words
(`0`, `1` and `pos`), or JSONL integers and strings (`1` and `"1"`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_tune.errors import ConfigError, DataError
from distributed_tune.files import sha256_file
from distributed_tune.keys import key
from distributed_tune.tasks.base import (
    MISSING,
    DataSource,
    Example,
    Label,
    Task,
    TaskData,
    check_text,
    float_label,
    lines,
    read_rows,
    read_text,
)


@dataclass(frozen=True)
class CustomOptions:
    """The `custom:` section: your files and their columns."""

    train_file: str | None = key(None, resume="fixed", formerly="data.train_file")
    """The training file (.csv, .tsv or .jsonl)."""
    validation_file: str | None = key(None, resume="fixed", formerly="data.validation_file")
    """The evaluation file, same format."""
    test_file: str | None = key(None, resume="free", formerly="data.test_file")
    """An optional test file (labels may be left out) that `predict --glue-submission DIR` labels
    into DIR/predictions.tsv."""
    text_fields: tuple[str, ...] | None = key(None, resume="fixed", formerly="data.text_fields")
    """The text column, or two columns for sentence pairs."""
    label_field: str = key("label", resume="fixed", trainer="label_column_name", formerly="data.label_field")
    """The label column (strings or integers; a number with custom.regression)."""
    regression: bool = key(False, resume="fixed", formerly="data.regression")
    """The label is a number to predict (MSE loss; Pearson/Spearman), not a class."""

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}


def read_table(path: Path, fields: tuple[str, ...], label_field: str | None,
               labeled: bool = False) -> list[tuple[int, tuple[str, ...], Any]]:
    """[(line, texts, raw label or None)] of one file; the label column may be absent unless
    `labeled` (train and validation files; a test file may leave it out)."""
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = FORMATS[path.suffix.lower()]
    out = []
    if delimiter is None:
        for lineno, line in enumerate(lines(read_text(path)), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg}); one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: no field {', '.join(map(repr, missing))} "
                                f"(has {', '.join(map(repr, row))}); set custom.text_fields")
            texts = tuple(check_text(path, lineno, row[f], f) for f in fields)
            out.append((lineno, texts, row.get(label_field) if label_field else None))
        if not out:
            raise DataError(f"{path}: file is empty")
        return out
    head, rows = read_rows(path, delimiter, header=True)
    assert head is not None
    missing = [f for f in fields if f not in head]
    if missing:
        raise DataError(f"{path}:1: no column {', '.join(map(repr, missing))} (columns: {', '.join(head)}); "
                        "set custom.text_fields")
    if labeled and label_field not in head:  # said once, at the header, not as an empty label on line 2
        raise DataError(f"{path}:1: no label column {label_field!r} (columns: {', '.join(head)}); "
                        "set custom.label_field")
    text_cols = [head.index(f) for f in fields]
    label_col = head.index(label_field) if label_field in head else None
    for lineno, row in rows:
        if len(row) != len(head):
            raise DataError(f"{path}:{lineno}: {len(row)} columns, the header has {len(head)}; fix or remove the line")
        texts = tuple(check_text(path, lineno, row[c]) for c in text_cols)
        out.append((lineno, texts, row[label_col] if label_col is not None else None))
    if not out:
        raise DataError(f"{path}: no rows after the header line; add examples (one per line)")
    return out


def _label_key(path: Path, line: int, raw: Any, field: str) -> str:
    """A classification label exactly as written (see the module docstring), as its class name."""
    if isinstance(raw, bool) or isinstance(raw, float) or not isinstance(raw, (str, int)):
        shown = "null" if raw is None else repr(raw)
        raise DataError(f"{path}:{line}: label {shown} in {field!r} is not a class name or an integer; write the "
                        "class as a string or an integer")
    if isinstance(raw, int):
        return str(raw)
    if raw == "":
        raise DataError(f"{path}:{line}: no value in the label column {field!r}")
    if raw != raw.strip():
        raise DataError(f"{path}:{line}: label {raw!r} has spaces around it; write it without them")
    if raw.lower() in MISSING:
        raise DataError(f"{path}:{line}: label {raw!r} reads as a missing value, not a class; give the row its "
                        "label or remove it")
    return raw


def _kind(raw: Any) -> str:
    """integer / word: one file's labels are all of one kind (JSONL: also one type)."""
    if isinstance(raw, int):
        return "JSON integer"
    return "integer" if raw.lstrip("-").isdigit() else "word"


def load(task: Task, data: DataSource) -> TaskData:
    cfg: CustomOptions = task.settings
    fields = tuple(cfg.text_fields or ())
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    paths = {split: Path(f).expanduser() for split, f in files.items() if f}
    tables = {split: read_table(p, fields, cfg.label_field, labeled=split != "test") for split, p in paths.items()}
    for split in ("train", "validation"):
        if any(raw is None or raw == "" for _, _, raw in tables[split]):
            line = next(n for n, _, raw in tables[split] if raw is None or raw == "")
            raise DataError(f"{paths[split]}:{line}: no value in the label column {cfg.label_field!r}")
    if not task.regression:  # one kind of label across train and validation: never 0, 1 and "pos"
        first: dict[str, tuple[Path, int, Any]] = {}
        for split in ("train", "validation", "test"):
            for line, _, raw in tables.get(split, []):
                if split == "test" and (raw is None or raw == ""):
                    continue
                _label_key(paths[split], line, raw, cfg.label_field)
                first.setdefault(_kind(raw), (paths[split], line, raw))
        if len(first) > 1:
            (k1, (f1, l1, r1)), (k2, (f2, l2, r2)) = sorted(first.items(), key=lambda kv: (str(kv[1][0]), kv[1][1]))[:2]
            a = "an" if k2[0] in "aeiou" else "a"
            raise DataError(f"{f2}:{l2}: label {r2!r} is {a} {k2}, but {f1}:{l1} has the {k1} {r1!r}: labels are taken as "
                            "written, so these would be different classes; write every label the same way")

    if task.regression:
        names: tuple[str, ...] = ()

        def label(split: str, line: int, raw: Any) -> Label:
            return float_label(paths[split], line, str(raw))
    else:
        keys = sorted({_label_key(paths["train"], n, raw, cfg.label_field) for n, _, raw in tables["train"]},
                      key=lambda k: (0, int(k)) if k.lstrip("-").isdigit() else (1, k))
        if len(keys) < 2:
            raise DataError(f"{paths['train']}: every row has the label {keys[0]!r}; a classifier needs at least "
                            "two classes (custom.regression=true for numeric targets)")
        names = tuple(keys)

        def label(split: str, line: int, raw: Any) -> Label:
            key = _label_key(paths[split], line, raw, cfg.label_field)
            if key not in names:
                raise DataError(f"{paths[split]}:{line}: label {key!r} does not occur in the training file "
                                f"(labels: {', '.join(names)})")
            return names.index(key)

    def examples(split: str) -> list[Example]:
        out = []
        for i, (line, texts, raw) in enumerate(tables[split]):
            value = None if split == "test" and (raw is None or raw == "") else label(split, line, raw)
            out.append(Example(texts, value, split, "", i))
        return out

    return TaskData(
        train=examples("train"),
        eval=examples("validation"),
        test={"test": examples("test")} if "test" in tables else {},
        label_names=names,
        fingerprint={str(p): sha256_file(p) for p in paths.values()},
        origin=str(paths["validation"]),
    )


def configure(task: Task, options: CustomOptions) -> Task:
    """The task shaped by its section: its text fields, and classes or a regression target."""
    return dataclasses.replace(
        task, settings=options, text_fields=tuple(options.text_fields or ()), regression=options.regression,
        dataset_name=Path(options.validation_file or "custom").name,
        metrics=("pearson", "spearman") if options.regression else ("accuracy", "f1", "mcc"))


def check_config(task: Task, data: DataSource) -> None:
    o: CustomOptions = task.settings
    missing = [f"custom.{k}" for k in ("train_file", "validation_file", "text_fields") if getattr(o, k) is None]
    if missing:
        raise ConfigError(f"task=custom needs {', '.join(missing)} (e.g. custom.train_file=train.csv "
                          "custom.validation_file=dev.csv custom.text_fields=[sentence])")
    if not 1 <= len(o.text_fields or ()) <= 2:
        raise ConfigError(f"custom.text_fields={list(o.text_fields or ())} must name one or two columns")
    if data.source is not None:
        raise ConfigError("task=custom reads custom.train_file / custom.validation_file; leave data.source unset")


def spell(task: Task, pred: float | int, names: tuple[str, ...]) -> str:
    """A class by the label it had in your files (the model's id2label); a score unclipped."""
    return f"{float(pred):.3f}" if task.regression else names[int(pred)]


TASK = configure(Task(
    name="custom", text_fields=(), label_names=(), eval_splits=("validation",), metrics=(),
    selection_split="validation", load=load, submission={"test": "predictions.tsv"},
    description="your own CSV / TSV / JSON Lines files (custom.train_file, custom.validation_file)",
    options=CustomOptions, configure=configure, check_config=check_config, spell=spell,
), CustomOptions())
