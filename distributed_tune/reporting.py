"""What a training run tells the user and the run directory: metrics.jsonl, the console (a progress
bar in a terminal, plain lines in a log file), the experiment trackers, and the final block.

    report = Reporter(accelerator, cfg, run_dir, task, selection_split)
    report.start(derived, progress.optimizer_step, flops_per_token)
    report.micro_batch(loss, batch)                  # device-side sums, no host sync
    report.after_step(progress, lr, grad_norm, log)   # a metrics record (and a line) every log_every steps
    report.evaluation(progress, result)               # one record per split, one line
    report.summary(); report.final_block(outcome, progress, last_eval_step)

Only the main process writes and prints; the collective parts (the window's all-reduce) run on
every rank. Training time excludes evaluation and checkpointing (`evaluating()`, `paused()`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distributed_tune import model_card, records, summary, trackers
from distributed_tune.config import Config, Derived
from distributed_tune.console import Console, duration
from distributed_tune.model import peak_flops
from distributed_tune.records import MetricsLog
from distributed_tune.tasks import Task


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


class Window:
    """Training sums kept on the device (no host sync per micro-batch): loss, micro-batches,
    real tokens, padded tokens. Time spent evaluating or checkpointing is not training time."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.one = torch.ones((), dtype=torch.float64, device=device)
        self.start, self.paused = time.perf_counter(), 0.0
        self.totals = [0.0] * 4  # over the whole run, for the summary record
        self.train_seconds = 0.0

    def add(self, loss: torch.Tensor, mask: torch.Tensor, padded_tokens: int) -> None:
        self.sums += torch.stack([loss.double(), self.one, mask.sum().double(), self.one * padded_tokens])

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.paused += time.perf_counter() - t0

    def flush(self, accelerator: Any) -> tuple[list[float], float, float]:
        """Collective: (sums over all ranks, training seconds since the last flush, optimizer steps)."""
        sums = accelerator.reduce(self.sums, reduction="sum").tolist()
        elapsed = time.perf_counter() - self.start - self.paused
        steps = sums[1] / (accelerator.num_processes * accelerator.gradient_accumulation_steps)
        self.totals = [a + b for a, b in zip(self.totals, sums)]
        self.train_seconds += elapsed
        self.sums.zero_()
        self.start, self.paused = time.perf_counter(), 0.0
        return sums, elapsed, steps


