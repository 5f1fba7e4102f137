"""The task seam: what a task is, and the examples every task hands to the rest of the package.

A `Task` says where its data comes from (`load`), its text fields (one sentence or a pair), its
labels (names, or regression), its evaluation splits, its metrics and the metric that picks the
best model. The loop, sharding, the exactly-once gather, checkpoints and every command speak to
this seam only. Add a task: write a `Task(...)` with a loader in a module of this package and
list it in `tasks/__init__.py`: never config.py or commands/. A task with options of its own
declares them as a dataclass of `keys.key` fields (`Task.options`): they become the config section
named after the task (`custom.train_file`), with the same typo checks, resume rules and reference.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from distributed_tune.errors import DataError
from distributed_tune.files import not_utf8

Label = int | float | None  # a class index, a regression target, or None (unlabeled test row)


class DataSource(Protocol):
    """What a loader reads of the config's `data:` section (config.DataConfig is one)."""

    source: str | None
    cache_dir: str


@dataclass(frozen=True)
class Example:
    text: tuple[str, ...]  # (sentence,) or (first, second) for pair tasks
    label: Label
    split: str  # the split it belongs to: train, in_domain_dev, validation_matched, ...
    source: str = ""  # CoLA: the publication code (column 1); otherwise ""
    idx: int = -1  # the row's own id where the file has one (GLUE test index), else its position


@dataclass(frozen=True)
class TaskData:
    """One task's examples, loaded and validated."""

    train: list[Example]
    eval: list[Example]  # every evaluation example, grouped by split in `Task.eval_splits` order
    test: dict[str, list[Example]]  # unlabeled test splits by name (GLUE submissions); may be empty
    label_names: tuple[str, ...]  # () for regression
    fingerprint: dict[str, str]  # file (or hub id) -> sha256, recorded in the run directory
    origin: str = ""  # where the evaluation data was read from, for messages; "" means data.source

    def counts(self) -> dict[str, int]:
        out = {"train": len(self.train), "eval": len(self.eval)}
        for e in self.eval:
            out[e.split] = out.get(e.split, 0) + 1
        return out


@dataclass(frozen=True)
class Task:
    name: str
    text_fields: tuple[str, ...]  # field names, as the `datasets` hub copy spells them
    label_names: tuple[str, ...]  # () for regression (one output) and for custom tasks (read from the data)
    eval_splits: tuple[str, ...]  # evaluated (and reported) every evaluation
    metrics: tuple[str, ...]  # metric names (metrics.py), the first one selects the best model
    selection_split: str  # the split whose first metric picks the best model and drives early stopping
    load: Callable[[Task, DataSource], TaskData]  # use `read`
    default_source: str | None = None  # data.source when the config leaves it null
    combined_split: str | None = None  # a split of all eval examples together (CoLA's `dev`)
    regression: bool = False  # one output trained with MSE (STS-B), not classes
    submission: dict[str, str] = field(default_factory=dict)  # test split -> GLUE submission file
    description: str = ""
    hub_dataset: str | None = None  # the Hub dataset the task's data is (model cards); None: your own files
    dataset_name: str = ""  # how a model card names the data (CoLA, GLUE SST2, your file)
    # The task's own config section (a dataclass of keys.key fields), the section's values once
    # configured, and how they shape the task (text fields, regression): see `configured`.
    options: type | None = None
    settings: Any = None
    configure: Callable[[Task, Any], Task] | None = None
    # Config-time checks of the task's section and data.source (ConfigError), before anything runs.
    check_config: Callable[[Task, DataSource], None] | None = None
    # Reads one evaluation file in the task's own format (`evaluate --tsv`), as split `split`.
    read_file: Callable[[Path, str], list[Example]] | None = None
    # A test prediction as the task's submission file spells it, given the model's label names
    # (default: the label index; a score with 3 decimals).
    spell: Callable[[Task, float | int, tuple[str, ...]], str] | None = None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def configured(self, settings: Any) -> Task:
        """This task with its config section's values applied (the identity without a section)."""
        if self.configure is None:
            return self
        return self.configure(self, settings)

    def check(self, data: DataSource) -> None:
        if self.check_config is not None:
            self.check_config(self, data)

    def submission_value(self, pred: float | int, names: tuple[str, ...]) -> str:
        if self.spell is not None:
            return self.spell(self, pred, names)
        return f"{float(pred):.3f}" if self.regression else str(int(pred))

    def read(self, cfg: DataSource) -> TaskData:
        """Load and validate this task's data from `cfg.source` (files, URL, hub). Data without an
        example of the selection split is refused: nothing could select the best model on it."""
        data = self.load(self, cfg)
        selection = data.eval if self.selection_split == self.combined_split else \
            [e for e in data.eval if e.split == self.selection_split]
        if not selection:
            where = data.origin or f"data.source={cfg.source or self.default_source}"
            raise DataError(f"{where}: no {self.selection_split} examples (an empty or header-only "
                            f"evaluation file?); {self.name} scores and selects the best model on "
                            f"{self.selection_split}: add its rows")
        return data

    def reported_splits(self) -> tuple[str, ...]:
        return self.eval_splits + ((self.combined_split,) if self.combined_split else ())

    def absent_splits(self, data: TaskData) -> tuple[str, ...]:
        """Evaluation splits without a single example in `data` (a GLUE-layout CoLA dev.tsv with
        in-domain rows only): they are not evaluated. Never the selection split (`read` refuses that)."""
        counts = data.counts()
        return tuple(s for s in self.eval_splits if not counts.get(s))


