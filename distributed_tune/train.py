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

import contextlib
import dataclasses
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune import checkpoint
from distributed_tune.config import Config, Derived, derive, dump_resolved
from distributed_tune.data import (
    DEV,
    IN_DOMAIN,
    OUT_OF_DOMAIN,
    CoLA,
    collate,
    global_batches,
    load_cola,
    rank_micro_batches,
    tokenize,
)
from distributed_tune.distributed import build_accelerator
from distributed_tune.errors import TrainingError
from distributed_tune.evaluation import EVAL_BATCH, example_row, metrics_by_split, predict_distributed, write_jsonl
from distributed_tune.metrics import MetricsLog
from distributed_tune.model import (
    build_optimizer,
    build_scheduler,
    load_model,
    load_tokenizer,
    peak_flops,
    training_flops_per_token,
)
from distributed_tune.slurm import requeue_job

# Optimizer steps between checks for stop signals and non-finite losses (each is a host-device
# sync and a collective); checks also run before every checkpoint and evaluation.
CONSENSUS_EVERY = 10
NO_BAD_STEP = 2**62


def micro_batch_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """Dropout seed of one micro-batch: the same whatever the world size and accumulation."""
    return int(np.random.SeedSequence([seed, epoch, step, micro]).generate_state(1)[0])


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


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    optimizer_step: int = 0  # optimizer steps done in total
    best_mcc: float = -2.0  # below any MCC, so the first evaluation is the best so far
    best_step: int = -1
    evals_without_improvement: int = 0
    skipped_steps: int = 0  # fp16 overflows: optimizer steps that updated nothing

    def record_evaluation(self, mcc: float, patience: int) -> tuple[bool, bool]:
        """Best-model bookkeeping for one dev MCC: (a new best?, stop early now?). Only a strictly
        better MCC counts; `patience` 0 never stops."""
        if mcc > self.best_mcc:
            self.best_mcc, self.best_step, self.evals_without_improvement = mcc, self.optimizer_step, 0
            return True, False
        self.evals_without_improvement += 1
        return False, bool(patience) and self.evals_without_improvement >= patience


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
        self.flops_per_token = training_flops_per_token(model)
        self.peak_flops = peak_flops(cfg.precision)
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
        """Progress plus what a resume must match (world size, ZeRO stage, global batch)."""
        return {
            **dataclasses.asdict(self.progress),
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
        d = self.derived
        checkpoint.check_resumable(ckpt, state, self.cfg.distributed.zero_stage, d.world_size,
                                   d.global_batch_size, here=f"this run has {d.world_size}")
        self.accelerator.load_state(str(ckpt))
        if self.is_main:
            self.log.truncate_after(state["optimizer_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        p = self.progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
        self.print(f"resumed from {ckpt} (epoch {p.epoch}, optimizer step {p.optimizer_step})")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """Predict every dev sentence once (gathered, checked exactly once); rank 0 computes MCC."""
        preds, probs = predict_distributed(self.accelerator, self.model, self.dev_data, EVAL_BATCH,
                                           self.derived.pad_to_multiple_of)
        result: dict[str, Any] = {}
        if self.is_main:
            result = metrics_by_split(self.dev_data.labels, preds, [e.split for e in self.cola.dev], DEV)
            result["predictions"] = (preds, probs)
        return result

    def log_evaluation(self, result: dict[str, Any]) -> None:
        if not self.is_main:
            return
        p = self.progress
        for split in (IN_DOMAIN, OUT_OF_DOMAIN, DEV):
            self.log.write({"split": split, **result[split], "optimizer_step": p.optimizer_step,
                            "epoch": self.epoch_float(), "world_size": self.derived.world_size})
        dev = result[DEV]
        warn = "  (collapsed: one class predicted)" if dev["collapsed"] else ""
        self.print(
            f"eval step {p.optimizer_step}: dev MCC {dev['mcc']:.4f} acc {dev['accuracy']:.4f} "
            f"(in-domain {result[IN_DOMAIN]['mcc']:.4f}, out-of-domain {result[OUT_OF_DOMAIN]['mcc']:.4f}; "
            f"n={dev['n']}){warn}"
        )
        self.write_predictions(*result["predictions"])

    def write_predictions(self, preds: np.ndarray, probs: np.ndarray, path: Path | None = None) -> None:
        rows = (example_row(i, e, pred, prob) for i, (e, pred, prob) in enumerate(zip(self.cola.dev, preds, probs)))
        write_jsonl(path or self.run_dir / "predictions.jsonl", rows)

    # ------------------------------------------------------------------ training

    def boundary_consensus(self) -> tuple[bool, int | None]:
        """Collective: did any rank get a stop signal, and did any see a non-finite loss (at which
        optimizer step)? It syncs host and device, so it runs every CONSENSUS_EVERY steps and
        before anything is saved, not on every step."""
        flags = torch.stack([torch.tensor(float(self.stop.received or 0), device=self.first_bad.device),
                             self.first_bad.double()])
        gathered = self.accelerator.gather(flags).view(-1, 2)
        first_bad = int(gathered[:, 1].min())
        signals = [int(x) for x in gathered[:, 0].tolist() if x > 0]
        if signals and self.stop.received is None:
            self.stop.received = signals[0]  # rank 0 acts on (requeues for) what any rank received
        return bool(signals), (first_bad if first_bad < NO_BAD_STEP else None)

    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop signal / early stop); returns how it ended."""
        self.stop = StopSignal()  # first: a warning signal during the (long) setup must not kill us
        self.setup()
        p, d = self.progress, self.derived
        self.bar = self._progress_bar(d.total_steps, p.optimizer_step)
        self.window = Window(self.accelerator.device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=self.accelerator.device)
        self.last_eval_step = -1
        self.model.train()
        outcome = "done"
        while p.optimizer_step < d.total_steps and p.epoch < self.cfg.train.epochs:
            outcome = self.train_epoch()
            if outcome != "epoch_end":
                break
        if self.bar is not None:
            self.bar[0].stop()
        self._log_summary()
        if outcome == "preempted":
            return self._preempted()
        if self.last_eval_step != p.optimizer_step:
            self.after_evaluation(self.evaluate())
        if not self.cfg.train.select_best or not (self.run_dir / "model").exists():
            self.save_model(reason="final")
        self.accelerator.wait_for_everyone()
        # The last line of a complete run (a sweep tells finished seeds from interrupted ones by it).
        self.log.write({"event": "finished", "outcome": outcome, "optimizer_step": p.optimizer_step,
                        "best_dev_mcc": p.best_mcc, "best_step": p.best_step})
        self.accelerator.end_training()
        return {"optimizer_step": p.optimizer_step, "preempted": False, "outcome": outcome}

    def train_epoch(self) -> str:
        """Run the rest of `progress.epoch`; returns 'epoch_end', 'done', 'early_stop' or 'preempted'."""
        cfg, acc, d, p = self.cfg, self.accelerator, self.derived, self.progress
        rank, world, accum = acc.process_index, acc.num_processes, d.gradient_accumulation_steps
        batches = global_batches(self.train_data.lengths, d.global_batch_size, cfg.seed, p.epoch,
                                 cfg.data.length_grouping)
        first_step = p.step_in_epoch  # > 0 when resuming mid-epoch
        seen: list[np.ndarray] = []  # this rank's examples, for the end-of-epoch audit
        for i, index in enumerate(rank_micro_batches(batches, rank, world, accum, first_step)):
            step_in_epoch = first_step + i // accum
            seen.append(index)
            # Dropout masks depend on (seed, epoch, step, micro-batch), not on rank or layout.
            torch.manual_seed(micro_batch_seed(cfg.seed, p.epoch, step_in_epoch, (i % accum) * world + rank))
            batch = collate(self.train_data, index, d.pad_to_multiple_of)
            del batch["index"]
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            with acc.accumulate(self.model):
                loss = self.model(**batch).loss
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            # The first optimizer step with a non-finite loss, tracked on the device (no sync).
            self.first_bad = torch.minimum(
                self.first_bad, torch.where(torch.isfinite(loss), NO_BAD_STEP, p.optimizer_step + 1))
            self.window.add(loss, batch["attention_mask"], batch["input_ids"].numel())
            if not acc.sync_gradients:
                continue
            p.step_in_epoch = step_in_epoch + 1
            epoch, epoch_complete = p.epoch, p.step_in_epoch == d.steps_per_epoch
            outcome = self.step_boundary(grad_norm)
            if epoch_complete:
                self.audit_epoch(seen, first_step, epoch)
            if outcome is not None:
                return outcome
        p.epoch, p.step_in_epoch = p.epoch + 1, 0  # resumed exactly at the end of an epoch
        return "epoch_end"

    def step_boundary(self, grad_norm: Any) -> str | None:
        """After each optimizer step: schedule, log, evaluate, checkpoint, stop. None: go on."""
        cfg, d, p = self.cfg.train, self.derived, self.progress
        lr = self.scheduler.get_last_lr()[0]
        if self.optimizer.step_was_skipped:
            # fp16 loss-scale overflow: no update happened, so the schedule does not advance
            # (only fp16 can skip; the check costs nothing otherwise).
            p.skipped_steps += 1
        else:
            self.scheduler.step()
        p.optimizer_step += 1
        epoch_end = p.step_in_epoch == d.steps_per_epoch
        done = p.optimizer_step >= d.total_steps
        evaluate = (cfg.eval_every and p.optimizer_step % cfg.eval_every == 0) or epoch_end or done
        save = (cfg.checkpoint_every and p.optimizer_step % cfg.checkpoint_every == 0) or epoch_end
        stopping = False
        if p.optimizer_step % CONSENSUS_EVERY == 0 or evaluate or save:
            stopping, bad_step = self.boundary_consensus()
            if bad_step is not None:
                last = checkpoint.latest_good(self.run_dir, warn=lambda _: None)
                raise TrainingError(
                    f"non-finite loss at optimizer step {bad_step} (epoch {p.epoch}); last good checkpoint: "
                    f"{last or 'none'}; lower train.lr, check the model weights, or use bf16/fp32 instead of fp16"
                )
        if p.optimizer_step == 1 and self.is_main:
            self.log.write({"event": "first_step", "startup_s": round(seconds_since_process_start(), 3),
                            "world_size": d.world_size})
        if p.optimizer_step % cfg.log_every == 0 or done:
            self._log_window(lr, grad_norm)
        if self.bar is not None:
            self.bar[0].update(self.bar[1], completed=p.optimizer_step)
        if epoch_end:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
        # Evaluate, then checkpoint: the checkpoint then holds this evaluation's effect on the best
        # model and on early stopping, so a resumed run decides as the uninterrupted one. (Our
        # evaluation draws no random numbers and uses no DataLoader: it cannot perturb training.)
        with self.window.pause():
            early_stop = bool(evaluate) and self.after_evaluation(self.evaluate())
            if save or stopping:
                self.save_checkpoint()
            if stopping:
                return "preempted"
            if early_stop:
                return "early_stop"
        if done:
            return "done"
        return "epoch_end" if epoch_end else None

    def audit_epoch(self, seen: list[np.ndarray], first_step: int, epoch: int) -> None:
        """Collective, once per epoch: every example trained on at most once, by one rank."""
        from accelerate.utils import gather_object

        mine = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
        per_rank = gather_object([mine.tolist()])  # an all-gather: every rank checks, none is left waiting
        flat = [i for part in per_rank for i in part]
        d = self.derived
        expected = (d.steps_per_epoch - first_step) * d.global_batch_size
        if len(flat) != expected or len(set(flat)) != len(flat):
            raise AssertionError(
                f"epoch {epoch}: {len(flat)} examples trained ({len(set(flat))} distinct), "
                f"expected {expected} distinct: the data was not split across ranks correctly"
            )
        if self.is_main:
            self.log.write({"event": "epoch_data", "epoch": epoch,
                            "optimizer_step": self.progress.optimizer_step, "examples": len(flat),
                            "distinct": len(set(flat)), "per_rank": [len(part) for part in per_rank],
                            "from_step": first_step, "world_size": d.world_size})

    def after_evaluation(self, result: dict[str, Any]) -> bool:
        """Log the evaluation, keep the best model; True when early stopping says stop."""
        self.last_eval_step = self.progress.optimizer_step
        self.log_evaluation(result)
        p, cfg = self.progress, self.cfg.train
        # Rank 0 computed the MCC; every rank must take the same decisions.
        mcc = self._broadcast(result[DEV]["mcc"] if self.is_main else 0.0)
        improved, stop = p.record_evaluation(mcc, cfg.early_stopping_patience)
        if improved and cfg.select_best:
            out = self.save_model(reason="best dev MCC")
            if self.is_main:  # the exported model's own dev predictions travel with it
                self.write_predictions(*result["predictions"], path=out / "dev_predictions.jsonl")
        if stop:
            self.print(f"early stop: dev MCC has not improved on {p.best_mcc:.4f} (step {p.best_step}) "
                       f"for {p.evals_without_improvement} evaluations")
        return stop

    def epoch_float(self) -> float:
        """Epochs done, fractional (optimizer steps / steps per epoch), as the HF Trainer logs it."""
        return round(self.progress.optimizer_step / self.derived.steps_per_epoch, 4)

    def _broadcast(self, value: float) -> float:
        from accelerate.utils import broadcast

        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(broadcast(t, from_process=0).item())

    def _preempted(self) -> dict[str, Any]:
        self.print(f"stop signal {self.stop.received}: checkpoint saved at optimizer step "
                   f"{self.progress.optimizer_step}; resume with --resume")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            # Last, after every rank's part of the checkpoint is written: requeueing a running
            # SLURM job ends it.
            requeue_job(self.stop.received, self.print)
        return {"optimizer_step": self.progress.optimizer_step, "preempted": True, "outcome": "preempted"}

    def _log_window(self, lr: float, grad_norm: Any) -> None:
        """One collective: sum the window over ranks, write one training record."""
        sums, elapsed, steps = self.window.flush(self.accelerator)
        record = {
            "optimizer_step": self.progress.optimizer_step,
            "epoch": self.epoch_float(),
            "loss": sums[0] / sums[1],
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": steps * self.derived.global_batch_size / elapsed,
            "tokens_per_s": sums[2] / elapsed,
            "padding_fraction": 1.0 - sums[2] / sums[3],
            "skipped_steps": self.progress.skipped_steps,
        }
        if self.peak_flops:
            record["mfu"] = self.mfu(sums[2] / elapsed)
        self.log.write(record)
        if self.bar is not None:
            self.bar[0].update(self.bar[1], info=f"loss {record['loss']:.4f}  {record['samples_per_s']:.0f} samples/s  "
                                                 f"{record['tokens_per_s']:.0f} tok/s")

    def _log_summary(self) -> None:
        """Throughput over the whole run (training time only, evaluation excluded)."""
        w, d = self.window, self.derived
        w.flush(self.accelerator)  # the last, partial window (early stop, preemption)
        if not w.train_seconds or not w.totals[1]:
            return
        loss_sum, micro, real, padded = w.totals
        samples = micro * d.micro_batch_size
        self.log.write({"event": "train_summary", "optimizer_step": self.progress.optimizer_step,
                        "optimizer_steps": int(micro / (d.world_size * d.gradient_accumulation_steps)),
                        "samples": int(samples), "train_seconds": round(w.train_seconds, 3),
                        "samples_per_s": samples / w.train_seconds, "tokens_per_s": real / w.train_seconds,
                        "padding_fraction": 1.0 - real / padded, "world_size": d.world_size,
                        **self._device_stats(real / w.train_seconds)})
        self.print(f"trained {int(samples)} samples in {w.train_seconds:.1f} s: {samples / w.train_seconds:.1f} "
                   f"samples/s, {real / w.train_seconds:.0f} tokens/s, padding {1.0 - real / padded:.1%}")

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

    def _progress_bar(self, total: int, done: int) -> Any:
        if not self.is_main:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), transient=False, redirect_stdout=False,
                       redirect_stderr=False)
        task = bar.add_task("train", total=total, completed=done, info="")
        bar.start()
        return bar, task

    # ------------------------------------------------------------------ export

    def save_model(self, reason: str) -> Path:
        """The weights as a `save_pretrained` folder (gathered under ZeRO-3) + tokenizer, with
        `training_info.json` saying which step they are and why they were kept."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # collective under ZeRO-3; None off rank 0
        out = self.run_dir / "model"
        if self.is_main:
            tmp = self.run_dir / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = acc.unwrap_model(self.model)
            if self.cfg.distributed.zero_stage == 3:
                # Loading under ZeRO-3 records transformers' legacy renamings (LayerNorm gamma/beta),
                # which save_pretrained would write back; the default mapping writes today's names.
                unwrapped._weight_conversions = None
            # save_pretrained pops tensors out of the dict it gets: hand it a copy.
            unwrapped.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            p = self.progress
            (tmp / "training_info.json").write_text(json.dumps({
                "selected": reason, "optimizer_step": p.optimizer_step, "epoch": p.epoch,
                "dev_mcc": p.best_mcc if reason != "final" else None, "run_dir": str(self.run_dir.resolve()),
            }, indent=1))
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        acc.wait_for_everyone()
        return out


def train(cfg: Config) -> dict[str, Any]:
    return Recipe(cfg).run()


