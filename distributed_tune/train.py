"""The training recipe: one loop for CPU, one GPU, DDP and every DeepSpeed ZeRO stage.

    python -m distributed_tune --config configs/cola_bert_base.yaml                       # 1 process
    accelerate launch --multi_gpu --num_processes 4 -m distributed_tune --config ...      # 4 processes
    python -m distributed_tune launch --config ... --gpus 8                               # rendered setup

`Recipe(cfg).run()`: setup (data, tokenizer, model, optimizer, schedule, the run directory, resume)
-> for each optimizer step: micro-batches -> forward / backward -> clip -> step -> the step
boundary (log / evaluate / checkpoint / stop, decided by `boundary`) -> final evaluation -> export.
What the run reports lives in reporting.py, the `model/` export in export.py, the run directory's
lock and markers in rundir.py. Predictions are gathered with their example indices on every rank,
and rank 0 checks that each evaluation example was predicted exactly once before it scores them.

The loop knows no scheduler: a stop signal (signals.py) ends it at a step boundary with a
checkpoint and a `STOPPED` marker in the run directory; a SLURM batch script requeues the job
after the training step has exited (slurm.py).
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune import checkpoint, lora, records, reshard, signals, summary
from distributed_tune.config import Config, Derived, TrainConfig, derive, dump_resolved, load_config
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
from distributed_tune.evaluation import EVAL_BATCH, Predicted, predict_distributed, predictions, write_predictions
from distributed_tune.export import export_model
from distributed_tune.files import atomic_write_json
from distributed_tune.metrics import score, score_splits
from distributed_tune.model import (
    build_optimizer,
    build_scheduler,
    class_weights,
    continue_schedule,
    enable_gradient_checkpointing,
    load_dtype,
    load_model,
    read_data_and_tokenizer,
    training_flops_per_token,
    what_runs,
)
from distributed_tune.reporting import Reporter
from distributed_tune.rundir import RunDir
from distributed_tune.tasks import Example
from distributed_tune.watchdog import Watchdog

# Optimizer steps between checks for stop signals and non-finite losses (each is a host-device
# sync and a collective); checks also run before every checkpoint and evaluation.
CONSENSUS_EVERY = 10
NO_BAD_STEP = 2**62
# Share of unknown tokens above which a tokenizer is refused (it cannot read the data).
MAX_UNKNOWN = 0.5


def micro_batch_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """Dropout seed of one micro-batch: the same whatever the world size and accumulation."""
    return int(np.random.SeedSequence([seed, epoch, step, micro]).generate_state(1)[0])


class Outcome(str, enum.Enum):
    """How a stretch of training ended (the value is what metrics.jsonl and the final block say)."""

    EPOCH_END = "epoch_end"  # the epoch's data is done; training goes on
    DONE = "done"  # total_steps reached
    EARLY_STOP = "early_stop"  # train.early_stopping_patience evaluations without a better value
    STOPPED = "stopped"  # a stop signal: checkpoint saved, resume with --resume
    ALREADY_FINISHED = "already_finished"  # --resume on a finished run: nothing to do


@dataclass(frozen=True)
class Boundary:
    """What happens after one optimizer step; `boundary()` decides it from progress and config."""

    check: bool  # agree across ranks on stop signals and non-finite losses (a host-device sync)
    log: bool  # a training record (the window's sums, all-reduced)
    evaluate: bool
    save: bool  # a resumable checkpoint (also when training ends here early: see Recipe.after_step)
    epoch_end: bool
    done: bool  # total_steps reached

    def outcome(self, stopping: bool, early_stop: bool) -> Outcome | None:
        """How training ends here (None: it goes on)."""
        if stopping:
            return Outcome.STOPPED
        if early_stop:
            return Outcome.EARLY_STOP
        if self.done:
            return Outcome.DONE
        return Outcome.EPOCH_END if self.epoch_end else None


def boundary(step: int, step_in_epoch: int, t: TrainConfig, d: Derived) -> Boundary:
    """The step boundary after optimizer step `step` (the `step_in_epoch`-th of its epoch). Pure."""
    epoch_end = step_in_epoch == d.steps_per_epoch
    done = step >= d.total_steps
    evaluate = bool(t.eval_every and step % t.eval_every == 0) or epoch_end or done
    # The last step is always saved (as the HF Trainer does): a finished run can be resumed for more steps.
    save = bool(t.checkpoint_every and step % t.checkpoint_every == 0) or epoch_end or done
    return Boundary(check=step % CONSENSUS_EVERY == 0 or evaluate or save, log=step % t.log_every == 0 or done,
                    evaluate=evaluate, save=save, epoch_end=epoch_end, done=done)


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


@dataclass
class LoopState:
    """What the loop changes, built in setup: the progress a checkpoint saves, and this attempt's own."""

    progress: Progress
    first_bad: torch.Tensor  # on the device: the first optimizer step with a non-finite loss (NO_BAD_STEP: none)
    last_eval_step: int = -1
    last_outputs: np.ndarray | None = None  # the last evaluation's outputs: the final model's predictions
    evaluation_due: bool = False  # resumed from a stop that came before this step's evaluation


