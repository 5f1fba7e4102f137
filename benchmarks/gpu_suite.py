"""One GPU session, one script: prove every CUDA path, then measure speed and MCC against the HF Trainer.

    python benchmarks/gpu_suite.py --data /data/cola/raw --minilm /models/all-MiniLM-L6-v2 --out results/
    python benchmarks/gpu_suite.py --data /data/cola/raw --minilm M --out /tmp/s --cpu --smoke   # the script, on CPU

Parts, in order of what matters most when time runs out (each writes its results at once):
  proofs   the tiny test BERT on the test data (tests/cola_data.py): plain fp16 (GradScaler) and bf16,
           DeepSpeed ZeRO-2 fp16/bf16, ZeRO-3 bf16 and fp16 + optimizer offload, ZeRO-2 bf16 + offload;
           each a short run (checkpoints, the dev evaluation: n = 527 + 516 = 1043), then its export
           reloaded by `evaluate` on one process and compared with the run's own numbers;
  speed    BERT-base-sized random weights, CoLA, 3 epochs, batch 32, bf16: distributed_tune eager and
           with CUDA graphs vs the Trainer (dynamic padding + group_by_length; pad-128 over 200 steps);
  mcc      the same with the pretrained MiniLM: the dev MCC of each setup;
  check    benchmarks/gpu_check.py: fp32 / bf16 / fp16 step time, MFU, peak memory, fp16 loss scale.
Writes OUT/summary.md (the tables), OUT/results.json (everything) and OUT/logs.txt (the tail of each
command's output). --budget stops starting parts that would not finish in time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
        self.start = time.monotonic()
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        self.sections: list[str] = []
        self.logs: list[str] = []

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if self.args.cpu:
            env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        return env

    def sh(self, name: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=self.env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            proc = subprocess.CompletedProcess(cmd, 124, out, err + f"\n[gpu_suite] timed out after {timeout:.0f} s")
        took = time.monotonic() - t0
        self.logs.append(f"===== {name} ({took:.1f} s, exit {proc.returncode}): {shlex.join(cmd)}\n"
                         f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}\n")
        print(f"[gpu_suite] {name}: exit {proc.returncode} in {took:.1f} s ({self.left():.0f} s left)", flush=True)
        return proc

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "summary.md").write_text("\n\n".join(self.sections) + "\n")
        (self.out / "logs.txt").write_text("\n".join(self.logs)[-15_000_000:])

    # ------------------------------------------------------------------ parts

    def environment(self) -> None:
        import torch

        info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
        for pkg in ("transformers", "accelerate", "deepspeed"):
            try:
                info[pkg] = __import__(pkg).__version__
            except Exception as e:  # a missing or broken package is a finding, not a crash
                info[pkg] = f"unavailable ({type(e).__name__}: {e})"
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if not self.args.cpu else None
        info["nvidia_smi"] = smi.stdout.strip() if smi is not None else "cpu run"
        self.results["environment"] = info
        self.sections.append("## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()))
        self.save()

    def proofs(self) -> None:
        from cola_data import write_cola
        from tiny_model import make_tiny_bert

        data = write_cola(self.work / "testdata")
        model = make_tiny_bert(self.work / "tiny-bert", data)
        cache = self.work / "cache"
        fp16 = [] if self.args.cpu else ["precision=fp16"]
        runs = {
            "plain fp16" if not self.args.cpu else "plain fp32": [*fp16],
            "plain bf16": ["precision=bf16"],
            "ZeRO-2 fp16" if not self.args.cpu else "ZeRO-2 fp32": ["distributed.zero_stage=2", *fp16],
            "ZeRO-2 bf16 + optimizer offload": ["distributed.zero_stage=2", "precision=bf16",
                                                "distributed.offload_optimizer=cpu"],
            "ZeRO-3 bf16": ["distributed.zero_stage=3", "precision=bf16"],
            "ZeRO-3 fp16 + optimizer offload" if not self.args.cpu else "ZeRO-3 fp32 + optimizer offload": [
                "distributed.zero_stage=3", "distributed.offload_optimizer=cpu", *fp16],
        }
        steps = 12 if self.args.smoke else 60

        def one(name: str, extra: list[str], port: int) -> dict[str, Any]:
            run = self.work / "proofs" / name.replace(" ", "_").replace("+", "")
            common = [f"model.name={model}", f"data.source={data}", f"data.cache_dir={cache}", f"output_dir={run}",
                      f"train.max_steps={steps}", "train.global_batch_size=32", "train.lr=5e-3",
                      "train.checkpoint_every=10", "train.eval_every=20", "train.log_every=5", *extra]
            cmd = [sys.executable, "-m", "distributed_tune", "launch", "--gpus", "1", "--port", str(port), *common]
            t0 = time.monotonic()
            proc = self.sh(f"proof {name}", cmd, timeout=min(300, max(60, self.left() - 30)))
            row: dict[str, Any] = {"run": name, "exit": proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
            if proc.returncode != 0:
                row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                return row
            from distributed_tune import records

            rows = records.read(run / "metrics.jsonl")
            last = {r["split"]: r for r in records.evaluations(rows)}
            summary = next(iter(records.events(rows, records.TRAIN_SUMMARY)), {})
            ckpt = sorted((run / "checkpoints").iterdir())[-1]
            row.update(n={s: r["n"] for s, r in last.items()}, mcc=last["dev"]["mcc"],
                       engine="DeepSpeed" if (ckpt / "pytorch_model").is_dir() else "torch",
                       shards=sorted(p.name for p in (ckpt / "pytorch_model").iterdir())
                       if (ckpt / "pytorch_model").is_dir() else [],
                       skipped_steps=summary.get("skipped_steps"), peak_memory_gib=summary.get("peak_memory_gib"),
                       samples_per_s=summary.get("samples_per_s"))
            evaluated = self.sh(f"evaluate {name}", [sys.executable, "-m", "distributed_tune", "evaluate", str(run)],
                                timeout=120)
            if evaluated.returncode == 0:
                mine = json.loads((run / "eval" / "metrics.json").read_text())["splits"]
                row["export_reloaded"] = {"n": mine["dev"]["n"], "mcc": mine["dev"]["mcc"],
                                          "same_as_logged": abs(mine["dev"]["mcc"] - last["dev"]["mcc"]) < 1e-3}
            else:
                row["export_reloaded"] = (evaluated.stderr.strip().splitlines() or ["?"])[-1][:300]
            return row

        from distributed_tune.distributed import free_port

        rows = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1 if self.args.cpu else 3) as pool:
            futures = [pool.submit(one, name, extra, free_port()) for name, extra in runs.items()]
            for f in futures:
                rows.append(f.result())
                self.results["proofs"] = rows
                self.save()
        lines = ["## Proofs (tiny BERT on the test data, one GPU)", "",
                 "| run | exit | engine | eval n (in / out / dev) | dev MCC | export reloaded: n, MCC, same | "
                 "skipped fp16 steps | s |", "| --- | ---: | --- | --- | ---: | --- | ---: | ---: |"]
        for r in rows:
            if r["exit"] != 0:
                lines.append(f"| {r['run']} | {r['exit']} | - | - | - | {r.get('error')} | - | {r['seconds']} |")
                continue
            n = r["n"]
            ex = r["export_reloaded"]
            ex_s = f"{ex['n']}, {ex['mcc']:.4f}, {ex['same_as_logged']}" if isinstance(ex, dict) else ex
            lines.append(f"| {r['run']} | 0 | {r['engine']} | {n.get('in_domain_dev')} / {n.get('out_of_domain_dev')} / "
                         f"{n.get('dev')} | {r['mcc']:.4f} | {ex_s} | {r['skipped_steps']} | {r['seconds']} |")
        self.sections.append("\n".join(lines))
        self.save()

    def bench(self, key: str, title: str, model: str, setups: list[str], variants: list[str], lr: float) -> None:
        out = self.work / key
        cmd = [sys.executable, "benchmarks/bench_vs_trainer.py", "--model", model, "--data", str(self.args.data),
               "--cache", str(self.work / "cache-real"), "--seeds", "42", "--epochs", str(self.args.epochs),
               "--lr", str(lr), "--precisions", "bf16", "--setups", *setups, "--pad128-steps", "200",
               "--out", str(out)]
        for v in variants:
            cmd += ["--variant", v]
        if self.args.smoke:
            cmd += ["--quick", "--quick-steps", "20"]
        proc = self.sh(title, cmd, timeout=max(60, self.left() - 20))
        table = (out / "table.txt").read_text() if (out / "table.txt").is_file() else proc.stdout[-3000:]
        self.results[key] = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() \
            else {"exit": proc.returncode, "stderr": proc.stderr[-2000:]}
        self.sections.append(f"## {title}\n\n```\n{table.strip()}\n```\n\ncommand: `{shlex.join(cmd)}`")
        self.save()

    def speed(self) -> None:
        from gpu_check import build_model

        model = build_model(self.work / "bert-base-random", str(self.args.data), self.work / "cache-real",
                            1 if self.args.smoke else 12)
        self.bench("speed", "Speed: BERT-base-sized random weights, CoLA, 3 epochs, batch 32, bf16", str(model),
                   ["ours", "trainer", "pad128"], [*self.variants(), "foreach-adamw:train.fused_adamw=false"], lr=5e-5)

    def mcc(self) -> None:
        self.bench("mcc", "Dev MCC: all-MiniLM-L6-v2 (pretrained), CoLA, 3 epochs, batch 32, bf16, lr 1e-4",
                   str(self.args.minilm), ["ours", "trainer"], self.variants(), lr=1e-4)

    def variants(self) -> list[str]:
        graphs = "graphs:train.cuda_graphs=true,data.pad_to_multiple_of=16" if not self.args.cpu else \
            "compiled:train.compile=true,data.pad_to_multiple_of=16"
        return ["eager:", graphs]

    def check(self) -> None:
        precisions = ["fp32", "bf16"] if self.args.cpu else ["fp32", "bf16", "fp16"]
        steps = "5" if self.args.smoke else "300"
        cmd = [sys.executable, "benchmarks/gpu_check.py", "--data", str(self.args.data), "--steps", steps,
               "--precisions", *precisions, "--out", str(self.work / "gpu_check.json"),
               "--workdir", str(self.work / "gpu_check")]
        if self.args.cpu:
            cmd += ["--cpu", "--layers", "1"]
        proc = self.sh("gpu_check", cmd, timeout=max(60, self.left() - 10))
        path = self.work / "gpu_check.json"
        data = json.loads(path.read_text()) if path.is_file() else {"table": proc.stderr[-2000:], "rows": []}
        self.results["gpu_check"] = data["rows"]
        self.sections.append(f"## gpu_check.py (BERT-base-sized random weights, one process, eager)\n\n{data['table']}\n\n"
                             f"command: `{shlex.join(cmd)}`")
        self.save()


PARTS = {"proofs": 150, "speed": 300, "mcc": 150, "check": 120}  # expected seconds on an H100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="CoLA's raw TSVs (the real release)")
    ap.add_argument("--minilm", type=Path, required=True, help="the all-MiniLM-L6-v2 model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a check of this script)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a check of this script")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible: this suite needs one NVIDIA GPU (a check of the script itself: "
              "--cpu --smoke)", file=sys.stderr)
        return 2
    suite = Suite(args)
    suite.environment()
    for part in args.parts:
        if suite.left() < PARTS[part] * 0.5 and not args.smoke:
            suite.sections.append(f"## {part}: skipped ({suite.left():.0f} s left of the budget)")
            continue
        try:
            getattr(suite, part)()
        except Exception:  # one broken part must not cost the others
            import traceback

            suite.results[f"{part}_error"] = traceback.format_exc()
            suite.sections.append(f"## {part}: FAILED\n\n```\n{traceback.format_exc()[-3000:]}\n```")
            suite.save()
    suite.save()
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
