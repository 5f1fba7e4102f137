"""GPU check: a BERT-base-sized random model on CoLA under DeepSpeed ZeRO-2, fp16 and bf16, one GPU.

    python benchmarks/gpu_check.py                                    # one NVIDIA GPU, no internet needed
    python benchmarks/gpu_check.py --data ../shared/data/cola --steps 300 --batch 32
    python benchmarks/gpu_check.py --cpu --steps 5 --layers 2         # smoke test of this script, no GPU (bf16)

Not a test: it prints numbers. It builds a randomly initialised BERT-base (BertConfig defaults: 12
layers, hidden 768, vocabulary 30522; a WordPiece tokenizer trained on the CoLA training sentences,
so nothing is downloaded) in a temporary folder, then runs distributed_tune's single-process
DeepSpeed fallback (plain python, a world of one, ZeRO-2) once per precision, each in its own
process. Each training process reports its own peak GPU memory and DeepSpeed's loss scale; step
time, samples/s and tokens/s come from the run's metrics.jsonl (the first logging window, which
holds the CUDA warm-up, is left out). The table is printed and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cola"
TRAIN_SENTENCES = 8551  # CoLA 1.1 in_domain_train.tsv


def build_model(folder: Path, data: Path, layers: int) -> Path:
    """A random BERT-base (BertConfig defaults) with a WordPiece vocabulary learnt from CoLA."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    lines = (data / "raw" / "in_domain_train.tsv").read_text(encoding="utf-8").splitlines()
    sentences = [line.split("\t")[3] for line in lines]
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
    """One training run in this process (a DeepSpeed world of one); writes what only it can see."""
    sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .` too
    import torch

    from distributed_tune.config import load_config
    from distributed_tune.train import Recipe

    cfg = load_config(None, spec["overrides"])
    recipe = Recipe(cfg)
    start = time.perf_counter()
    recipe.run()
    engine = recipe.model  # the DeepSpeedEngine accelerate built
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None) if cfg.precision == "fp16" else None
    out = {
        "wall_s": time.perf_counter() - start,
        "engine": type(engine).__name__,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_scale_final": float(scale) if scale is not None else None,
        "skipped_steps": getattr(engine, "skipped_steps", None),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    Path(spec["result"]).write_text(json.dumps(out))


def summarise(run_dir: Path, result: dict[str, Any], precision: str, batch: int, initial_scale_power: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "samples_per_s" in r]
    timed = steps[1:] or steps  # the first window holds CUDA/cuBLAS warm-up
    samples_per_s = statistics.median(r["samples_per_s"] for r in timed)
    dev = [r for r in records if r.get("split") == "dev"]
    summary = next((r for r in reversed(records) if r.get("event") == "train_summary"), {})
    scale = result["loss_scale_final"]
    return {
        "precision": precision,
        "steps": steps[-1]["optimizer_step"] if steps else 0,
        "step_ms": 1000.0 * batch / samples_per_s,
        "samples_per_s": samples_per_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gpu_gib": result["peak_gpu_bytes"] / 2**30 if result["peak_gpu_bytes"] is not None else None,
        "peak_rss_gib": result["peak_rss_bytes"] / 2**30,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "dev_mcc": dev[-1]["mcc"] if dev else None,
        "mfu": summary.get("mfu"),  # train.py logs it on CUDA, over the whole run (warm-up included)
        "loss_scale": (f"2^{initial_scale_power} -> {scale:g}, {result['skipped_steps']} skipped steps"
                       if scale is not None else "n/a"),
        "engine": result["engine"],
        "device": result["device"],
        "wall_s": result["wall_s"],
    }


def print_table(rows: list[dict]) -> None:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    print("\n| precision | steps | step time (ms) | samples/s | tokens/s | peak GPU mem (GiB) | peak RSS (GiB) "
          "| MFU | first loss | final loss | dev MCC | fp16 loss scale |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['precision']} | {r['steps']} | {fmt(r['step_ms'], '.1f')} | {fmt(r['samples_per_s'], '.1f')} "
              f"| {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['peak_gpu_gib'], '.2f')} | {fmt(r['peak_rss_gib'], '.2f')} "
              f"| {fmt(r['mfu'], '.1%')} | {fmt(r['first_loss'], '.4f')} | {fmt(r['final_loss'], '.4f')} | {fmt(r['dev_mcc'], '.4f')} "
              f"| {r['loss_scale']} |")
    if rows:
        print(f"\ndevice: {rows[0]['device']}; engine: {rows[0]['engine']}; ZeRO-2, one process")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with CoLA's raw/*.tsv (default %(default)s)")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps per precision (default %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="sentences per step, one process (default %(default)s)")
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base; fewer for a smoke test)")
    ap.add_argument("--precisions", default=None, help="comma-separated, of fp16,bf16 (default: both; --cpu: bf16)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (bf16 only): checks the script, not the GPU")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the model and runs here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    precisions = (args.precisions or ("bf16" if args.cpu else "fp16,bf16")).split(",")
    bad = [p for p in precisions if p not in ("fp16", "bf16")]
    if bad:
        ap.error(f"--precisions: {', '.join(bad)} is not one of fp16, bf16")
    if args.cpu and "fp16" in precisions:
        ap.error("--cpu runs bf16 only: DeepSpeed has no fp16 on the CPU")
    if args.steps < 1 or args.batch < 1 or args.layers < 1:
        ap.error("--steps, --batch and --layers must be at least 1")
    if not (args.data / "raw" / "in_domain_train.tsv").is_file():
        print(f"error: --data {args.data} holds no raw/in_domain_train.tsv; point it at the CoLA folder", file=sys.stderr)
        return 2
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible: this check needs one NVIDIA GPU "
              "(for a smoke test of the script itself: --cpu --steps 5 --layers 2)", file=sys.stderr)
        return 2

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    model = build_model(work / "bert-base-random", args.data, args.layers)
    steps_per_epoch = TRAIN_SENTENCES // args.batch
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # the fallback sets up its own world of one
        env.pop(key, None)
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    initial_scale_power = 16
    rows = []
    for precision in precisions:
        run_dir = work / f"run-{precision}"
        result = work / f"result-{precision}.json"
        overrides = [
            f"output_dir={run_dir}", "overwrite=true", f"model.name={model}", f"data.source={args.data}",
            f"data.cache_dir={work / 'cache'}", f"precision={precision}", "distributed.zero_stage=2",
            f"train.epochs={math.ceil(args.steps / steps_per_epoch)}", f"train.max_steps={args.steps}",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.lr=5e-5",
            f"train.log_every={max(1, min(10, args.steps // 5))}", "train.eval_every=0",
            f"fp16.initial_scale_power={initial_scale_power}",
        ]
        print(f"[gpu_check] {precision}: {args.steps} steps of ZeRO-2 -> {run_dir}", flush=True)
        spec = json.dumps({"overrides": overrides, "result": str(result)})
        proc = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, cwd=REPO)
        if proc.returncode != 0:
            print(f"error: the {precision} run failed (exit {proc.returncode}); its output is above", file=sys.stderr)
            return 1
        rows.append(summarise(run_dir, json.loads(result.read_text()), precision, args.batch, initial_scale_power))
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nmodel and runs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
