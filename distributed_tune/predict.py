"""Label sentences with a trained model: acceptable or unacceptable, with a probability.

    python -m distributed_tune predict runs/cola "The sailors rode the breeze clear of the rocks." "Him saw she."
    python -m distributed_tune predict runs/cola --file sentences.txt --out predictions.jsonl
    cat sentences.txt | python -m distributed_tune predict path/to/save_pretrained_folder

RUN_OR_MODEL is a run directory (its model/ folder is used) or any save_pretrained folder, also
one trained under ZeRO-3 (the exported folder holds the gathered weights). Sentences come from
the arguments, else --file (one per line, blank lines skipped), else stdin. Runs batched, on the
GPU if there is one, else on the CPU. Prints `label<TAB>probability of that label<TAB>sentence`
per sentence, or writes JSON lines to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distributed_tune.data import Example
from distributed_tune.errors import ConfigError, DataError

DEFAULT_BATCH = 64


def read_sentences(args: argparse.Namespace) -> list[tuple[int | None, str]]:
    """(line number or None for arguments, sentence) in input order."""
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
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{where}: no sentences (only blank lines); put one sentence per line")
    return lines


def predict(target: Any, sentences: list[str], batch_size: int) -> tuple[Any, Any]:
    """(predicted labels, P(acceptable)) in input order, batched by length on one process."""
    from distributed_tune.data import tokenize
    from distributed_tune.evaluate import SingleProcess, load_trained
    from distributed_tune.evaluation import predict_distributed

    model, tokenizer = load_trained(target)
    process = SingleProcess()
    model.to(process.device)
    # The label column is unused here; the same tokenize/collate path as evaluate gives the same numbers.
    data = tokenize([Example(s, 0, "predict", "") for s in sentences], tokenizer, target.max_length, None)
    return predict_distributed(process, model, data, batch_size, target.pad_to_multiple_of)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="RUN_OR_MODEL")
    ap.add_argument("sentences", nargs="*", metavar="SENTENCE")
    ap.add_argument("--file", help="text file, one sentence per line (default: the arguments, else stdin)")
    ap.add_argument("--out", help="write JSON lines here instead of printing")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"sentences per forward pass ({DEFAULT_BATCH})")
    return ap


def cmd_predict(argv: list[str]) -> int:
    from distributed_tune.evaluate import resolve_target
    from distributed_tune.evaluation import prediction_row, write_jsonl

    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    target = resolve_target(args.target)
    lines = read_sentences(args)
    preds, probs = predict(target, [s for _, s in lines], args.batch_size)
    rows = []
    for i, ((line, sentence), pred, prob) in enumerate(zip(lines, preds, probs)):
        row = prediction_row(pred, prob, index=i, sentence=sentence)
        row["prob"] = round(float(prob if pred == 1 else 1.0 - prob), 6)  # of the predicted label
        if line is not None:
            row["line"] = line
        rows.append(row)
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out, rows)
        n_ok = sum(r["pred"] for r in rows)
        print(f"wrote {len(rows)} predictions to {out} ({n_ok} acceptable, {len(rows) - n_ok} unacceptable)")
    else:
        for r in rows:
            print(f"{r['pred_label']}\t{r['prob']:.4f}\t{r['sentence']}")
    return 0
