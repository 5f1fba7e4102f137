"""GPU check: a BERT-base-sized random model on CoLA, one GPU, fp32 / bf16 / fp16 through the real loop.

    python benchmarks/gpu_check.py --data /data/cola                          # one NVIDIA GPU, no internet needed
    python benchmarks/gpu_check.py --data /data/cola --steps 300 --set train.cuda_graphs=true
    python benchmarks/gpu_check.py --data /data/cola --cpu --steps 5 --layers 2 --precisions fp32 bf16   # smoke test

Not a test: it prints numbers. It builds a randomly initialised BERT-base (BertConfig defaults: 12
layers, hidden 768, vocabulary 30522; a WordPiece tokenizer trained on the CoLA training sentences,
so nothing is downloaded) in a temporary folder, then trains it with distributed_tune's loop on one
device (plain data parallel of one; `--set distributed.zero_stage=2` for DeepSpeed), once per
precision, each in its own process. Each process reports step time, samples/s, tokens/s (real
tokens, padding excluded), MFU, peak GPU memory, and for fp16 the final loss scale and the optimizer
steps skipped for overflow. The table is printed and written to --out as JSON. --data: a folder with
CoLA's raw TSVs, or the official URL (the default; downloaded once).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"


def build_model(folder: Path, data: str, cache: Path, layers: int) -> Path:
    """A random BERT-base (BertConfig defaults) with a WordPiece vocabulary learnt from CoLA."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    from distributed_tune.config import load_config

    hf_logging.disable_progress_bar()
    cfg = load_config(None, [f"data.source={data}", f"data.cache_dir={cache}"])
    sentences = [e.text[0] for e in cfg.task_spec.read(cfg.data).train]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # CoLA holds fewer distinct word pieces than 30522; the embedding keeps BERT-base's 30522 rows.
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    config = BertConfig(num_hidden_layers=layers, num_labels=2)  # vocab 30522, hidden 768, 12 heads
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"[gpu_check] random BERT: {layers} layers, {params / 1e6:.1f}M parameters, "
          f"tokenizer vocabulary {tok.get_vocab_size()} -> {folder}", flush=True)
    return folder


def worker(spec: dict[str, Any]) -> None:
    """One training run in this process; writes what only it can see (loss scale, peak memory)."""
    sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .` too
    import torch

    from distributed_tune.config import load_config
    from distributed_tune.distributed import resolve_accelerate_settings
    from distributed_tune.train import Recipe

    cfg = resolve_accelerate_settings(load_config(None, spec["overrides"]), frozenset())
    recipe = Recipe(cfg)
    start = time.perf_counter()
    recipe.run()
    scaler = getattr(recipe.accelerator, "scaler", None)
    engine = recipe.model
    ds_optimizer = getattr(engine, "optimizer", None)
    scale = None
    if cfg.precision == "fp16":
        scale = scaler.get_scale() if scaler is not None else getattr(ds_optimizer, "loss_scale", None)
    out = {
        "wall_s": time.perf_counter() - start,
        "engine": type(engine).__name__,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_scale_final": float(scale) if scale is not None else None,
        "skipped_steps": recipe.state.progress.skipped_steps,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    Path(spec["result"]).write_text(json.dumps(out))


def summarise(run_dir: Path, result: dict[str, Any], precision: str, batch: int, initial_scale_power: int) -> dict:
    from distributed_tune import records

    rows = records.read(run_dir / "metrics.jsonl")
    summary = next(reversed(records.events(rows, records.TRAIN_SUMMARY)), {})
    losses = [r["loss"] for r in records.train_steps(rows)]
    steps = summary.get("optimizer_steps", 0)
    scale = result["loss_scale_final"]
    return {
        "precision": precision,
        "steps": steps,
        "step_ms": 1000.0 * summary["train_seconds"] / steps if steps else None,
        "samples_per_s": summary.get("samples_per_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_seconds": summary.get("train_seconds"),
        "warmup_seconds": summary.get("warmup_seconds"),
        "peak_gpu_gib": result["peak_gpu_bytes"] / 2**30 if result["peak_gpu_bytes"] is not None else None,
        "peak_rss_gib": result["peak_rss_bytes"] / 2**30,
        "mfu": summary.get("mfu"),
        "loss_scale": (f"2^{initial_scale_power} -> {scale:g}, {result['skipped_steps']} skipped steps"
                       if scale is not None else "n/a"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "engine": result["engine"],
        "device": result["device"],
        "wall_s": result["wall_s"],
    }


def print_table(rows: list[dict]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = ["| precision | steps | step time (ms) | samples/s | tokens/s | MFU | peak GPU mem (GiB) | warm-up (s) "
             "| first loss | final loss | fp16 loss scale |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['steps']} | {fmt(r['step_ms'], '.2f')} | {fmt(r['samples_per_s'], '.1f')} "
                     f"| {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['mfu'] * 100 if r['mfu'] else None, '.1f')}% "
                     f"| {fmt(r['peak_gpu_gib'], '.2f')} | {fmt(r['warmup_seconds'], '.1f')} "
                     f"| {fmt(r['first_loss'], '.4f')} | {fmt(r['final_loss'], '.4f')} | {r['loss_scale']} |")
    if rows:
        lines.append(f"\ndevice: {rows[0]['device']}; engine: {rows[0]['engine']}; one process")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=OFFICIAL_URL, help="CoLA: a folder with the raw TSVs, or the official URL")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps per precision (default %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="sentences per step, one process (default %(default)s)")
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base; fewer for a smoke test)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no fp16): checks the script, not the GPU")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the model and runs here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.cpu and "fp16" in args.precisions:
        ap.error("--cpu runs fp32 and bf16 only: fp16 needs CUDA")
    if args.steps < 1 or args.batch < 1 or args.layers < 1:
        ap.error("--steps, --batch and --layers must be at least 1")
    sys.path.insert(0, str(REPO))
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible: this check needs one NVIDIA GPU "
              "(for a smoke test of the script itself: --cpu --steps 5 --layers 2 --precisions fp32 bf16)",
              file=sys.stderr)
        return 2

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    cache = work / "cache"
    model = build_model(work / "bert-base-random", args.data, cache, args.layers)
    steps_per_epoch = 8551 // args.batch
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a world of one
        env.pop(key, None)
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    initial_scale_power = 16
    rows = []
    for precision in args.precisions:
        run_dir = work / f"run-{precision}"
        result = work / f"result-{precision}.json"
        overrides = [
            f"output_dir={run_dir}", "overwrite=true", f"model.name={model}", f"data.source={args.data}",
            f"data.cache_dir={cache}", f"precision={precision}",
            f"train.epochs={math.ceil(args.steps / steps_per_epoch)}", f"train.max_steps={args.steps}",
            f"train.global_batch_size={args.batch}", "train.lr=5e-5", "train.eval_every=0",
            "train.select_best=false", f"train.log_every={max(1, min(50, args.steps // 5))}",
            f"fp16.initial_scale_power={initial_scale_power}", *args.overrides,
        ]
        print(f"[gpu_check] {precision}: {args.steps} steps -> {run_dir}", flush=True)
        spec = json.dumps({"overrides": overrides, "result": str(result)})
        proc = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, cwd=REPO)
        if proc.returncode != 0:
            print(f"error: the {precision} run failed (exit {proc.returncode}); its output is above", file=sys.stderr)
            return 1
        rows.append(summarise(run_dir, json.loads(result.read_text()), precision, args.batch, initial_scale_power))
    text = print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "table": text}, indent=1))
    print(f"\nmodel and runs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
