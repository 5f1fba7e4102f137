"""The training recipe: one loop for CPU, one GPU, DDP and every DeepSpeed ZeRO stage.

    python -m distributed_tune --config configs/cola_bert_base.yaml                       # 1 process
    accelerate launch --multi_gpu --num_processes 4 -m distributed_tune --config ...      # 4 processes
    python -m distributed_tune launch --config ... --gpus 8                               # rendered setup

setup -> (resume) -> for each optimizer step: accumulate -> backward -> clip -> step -> schedule
-> log / evaluate / checkpoint at step boundaries -> final evaluation -> save_pretrained.
Predictions are gathered with their example indices on every rank, and rank 0 checks that each
evaluation example was predicted exactly once before it computes the task's metrics.

The loop knows no scheduler: a stop signal (signals.py) ends it at a step boundary with a
checkpoint and a `STOPPED` marker in the run directory; a SLURM batch script requeues the job
after the training step has exited (slurm.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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

from distributed_tune import checkpoint, model_card, signals, summary, trackers
from distributed_tune.config import Config, Derived, derive, dump_resolved
from distributed_tune.console import Console, duration
from distributed_tune.data import (
    HELDOUT,
    Batcher,
    Tokenized,
    global_batches,
    rank_micro_batches,
    split_heldout,
    tokenize,
    unknown_fraction,
)
from distributed_tune.distributed import build_accelerator
from distributed_tune.errors import DataError, RunDirError, TrainingError
from distributed_tune.evaluation import EVAL_BATCH, Predicted, example_rows, predict_distributed, predictions
from distributed_tune.files import RunLock, atomic_write_json, atomic_write_jsonl
from distributed_tune.metrics import MetricsLog, read_metrics, score, score_splits
from distributed_tune.model import (
    build_optimizer,
    build_scheduler,
    load_model,
    peak_flops,
    quiet_transformers,
    read_data_and_tokenizer,
    training_flops_per_token,
)
from distributed_tune.tasks import Example

# Optimizer steps between checks for stop signals and non-finite losses (each is a host-device
# sync and a collective); checks also run before every checkpoint and evaluation.
CONSENSUS_EVERY = 10
NO_BAD_STEP = 2**62
STOPPED = "STOPPED"  # marker: the run stopped for a signal with a checkpoint; a batch script requeues
# Share of unknown tokens above which a tokenizer is refused (it cannot read the data).
MAX_UNKNOWN = 0.5
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


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
    best_value: float = float("-inf")  # the selection metric's best value so far
    best_step: int = -1
    evals_without_improvement: int = 0
    counting: bool = False  # early stopping counts once an evaluation predicted more than one class
    skipped_steps: int = 0  # fp16 overflows: optimizer steps that updated nothing

    def record_evaluation(self, value: float, collapsed: bool, patience: int) -> tuple[bool, bool]:
        """Best-model bookkeeping for one evaluation: (a new best?, stop early now?). Only a strictly
        better value counts; `patience` 0 never stops. Patience runs only once the model has left
        its one-class start: CoLA runs often predict one class for hundreds of steps, then learn."""
        self.counting = self.counting or not collapsed
        if value > self.best_value:
            self.best_value, self.best_step, self.evals_without_improvement = value, self.optimizer_step, 0
            return True, False
        if self.counting:
            self.evals_without_improvement += 1
        return False, bool(patience) and self.evals_without_improvement >= patience


@dataclass(frozen=True)
class EvalSet:
    """What one evaluation predicts: the task's dev splits, and the held-out slice of train."""

    examples: list[Example]
    data: Tokenized


