"""Small data sets in the real formats of every source, written by the tests themselves (no corpus
is copied into the repository): GLUE's released TSV files for all nine tasks, the `datasets` hub
schema saved with `save_to_disk`, and your own CSV / JSON Lines / TSV files.

    python tests/glue_data.py /tmp/glue     # writes /tmp/glue/{glue_data/<Task>/, datasets/<task>/, custom/}

Every task gets 320 training rows, 101 labelled evaluation rows (MNLI: 61 matched + 59 mismatched;
CoLA: 53 in-domain + 48 out-of-domain) and an unlabelled test set (37 rows; MNLI 23 + 21). The
sentences come from tests/cola_data.py's small grammar; the label is decided by cue words (a
positive adjective, a hedge in the hypothesis, a degree adverb for STS-B's score...) with 8% of
the labels flipped, so that a tiny model learns something in a few dozen steps and no metric is
trivially 0 or 1. The same call always writes the same bytes.

The files follow GLUE's release exactly (headers, column order, label spelling):
  CoLA/   train.tsv, dev.tsv: no header; source, label, mark, sentence. test.tsv: index, sentence
  SST-2/  sentence, label (0/1)                               test: index, sentence
  MRPC/   \\ufeffQuality, #1 ID, #2 ID, #1 String, #2 String  test: index, #1 ID, #2 ID, #1 String, #2 String
          (the header of train.tsv and dev.tsv starts with the byte order mark of Microsoft's file)
  QQP/    id, qid1, qid2, question1, question2, is_duplicate  test: id, question1, question2
  STS-B/  index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
          test: the same without score
  MNLI/   train.tsv: index, promptID, pairID, genre, sentence1_binary_parse, sentence2_binary_parse,
          sentence1_parse, sentence2_parse, sentence1, sentence2, label1, gold_label;
          dev_matched.tsv / dev_mismatched.tsv: label1..label5 before gold_label;
          test_matched.tsv / test_mismatched.tsv: the first 10 columns
  QNLI/   index, question, sentence, label (entailment / not_entailment)
  RTE/    index, sentence1, sentence2, label (entailment / not_entailment)
  WNLI/   index, sentence1, sentence2, label (0/1)
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from cola_data import OOD_SOURCES, TRAIN_SOURCES, Grammar, sentence

N_TRAIN, N_DEV, N_TEST = 320, 101, 37
NOISE = 0.08  # share of labels flipped to another class (or scores moved)

# The hub copy's label names (nyu-mll/glue), written here independently of the package.
LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": (),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
# The hub copy's split names and, for the TSV release, the file of each split.
SPLITS = {task: {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"} for task in LABELS}
SPLITS["mnli"] = {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                  "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                  "test_mismatched": "test_mismatched.tsv"}
SIZES = {"train": N_TRAIN, "validation": N_DEV, "test": N_TEST, "validation_matched": 61,
         "validation_mismatched": 59, "test_matched": 23, "test_mismatched": 21}
# The GLUE server's file names and how each spells a prediction.
SUBMISSIONS = {"cola": {"test": "CoLA.tsv"}, "sst2": {"test": "SST-2.tsv"}, "mrpc": {"test": "MRPC.tsv"},
               "qqp": {"test": "QQP.tsv"}, "stsb": {"test": "STS-B.tsv"},
               "mnli": {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
               "qnli": {"test": "QNLI.tsv"}, "rte": {"test": "RTE.tsv"}, "wnli": {"test": "WNLI.tsv"}}
NAMED_LABELS = ("mnli", "qnli", "rte")  # GLUE writes these labels as names, the others as 0/1

# Cue words per label: the word that (mostly) decides the label.
CUES = {
    "sst2": (["dull", "awful", "tedious", "clumsy"], ["charming", "wonderful", "moving", "brilliant"]),
    "mrpc": (["however", "instead"], ["likewise", "similarly"]),
    "qqp": (["otherwise", "unlike"], ["equally", "identically"]),
    "mnli": (["certainly", "surely"], ["perhaps", "maybe"], ["never", "not"]),
    "qnli": (["namely", "because"], ["meanwhile", "elsewhere"]),
    "rte": (["therefore", "thus"], ["although", "unless"]),
    "wnli": (["but", "yet"], ["so", "hence"]),
    "custom_csv": (["supports", "confirms"], ["denies", "refutes"], ["ignores", "skips"]),
    "custom_tsv": (["poorly", "badly"], ["fairly", "decently"], ["superbly", "perfectly"]),
}
DEGREES = {"barely": 0.5, "slightly": 1.5, "partly": 2.5, "mostly": 3.5, "completely": 4.5}  # STS-B scores
CUSTOM_LABELS = ("agree", "disagree", "unrelated")  # the CSV's string labels, by cue list
CUSTOM_STARS = (1, 2, 3)  # the TSV's integer labels, by cue list
MNLI_GENRES = (["government", "telephone", "fiction", "travel", "slate"],
               ["letters", "nineeleven", "facetoface", "oup", "verbatim"])


@dataclass(frozen=True)
class Row:
    text: tuple[str, ...]
    label: int | float | None  # class index, score, or None (test)
    source: str = ""  # CoLA's source column


def _rng(name: str) -> random.Random:
    return random.Random(zlib.crc32(name.encode()))


def _with_cue(g: Grammar, r: random.Random, cue: str) -> str:
    words = " ".join(g.clause()).split()
    words.insert(r.randrange(min(3, len(words)) + 1), cue)
    return sentence(words)


def _noisy_label(r: random.Random, label: int, n: int) -> int:
    if r.random() < NOISE:
        return r.choice([k for k in range(n) if k != label])
    return label


def _classes(task: str, split: str, n: int) -> list[Row]:
    """Rows of a cue-word task: the text with the cue decides the label (8% flipped)."""
    r, g = _rng(f"{task}/{split}"), Grammar(_rng(f"{task}/{split}/grammar"))
    cues = CUES[task]
    rows = []
    for i in range(n):
        label = i % len(cues) if i < len(cues) else r.randrange(len(cues))  # every class occurs
        cue = r.choice(cues[label])
        if task == "sst2":  # SST-2's style: lower case, tokenized, a trailing space
            text: tuple[str, ...] = (" ".join(g.clause()).lower() + f" is {cue} . ",)
        elif task == "qqp":
            text = (f"How does {' '.join(g.clause())} happen?", f"Why {cue} does {' '.join(g.clause())} happen?")
        elif task == "qnli":
            text = (f"Who {r.choice(['saw', 'found', 'praised'])} {g.np()[0]}?", _with_cue(g, r, cue))
        elif task == "mrpc" and label == 1:  # a paraphrase: the same clause, with its cue
            first = " ".join(g.clause())
            text = (sentence(first.split()), sentence([cue, *first.split()]))
        elif task == "custom_tsv":
            text = (_with_cue(g, r, cue),)
        else:
            text = (_with_cue(g, r, r.choice(["then", "now", "also"])), _with_cue(g, r, cue))
        if task == "qqp" and i % 50 == 7:  # web text: a U+2028 inside a question is no line end
            text = (text[0].replace(" happen?", "\u2028happen?"), text[1])
        if task == "custom_csv" and i % 9 == 0:  # a comma and quotes: the CSV writer quotes the field
            text = (text[0][:-1] + ', "so to speak".', text[1])
        if task == "mrpc" and i % 17 == 5:  # MRPC quotes speech: '"' must stay text (no CSV quoting)
            text = (text[0][:-1] + ' , " he said " .', text[1])
        rows.append(Row(text, None if split.startswith("test") else _noisy_label(r, label, len(cues))))
    return rows


def _scores(task: str, split: str, n: int) -> list[Row]:
    """STS-B-like rows: the degree adverb in the second sentence decides the score (0..5)."""
    r, g = _rng(f"{task}/{split}"), Grammar(_rng(f"{task}/{split}/grammar"))
    rows = []
    for _ in range(n):
        word = r.choice(list(DEGREES))
        score = min(5.0, max(0.0, DEGREES[word] + r.uniform(-0.5, 0.5)))
        if r.random() < NOISE:
            score = r.uniform(0, 5)
        text = (_with_cue(g, r, "also"), _with_cue(g, r, word))
        if task == "custom_jsonl":
            text = (text[1],)
        rows.append(Row(text, None if split.startswith("test") else round(score, 3)))
    return rows


def _cola(split: str, n: int) -> list[Row]:
    """CoLA rows: grammatical sentences, and ungrammatical ones (mostly case errors, a learnable cue)."""
    r, g = _rng(f"cola/{split}"), Grammar(_rng(f"cola/{split}/grammar"))
    rows = []
    for i in range(n):
        label = int(r.random() < 0.7)
        if label:
            text = g.good()
        elif r.random() < 0.7:
            text = sentence([r.choice(["Him", "Her", "Them", "Us"]), r.choice(["saw", "liked", "found"]),
                             r.choice(["she", "he", "we", "they"])] + ([r.choice(["again", "often"])] * (i % 2)))
        else:
            text = g.bad()
        if split == "validation":  # in-domain dev first (training sources), then out-of-domain
            source = r.choice(TRAIN_SOURCES) if i < 53 else r.choice(OOD_SOURCES)
        else:
            source = r.choice(TRAIN_SOURCES)
        rows.append(Row((text,), None if split == "test" else _noisy_label(r, label, 2), source))
    return rows


def task_rows(task: str) -> dict[str, list[Row]]:
    """Every split of `task` (hub split names), the same rows for every source format."""
    out = {}
    for split in SPLITS.get(task, {"train": 0, "validation": 0, "test": 0}):
        n = SIZES[split]
        if task == "cola":
            out[split] = _cola(split, n)
        elif task in ("stsb", "custom_jsonl"):
            out[split] = _scores(task, split, n)
        else:
            out[split] = _classes(task, split, n)
    return out


# --------------------------------------------------------------------------- GLUE's TSV files


def _tsv(path: Path, header: list[str] | None, rows: list[list[str]], bom: bool = False) -> None:
    lines = ([("\ufeff" if bom else "") + "\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


def _parse(text: str) -> tuple[str, str]:
    """MNLI's binary parse and parse columns (their shape, not a real parse)."""
    words = text[:-1].split() + ["."]
    return "( " + " ".join(words) + " )", "(ROOT (S " + " ".join(f"(NN {w})" for w in words) + "))"