@dataclass(frozen=True)
class EvalSet:
    """What one evaluation predicts: the task's dev splits, and the held-out slice of train."""

    examples: list[Example]
    data: Tokenized


def start_watchdog(acc: Any, run_dir: Path, hang_timeout_s: int) -> Watchdog:
    """Heartbeats between the ranks (watchdog.py), under a token of this attempt from rank 0."""
    import secrets

    token = [secrets.token_hex(8) if acc.is_main_process else None]
    torch.distributed.broadcast_object_list(token, src=0)
    dog = Watchdog(run_dir, acc.process_index, acc.num_processes, hang_timeout_s, str(token[0]))
    dog.start()
    return dog


class Recipe:
    """One fine-tuning job: `Recipe(cfg).run()`; `cfg` is resolved (config file, overrides and
    accelerate's settings)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.task = cfg.task_spec
        self.report: Reporter | None = None
        self.watchdog: Watchdog | None = None

    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop signal / early stop); returns how it ended."""
        self.run_dir = RunDir(self.cfg)
        try:
            with self.run_dir.owned():
                if not self.setup():
                    return {"optimizer_step": None, "outcome": Outcome.ALREADY_FINISHED.value}
                ended = self.train()
                self.report.end_of_attempt()  # results.json, and the model card with the training time
                return ended
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if self.report is not None:
                self.report.close()

    # ------------------------------------------------------------------ setup

    def setup(self) -> bool:
        """Build everything; False when there is nothing to do (resuming a finished run)."""
        cfg, run_dir = self.cfg, self.run_dir
        self.accelerator = acc = build_accelerator(cfg, project_dir=str(run_dir / "trackers"))
        self.is_main = acc.is_main_process
        if self.is_main and not cfg.resume:
            checkpoint.ensure_key()  # a fresh run: the key its checkpoints are sealed with (made if none)
        self.selection_split = HELDOUT if cfg.data.heldout_fraction > 0 else self.task.selection_split
        self.report = report = Reporter(acc, cfg, run_dir.path, self.task, self.selection_split)
        if cfg.resume and checkpoint.run_finished(run_dir.path) and not self.extends_finished_run():
            return False
        if acc.num_processes > 1:  # from here on a silent peer ends the job (watchdog.py)
            self.watchdog = start_watchdog(acc, run_dir.path, cfg.distributed.hang_timeout_s)

        cache = Path(cfg.data.cache_dir).expanduser()
        # Download, read and tokenize on the local main process first; the others hit its cache.
        with acc.local_main_process_first():
            self.data, self.tokenizer = read_data_and_tokenizer(self.task, cfg)  # both problems said at once
            train, heldout = split_heldout(self.data.train, cfg.data.heldout_fraction, self.task.regression)
            self.train_data = self.tokenize(train, cache)
            self.check_tokenizer()
            self.dev = EvalSet(self.data.eval, self.tokenize(self.data.eval, cache))
            self.heldout = EvalSet(heldout, self.tokenize(heldout, cache)) if heldout else None
        self.derived: Derived = derive(cfg, acc.num_processes, len(self.train_data))
        weights = class_weights(cfg.train.class_weights, self.train_data.labels, self.data.label_names,
                                self.task.regression)

        torch.manual_seed(cfg.seed)  # the new classification head is initialised from this
        model, notes = load_model(cfg.model, self.data.label_names, self.task.regression,
                                  self.tokenizer.pad_token_id, cfg.data.max_length, self.tokenizer, load_dtype(cfg))
        flops_per_token = training_flops_per_token(model)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model, lora=lora.enabled(cfg.model))
        model, lora_note = lora.apply_lora(model, cfg.model)
        notes += [lora_note] if lora_note else []
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg.train))
        notes.append(what_runs(model, acc, cfg))
        self.batches = Batcher(self.train_data, acc.device, self.derived.pad_to_multiple_of)
        # The forward pass of training: the same parameters, compiled when train.compile is on
        # (evaluation runs the model as it is: other shapes, no backward).
        self.train_forward = self.model
        if cfg.train.compile or cfg.train.cuda_graphs:
            self.train_forward = torch.compile(self.model, mode="reduce-overhead" if cfg.train.cuda_graphs else None)
        # After prepare: ZeRO-3 regroups the optimizer's parameters, and the schedule must drive
        # the groups the engine really steps.
        self.scheduler = build_scheduler(self.optimizer, self.derived.warmup_steps, self.derived.total_steps)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=acc.device) if weights else None
        self.state = LoopState(Progress(), torch.full((), NO_BAD_STEP, dtype=torch.long, device=acc.device))

        # Bad input has been refused by now, and nothing written: from here on this run writes, alone.
        run_dir.claim(acc)
        if self.is_main:
            if cfg.overwrite:
                checkpoint.clear_results(run_dir.path)
            run_dir.path.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if cfg.resume:
            self.resume()  # may refuse (a changed recipe): the stopped run must then stay as it was
        if self.is_main:
            run_dir.new_attempt()
            dump_resolved(cfg, self.derived, run_dir / "config.yaml")
            atomic_write_json(run_dir / "data_fingerprint.json",
                              {"task": self.task.name, "counts": self.data.counts(), "train_used": len(train),
                               "heldout": len(heldout), "sha256": self.data.fingerprint})
        report.start(self.derived, self.state.progress.optimizer_step, flops_per_token)
        for note in notes:
            report.say(note)
        for split in self.task.absent_splits(self.data):  # evaluate the splits that exist, say which do not
            report.say(f"{split}: no examples in data.source={cfg.data.source}; not evaluated"
                       + (f" ({self.task.combined_split} is the other splits only)" if self.task.combined_split else ""))
        counts = ", ".join(f"{k} {v}" for k, v in self.data.counts().items())
        held = f", heldout {len(heldout)} (selection)" if heldout else ""
        report.say(f"{self.task.name}: {counts}{held}; {self.derived.describe()}")
        if weights:
            setting = cfg.train.class_weights if isinstance(cfg.train.class_weights, str) else "list"
            report.say(f"class weights (train.class_weights={setting}): "
                       + ", ".join(f"{n} {w:.4f}" for n, w in zip(self.data.label_names, weights)))
        return True

    def extends_finished_run(self) -> bool:
        """--resume on a finished run: True when the config makes it longer (train.max_steps or
        train.epochs raised: continue from its last checkpoint), else say there is nothing to do."""
        run_dir, cfg = self.run_dir.path, self.cfg
        before = load_config(run_dir / "config.yaml").train
        length = {"train.epochs": (before.epochs, cfg.train.epochs),
                  "train.max_steps": (before.max_steps, cfg.train.max_steps)}
        changed = {k: v for k, v in length.items() if v[0] != v[1]}
        if not changed:
            key = "train.max_steps" if before.max_steps is not None else "train.epochs"
            self.report.say(f"output_dir={run_dir} holds a finished run ({key}={length[key][0]}): nothing to resume; "
                            "resume with a larger train.max_steps (or train.epochs) to train it longer, or "
                            "--overwrite to train it again")
            return False
        if checkpoint.latest_good(run_dir, warn=lambda _: None, resuming=True) is None:
            raise RunDirError(f"output_dir={run_dir} holds a finished run without a complete checkpoint: it cannot be "
                              f"extended ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}); start a "
                              "new run in another output_dir")
        return True

    def tokenize(self, examples: list[Example], cache: Path) -> Tokenized:
        return tokenize(examples, self.tokenizer, self.cfg.data.max_length, cache, self.task.regression,
                        say=self.report.say)

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

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Epochs until total_steps, early stopping or a stop signal; then the final evaluation and export."""
        p, d, report = self.state.progress, self.derived, self.report
        self.model.train()  # from_pretrained returns a model in eval mode; compile it as it trains
        report.start_clock(self.warm_up())
        outcome = Outcome.DONE
        with signals.stoppable():
            if self.state.evaluation_due and self.evaluate_and_select():
                outcome = Outcome.EARLY_STOP  # the evaluation the stop put off ended the run
            while outcome in (Outcome.DONE, Outcome.EPOCH_END) and p.optimizer_step < d.total_steps \
                    and p.epoch < d.epochs:
                outcome = self.train_epoch()
            if outcome is Outcome.EPOCH_END:
                outcome = Outcome.DONE
            report.summary(p)
            if outcome is Outcome.STOPPED:
                return self.stopped()
        if self.state.last_eval_step != p.optimizer_step:
            self.evaluate_and_select()
        if not self.cfg.train.select_best or not (self.run_dir / "model").exists():
            self.export(reason="final", outputs=self.state.last_outputs)
        self.accelerator.wait_for_everyone()
        report.finished(p, outcome.value)
        report.final_block(outcome.value, p, self.state.last_eval_step)
        self.accelerator.end_training()
        return {"optimizer_step": p.optimizer_step, "outcome": outcome.value}

    def train_epoch(self) -> Outcome:
        """The rest of `progress.epoch`: micro-batches -> forward / backward -> (once per optimizer
        step) clip and step -> the step boundary."""
        cfg, acc, d, p = self.cfg, self.accelerator, self.derived, self.state.progress
        rank, world, accum = acc.process_index, acc.num_processes, d.gradient_accumulation_steps
        batches = global_batches(self.train_data.lengths, d.global_batch_size, cfg.seed, p.epoch,
                                 cfg.data.length_grouping)
        first_step = p.step_in_epoch  # > 0 when resuming mid-epoch
        seen: list[np.ndarray] = []  # this rank's examples, for the end-of-epoch audit
        for i, index in enumerate(rank_micro_batches(batches, rank, world, accum, first_step)):
            seen.append(index)
            # Dropout masks depend on (seed, epoch, step, micro-batch), not on rank or layout.
            torch.manual_seed(micro_batch_seed(cfg.seed, p.epoch, first_step + i // accum, (i % accum) * world + rank))
            batch = self.batches(index)
            # Inside accumulate(), accelerate skips the gradient all-reduce, optimizer.step() and
            # zero_grad() until the optimizer step's last micro-batch (acc.sync_gradients).
            with acc.accumulate(self.model):
                loss = self.loss(batch)
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            self.track_finite(loss)
            self.report.micro_batch(loss, batch)
            if not acc.sync_gradients:
                continue
            p.step_in_epoch += 1
            epoch, epoch_complete = p.epoch, p.step_in_epoch == d.steps_per_epoch
            outcome = self.after_step(grad_norm)
            if epoch_complete:
                self.audit_epoch(seen, first_step, epoch)
            if outcome is not None:
                return outcome
        p.epoch, p.step_in_epoch = p.epoch + 1, 0  # resumed exactly at the end of an epoch
        return Outcome.EPOCH_END

    def after_step(self, grad_norm: Any) -> Outcome | None:
        """After each optimizer step: schedule, then what `boundary` says (log, evaluate, checkpoint,
        stop). None: training goes on."""
        p = self.state.progress
        lr = self.scheduler.get_last_lr()[0]
        if self.optimizer.step_was_skipped:
            # fp16 loss-scale overflow: no update happened, so the schedule does not advance
            # (only fp16 can skip; the check costs nothing otherwise).
            p.skipped_steps += 1
        else:
            self.scheduler.step()
        p.optimizer_step += 1
        b = boundary(p.optimizer_step, p.step_in_epoch, self.cfg.train, self.derived)
        stopping = b.check and self.consensus()
        self.report.after_step(p, lr, grad_norm, log=b.log)
        if b.epoch_end:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
        # Evaluate, then checkpoint: the checkpoint then holds this evaluation's effect on the best
        # model and on early stopping, so a resumed run decides as the uninterrupted one. (Our
        # evaluation draws no random numbers and uses no DataLoader: it cannot perturb training.)
        early_stop = False
        if b.evaluate and not stopping:
            early_stop = self.evaluate_and_select()
        if b.save or stopping or early_stop:
            with self.report.paused():
                # A stop skips this step's evaluation (it saves at once); the checkpoint says it is
                # due, and the resumed run evaluates first: the same evaluations as without the stop.
                self.save_checkpoint(evaluation_due=stopping and b.evaluate)
        return b.outcome(stopping, early_stop)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's training loss: the model's own (mean cross-entropy, or MSE for
        regression), or the class-weighted cross-entropy with train.class_weights."""
        if self.class_weights is None:
            return self.train_forward(**batch).loss
        logits = self.train_forward(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)

    def track_finite(self, loss: torch.Tensor) -> None:
        """Remember the first optimizer step with a non-finite loss, on the device (no sync)."""
        s = self.state
        s.first_bad = torch.minimum(s.first_bad,
                                    torch.where(torch.isfinite(loss), NO_BAD_STEP, s.progress.optimizer_step + 1))

    def consensus(self) -> bool:
        """Collective: did any rank get a stop signal? Raises if any saw a non-finite loss. It syncs
        host and device, so it runs every CONSENSUS_EVERY steps and before anything is saved."""
        p = self.state.progress
        flags = torch.stack([torch.tensor(float(signals.requested() or 0), device=self.state.first_bad.device),
                             self.state.first_bad.double()])
        gathered = self.accelerator.gather(flags).view(-1, 2)
        first_bad = int(gathered[:, 1].min())
        if first_bad < NO_BAD_STEP:
            last = checkpoint.latest_good(self.run_dir.path, warn=lambda _: None)
            raise TrainingError(
                f"non-finite loss at optimizer step {first_bad} (epoch {p.epoch}); last good checkpoint: "
                f"{last or 'none'}; lower train.lr, check the model weights, or use bf16/fp32 instead of fp16"
            )
        received = [int(x) for x in gathered[:, 0].tolist() if x > 0]
        if received:
            signals.request(received[0])  # every rank records what any rank received
        return bool(received)

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
        self.report.log.event(records.EPOCH_DATA, epoch=epoch, optimizer_step=self.state.progress.optimizer_step,
                              examples=len(flat), distinct=len(set(flat)), per_rank=[len(part) for part in per_rank],
                              from_step=first_step, world_size=d.world_size)

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
        for epoch in range(self.state.progress.epoch, d.epochs):
            batches = global_batches(self.train_data.lengths, d.global_batch_size, cfg.seed, epoch,
                                     cfg.data.length_grouping)
            for batch in batches:
                for micro in np.split(batch, d.world_size * d.gradient_accumulation_steps):
                    first.setdefault(self.batches.width(micro), micro)
        for width in sorted(first):
            for _ in range(3):  # CUDA graph trees record on the second call and replay from the third
                acc.backward(self.loss(self.batches(first[width])))
                self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.report.say(f"compiled the step for {len(first)} batch widths ({', '.join(map(str, sorted(first)))}) "
                        f"in {seconds:.1f} s (not counted as training time)")
        return seconds

    def stopped(self) -> dict[str, Any]:
        """A stop signal ended training (its checkpoint is saved): mark the run directory."""
        p = self.state.progress
        sig = signals.requested()
        name = signal.Signals(sig).name if sig else "?"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.run_dir.mark_stopped(name, p.optimizer_step)
        self.report.stopped(p, sig, name)
        return {"optimizer_step": p.optimizer_step, "outcome": Outcome.STOPPED.value, "signal": name}

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
            n = len(self.data.label_names) or 1
            result = score_splits(self.task, self.dev.data.labels, predictions(self.task, dev.outputs),
                                  [e.split for e in self.dev.examples], n, dev.logits)
            if held is not None:
                result[HELDOUT] = score(self.task, self.heldout.data.labels, predictions(self.task, held.outputs), n,
                                        held.logits)
            result["outputs"] = dev.outputs
        return result

    def evaluate_and_select(self) -> bool:
        """Evaluate, log it, keep the best model; True when early stopping says stop."""
        with self.report.evaluating():
            result = self.evaluate()
            p, s, cfg = self.state.progress, self.state, self.cfg.train
            s.last_eval_step = p.optimizer_step
            self.report.evaluation(p, result)
            if self.is_main:
                self.write_predictions(result["outputs"])
                s.last_outputs = result["outputs"]
            # Rank 0 scored; every rank must take the same decisions.
            sel = result.get(self.selection_split, {})
            value, collapsed = self.broadcast([sel.get(self.task.main_metric, 0.0), float(sel.get("collapsed", 0))])
            improved, stop = p.record_evaluation(value, bool(collapsed), cfg.early_stopping_patience)
            if improved and cfg.select_best:
                self.export(reason=f"best {self.selection_split} {self.task.main_metric}",
                            outputs=result.get("outputs"))  # rank 0's
            if stop:
                self.report.say(f"early stop: {self.selection_split} {self.task.main_metric} has not improved on "
                                f"{p.best_value:.4f} (step {p.best_step}) for {p.evals_without_improvement} "
                                "evaluations")
        return stop

    def write_predictions(self, outputs: np.ndarray, path: Path | None = None) -> None:
        write_predictions(path or self.run_dir / "predictions.jsonl", self.task, self.data.label_names,
                          self.dev.examples, outputs)

    def broadcast(self, values: list[float]) -> list[float]:
        from accelerate.utils import broadcast

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return broadcast(t, from_process=0).tolist()

    # ------------------------------------------------------------------ checkpoints and export

    def trainer_state(self) -> dict[str, Any]:
        """Progress plus what a resume must match (the recipe, world size, ZeRO stage)."""
        return {
            **dataclasses.asdict(self.state.progress),
            "world_size": self.derived.world_size,
            "zero_stage": self.cfg.distributed.zero_stage,
            "weight_decay_groups": checkpoint.DECAY_GROUPS,
            "global_batch_size": self.derived.global_batch_size,
            "total_steps": self.derived.total_steps,
            "trajectory": checkpoint.trajectory(self.cfg, self.data.fingerprint),
            "scheduler": self.scheduler.state_dict(),
        }

    def save_checkpoint(self, evaluation_due: bool = False) -> Path:
        return checkpoint.save(self.accelerator, self.run_dir.path, self.state.progress.optimizer_step,
                               {**self.trainer_state(), "evaluation_due": evaluation_due},
                               self.cfg.train.keep_checkpoints)

    def resume(self) -> None:
        # Checkpoints that only another key could verify stop the resume here (one line), never a fresh start.
        ckpt = checkpoint.latest_good(self.run_dir.path, warn=self.report.say, resuming=True)
        log = self.report.log
        if ckpt is None:
            if self.is_main:
                checkpoint.ensure_key()  # nothing to resume: a fresh start, with its key
            if self.is_main and log.path.is_file():
                log.truncate_after(0)  # a fresh start gets a clean log
            self.report.say(f"resume: no complete checkpoint in {self.run_dir.path}; starting fresh")
            return
        state = checkpoint.read_trainer_state(ckpt)
        d = self.derived
        extension = checkpoint.check_resumable(ckpt, state, self.cfg, fingerprint=self.data.fingerprint,
                                               total_steps=d.total_steps)
        seconds = reshard.load_state(self.accelerator, ckpt, state)
        if self.is_main:
            log.truncate_after(state["optimizer_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        if seconds is not None:
            # The converted optimizer keeps its groups' rates from construction: the schedule's, as saved.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
            engine = f"ZeRO-{state['zero_stage']}" if state.get("zero_stage") is not None else "DDP"
            log.event(records.CONVERTED, optimizer_step=state["optimizer_step"], from_world_size=state["world_size"],
                      to_world_size=d.world_size, zero_stage=state.get("zero_stage"), seconds=round(seconds, 3))
            self.report.say(f"resumed on {d.world_size} process{'es' if d.world_size > 1 else ''} from a checkpoint of {state['world_size']} ({engine}, "
                            f"accumulation {d.gradient_accumulation_steps}): converted on load in {seconds:.1f} s")
        p = self.state.progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
        self.state.evaluation_due = state.get("evaluation_due", False)
        self.report.say(f"resumed from {ckpt} (epoch {p.epoch}, optimizer step {p.optimizer_step})")
        if extension is not None:
            continue_schedule(self.scheduler, p.optimizer_step)
            log.event(records.EXTENDED, optimizer_step=p.optimizer_step, from_steps=extension[0], to_steps=extension[1])
            self.report.say(f"extended from {extension[0]} to {extension[1]} optimizer steps: the learning rate follows "
                            f"the {extension[1]}-step schedule from step {p.optimizer_step} on (now "
                            f"{self.scheduler.get_last_lr()[0]:.3g})")

    def export(self, reason: str, outputs: np.ndarray | None = None) -> Path:
        """model/: the weights now, with training_info.json saying which step and why, and the
        model's own dev predictions (`outputs`), all in place at once (collective)."""
        p = self.state.progress
        info = {"selected": reason, "optimizer_step": p.optimizer_step, "epoch": p.epoch, "task": self.task.name,
                "metric": f"{self.selection_split}/{self.task.main_metric}",
                "value": p.best_value if reason != "final" else None, "run_dir": str(self.run_dir.path.resolve()),
                **summary.exported_evaluation(self.run_dir.path, p.optimizer_step, self.selection_split)}

        def predictions(folder: Path) -> None:
            if outputs is not None:
                self.write_predictions(outputs, folder / "dev_predictions.jsonl")

        return export_model(self.accelerator, self.model, self.tokenizer, self.run_dir.path, info,
                            self.cfg.distributed.zero_stage, base_model=lora.base_name(self.cfg.model),
                            extra=predictions)