class Recipe:
    """One fine-tuning job: `Recipe(cfg).run()`; `cfg` is resolved (config file, overrides and
    accelerate's settings)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.task = cfg.task_spec
        self.lock: RunLock | None = None
        self.out = Console(False, 0)

    # ------------------------------------------------------------------ setup

    def setup(self) -> bool:
        """Build everything; False when there is nothing to do (resuming a finished run)."""
        cfg = self.cfg
        self.run_dir = checkpoint.refuse_used_run_dir(cfg)  # before anything loads or is written
        self.accelerator = acc = build_accelerator(cfg, project_dir=str(self.run_dir / "trackers"))
        self.is_main = acc.is_main_process
        self.out = Console(self.is_main, 0)  # plain lines until the bar knows its length
        if cfg.resume and checkpoint.run_finished(self.run_dir):
            self.out.say(f"output_dir={self.run_dir} holds a finished run: nothing to resume "
                         "(--overwrite trains it again)")
            return False

        cache = Path(cfg.data.cache_dir).expanduser()
        # Download, read and tokenize on the local main process first; the others hit its cache.
        with acc.local_main_process_first():
            self.data, self.tokenizer = read_data_and_tokenizer(self.task, cfg)  # both problems said at once
            train, heldout = split_heldout(self.data.train, cfg.data.heldout_fraction, self.task.regression)
            self.train_examples = train
            self.train_data = self.tokenize(train, cache)
            self.check_tokenizer()
            self.dev = EvalSet(self.data.eval, self.tokenize(self.data.eval, cache))
            self.heldout = EvalSet(heldout, self.tokenize(heldout, cache)) if heldout else None
        self.derived: Derived = derive(cfg, acc.num_processes, len(self.train_data))
        self.selection_split = HELDOUT if self.heldout else self.task.selection_split

        torch.manual_seed(cfg.seed)  # the new classification head is initialised from this
        model, notes = load_model(cfg.model, self.data.label_names, self.task.regression,
                                  self.tokenizer.pad_token_id, cfg.data.max_length, self.tokenizer)
        self.flops_per_token = training_flops_per_token(model)
        self.peak_flops = peak_flops(cfg.precision)
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg.train))
        self.batches = Batcher(self.train_data, acc.device, self.derived.pad_to_multiple_of)
        # The forward pass of training: the same parameters, compiled when train.compile is on
        # (evaluation runs the model as it is: other shapes, no backward).
        self.train_forward = self.model
        if cfg.train.compile or cfg.train.cuda_graphs:
            self.train_forward = torch.compile(self.model, mode="reduce-overhead" if cfg.train.cuda_graphs else None)
        # After prepare: ZeRO-3 regroups the optimizer's parameters, and the schedule must drive
        # the groups the engine really steps.
        self.scheduler = build_scheduler(self.optimizer, self.derived.warmup_steps, self.derived.total_steps)
        self.progress = Progress()

        # Bad input has been refused by now, and nothing written: from here on this run writes, alone.
        self.take_lock()
        if self.is_main:
            if cfg.overwrite:
                checkpoint.clear_results(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main)
        if cfg.resume:
            self.resume()  # may refuse (a changed recipe): the stopped run must then stay as it was
        if self.is_main:
            for name in (STOPPED, summary.RESULTS_JSON):  # a new attempt: what the last one ended with goes
                (self.run_dir / name).unlink(missing_ok=True)
            dump_resolved(cfg, self.derived, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "data_fingerprint.json",
                              {"task": self.task.name, "counts": self.data.counts(), "train_used": len(train),
                               "heldout": len(heldout), "sha256": self.data.fingerprint})
        trackers.start(acc, cfg, self.derived)
        self.out = Console(self.is_main, self.derived.total_steps, self.progress.optimizer_step)
        for note in notes:
            self.out.say(note)
        for split in self.task.absent_splits(self.data):  # evaluate the splits that exist, say which do not
            self.out.say(f"{split}: no examples in data.source={cfg.data.source}; not evaluated"
                         + (f" ({self.task.combined_split} is the other splits only)" if self.task.combined_split else ""))
        counts = ", ".join(f"{k} {v}" for k, v in self.data.counts().items())
        held = f", heldout {len(heldout)} (selection)" if heldout else ""
        self.out.say(f"{self.task.name}: {counts}{held}; {self.derived.describe()}")
        return True

    def take_lock(self) -> None:
        """Rank 0 holds the run directory's lock; every rank learns whether it got it."""
        from accelerate.utils import broadcast_object_list

        problem = [None]
        if self.is_main:
            try:
                self.lock = RunLock(self.run_dir).acquire()
            except RunDirError as e:
                problem = [str(e)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(problem, from_process=0)
        if problem[0]:
            raise RunDirError(problem[0])

    def tokenize(self, examples: list[Example], cache: Path) -> Tokenized:
        return tokenize(examples, self.tokenizer, self.cfg.data.max_length, cache, self.task.regression,
                        say=self.out.say)

    def check_tokenizer(self) -> None:
        """A folder without its tokenizer files gets a stub tokenizer that maps every word to the
        unknown token: training would "succeed" on nothing. Refuse it."""
        unknown = unknown_fraction(self.train_data, self.tokenizer)
        if unknown > MAX_UNKNOWN:
            raise DataError(
                f"model.name={self.cfg.model.name}: its tokenizer maps {unknown:.0%} of the training tokens to "
                f"{self.tokenizer.unk_token}; the tokenizer files (tokenizer.json / vocab.txt) are missing or "
                "belong to another model; copy the model's own tokenizer files into the folder"
            )

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict[str, Any]:
        """Progress plus what a resume must match (the recipe, world size, ZeRO stage)."""
        return {
            **dataclasses.asdict(self.progress),
            "world_size": self.derived.world_size,
            "zero_stage": self.cfg.distributed.zero_stage,
            "global_batch_size": self.derived.global_batch_size,
            "trajectory": checkpoint.trajectory(self.cfg, self.data.fingerprint),
            "scheduler": self.scheduler.state_dict(),
        }

    def save_checkpoint(self) -> Path:
        return checkpoint.save(
            self.accelerator, self.run_dir, self.progress.optimizer_step,
            self.trainer_state(), self.cfg.train.keep_checkpoints,
        )

    def resume(self) -> None:
        ckpt = checkpoint.latest_good(self.run_dir, warn=self.out.say)
        if ckpt is None:
            if self.is_main and (self.run_dir / "metrics.jsonl").is_file():
                self.log.truncate_after(0)  # a fresh start gets a clean log
            self.out.say(f"resume: no complete checkpoint in {self.run_dir}; starting fresh")
            return
        state = checkpoint.read_trainer_state(ckpt)
        d = self.derived
        checkpoint.check_resumable(ckpt, state, self.cfg, d.world_size, here=f"this run has {d.world_size}",
                                   fingerprint=self.data.fingerprint)
        self.accelerator.load_state(str(ckpt))
        if self.is_main:
            self.log.truncate_after(state["optimizer_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        p = self.progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
        self.out.say(f"resumed from {ckpt} (epoch {p.epoch}, optimizer step {p.optimizer_step})")

    # ------------------------------------------------------------------ evaluation

    def predict(self, eval_set: EvalSet) -> Predicted:
        return predict_distributed(self.accelerator, self.model, eval_set.data, EVAL_BATCH,
                                   self.derived.pad_to_multiple_of, self.task.regression)

    def evaluate(self) -> dict[str, Any]:
        """Predict every evaluation example once (gathered, checked exactly once); rank 0 scores."""
        dev = self.predict(self.dev)
        held = self.predict(self.heldout) if self.heldout else None
        result: dict[str, Any] = {}
        if self.is_main:
            n = self.num_labels
            result = score_splits(self.task, self.dev.data.labels, predictions(self.task, dev.outputs),
                                  [e.split for e in self.dev.examples], n, dev.logits)
            if held is not None:
                result[HELDOUT] = score(self.task, self.heldout.data.labels, predictions(self.task, held.outputs), n,
                                        held.logits)
            result["outputs"] = dev.outputs
        return result

    @property
    def num_labels(self) -> int:
        return len(self.data.label_names) or 1

    def log_evaluation(self, result: dict[str, Any]) -> None:
        if not self.is_main:
            return
        p = self.progress
        for split, metrics in result.items():
            if split == "outputs":
                continue
            record = {"split": split, **metrics, "optimizer_step": p.optimizer_step, "epoch": self.epoch_float(),
                      "world_size": self.derived.world_size}
            self.log.write(record)
            trackers.log_eval(self.accelerator, self.cfg, split, metrics, p.optimizer_step)
        main = self.task.main_metric
        sel = result[self.selection_split]
        parts = [f"{s} {result[s][main]:.4f}" for s in self.task.reported_splits() if s != self.selection_split and s in result]
        warn = "  (collapsed: one class predicted)" if sel["collapsed"] else ""
        self.out.say(f"eval step {p.optimizer_step}: {self.selection_split} {main} {sel[main]:.4f}"
                     + (f" ({', '.join(parts)})" if parts else "") + f"; n={sel['n']}{warn}")
        self.write_predictions(result["outputs"])
        self.last_outputs = result["outputs"]

    def write_predictions(self, outputs: np.ndarray, path: Path | None = None) -> None:
        rows = example_rows(self.task, self.data.label_names, self.dev.examples, outputs)
        atomic_write_jsonl(path or self.run_dir / "predictions.jsonl", rows)

    # ------------------------------------------------------------------ training

    def boundary_consensus(self) -> tuple[bool, int | None]:
        """Collective: did any rank get a stop signal, and did any see a non-finite loss (at which
        optimizer step)? It syncs host and device, so it runs every CONSENSUS_EVERY steps and
        before anything is saved, not on every step."""
        flags = torch.stack([torch.tensor(float(signals.received or 0), device=self.first_bad.device),
                             self.first_bad.double()])
        gathered = self.accelerator.gather(flags).view(-1, 2)
        first_bad = int(gathered[:, 1].min())
        received = [int(x) for x in gathered[:, 0].tolist() if x > 0]
        if received and signals.received is None:
            signals.received = received[0]  # every rank records what any rank received
        return bool(received), (first_bad if first_bad < NO_BAD_STEP else None)

    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop signal / early stop); returns how it ended."""
        try:
            if not self.setup():
                return {"optimizer_step": None, "outcome": "already_finished"}
            ended = self._train()
            if self.is_main:  # how the attempt ended, for scripts (results.json) and the card (its training time)
                summary.write_results(self.run_dir)
                if (self.run_dir / "model").is_dir():
                    model_card.write(self.run_dir / "model", self.run_dir)
            return ended
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            last = checkpoint.latest_good(self.run_dir, warn=lambda _: None)
            raise RunDirError(
                f"could not write {e.filename or 'a file'} ({e.strerror}): the disk is full or a file size limit is "
                f"reached; the newest complete checkpoint ({last or 'none yet'}) is kept; free disk space and "
                "resume with --resume") from None
        finally:
            self.out.close()
            signals.training = False
            if self.lock is not None:
                self.lock.release()

    def warm_up(self) -> float:
        """Compile (and with CUDA graphs, record) the step for every batch width the run will see,
        before the clock starts: forward and backward on real batches of each width, gradients
        dropped, no optimizer step. Every rank runs the same widths in the same order (the union
        over ranks), so the data-parallel all-reduces pair up. Returns the seconds it took."""
        if self.train_forward is self.model:
            return 0.0
        t0 = time.perf_counter()
        d, acc, cfg = self.derived, self.accelerator, self.cfg
        first: dict[int, np.ndarray] = {}
        for epoch in range(self.progress.epoch, cfg.train.epochs):
            batches = global_batches(self.train_data.lengths, d.global_batch_size, cfg.seed, epoch,
                                     cfg.data.length_grouping)
            for batch in batches:
                for micro in np.split(batch, d.world_size * d.gradient_accumulation_steps):
                    first.setdefault(self.batches.width(micro), micro)
        for width in sorted(first):
            for _ in range(3):  # CUDA graph trees record on the second call and replay from the third
                acc.backward(self.train_forward(**self.batches(first[width])).loss)
                self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.out.say(f"compiled the step for {len(first)} batch widths ({', '.join(map(str, sorted(first)))}) "
                     f"in {seconds:.1f} s (not counted as training time)")
        return seconds

    def _train(self) -> dict[str, Any]:
        p, d = self.progress, self.derived
        self.model.train()  # from_pretrained returns a model in eval mode; compile it as it trains
        self.warmup_seconds = self.warm_up()
        self.window = Window(self.accelerator.device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=self.accelerator.device)
        self.last_eval_step = -1
        self.last_outputs: np.ndarray | None = None
        self.eval_seconds = 0.0
        signals.training = True
        outcome = "done"
        while p.optimizer_step < d.total_steps and p.epoch < self.cfg.train.epochs:
            outcome = self.train_epoch()
            if outcome != "epoch_end":
                break
        if outcome == "epoch_end":
            outcome = "done"
        self._log_summary()
        if outcome == "stopped":
            return self._stopped()
        signals.training = False
        if self.last_eval_step != p.optimizer_step:
            self.after_evaluation(self.evaluate())
        if not self.cfg.train.select_best or not (self.run_dir / "model").exists():
            out = self.save_model(reason="final")
            if self.is_main and self.last_outputs is not None:  # the exported model's own predictions
                self.write_predictions(self.last_outputs, path=out / "dev_predictions.jsonl")
        self.accelerator.wait_for_everyone()
        # The last line of a complete run (a sweep tells finished runs from interrupted ones by it).
        self.log.write({"event": "finished", "outcome": outcome, "optimizer_step": p.optimizer_step,
                        "selection": f"{self.selection_split}/{self.task.main_metric}",
                        "best_value": p.best_value, "best_step": p.best_step})
        self.final_block(outcome)
        self.accelerator.end_training()
        return {"optimizer_step": p.optimizer_step, "outcome": outcome}

    def train_epoch(self) -> str:
        """Run the rest of `progress.epoch`; returns 'epoch_end', 'done', 'early_stop' or 'stopped'."""
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
            batch = self.batches(index)
            with acc.accumulate(self.model):
                loss = self.train_forward(**batch).loss
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
        else:
            self.out.step(p.optimizer_step)
        if epoch_end:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
        # Evaluate, then checkpoint: the checkpoint then holds this evaluation's effect on the best
        # model and on early stopping, so a resumed run decides as the uninterrupted one. (Our
        # evaluation draws no random numbers and uses no DataLoader: it cannot perturb training.)
        with self.window.pause():
            t0 = time.perf_counter()
            early_stop = bool(evaluate) and not stopping and self.after_evaluation(self.evaluate())
            self.eval_seconds += time.perf_counter() - t0
            if save or stopping:
                self.save_checkpoint()
            if stopping:
                return "stopped"
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
        # Rank 0 scored; every rank must take the same decisions.
        value, collapsed = self._broadcast(
            [result[self.selection_split][self.task.main_metric], float(result[self.selection_split]["collapsed"])]
            if self.is_main else [0.0, 0.0])
        improved, stop = p.record_evaluation(value, bool(collapsed), cfg.early_stopping_patience)
        if improved and cfg.select_best:
            out = self.save_model(reason=f"best {self.selection_split} {self.task.main_metric}")
            if self.is_main:  # the exported model's own predictions travel with it
                self.write_predictions(result["outputs"], path=out / "dev_predictions.jsonl")
        if stop:
            self.out.say(f"early stop: {self.selection_split} {self.task.main_metric} has not improved on "
                         f"{p.best_value:.4f} (step {p.best_step}) for {p.evals_without_improvement} evaluations")
        return stop

    def epoch_float(self) -> float:
        """Epochs done, fractional (optimizer steps / steps per epoch), as the HF Trainer logs it."""
        return round(self.progress.optimizer_step / self.derived.steps_per_epoch, 4)

    def _broadcast(self, values: list[float]) -> list[float]:
        from accelerate.utils import broadcast

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return broadcast(t, from_process=0).tolist()

    def _stopped(self) -> dict[str, Any]:
        p = self.progress
        sig = signals.received
        name = signal.Signals(sig).name if sig else "?"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            ckpt = self.run_dir / "checkpoints" / checkpoint.checkpoint_name(p.optimizer_step)
            atomic_write_json(self.run_dir / STOPPED, {"signal": name, "optimizer_step": p.optimizer_step,
                                                       "checkpoint": str(ckpt)})
            self.log.write({"event": "stopped", "signal": name, "optimizer_step": p.optimizer_step})
        self.out.say(f"stop signal {sig} ({name}): checkpoint saved at optimizer step {p.optimizer_step}; "
                     "resume with --resume")
        return {"optimizer_step": p.optimizer_step, "outcome": "stopped", "signal": name}

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
        trackers.log_train(self.accelerator, self.cfg, record)
        self.out.step(self.progress.optimizer_step, record["loss"], lr, record["samples_per_s"])

    def _log_summary(self) -> None:
        """Throughput over the whole run (training time only, evaluation excluded)."""
        w, d = self.window, self.derived
        w.flush(self.accelerator)  # the last, partial window (early stop, preemption)
        self.out.close()
        if not w.train_seconds or not w.totals[1]:
            return
        loss_sum, micro, real, padded = w.totals
        samples = micro * d.micro_batch_size
        self.log.write({"event": "train_summary", "optimizer_step": self.progress.optimizer_step,
                        "optimizer_steps": int(micro / (d.world_size * d.gradient_accumulation_steps)),
                        "samples": int(samples), "train_seconds": round(w.train_seconds, 3),
                        "eval_seconds": round(self.eval_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
                        "samples_per_s": samples / w.train_seconds, "tokens_per_s": real / w.train_seconds,
                        "padding_fraction": 1.0 - real / padded, "world_size": d.world_size,
                        "skipped_steps": self.progress.skipped_steps, **self._device_stats(real / w.train_seconds)})
        self.out.say(f"trained {int(samples)} samples in {w.train_seconds:.1f} s: {samples / w.train_seconds:.1f} "
                     f"samples/s, {real / w.train_seconds:.0f} tokens/s, padding {1.0 - real / padded:.1%}")

    def final_block(self, outcome: str) -> None:
        """What a user wants at the end: the best evaluation per split, where the model is, what next."""
        if not self.is_main:
            return
        p = self.progress
        main = self.task.main_metric
        info_path = self.run_dir / "model" / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        step = info.get("optimizer_step", p.optimizer_step)
        evaluations = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if "split" in r]

        def splits_at(at: int) -> str:
            """'split value, ...' of the evaluation at optimizer step `at` (the last record of a split wins)."""
            at_step = {r["split"]: r for r in evaluations if r.get("optimizer_step") == at}
            return ", ".join(f"{s} {r[main]:.4f}" for s, r in at_step.items() if main in r)

        def flag(at: int) -> str:  # the evaluation lines' warning, where the selection split was one class
            return "  (collapsed: one class predicted)" if any(
                r["split"] == self.selection_split and r.get("collapsed") for r in evaluations
                if r.get("optimizer_step") == at) else ""

        last = splits_at(self.last_eval_step) if step != self.last_eval_step else ""
        lines = [
            f"finished ({outcome.replace('_', ' ')}) after {p.optimizer_step} optimizer steps in "
            f"{duration(self.out.elapsed())} (training {duration(self.window.train_seconds)}, "
            f"evaluation {duration(self.eval_seconds)})",
            f"model/ = step {step} ({info.get('selected', 'final')}): {main} {splits_at(step)}{flag(step)}",
            *([f"last evaluation (step {self.last_eval_step}, the honest number when model/ was selected on the "
               f"reported split): {main} {last}{flag(self.last_eval_step)}"] if last else []),
            f"model:    {self.run_dir / 'model'}  (save_pretrained folder; transformers.pipeline loads it)",
            f"evaluate: python -m distributed_tune evaluate {self.run_dir}",
        ]
        for line in lines:
            self.out.say(line)

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

    # ------------------------------------------------------------------ export

    def save_model(self, reason: str) -> Path:
        """The weights as a `save_pretrained` folder (gathered under ZeRO-3; fp32 whatever the
        training precision) + tokenizer, with `training_info.json` saying which step they are and
        why they were kept. A failed write keeps the previous model/ and leaves no .tmp-model."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # collective under ZeRO-3; None off rank 0
        out = self.run_dir / "model"
        failure = [None]
        if self.is_main:
            tmp = self.run_dir / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                unwrapped = acc.unwrap_model(self.model)
                if self.cfg.distributed.zero_stage == 3:
                    # Loading under ZeRO-3 records transformers' legacy renamings (LayerNorm gamma/beta),
                    # which save_pretrained would write back; the default mapping writes today's names.
                    unwrapped._weight_conversions = None
                # One rule for every backend: the export is fp32. save_pretrained pops tensors out of
                # the dict it gets: it gets its own.
                fp32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
                unwrapped.config.dtype = torch.float32
                with quiet_transformers():
                    unwrapped.save_pretrained(tmp, state_dict=fp32, safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp)
                p = self.progress
                atomic_write_json(tmp / "training_info.json", {
                    "selected": reason, "optimizer_step": p.optimizer_step, "epoch": p.epoch,
                    "task": self.task.name, "metric": f"{self.selection_split}/{self.task.main_metric}",
                    "value": p.best_value if reason != "final" else None, "run_dir": str(self.run_dir.resolve()),
                    **summary.exported_evaluation(self.run_dir, p.optimizer_step, self.selection_split),
                })
                model_card.write(tmp, self.run_dir)  # model/README.md
                shutil.rmtree(out, ignore_errors=True)
                tmp.replace(out)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                failure = [f"could not export the model to {out} ({e.strerror or e}); "
                           f"{'the previous model/ is kept; ' if out.exists() else ''}free disk space and resume "
                           "with --resume"]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(failure, from_process=0)
        if failure[0]:
            raise RunDirError(failure[0])
        acc.wait_for_everyone()
        return out


def train(cfg: Config) -> dict[str, Any]:
    return Recipe(cfg).run()
