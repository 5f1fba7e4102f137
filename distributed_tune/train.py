"""The training recipe: one loop for CPU, one GPU, DDP and every DeepSpeed ZeRO stage.

    python -m distributed_tune --config configs/cola_bert_base.yaml                       # 1 process
    accelerate launch --multi_gpu --num_processes 4 -m distributed_tune --config ...      # 4 processes
    python -m distributed_tune launch --config ... --gpus 8                               # rendered setup

setup -> (resume) -> for each optimizer step: accumulate -> backward -> clip -> step -> schedule
-> log / evaluate / checkpoint at step boundaries -> final evaluation -> save_pretrained.
Predictions are gathered with their example indices on every rank, and rank 0 checks that each
dev example was predicted exactly once before it computes MCC.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune import checkpoint
from distributed_tune.config import Config, Derived, derive, dump_resolved
from distributed_tune.data import (
    DEV,
    IN_DOMAIN,
    LABELS,
    OUT_OF_DOMAIN,
    CoLA,
    collate,
    eval_shard,
    global_batches,
    load_cola,
    rank_micro_batches,
    tokenize,
)
from distributed_tune.distributed import build_accelerator
from distributed_tune.errors import RunDirError, TrainingError
from distributed_tune.metrics import MetricsLog, classification_metrics
from distributed_tune.model import build_optimizer, build_scheduler, load_model, load_tokenizer

EVAL_BATCH = 128


def micro_batch_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """Dropout seed of one micro-batch: the same whatever the world size and accumulation."""
    return int(np.random.SeedSequence([seed, epoch, step, micro]).generate_state(1)[0])


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    optimizer_step: int = 0  # optimizer steps done in total
    best_mcc: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


class StopSignal:
    """SIGUSR1/SIGTERM (SLURM's warning before preemption or the time limit) set a flag; the loop
    turns it into a collective decision at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum


class Recipe:
    """One fine-tuning job. `Recipe(cfg).run()` is all the CLI does."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator = acc = build_accelerator(cfg)
        self.is_main = acc.is_main_process
        self.run_dir = checkpoint.refuse_used_run_dir(cfg)
        cache = Path(cfg.data.cache_dir).expanduser()
        # Download, read and tokenize on the local main process first; the others hit its cache.
        with acc.local_main_process_first():
            self.cola: CoLA = load_cola(cfg.data)
            self.tokenizer = load_tokenizer(cfg.model)
            self.train_data = tokenize(self.cola.train, self.tokenizer, cfg.data.max_length, cache)
            self.dev_data = tokenize(self.cola.dev, self.tokenizer, cfg.data.max_length, cache)
        self.derived: Derived = derive(cfg, acc.num_processes, len(self.train_data))

        torch.manual_seed(cfg.seed)  # the new classifier head is initialised from this
        model = load_model(cfg.model, self.tokenizer.pad_token_id)
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg.train))
        # After prepare: ZeRO-3 regroups the optimizer's parameters, and the schedule must drive
        # the groups the engine really steps.
        self.scheduler = build_scheduler(self.optimizer, self.derived.warmup_steps, self.derived.total_steps)
        self.progress = Progress()

        if self.is_main:
            if cfg.overwrite:
                checkpoint.clear_results(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main)
        if cfg.resume:
            self.resume()
        if self.is_main:
            dump_resolved(cfg, self.derived, self.run_dir / "config.yaml")
            (self.run_dir / "data_fingerprint.json").write_text(
                json.dumps({"counts": self.cola.counts(), "sha256": self.cola.fingerprint}, indent=1)
            )
            self.print(f"data {self.cola.counts()}; {self.derived.describe()}")

    def print(self, msg: str) -> None:
        if self.is_main:
            from rich.console import Console

            Console(stderr=True, highlight=False, markup=False).print(f"[distributed_tune] {msg}")

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "epoch": p.epoch,
            "step_in_epoch": p.step_in_epoch,
            "optimizer_step": p.optimizer_step,
            "best_mcc": p.best_mcc,
            "world_size": self.derived.world_size,
            "zero_stage": self.cfg.distributed.zero_stage,
            "global_batch_size": self.derived.global_batch_size,
            "scheduler": self.scheduler.state_dict(),
        }

    def save_checkpoint(self) -> Path:
        return checkpoint.save(
            self.accelerator, self.run_dir, self.progress.optimizer_step,
            self.trainer_state(), self.cfg.train.keep_checkpoints,
        )

    def resume(self) -> None:
        ckpt = checkpoint.latest_good(self.run_dir, warn=self.print)
        if ckpt is None:
            self.print(f"resume: no complete checkpoint in {self.run_dir}; starting fresh")
            return
        state = checkpoint.read_trainer_state(ckpt)
        zero = self.cfg.distributed.zero_stage
        if state["zero_stage"] != zero:
            raise RunDirError(
                f"{ckpt} was saved with distributed.zero_stage={state['zero_stage']} but this run uses "
                f"{zero}; resume with the same stage, or start a new run from its weights"
            )
        if zero is not None and state["world_size"] != self.derived.world_size:
            raise RunDirError(
                f"{ckpt} holds ZeRO state sharded over {state['world_size']} processes but this run has "
                f"{self.derived.world_size}; resume with {state['world_size']} processes, or start a new run "
                f"from consolidated weights (DeepSpeed's zero_to_fp32.py in {ckpt})"
            )
        if state["global_batch_size"] != self.derived.global_batch_size:
            raise RunDirError(
                f"{ckpt} was trained with train.global_batch_size={state['global_batch_size']}; "
                f"resume with the same global batch (now {self.derived.global_batch_size})"
            )
        self.accelerator.load_state(str(ckpt))
        self.scheduler.load_state_dict(state["scheduler"])
        p = self.progress
        p.epoch, p.step_in_epoch = state["epoch"], state["step_in_epoch"]
        p.optimizer_step, p.best_mcc = state["optimizer_step"], state["best_mcc"]
        self.print(f"resumed from {ckpt} (epoch {p.epoch}, optimizer step {p.optimizer_step})")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Predict every dev sentence once; rank 0 gets all predictions and computes MCC."""
        from accelerate.utils import gather_object

        acc, data = self.accelerator, self.dev_data
        shard = eval_shard(data.lengths, acc.process_index, acc.num_processes)
        self.model.eval()
        local: list[tuple[int, int, float]] = []
        for start in range(0, len(shard), EVAL_BATCH):
            index = shard[start : start + EVAL_BATCH]
            batch = collate(data, index, self.derived.pad_to_multiple_of)
            logits = self.model(
                input_ids=batch["input_ids"].to(acc.device),
                attention_mask=batch["attention_mask"].to(acc.device),
            ).logits.float()
            probs = torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()
            local += [(int(i), int(p > 0.5), float(p)) for i, p in zip(index, probs) if i >= 0]
        self.model.train()
        gathered = gather_object(local)
        result: dict[str, Any] = {}
        if self.is_main:
            indices = sorted(i for i, _, _ in gathered)
            if indices != list(range(len(data))):
                raise AssertionError(
                    f"gathered {len(indices)} predictions for {len(data)} dev examples "
                    f"({len(set(indices))} distinct): an example was lost or counted twice"
                )
            gathered.sort()
            preds = np.array([p for _, p, _ in gathered])
            probs = np.array([q for _, _, q in gathered])
            splits = np.array([e.split for e in self.cola.dev])
            for split in (IN_DOMAIN, OUT_OF_DOMAIN, DEV):
                m = np.ones(len(data), bool) if split == DEV else splits == split
                result[split] = classification_metrics(data.labels[m], preds[m])
            result["predictions"] = (preds, probs)
        return result

    def log_evaluation(self, result: dict[str, Any]) -> None:
        if not self.is_main:
            return
        p = self.progress
        for split in (IN_DOMAIN, OUT_OF_DOMAIN, DEV):
            self.log.write({"split": split, **result[split], "optimizer_step": p.optimizer_step,
                            "epoch": p.epoch, "world_size": self.derived.world_size})
        dev = result[DEV]
        warn = "  (collapsed: one class predicted)" if dev["collapsed"] else ""
        self.print(
            f"eval step {p.optimizer_step}: dev MCC {dev['mcc']:.4f} acc {dev['accuracy']:.4f} "
            f"(in-domain {result[IN_DOMAIN]['mcc']:.4f}, out-of-domain {result[OUT_OF_DOMAIN]['mcc']:.4f}; "
            f"n={dev['n']}){warn}"
        )
        self.write_predictions(*result["predictions"])

    def write_predictions(self, preds: np.ndarray, probs: np.ndarray) -> None:
        tmp = self.run_dir / "predictions.jsonl.tmp"
        with tmp.open("w") as f:
            for i, (e, pred, prob) in enumerate(zip(self.cola.dev, preds, probs)):
                f.write(json.dumps({
                    "index": i, "split": e.split, "source": e.source, "sentence": e.sentence,
                    "label": e.label, "pred": int(pred), "pred_label": LABELS[int(pred)],
                    "prob_acceptable": round(float(prob), 6),
                }) + "\n")
        tmp.replace(self.run_dir / "predictions.jsonl")

    # ------------------------------------------------------------------ training

    def boundary_consensus(self, stop: StopSignal, nonfinite: torch.Tensor) -> tuple[bool, bool]:
        """One small collective per optimizer step: did any rank get a signal or a bad loss?"""
        flags = torch.stack([
            torch.tensor(float(stop.received is not None), device=nonfinite.device), nonfinite.float()
        ])
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def run(self) -> dict[str, Any]:
        self.setup()
        cfg, acc, d, p = self.cfg, self.accelerator, self.derived, self.progress
        stop = StopSignal()
        rank, world, accum = acc.process_index, acc.num_processes, d.gradient_accumulation_steps
        device = acc.device
        # Running sums over the logging window, kept on the device (no sync per micro-batch):
        # [loss sum, micro-batches, real tokens, padded tokens].
        window = torch.zeros(4, dtype=torch.float64, device=device)
        window_start, window_steps = time.perf_counter(), 0
        last_eval_step = -1
        bar = self._progress_bar(d.total_steps, p.optimizer_step)
        self.model.train()

        while p.optimizer_step < d.total_steps and p.epoch < cfg.train.epochs:
            batches = global_batches(self.train_data.lengths, d.global_batch_size, cfg.seed, p.epoch,
                                     cfg.data.length_grouping)
            first_step = p.step_in_epoch  # > 0 when resuming mid-epoch
            micro_batches = rank_micro_batches(batches, rank, world, accum, first_step)
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            for i, index in enumerate(micro_batches):
                step_in_epoch = first_step + i // accum
                a = i % accum
                batch = collate(self.train_data, index, d.pad_to_multiple_of)
                del batch["index"]
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                torch.manual_seed(micro_batch_seed(cfg.seed, p.epoch, step_in_epoch, a * world + rank))
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                nonfinite |= ~torch.isfinite(loss)
                window += torch.stack([
                    loss.double(), torch.ones((), dtype=torch.float64, device=device),
                    batch["attention_mask"].sum().double(),
                    torch.tensor(batch["input_ids"].numel(), dtype=torch.float64, device=device),
                ])
                if not acc.sync_gradients:
                    continue

                # ---- optimizer-step boundary
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                p.optimizer_step += 1
                p.step_in_epoch = step_in_epoch + 1
                window_steps += 1
                stopping, bad_loss = self.boundary_consensus(stop, nonfinite)
                if bad_loss:
                    raise TrainingError(
                        f"non-finite loss at optimizer step {p.optimizer_step} (epoch {p.epoch}); "
                        f"last good checkpoint: {checkpoint.latest_good(self.run_dir, warn=lambda _: None)}; "
                        "lower train.lr or use bf16/fp32"
                    )
                if p.optimizer_step % cfg.train.log_every == 0 or p.optimizer_step == d.total_steps:
                    window = self._log_window(window, window_start, window_steps, lr, grad_norm)
                    window_start, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar[0].update(bar[1], completed=p.optimizer_step)
                epoch_end = p.step_in_epoch == d.steps_per_epoch
                done = p.optimizer_step >= d.total_steps
                if (cfg.train.eval_every and p.optimizer_step % cfg.train.eval_every == 0) or epoch_end or done:
                    if epoch_end:
                        p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    # Checkpoint before evaluating: building eval batches must not perturb what
                    # the resumed run would see (PLATFORM.md).
                    if (cfg.train.checkpoint_every and p.optimizer_step % cfg.train.checkpoint_every == 0) or epoch_end:
                        self.save_checkpoint()
                    self.log_evaluation(self.evaluate())
                    last_eval_step = p.optimizer_step
                elif cfg.train.checkpoint_every and p.optimizer_step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint()
                if stopping:
                    return self._preempted(stop)
                if done or epoch_end:
                    break
            else:  # an epoch that resumed at its very end has nothing left to run
                p.epoch, p.step_in_epoch = p.epoch + 1, 0

        if bar is not None:
            bar[0].stop()
        if last_eval_step != p.optimizer_step:
            self.log_evaluation(self.evaluate())
        self.save_model()
        acc.wait_for_everyone()
        acc.end_training()
        return {"optimizer_step": p.optimizer_step, "preempted": False}

    def _preempted(self, stop: StopSignal) -> dict[str, Any]:
        self.print(f"stop signal {stop.received}: saving at optimizer step {self.progress.optimizer_step}")
        self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        return {"optimizer_step": self.progress.optimizer_step, "preempted": True}

    def _log_window(self, window: torch.Tensor, start: float, steps: int, lr: float,
                    grad_norm: Any) -> torch.Tensor:
        sums = self.accelerator.reduce(window, reduction="sum").tolist()
        elapsed = time.perf_counter() - start
        samples = steps * self.derived.global_batch_size
        record = {
            "optimizer_step": self.progress.optimizer_step,
            "epoch": self.progress.epoch,
            "loss": sums[0] / sums[1],
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": sums[2] / elapsed,
            "padding_fraction": 1.0 - sums[2] / sums[3],
        }
        if self.is_main:
            self.log.write(record)
        return torch.zeros_like(window)

    def _progress_bar(self, total: int, done: int) -> Any:
        if not self.is_main:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       transient=False, redirect_stdout=False, redirect_stderr=False)
        task = bar.add_task("train", total=total, completed=done)
        bar.start()
        return bar, task

    # ------------------------------------------------------------------ export

    def save_model(self) -> Path:
        """The final weights as a `save_pretrained` folder (gathered under ZeRO-3) + tokenizer."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # collective under ZeRO-3; None off rank 0
        out = self.run_dir / "model"
        if self.is_main:
            tmp = self.run_dir / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = acc.unwrap_model(self.model)
            # save_pretrained pops tensors out of the dict it gets: hand it a copy.
            unwrapped.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        acc.wait_for_everyone()
        return out


def train(cfg: Config) -> dict[str, Any]:
    return Recipe(cfg).run()


