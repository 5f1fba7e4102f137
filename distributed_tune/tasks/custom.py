"""Your own data: CSV, TSV or JSON Lines files for train and validation (run_glue's `train_file` /
`validation_file`), with the text column(s) and the label column named in the config.

    task: custom
    data:
      train_file: data/train.csv         # .csv, .tsv or .jsonl (.json: JSON Lines too)
      validation_file: data/dev.csv
      test_file: data/test.csv           # optional, unlabeled is fine (predict writes its predictions)
      text_fields: [premise, hypothesis] # one or two columns
      label_field: label                 # strings or integers; data.regression=true: a number
      regression: false

Label names are the distinct training labels, sorted (strings as written, integers as their
digits); the exported model's `id2label` keeps them. CSV follows RFC 4180 quoting; TSV files are
split on tabs only. Every row is validated; an error names the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed_tune.errors import DataError
from distributed_tune.files import sha256_file
from distributed_tune.tasks.base import (
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

if TYPE_CHECKING:
    from distributed_tune.config import DataConfig

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
                                f"(has {', '.join(map(repr, row))}); set data.text_fields")
            texts = tuple(check_text(path, lineno, str(row[f])) for f in fields)
            out.append((lineno, texts, row.get(label_field) if label_field else None))
        if not out:
            raise DataError(f"{path}: file is empty")
        return out
    head, rows = read_rows(path, delimiter, header=True)
    assert head is not None
    missing = [f for f in fields if f not in head]
    if missing:
        raise DataError(f"{path}:1: no column {', '.join(map(repr, missing))} (columns: {', '.join(head)}); "
                        "set data.text_fields")
    if labeled and label_field not in head:  # said once, at the header, not as an empty label on line 2
        raise DataError(f"{path}:1: no label column {label_field!r} (columns: {', '.join(head)}); "
                        "set data.label_field")
    text_cols = [head.index(f) for f in fields]
    label_col = head.index(label_field) if label_field in head else None
    for lineno, row in rows:
        if len(row) != len(head):
            raise DataError(f"{path}:{lineno}: {len(row)} columns, the header has {len(head)}; fix or remove the line")
        texts = tuple(check_text(path, lineno, row[c]) for c in text_cols)
        out.append((lineno, texts, row[label_col] if label_col is not None else None))
    return out


def _label_key(raw: Any) -> str:
    return str(raw).strip() if not isinstance(raw, bool) else str(int(raw))


def load(task: Task, cfg: DataConfig) -> TaskData:
    fields = tuple(cfg.text_fields or ())
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    paths = {split: Path(f).expanduser() for split, f in files.items() if f}
    tables = {split: read_table(p, fields, cfg.label_field, labeled=split != "test") for split, p in paths.items()}
    for split in ("train", "validation"):
        if any(raw is None or raw == "" for _, _, raw in tables[split]):
            line = next(n for n, _, raw in tables[split] if raw is None or raw == "")
            raise DataError(f"{paths[split]}:{line}: no value in the label column {cfg.label_field!r}")

    if task.regression:
        names: tuple[str, ...] = ()

        def label(split: str, line: int, raw: Any) -> Label:
            return float_label(paths[split], line, str(raw))
    else:
        keys = sorted({_label_key(raw) for _, _, raw in tables["train"]},
                      key=lambda k: (0, int(k)) if k.lstrip("-").isdigit() else (1, k))
        if len(keys) < 2:
            raise DataError(f"{paths['train']}: every row has the label {keys[0]!r}; a classifier needs at least "
                            "two classes (data.regression=true for numeric targets)")
        names = tuple(keys)

        def label(split: str, line: int, raw: Any) -> Label:
            key = _label_key(raw)
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
    )


def custom_task(regression: bool) -> Task:
    return Task(
        name="custom", text_fields=(), label_names=(), eval_splits=("validation",),
        metrics=("pearson", "spearman") if regression else ("accuracy", "f1", "mcc"),
        selection_split="validation", load=load, regression=regression, submission={"test": "predictions.tsv"},
        description="your own CSV / TSV / JSON Lines files (data.train_file, data.validation_file)",
    )
