"""Peak memory per device and step time of full fine-tuning vs LoRA, with and without gradient
checkpointing, under ZeRO 0/2/3 and optimizer offload, for a Llama-architecture sequence classifier
with random weights (no hub needed), on CPU (peak RSS per process) or CUDA (max_memory_allocated).

    python benchmarks/scale.py                                  # ~110M params, 1 and 2 processes, CPU
    python benchmarks/scale.py --hidden 4096 --layers 32 --heads 32 --kv-heads 8 --intermediate 14336 \\
        --seq-len 512 --micro-batch 4 --worlds 8 --precision bf16 --only lora    # Llama-3-8B shape, 8 GPUs

Every row is its own launch (`torchrun --nproc_per_node W benchmarks/scale.py --worker ...`), so a
peak belongs to one setup. The worker goes through the package's own code: the Accelerator of
`distributed.build_accelerator` (under ZeRO-3 the model is built inside DeepSpeed's zero.Init, each
rank holding its shard), `lora.apply_lora`, `model.enable_gradient_checkpointing`, `build_optimizer`.
A step: forward + backward + optimizer step on `--micro-batch` random sequences of `--seq-len` tokens
per rank; the step time is the median after `--warmup` steps. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, model.lora.r or None, gradient checkpointing, ZeRO stage or None, offload optimizer)
ROWS_1 = [("full", None, False, None, False), ("full+gc", None, True, None, False),
          ("lora", 8, False, None, False), ("lora+gc", 8, True, None, False)]
ROWS_N = [("full", None, False, 0, False), ("full", None, False, 2, False), ("full", None, False, 3, False),
          ("full+gc", None, True, 3, False), ("full+offload", None, False, 3, True),
          ("lora", 8, False, 0, False), ("lora", 8, False, 2, False), ("lora", 8, False, 3, False),
          ("lora+gc", 8, True, 3, False), ("lora+offload", 8, False, 3, True)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--only", choices=["full", "lora"], default=None, help="only these rows (8B full does not fit)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(a: argparse.Namespace) -> None:
    """One row, in each of the launched processes; rank 0 prints a JSON line."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from distributed_tune import lora
    from distributed_tune.config import load_config
    from distributed_tune.distributed import build_accelerator
    from distributed_tune.model import build_optimizer, enable_gradient_checkpointing

    name, r, gc, zero, offload = json.loads(a.worker)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [f"train.global_batch_size={a.micro_batch * world}", f"train.micro_batch_size={a.micro_batch}",
                 f"precision={a.precision}", f"model.lora.r={'null' if r is None else r}",
                 f"train.gradient_checkpointing={str(gc).lower()}", "train.lr=1e-4", "model.name=random-llama",
                 f"distributed.zero_stage={'null' if zero is None else zero}",
                 f"distributed.offload_optimizer={'cpu' if offload else 'none'}"]
    cfg = load_config(None, overrides)
    acc = build_accelerator(cfg)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=max(a.seq_len, 128), num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.precision == "bf16" and zero is not None else torch.float32
    model = LlamaForSequenceClassification._from_config(config, dtype=dtype)  # zero.Init under ZeRO-3
    if gc:
        enable_gradient_checkpointing(model, lora=r is not None)
    model, _ = lora.apply_lora(model, cfg.model)
    total, trainable = lora.count_parameters(model)
    model, optimizer = acc.prepare(model, build_optimizer(model, cfg.train))
    model.train()
    g = torch.Generator().manual_seed(acc.process_index)
    times = []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(1, a.vocab, (a.micro_batch, a.seq_len), generator=g).to(acc.device)
        labels = torch.randint(0, 2, (a.micro_batch,), generator=g).to(acc.device)
        t0 = time.perf_counter()
        with acc.accumulate(model):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).tolist()
    if acc.is_main_process:
        print("ROW " + json.dumps({"name": name, "zero": zero, "world": world, "total": total, "trainable": trainable,
                                   "peak_gib": max(peaks), "step_s": statistics.median(times)}), flush=True)
    acc.wait_for_everyone()


def launch(a: argparse.Namespace, row: tuple, world: int, argv: list[str]) -> dict | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               HF_HUB_OFFLINE="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           str(Path(__file__).resolve()), *argv, "--worker", json.dumps(list(row))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        tail = [line for line in proc.stderr.splitlines() if "Error" in line][-1:] or proc.stderr.splitlines()[-1:]
        print(f"  {row[0]} ZeRO {row[3]} x{world}: failed ({' '.join(tail)[:200]})", file=sys.stderr)
        return None
    return rows[0]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.worker is not None:
        worker(a)
        return
    device = "CUDA max_memory_allocated" if _cuda() else "CPU peak RSS (the process, torch included)"
    lines = [f"Llama-architecture classifier: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads} KV), "
             f"intermediate {a.intermediate}, vocab {a.vocab}; {a.micro_batch} x {a.seq_len} tokens per rank per step, "
             f"{a.precision}; median of {a.steps} steps after {a.warmup}; memory: {device}, the largest rank.", "",
             "| setup | ZeRO | processes | parameters | trainable | peak memory / device (GiB) | step time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for world in a.worlds:
        for row in ROWS_1 if world == 1 else ROWS_N:
            if a.only and not row[0].startswith(a.only):
                continue
            got = launch(a, row, world, argv)
            if got is None:
                continue
            zero = "-" if got["zero"] is None else str(got["zero"]) + (" + offload opt." if row[4] else "")
            line = (f"| {got['name']} | {zero} | {world} | {got['total'] / 1e6:.1f}M | {got['trainable'] / 1e6:.2f}M | "
                    f"{got['peak_gib']:.2f} | {got['step_s']:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