# --------------------------------------------------------------------------- reading helpers


def read_text(path: Path) -> str:
    """A whole file as UTF-8; a wrong encoding is one line that names the file and the byte.

    A leading byte order mark is dropped: GLUE's MRPC train.tsv and dev.tsv start with one (their
    header reads '\\ufeffQuality'), and so does a CSV saved as "UTF-8" by Excel."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(not_utf8(path, e)) from None


def lines(text: str) -> list[str]:
    """The lines of a file, split on \\n (and \\r\\n) only. Not `str.splitlines`, which also
    splits on U+2028, U+0085, \\x0b, \\x0c, \\x1c-\\x1e: characters that occur inside real sentences
    (web text such as QQP's) and would cut one row in two."""
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def read_rows(path: Path, delimiter: str, header: bool) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header or None, [(line number, columns)]) of a delimited file, quotes kept as text for
    tabs (GLUE's and CoLA's TSVs are not quoted) and honoured for commas (CSV, where a quoted
    field may span lines: a row's number is the line it starts on)."""
    text = read_text(path)
    rows: list[tuple[int, list[str]]] = []
    if delimiter == "\t":  # no quoting: a plain split (the csv module refuses a lone \r in a field)
        rows = [(n, line.split("\t")) for n, line in enumerate(lines(text), 1) if line]
    else:
        # newline="": the csv module sees the file's own line ends (RFC 4180 newlines in quotes).
        # A field may be as long as a JSONL sentence: no 131,072-character cap (the csv default).
        csv.field_size_limit(2**31 - 1)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        start = 1
        try:
            for row in reader:
                if row:
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{start}: not valid CSV ({e}); fix or remove the line") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    if not header:
        return None, rows
    return rows[0][1], rows[1:]


def column(path: Path, head: list[str], name: str) -> int:
    """The index of column `name` in a header, or one line naming the columns that exist."""
    if name not in head:
        raise DataError(f"{path}:1: no column {name!r} (columns: {', '.join(head)})")
    return head.index(name)


# Data rules, one for every format (CSV, TSV, JSONL, `datasets` folders; README "Data rules"):
# a text is a non-empty string, taken as written; a label is taken exactly as written or refused
# (see custom.py for the labels of your own files). Nothing is converted by a guess.
MISSING = frozenset({"nan", "-nan", "na", "n/a", "null", "none", "nil", "?"})


def check_text(path: Path | str, line: int | str, text: Any, field: str | None = None) -> str:
    """A text value as written; null, a number or other non-string, an empty or blank string are
    refused (JSONL `"sentence": null` once trained on the text "None")."""
    what = f" field {field!r}" if field else ""
    if not isinstance(text, str):
        shown = "null" if text is None else f"{type(text).__name__} {text!r}"
        raise DataError(f"{path}:{line}:{what} text is {shown}, not a string; write the text, or remove the line")
    if not text.strip():
        raise DataError(f"{path}:{line}:{what} empty text; fix or remove the line")
    return text


def class_label(path: Path, line: int, raw: str, names: tuple[str, ...]) -> int:
    """A label written as its name or as its index."""
    if raw in names:
        return names.index(raw)
    if raw.isdigit() and int(raw) < len(names):
        return int(raw)
    raise DataError(f"{path}:{line}: label {raw!r} is not one of {', '.join(names)} (or 0..{len(names) - 1})")


def float_label(path: Path, line: int, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: label {raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{path}:{line}: label {raw!r} is not a finite number")
    return value


def require(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def records_from_hub(rows: Any, fields: tuple[str, ...], split: str, regression: bool,
                     source: str = "data.source=hub") -> list[Example]:
    """`datasets` rows (dicts) -> Examples; test rows carry label -1 on the hub: None here."""
    out = []
    for i, r in enumerate(rows):
        where, label = f"{source}: split {split}, row", r["label"]
        if regression:
            if isinstance(label, bool) or not isinstance(label, (int, float)) or label != label or abs(label) == float("inf"):
                raise DataError(f"{where} {i}: label {label!r} is not a finite number; fix or remove the row")
            value: Label = float(label)
        else:
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{where} {i}: label {label!r} is not a class index; fix or remove the row")
            value = None if label < 0 else label
        texts = tuple(check_text(where, i, r[f], f) for f in fields)
        out.append(Example(texts, value, split, "", int(r.get("idx", i))))
    return out