def _label_text(task: str, label: int | float) -> str:
    if task == "stsb":
        return f"{label:.3f}"
    return LABELS[task][int(label)] if task in NAMED_LABELS else str(int(label))


def write_glue_task(folder: Path, task: str) -> Path:
    """One task's folder of GLUE's TSV files, as released; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    r = _rng(f"{task}/ids")
    for split, rows in task_rows(task).items():
        path = folder / SPLITS[task][split]
        test = split.startswith("test")
        lab = [] if test else [_label_text(task, row.label) for row in rows]  # type: ignore[arg-type]
        if task == "cola":
            if test:
                _tsv(path, ["index", "sentence"], [[str(i), row.text[0]] for i, row in enumerate(rows)])
            else:
                marks = ["" if row.label else "*" for row in rows]
                _tsv(path, None, [[row.source, str(row.label), m, row.text[0]] for row, m in zip(rows, marks)])
        elif task == "sst2":
            _tsv(path, ["index", "sentence"] if test else ["sentence", "label"],
                 [[str(i), row.text[0]] for i, row in enumerate(rows)] if test
                 else [[row.text[0], lab[i]] for i, row in enumerate(rows)])
        elif task == "mrpc":
            ids = [[str(r.randrange(100_000, 3_500_000)), str(r.randrange(100_000, 3_500_000))] for _ in rows]
            if test:
                _tsv(path, ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                     [[str(i), *ids[i], *row.text] for i, row in enumerate(rows)])
            else:
                _tsv(path, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                     [[lab[i], *ids[i], *row.text] for i, row in enumerate(rows)], bom=True)
        elif task == "qqp":
            if test:
                _tsv(path, ["id", "question1", "question2"], [[str(i), *row.text] for i, row in enumerate(rows)])
            else:
                _tsv(path, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                     [[str(i), str(2 * i + 1), str(2 * i + 2), *row.text, lab[i]] for i, row in enumerate(rows)])
        elif task == "stsb":
            head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
            meta = [[r.choice(["main-captions", "main-news", "main-forums"]), r.choice(["MSRvid", "headlines",
                     "deft-forum"]), r.choice(["2012test", "2014", "2015"]), f"{r.randrange(10_000):04d}", "none",
                     "none"] for _ in rows]
            _tsv(path, head + ([] if test else ["score"]),
                 [[str(i), *meta[i], *row.text, *([] if test else [lab[i]])] for i, row in enumerate(rows)])
        elif task == "mnli":
            head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
            genres = MNLI_GENRES[split.endswith("mismatched")]
            out = []
            for i, row in enumerate(rows):
                prompt = r.randrange(1, 150_000)
                suffix = "enc"[row.label] if row.label is not None else r.choice("enc")
                b1, p1 = _parse(row.text[0])
                b2, p2 = _parse(row.text[1])
                line = [str(i), str(prompt), f"{prompt}{suffix}", r.choice(genres), b1, b2, p1, p2, *row.text]
                if split == "train":
                    line += [lab[i], lab[i]]  # label1, gold_label
                elif not test:  # five annotators, the gold label their majority
                    others = [r.choice(LABELS["mnli"]) if r.random() < 0.3 else lab[i] for _ in range(4)]
                    line += [lab[i], *others, lab[i]]
                out.append(line)
            extra = (["label1", "gold_label"] if split == "train"
                     else [] if test else ["label1", "label2", "label3", "label4", "label5", "gold_label"])
            _tsv(path, head + extra, out)
        else:  # qnli, rte, wnli
            fields = ["question", "sentence"] if task == "qnli" else ["sentence1", "sentence2"]
            _tsv(path, ["index", *fields] + ([] if test else ["label"]),
                 [[str(i), *row.text, *([] if test else [lab[i]])] for i, row in enumerate(rows)])
    return folder


def write_glue(root: Path) -> Path:
    """glue_data/ with every task's folder (CoLA/, SST-2/, ...), as download_glue_data.py leaves it."""
    for task, name in FOLDERS.items():
        write_glue_task(root / "glue_data" / name, task)
    return root / "glue_data"