class Reporter:
    """metrics.jsonl, the console and the trackers of one training run."""

    def __init__(self, accelerator: Any, cfg: Config, run_dir: Path, task: Task, selection_split: str) -> None:
        self.acc, self.cfg, self.run_dir, self.task, self.selection_split = accelerator, cfg, run_dir, task, selection_split
        self.is_main = accelerator.is_main_process
        self.log = MetricsLog(run_dir / "metrics.jsonl", self.is_main)
        self.out = Console(self.is_main, 0)  # plain lines until the bar knows its length
        self.eval_seconds = self.warmup_seconds = 0.0
        self.peak_flops = peak_flops(cfg.precision)

    def say(self, message: str) -> None:
        self.out.say(message)

    def start(self, derived: Derived, done_steps: int, flops_per_token: float) -> None:
        """The trackers and the progress bar (a resumed run's starts where it is)."""
        self.derived, self.flops_per_token = derived, flops_per_token
        trackers.start(self.acc, self.cfg, derived)
        self.out = Console(self.is_main, derived.total_steps, done_steps)

    def start_clock(self, warmup_seconds: float) -> None:
        """Training time starts now (after a compile's warm-up, which is reported apart)."""
        self.warmup_seconds = warmup_seconds
        self.window = Window(self.acc.device)

    # ------------------------------------------------------------------ training

    def micro_batch(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.window.add(loss, batch["attention_mask"], batch["input_ids"].numel())

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Not training time (a checkpoint being saved)."""
        return self.window.pause()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Not training time, and counted as evaluation time."""
        t0 = time.perf_counter()
        with self.window.pause():
            yield
        self.eval_seconds += time.perf_counter() - t0

    def after_step(self, p: Any, lr: float, grad_norm: Any, log: bool) -> None:
        """After optimizer step `p.optimizer_step`: a training record when `log` (a collective: every
        rank calls it with the same `log`), else the bar moves."""
        if p.optimizer_step == 1:
            self.log.event(records.FIRST_STEP, optimizer_step=1, startup_s=round(seconds_since_process_start(), 3),
                           world_size=self.derived.world_size)
        if not log:
            self.out.step(p.optimizer_step)
            return
        sums, elapsed, steps = self.window.flush(self.acc)
        record = {
            "optimizer_step": p.optimizer_step,
            "epoch": self.epoch_float(p),
            "loss": sums[0] / sums[1],
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": steps * self.derived.global_batch_size / elapsed,
            "tokens_per_s": sums[2] / elapsed,
            "padding_fraction": 1.0 - sums[2] / sums[3],
            "skipped_steps": p.skipped_steps,
        }
        if self.peak_flops:
            record["mfu"] = self.mfu(sums[2] / elapsed)
        self.log.train(**record)
        trackers.log_train(self.acc, self.cfg, record)
        self.out.step(p.optimizer_step, record["loss"], lr, record["samples_per_s"])

    def epoch_float(self, p: Any) -> float:
        """Epochs done, fractional (optimizer steps / steps per epoch), as the HF Trainer logs it."""
        return round(p.optimizer_step / self.derived.steps_per_epoch, 4)

    def evaluation(self, p: Any, result: dict[str, Any]) -> None:
        """One metrics record per split (rank 0 holds `result`), the trackers, one line."""
        if not self.is_main:
            return
        for split, metrics in result.items():
            if split == "outputs":
                continue
            self.log.evaluation(split=split, **metrics, optimizer_step=p.optimizer_step, epoch=self.epoch_float(p),
                                world_size=self.derived.world_size)
            trackers.log_eval(self.acc, self.cfg, split, metrics, p.optimizer_step)
        main = self.task.main_metric
        sel = result[self.selection_split]
        parts = [f"{s} {result[s][main]:.4f}" for s in self.task.reported_splits()
                 if s != self.selection_split and s in result]
        warn = "  (collapsed: one class predicted)" if sel["collapsed"] else ""
        self.say(f"eval step {p.optimizer_step}: {self.selection_split} {main} {sel[main]:.4f}"
                 + (f" ({', '.join(parts)})" if parts else "") + f"; n={sel['n']}{warn}")

    # ------------------------------------------------------------------ the end

    def summary(self, p: Any) -> None:
        """Throughput over the whole attempt (training time only, evaluation excluded). Collective."""
        w, d = self.window, self.derived
        w.flush(self.acc)  # the last, partial window (early stop, preemption)
        self.out.close()
        if not w.train_seconds or not w.totals[1]:
            return
        _, micro, real, padded = w.totals
        samples = micro * d.micro_batch_size
        self.log.event(records.TRAIN_SUMMARY, optimizer_step=p.optimizer_step,
                       optimizer_steps=int(micro / (d.world_size * d.gradient_accumulation_steps)),
                       samples=int(samples), train_seconds=round(w.train_seconds, 3),
                       eval_seconds=round(self.eval_seconds, 3), warmup_seconds=round(self.warmup_seconds, 3),
                       samples_per_s=samples / w.train_seconds, tokens_per_s=real / w.train_seconds,
                       padding_fraction=1.0 - real / padded, world_size=d.world_size,
                       skipped_steps=p.skipped_steps, **self._device_stats(real / w.train_seconds))
        self.say(f"trained {int(samples)} samples in {w.train_seconds:.1f} s: {samples / w.train_seconds:.1f} "
                 f"samples/s, {real / w.train_seconds:.0f} tokens/s, padding {1.0 - real / padded:.1%}")

    def stopped(self, p: Any, signum: int | None, name: str) -> None:
        self.log.event(records.STOPPED, signal=name, optimizer_step=p.optimizer_step)
        self.say(f"stop signal {signum} ({name}): checkpoint saved at optimizer step {p.optimizer_step}; "
                 "resume with --resume")

    def finished(self, p: Any, outcome: str) -> None:
        """The last line of a complete run (a sweep tells finished runs from interrupted ones by it)."""
        self.log.event(records.FINISHED, outcome=outcome, optimizer_step=p.optimizer_step,
                       selection=f"{self.selection_split}/{self.task.main_metric}",
                       best_value=p.best_value, best_step=p.best_step)

    def final_block(self, outcome: str, p: Any, last_eval_step: int) -> None:
        """What a user wants at the end: the kept model's evaluation per split, where it is, what next."""
        if not self.is_main:
            return
        main = self.task.main_metric
        info_path = self.run_dir / "model" / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        step = info.get("optimizer_step", p.optimizer_step)
        rows = records.read(self.log.path)

        def splits_at(at: int) -> str:
            return ", ".join(f"{s} {r[main]:.4f}" for s, r in records.at_step(rows, at).items() if main in r)

        def flag(at: int) -> str:  # the evaluation lines' warning, where the selection split was one class
            collapsed = records.at_step(rows, at).get(self.selection_split, {}).get("collapsed")
            return "  (collapsed: one class predicted)" if collapsed else ""

        last = splits_at(last_eval_step) if step != last_eval_step else ""
        lines = [
            f"finished ({outcome.replace('_', ' ')}) after {p.optimizer_step} optimizer steps in "
            f"{duration(self.out.elapsed())} (training {duration(self.window.train_seconds)}, "
            f"evaluation {duration(self.eval_seconds)})",
            f"model/ = step {step} ({info.get('selected', 'final')}): {main} {splits_at(step)}{flag(step)}",
            *([f"last evaluation (step {last_eval_step}, the honest number when model/ was selected on the "
               f"reported split): {main} {last}{flag(last_eval_step)}"] if last else []),
            f"model:    {self.run_dir / 'model'}  (save_pretrained folder; transformers.pipeline loads it)",
            f"evaluate: python -m distributed_tune evaluate {self.run_dir}",
        ]
        for line in lines:
            self.say(line)

    def end_of_attempt(self) -> None:
        """Rank 0, when an attempt ends (finished, stopped early, or stopped for a signal):
        results.json for scripts, and model/'s card again, now with the training time."""
        if not self.is_main:
            return
        summary.write_results(self.run_dir)
        if (self.run_dir / "model").is_dir():
            model_card.write(self.run_dir / "model", self.run_dir)

    def close(self) -> None:
        self.out.close()

    def _device_stats(self, tokens_per_s: float) -> dict[str, float]:
        """MFU and this rank's peak memory on CUDA; nothing on CPU."""
        if not torch.cuda.is_available():
            return {}
        stats = {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
        if self.peak_flops:
            stats["mfu"] = self.mfu(tokens_per_s)
        return stats

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOP utilisation over all GPUs; padded tokens are computed too, but only real
        ones count as useful work."""
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.derived.world_size)
