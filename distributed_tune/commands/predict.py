"""Label sentences with a trained model, or write the GLUE benchmark's test-set submission files.

    python -m distributed_tune predict runs/cola "The sailors rode the breeze clear of the rocks." "Him saw she."
    python -m distributed_tune predict runs/cola --file sentences.txt --out predictions.jsonl
    cat sentences.txt | python -m distributed_tune predict path/to/save_pretrained_folder
    python -m distributed_tune predict runs/mnli --glue-submission submission/   # MNLI-m.tsv, MNLI-mm.tsv

RUN_OR_MODEL is a run directory (its model/ folder is used) or any save_pretrained folder, also
one trained under ZeRO-3 (the exported folder holds the gathered weights). Sentences come from
the arguments, else --file (one per line, blank lines skipped), else stdin; for a sentence-pair
task a TAB separates the two texts of a line. Runs batched, on the GPU if there is one, else on
the CPU. Prints `label<TAB>probability of that label<TAB>text` per line (a score for regression),
or writes JSON lines to --out. A model its run found collapsed (one class predicted at its step,
said by its training_info.json) gets one warning on stderr.

--glue-submission DIR predicts the task's unlabeled test split(s) (GLUE's test.tsv files, or the
hub copy's test splits; task=custom: custom.test_file) and writes the files the GLUE server takes:
`index<TAB>prediction` with GLUE's label names (CoLA.tsv, SST-2.tsv, MNLI-m.tsv, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distributed_tune.errors import ConfigError, DataError
from distributed_tune.trained import label_names, load_trained, resolve_target

DEFAULT_BATCH = 64


def read_lines(args: argparse.Namespace) -> list[tuple[int | None, str]]:
    """(line number or None for arguments, text) in input order."""
    from distributed_tune.tasks.base import lines as base_lines

    if args.sentences and args.file:
        raise ConfigError("pass sentences either as arguments or with --file, not both")
    if args.sentences:
        for i, s in enumerate(args.sentences, 1):
            if not s.strip():
                raise DataError(f"sentence argument {i} is empty; remove it or put text in it")
        return [(None, s) for s in args.sentences]
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise DataError(f"--file {path}: no such file; pass a text file with one sentence per line")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        where = str(path)
    else:
        if sys.stdin.isatty():
            raise ConfigError("no sentences: pass them as arguments, with --file FILE, or on stdin")
        text, where = sys.stdin.read(), "stdin"
    # Split on \n only (tasks.base.lines): str.splitlines would also cut a line at U+2028 or U+0085.
    lines = [(n, line.strip("\r\n ")) for n, line in enumerate(base_lines(text), 1) if line.strip()]
    if not lines:
        raise DataError(f"{where}: no sentences (only blank lines); put one sentence per line")
    return lines


def to_examples(lines: list[tuple[int | None, str]], fields: int) -> list[Any]:
    from distributed_tune.tasks import Example

    examples = []
    for i, (line, text) in enumerate(lines):
        parts = tuple(p.strip() for p in text.split("\t")) if fields == 2 else (text,)
        if len(parts) != fields or not all(parts):
            where = f"line {line}" if line is not None else f"argument {i + 1}"
            raise DataError(f"{where}: a sentence-pair task needs two texts separated by a TAB, got {text!r}")
        examples.append(Example(parts, None, "predict", "", i))
    return examples


class Predictor:
    """The target's model, loaded once (fp32, on this process's device), and its label names;
    `predictor(examples, batch_size)` -> outputs [n, classes] or [n, 1] in input order, batched by
    length."""

    def __init__(self, target: Any) -> None:
        from distributed_tune.evaluation import SingleProcess

        self.target, self.process = target, SingleProcess()
        warning = target.collapse_warning()
        if warning:  # on stderr: the predictions on stdout stay parseable
            print(warning, file=sys.stderr)
        self.names = label_names(target)
        self.model, self.tokenizer = load_trained(target, self.names)
        self.model.to(self.process.device)

    def __call__(self, examples: list[Any], batch_size: int) -> Any:
        from distributed_tune.config import pad_multiple
        from distributed_tune.data import tokenize
        from distributed_tune.evaluation import predict_distributed

        cfg, task = self.target.cfg, self.target.cfg.task_spec
        data = tokenize(examples, self.tokenizer, cfg.data.max_length, None, task.regression)
        return predict_distributed(self.process, self.model, data, batch_size, pad_multiple(cfg), task.regression).outputs


def write_submission(target: Any, out_dir: Path, batch_size: int) -> int:
    """The task's test splits -> GLUE submission files."""
    from distributed_tune.files import atomic_write_text, make_dirs

    task = target.cfg.task_spec
    data = task.read(target.cfg.data)
    if not data.test:
        raise DataError(f"data.source={target.cfg.data.source}: no unlabeled test split for {task.name} (GLUE's "
                        "test.tsv, or the hub copy); point data.source at GLUE's files or use hub")
    from distributed_tune.evaluation import predictions

    make_dirs(out_dir)
    predictor = Predictor(target)  # one model load for every test split (MNLI has two)
    for split, examples in data.test.items():
        preds = predictions(task, predictor(examples, batch_size))
        values = [task.submission_value(p, predictor.names) for p in preds]
        lines = ["index\tprediction"] + [f"{e.idx}\t{v}" for e, v in zip(examples, values)]
        path = out_dir / task.submission[split]
        atomic_write_text(path, "\n".join(lines) + "\n")
        print(f"wrote {path} ({len(examples)} predictions of {split})")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="RUN_OR_MODEL")
    ap.add_argument("sentences", nargs="*", metavar="SENTENCE")
    ap.add_argument("--file", help="text file, one sentence (or TAB-separated pair) per line")
    ap.add_argument("--out", help="write JSON lines here instead of printing")
    ap.add_argument("--glue-submission", metavar="DIR", help="predict the task's test split(s) into GLUE's files")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                    help="config override, e.g. --set data.source=/data/glue/SST-2 (repeatable)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"sentences per forward pass ({DEFAULT_BATCH})")
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    from distributed_tune.evaluation import prediction_row
    from distributed_tune.files import atomic_write_jsonl, make_dirs

    target = resolve_target(args.target, args.overrides)
    if args.glue_submission:
        if args.sentences or args.file or args.out:
            raise ConfigError("--glue-submission predicts the task's test sets: leave out sentences, --file and --out")
        return write_submission(target, Path(args.glue_submission).expanduser(), args.batch_size)
    task = target.cfg.task_spec
    lines = read_lines(args)
    examples = to_examples(lines, max(1, len(task.text_fields)))
    predictor = Predictor(target)
    outputs, names = predictor(examples, args.batch_size), predictor.names
    rows = []
    for i, ((line, text), output) in enumerate(zip(lines, outputs)):
        row = prediction_row(task, names, output, index=i, sentence=text)
        if line is not None:
            row["line"] = line
        rows.append(row)
    if args.out:
        out = Path(args.out).expanduser()
        make_dirs(out.parent)
        atomic_write_jsonl(out, rows)
        if task.regression:
            print(f"wrote {len(rows)} predictions to {out}")
        else:
            counts = ", ".join(f"{sum(r['pred'] == k for r in rows)} {n}" for k, n in enumerate(names))
            print(f"wrote {len(rows)} predictions to {out} ({counts})")
    else:
        for r in rows:
            value = f"{r['pred']:.4f}" if task.regression else f"{r['pred_label']}\t{r['prob']:.4f}"
            print(f"{value}\t{r['sentence']}")
    return 0