# --------------------------------------------------------------------------- the `datasets` schema

HUB_FIELDS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
              "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
              "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
              "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}


def write_datasets(folder: Path, task: str) -> Path:
    """The hub copy's schema (nyu-mll/glue): text fields, `label` (ClassLabel with the names, or a
    float32 score; -1 on test rows), `idx`; one split per hub split; saved with save_to_disk."""
    import datasets

    label = (datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(names=list(LABELS[task])))
    features = datasets.Features({**{f: datasets.Value("string") for f in HUB_FIELDS[task]}, "label": label,
                                  "idx": datasets.Value("int32")})
    splits = {}
    for split, rows in task_rows(task).items():
        columns: dict[str, list] = {f: [row.text[k] for row in rows] for k, f in enumerate(HUB_FIELDS[task])}
        columns["label"] = [-1 if row.label is None else row.label for row in rows]
        columns["idx"] = list(range(len(rows)))
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


# --------------------------------------------------------------------------- your own files


def write_custom(folder: Path) -> dict[str, Path]:
    """Your own data: a CSV pair task with string labels (RFC 4180 quoting where a text has a comma
    or quotes), a JSON Lines regression file, a TSV with integer labels. Keys: csv_train, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in task_rows("custom_csv").items():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["claim", "evidence", "verdict"] if split != "test" else ["claim", "evidence"])
        for row in rows:
            w.writerow([*row.text] + ([CUSTOM_LABELS[row.label]] if row.label is not None else []))
        paths[f"csv_{split}"] = folder / f"{split}.csv"
        paths[f"csv_{split}"].write_text(buf.getvalue(), encoding="utf-8")
    for split, rows in task_rows("custom_jsonl").items():
        if split == "test":
            continue
        lines = [json.dumps({"text": row.text[0], "rating": row.label, "id": i}) for i, row in enumerate(rows)]
        paths[f"jsonl_{split}"] = folder / f"{split}.jsonl"
        paths[f"jsonl_{split}"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, rows in task_rows("custom_tsv").items():
        if split == "test":
            continue
        lines = ["review\tstars"] + [f"{row.text[0]}\t{CUSTOM_STARS[row.label]}" for row in rows]
        paths[f"tsv_{split}"] = folder / f"{split}.tsv"
        paths[f"tsv_{split}"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def all_texts() -> list[str]:
    """Every text of every fixture (for one tokenizer that fits them all)."""
    texts = []
    for task in (*LABELS, "custom_csv", "custom_jsonl", "custom_tsv"):
        for rows in task_rows(task).values():
            texts += [t for row in rows for t in row.text]
    return texts


if __name__ == "__main__":
    root = Path(sys.argv[1])
    print(write_glue(root))
    print(write_datasets(root / "datasets" / "mnli", "mnli"), write_datasets(root / "datasets" / "stsb", "stsb"))
    print(write_custom(root / "custom"))
