"""The training config: typed dataclasses are the single source of truth.

    python -m distributed_tune --config configs/cola_bert_base.yaml train.epochs=4 precision=bf16
    python -m distributed_tune config --config configs/cola_bert_base.yaml train.lr=3e-5   # resolved

A YAML file is merged over the dataclass defaults, then ``a.b=value`` overrides over that.
Unknown keys and wrong types are rejected with the key, the expected type and the closest
valid key (also for the names users bring from the HF Trainer). Everything derived from the
config and the world size (micro batch, accumulation, steps, warmup) is computed once in
:func:`derive` and written, with the resolved config, into the run directory.

Every command reads configs through :func:`load_config` (also a run's own config.yaml).
This module imports no torch/transformers: ``--help``, validation and the launcher stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distributed_tune.errors import ConfigError
from distributed_tune.files import atomic_write_text, not_utf8
from distributed_tune.keys import AT_LEAST_1, OFF_OR_POSITIVE, Check, Resume, key
from distributed_tune.tasks import NAMES as TASK_NAMES
from distributed_tune.tasks import SECTIONS as TASK_SECTIONS
from distributed_tune.tasks import Task, get_task

TRACKERS = ("tensorboard", "wandb", "mlflow")

# Per-key rules: see keys.py (resume, check, trainer, accelerate, formerly).


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters through peft (distributed_tune/lora.py); `model.lora: null` (the default) is
    full fine-tuning. The classification head is always trained in full and always saved."""

    r: int | None = key(None, resume="fixed", check=AT_LEAST_1)
    """LoRA rank; null: no LoRA, every weight is fine-tuned."""
    alpha: float = key(16.0, resume="fixed", check=Check(lambda v: v > 0, "must be positive"))
    """LoRA scaling numerator: the update is (alpha / r) B A."""
    dropout: float = key(0.0, resume="fixed", check=Check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    """Dropout on the LoRA input (0: off, and runs stay world-size invariant without re-seeding)."""
    target_modules: tuple[str, ...] | None = key(None, resume="fixed")
    """Module names that get adapters (peft's matching: a name's last part(s)), or `all-linear`;
    null: the family's default (BERT-like query/value, Llama/Qwen/Mistral/Gemma q_proj/v_proj,
    GPT-2 c_attn, DistilBERT q_lin/v_lin, DeBERTa query_proj/value_proj)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = key("bert-base-uncased", resume="fixed", trainer="model_name_or_path")
    """Hub name or local folder of any Hugging Face sequence-classification model."""
    dropout: float | None = key(None, resume="fixed", check=Check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    """Overrides every dropout probability in the model config; null keeps the model's own."""
    trust_remote_code: bool = key(False, resume="free")
    """Run code shipped with a hub model. Off: only enable for repositories you trust."""
    revision: str | None = key(None, resume="fixed")
    """Hub revision (branch, tag or commit) to pin; null takes the default branch."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class DataConfig:
    source: str | None = key(None, resume="fixed", trainer={"dataset_name": "task / data.source"})
    """Where the task's data comes from: a local folder, a URL (CoLA's official zip), `hub`, or a
    `datasets` save_to_disk folder; null: the task's default (CoLA: the official URL; GLUE: hub)."""
    cache_dir: str = key("~/.cache/distributed_tune", resume="free")
    """Where downloads and the tokenized dataset are cached."""
    max_length: int = key(128, resume="fixed", check=AT_LEAST_1, trainer=("max_seq_length", "max_length"))
    """Tokens per example at most (CoLA's longest sentence is ~47 BERT tokens)."""
    pad_to_multiple_of: int | None = key(None, resume="fixed", check=AT_LEAST_1)
    """Pad each batch to a multiple of this; null means 8 under fp16/bf16, else 1."""
    length_grouping: bool = key(True, resume="fixed")
    """Group examples of similar length into the same global batch (less padding, same data)."""
    heldout_fraction: float = key(0.0, resume="fixed",
                                  check=Check(lambda v: 0.0 <= v <= 0.5, "must be between 0 (off) and 0.5"))
    """Hold out this fraction of the training set (stratified, the same rows for every seed) to
    select the best model and stop early on; the dev sets are then reported, never selected on."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(5, resume="grow", check=AT_LEAST_1, trainer="num_train_epochs")
    """Passes over the training set (unless train.max_steps is set). More than the BERT paper's 3:
    CoLA runs often peak late, and early stopping ends the ones that do not (Mosbach et al. 2021)."""
    max_steps: int | None = key(None, resume="grow", check=AT_LEAST_1, trainer="max_steps")
    """Optimizer steps to train; when set it decides the length instead of train.epochs (as in the
    HF Trainer: the data is passed over as many times as needed); null: train.epochs."""
    global_batch_size: int = key(32, resume="fixed", check=AT_LEAST_1,
                                 trainer=("train_batch_size", "batch_size"))
    """Examples per optimizer step, summed over all processes and accumulation steps: the recipe."""
    micro_batch_size: int | None = key(None, resume="free", check=AT_LEAST_1, trainer={
        "per_device_train_batch_size": "train.micro_batch_size (the recipe is train.global_batch_size)",
        "gradient_accumulation_steps": "train.global_batch_size (accumulation is derived from it)"})
    """Examples per forward pass on one process; null: global batch / world size, with gradient
    accumulation only where that exceeds train.max_micro_batch_size."""
    max_micro_batch_size: int = key(32, resume="free", check=AT_LEAST_1)
    """The largest automatic micro batch (a memory cap per device)."""
    lr: float = key(2e-5, resume="fixed", check=Check(lambda v: v > 0, "must be positive"), trainer="learning_rate")
    """Peak learning rate of AdamW."""
    weight_decay: float = key(0.01, resume="fixed", check=OFF_OR_POSITIVE)
    """Decoupled weight decay, not applied to biases and LayerNorm weights."""
    adam_betas: tuple[float, float] = key(
        (0.9, 0.999), resume="fixed", trainer={"adam_beta1": "train.adam_betas", "adam_beta2": "train.adam_betas"},
        check=Check(lambda v: all(0.0 <= b < 1.0 for b in v), "must each be in [0, 1) (e.g. [0.9, 0.999])"))
    adam_eps: float = key(1e-8, resume="fixed", check=Check(lambda v: v > 0, "must be positive (e.g. 1e-8)"),
                          trainer="adam_epsilon")
    fused_adamw: bool = key(True, resume="free")
    """One fused kernel per AdamW step instead of ~6 passes over memory (4x faster on CPU)."""
    class_weights: Literal["none", "auto"] | tuple[float, ...] = key(
        "none", resume="fixed", check=Check(lambda v: isinstance(v, str) or all(w > 0 for w in v),
                                            "must be none, auto or a list of positive weights, one per class"))
    """Weights of the classes in the training loss: none; auto (n / (classes x count) from the
    training labels: rare classes weigh more); or a list, one weight per label in label order."""
    warmup_ratio: float = key(0.1, resume="fixed", check=Check(lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1"))
    """Fraction of the total optimizer steps spent in linear warmup, then linear decay to 0."""
    warmup_steps: int | None = key(None, resume="fixed", check=OFF_OR_POSITIVE, trainer="warmup_steps")
    """Warmup in optimizer steps; when set it replaces train.warmup_ratio."""
    max_grad_norm: float = key(1.0, resume="fixed", check=OFF_OR_POSITIVE, accelerate="gradient_clipping")
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = key(10, resume="free", check=AT_LEAST_1, trainer="logging_steps")
    """Log loss, lr, grad norm and throughput every this many optimizer steps."""
    eval_every: int = key(50, resume="free", check=OFF_OR_POSITIVE, trainer="eval_steps")
    """Evaluate every this many optimizer steps (0: only at the end of each epoch). 50 is about 5
    evaluations per epoch at batch 32: CoLA runs can peak and fall within an epoch."""
    early_stopping_patience: int = key(10, resume="free", check=OFF_OR_POSITIVE)
    """Stop after this many evaluations without a better selection metric (0: never stop early).
    Counting starts at the first evaluation that predicts more than one class: a run still in
    its one-class start is not stopped (Dodge et al. 2020: stop bad runs early, not slow ones)."""
    select_best: bool = key(True, resume="free", trainer="load_best_model_at_end")
    """The final model/ folder holds the weights of the best evaluation of the task's selection
    metric (training_info.json says which step), not the last ones."""
    checkpoint_every: int = key(0, resume="free", check=OFF_OR_POSITIVE, trainer="save_steps")
    """Save a resumable checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = key(2, resume="free", check=AT_LEAST_1, trainer="save_total_limit")
    """How many of the newest complete checkpoints to keep."""
    compile: bool = key(False, resume="free", accelerate="dynamo_backend")
    """torch.compile the training forward/backward (the batch widths of the run are compiled before
    the clock starts: metrics.jsonl's train_summary reports that warm-up apart)."""
    cuda_graphs: bool = key(False, resume="free")
    """Also capture each compiled step in a CUDA graph (torch.compile mode reduce-overhead): no
    per-kernel launch cost. One CUDA process, no DeepSpeed."""
    gradient_checkpointing: bool = key(False, resume="free", trainer="gradient_checkpointing")
    """Recompute each layer's activations in the backward pass instead of keeping them (transformers'
    non-reentrant checkpointing): less memory, ~30% more compute, the same losses."""


@dataclass(frozen=True)
class DistributedConfig:
    zero_stage: int | None = key(None, resume="fixed", trainer="deepspeed", accelerate="zero_stage", check=Check(
        lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2, 3 or null (plain DDP)"))
    """0-3: DeepSpeed with this ZeRO stage; null: plain data parallel (DDP, or one process).
    Unset in the config, accelerate's DeepSpeed setting (--use_deepspeed --zero_stage N) applies."""
    offload_optimizer: Literal["none", "cpu"] = key("none", resume="free", accelerate="offload_optimizer_device")
    """DeepSpeed optimizer-state offload (ZeRO 1-3)."""
    offload_params: Literal["none", "cpu"] = key("none", resume="free", accelerate="offload_param_device")
    """DeepSpeed parameter offload (ZeRO 3 only)."""
    timeout_s: int = key(600, resume="free", check=AT_LEAST_1)
    """Collective timeout: a rank that waits this long in one collective (a peer died in it, or never
    joins it while alive) fails, and the job with it."""
    hang_timeout_s: int = key(120, resume="free", check=AT_LEAST_1)
    """A peer that stops answering (stopped, frozen, its host gone: no heartbeat) ends the job after
    this long, with a line naming its rank and host; the job then fails, it is not requeued."""


@dataclass(frozen=True)
class Fp16Config:
    """Dynamic loss scaling for fp16: DeepSpeed uses all four; torch's GradScaler (DDP, one GPU)
    uses initial_scale_power and loss_scale_window."""

    initial_scale_power: int = key(16, resume="fixed")
    """The first loss scale is 2**this."""
    loss_scale_window: int = key(1000, resume="fixed")
    """Steps without overflow before the scale grows."""
    hysteresis: int = key(2, resume="fixed")
    """Overflows tolerated before the scale shrinks (DeepSpeed only)."""
    min_loss_scale: float = key(1.0, resume="fixed")
    """The scale never drops below this (DeepSpeed only)."""


@dataclass(frozen=True)
class BaseConfig:
    seed: int = key(42, resume="fixed", check=Check(lambda v: 0 <= v < 2**64, "must be between 0 and 2**64 - 1 "
                                                  "(torch and numpy take no other seed)"))
    """Seeds the model head, the data order (seed, epoch) and dropout (seed, step, micro-batch)."""
    task: str = key("cola", resume="fixed", trainer="task_name")
    """cola, a GLUE task as `datasets` names it (sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), or
    custom (your own files: custom.train_file, custom.validation_file, custom.text_fields)."""
    output_dir: str = key("runs/cola", resume="free")
    """The run directory: config, metrics.jsonl, predictions, checkpoints, final model."""
    precision: Literal["fp32", "bf16", "fp16"] = key("fp32", resume="fixed", accelerate="mixed_precision",
                                                     trainer={"fp16": "precision=fp16", "bf16": "precision=bf16"})
    """Mixed precision; fp16 needs a CUDA device. Unset in the config, accelerate's mixed_precision
    (its config file or --mixed_precision) applies."""
    report_to: tuple[str, ...] = key((), resume="free")
    """Experiment trackers (accelerate's): none, tensorboard, wandb, mlflow, or a list; files
    under output_dir/trackers, rank 0 only."""
    resume: bool = key(False, resume="free", trainer={"resume_from_checkpoint": "--resume"})
    """Continue from the newest complete checkpoint in output_dir (start fresh if none)."""
    overwrite: bool = key(False, resume="free", trainer={"overwrite_output_dir": "--overwrite"})
    """Delete an existing run directory's results before starting."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)

    @property
    def task_spec(self) -> Task:
        """The task, configured by its own section (`custom:`) where it has one."""
        return get_task(self.task).configured(getattr(self, self.task, None))


def _with_task_sections(base: type) -> type:
    """`base` plus one section per task that declares options (tasks.SECTIONS): the tasks own
    their keys, and this module never names a task."""
    sections = [(name, options, field(default_factory=options)) for name, options in TASK_SECTIONS.items()]
    return dataclasses.make_dataclass("Config", sections, bases=(base,), frozen=True,
                                      namespace={"__doc__": "The whole config: the package's sections and the tasks'.",
                                                 "__module__": __name__})


Config = _with_task_sections(BaseConfig)


@dataclass(frozen=True)
class KeyInfo:
    """One leaf key: its dotted name, type annotation, default and rules."""

    name: str
    type: Any
    default: Any
    resume: Resume
    check: Check | None
    trainer: dict[str, str]  # HF Trainer name -> what to say
    accelerate: str | None
    formerly: str | None


def _key_infos(cls: type, prefix: str = "") -> dict[str, KeyInfo]:
    out: dict[str, KeyInfo] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_key_infos(tp, f"{name}."))
            continue
        if "resume" not in f.metadata:
            raise AssertionError(f"config key {name} is declared without key(..., resume=...)")
        m = f.metadata
        trainer = m["trainer"] or {}
        if isinstance(trainer, str):
            trainer = (trainer,)
        if isinstance(trainer, tuple):
            trainer = dict.fromkeys(trainer, name)
        out[name] = KeyInfo(name, tp, f.default, m["resume"], m["check"], trainer, m["accelerate"], m["formerly"])
    return out


KEYS: dict[str, KeyInfo] = _key_infos(Config)
"""Every leaf key, in declaration order: 'seed', ..., 'train.lr', ..."""
# Config keys a resume must not change (saved with every checkpoint, compared on resume).
TRAJECTORY_KEYS = tuple(k for k, info in KEYS.items() if info.resume in ("fixed", "grow"))
# The run's length: may grow on resume (an extension), never shrink.
LENGTH_KEYS = tuple(k for k, info in KEYS.items() if info.resume == "grow")
# Names users bring from the HF Trainer / run_glue.py -> ours (for the unknown-key error).
TRAINER_NAMES = {alias: say for info in KEYS.values() for alias, say in info.trainer.items()}
# Names of earlier releases -> the key now (data.train_file -> custom.train_file).
FORMER_NAMES = {info.formerly: name for name, info in KEYS.items() if info.formerly}


# Written by the run into config.yaml for the record; read back, it is recomputed, not trusted.
DERIVED_KEY = "derived"

@dataclass(frozen=True)
class Derived:
    """Numbers computed once from the config, the world size and the training set size."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    train_examples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    pad_to_multiple_of: int
    epochs: int  # passes over the data the run starts (the last may be cut short by train.max_steps)

    def describe(self) -> str:
        return (
            f"world {self.world_size} x micro {self.micro_batch_size} x accumulation "
            f"{self.gradient_accumulation_steps} = global batch {self.global_batch_size}; "
            f"{self.steps_per_epoch} optimizer steps/epoch, {self.total_steps} total "
            f"({self.total_steps / self.steps_per_epoch:.3g} epochs), {self.warmup_steps} warmup"
        )


def batch_layout(t: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch, gradient accumulation steps) that make train.global_batch_size on `world_size`
    processes; fails with one line when no layout can."""
    g = t.global_batch_size
    if t.micro_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        if g % per_step:
            raise ConfigError(
                f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={t.micro_batch_size} "
                f"x world size {world_size} = {per_step}; pick a global batch that is a multiple of {per_step} "
                "or leave train.micro_batch_size unset (null: derived)"
            )
        return t.micro_batch_size, g // per_step
    if g % world_size:
        raise ConfigError(
            f"train.global_batch_size={g} cannot be split over world size {world_size}; pick a global batch "
            f"that is a multiple of {world_size} (e.g. {math.ceil(g / world_size) * world_size}) or another "
            "number of processes"
        )
    per_rank = g // world_size
    accumulation = next(a for a in range(1, per_rank + 1)
                        if per_rank % a == 0 and per_rank // a <= t.max_micro_batch_size)
    return per_rank // accumulation, accumulation


def pad_multiple(cfg: Config) -> int:
    return cfg.data.pad_to_multiple_of or (8 if cfg.precision in ("bf16", "fp16") else 1)


def derive(cfg: Config, world_size: int, train_examples: int) -> Derived:
    micro, accumulation = batch_layout(cfg.train, world_size)
    steps_per_epoch = train_examples // cfg.train.global_batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the training set "
            f"({train_examples} examples); lower it"
        )
    t = cfg.train
    # train.max_steps, when set, decides the length (the HF Trainer's rule), else train.epochs.
    total = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total)
    return Derived(
        world_size=world_size,
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        global_batch_size=t.global_batch_size,
        train_examples=train_examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(warmup, total),
        pad_to_multiple_of=pad_multiple(cfg),
        epochs=math.ceil(total / steps_per_epoch),
    )


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _optional_inner(tp) is not None:
        return f"{_type_name(_optional_inner(tp))} or null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {args[0].__name__}"
        return f"list of {len(args)} {args[0].__name__}s"
    return getattr(tp, "__name__", str(tp))


def _optional_inner(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form."""

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")

    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        try:
            return _coerce(value, inner, key, where)
        except ConfigError:
            raise bad() from None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. 'none' | 'auto' | a list of floats: the first that fits
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, key, where)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(value, str):  # `report_to: tensorboard`, `text_fields: sentence`
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise bad()
            return tuple(_coerce(v, args[0], key, where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(_coerce(v, t, key, where) for v, t in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "2e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: list[str]) -> str:
    ours = TRAINER_NAMES.get(key.rsplit(".", 1)[-1])
    if ours is not None:
        return f"; that is the HF Trainer's name: here it is {ours}"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for leaf, value in data.items():
        full = f"{prefix}{leaf}"
        if leaf not in hints:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"{where}: unknown key '{full}'{_suggest(full, valid + list(KEYS))}")
        tp = hints[leaf]
        if dataclasses.is_dataclass(tp):
            # `model.lora: null` is the section's defaults (for LoRA: full fine-tuning)
            kwargs[leaf] = _build(tp, {} if value is None else value, f"{full}.", where)
        elif leaf == "report_to" and value in ("none", None):
            kwargs[leaf] = ()
        else:
            kwargs[leaf] = _coerce(value, tp, full, where)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _renamed(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with keys of earlier releases under their names now (FORMER_NAMES): a run directory's
    config.yaml written before a key moved stays loadable, and means what it meant."""
    out = dict(tree)
    for old, new in FORMER_NAMES.items():
        section, _, leaf = old.rpartition(".")
        node = out.get(section) if section else out
        if isinstance(node, dict) and leaf in node:
            node = out[section] = dict(node) if section else node
            value = node.pop(leaf)
            if section and not node:
                del out[section]
            _set_dotted(out, new, value)
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`['train.lr=3e-5', 'model.name=/m']` -> nested dict; values are read as YAML scalars."""
    tree: dict[str, Any] = {}
    valid = list(KEYS)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=4)")
        key, raw = item.split("=", 1)
        key = FORMER_NAMES.get(key, key)
        if key not in valid:
            raise ConfigError(f"override: unknown key '{key}'{_suggest(key, valid)}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _refuse_duplicates(node: yaml.Node, path: Path, keys: tuple[str, ...] = ()) -> None:
    """A key given twice in one mapping (two `train:` blocks, `lr` twice): PyYAML keeps the last
    one and the first one's settings vanish. Refused, naming both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else key.start_mark.line
            line = key.start_mark.line + 1
            if name in seen and name != "<<":
                dotted = ".".join((*keys, str(name)))
                raise ConfigError(f"{path}:{line}: key '{dotted}' is given twice (lines {seen[name]} and {line}); "
                                  "only the last would be used: keep one")
            seen[name] = line
            _refuse_duplicates(value, path, (*keys, str(name)))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, path, keys)


def load_yaml_text(text: str, path: Path) -> Any:
    """yaml.safe_load, with duplicate keys refused (file:line, both lines)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _refuse_duplicates(node, path)
        return loader.construct_document(node) or {}
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; pass a YAML file (e.g. {path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(path, e)) from None
    try:
        data = load_yaml_text(text, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: YAML syntax error: {problem}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    data.pop(DERIVED_KEY, None)  # the record of a previous run: recomputed, never read back
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `a.b=value` overrides, validated; data.source resolved to the
    task's default when left null."""
    return load_config_and_keys(path, overrides)[0]


def load_config_and_keys(path: str | Path | None = None,
                         overrides: list[str] | None = None) -> tuple[Config, frozenset[str]]:
    """`load_config`, and the dotted keys the file and the overrides set (the others are defaults,
    which accelerate's own settings may replace)."""
    data = _renamed(read_yaml(path)) if path is not None else {}
    where = str(path) if path is not None else "config"
    cfg = _build(Config, data, "", where)
    over = parse_overrides(overrides or [])
    if over:
        cfg = _build(Config, _merge(to_dict(cfg), over), "", "override")
    validate(cfg)
    task = cfg.task_spec
    if cfg.data.source is None and task.default_source is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=task.default_source))
    return cfg, frozenset(_dotted(data)) | frozenset(_dotted(over))


def _dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _check_values(cfg: Config) -> None:
    """Each key's own bound (`key(check=...)`); every float is finite."""
    flat = flat_dict(cfg)
    for name, info in KEYS.items():
        value = flat[name]
        if value is None:
            continue
        shown = list(value) if isinstance(value, (tuple, list)) else value
        floats = [v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, float)]
        if not all(math.isfinite(v) for v in floats):
            raise ConfigError(f"{name}={shown} must be a finite number")
        if info.check is not None and not info.check.ok(value):
            raise ConfigError(f"{name}={shown} {info.check.says}")


def validate(cfg: Config) -> None:
    """Checks of single values and of combinations that need no hardware knowledge."""
    t, dist = cfg.train, cfg.distributed
    if cfg.task not in TASK_NAMES:
        get_task(cfg.task)  # raises with the closest name
    _check_values(cfg)
    if dist.offload_optimizer != "none" and not dist.zero_stage:
        raise ConfigError(
            "distributed.offload_optimizer=cpu needs DeepSpeed ZeRO stage 1, 2 or 3; "
            f"set distributed.zero_stage (now {dist.zero_stage})"
        )
    if dist.offload_params != "none" and dist.zero_stage != 3:
        raise ConfigError(
            f"distributed.offload_params=cpu needs distributed.zero_stage=3 (now {dist.zero_stage}); "
            "parameter offload exists only in ZeRO-3"
        )
    lora = cfg.model.lora
    if lora.r is not None and dist.offload_params != "none":
        raise ConfigError("model.lora.r is set with distributed.offload_params=cpu: peft cannot place its adapters on "
                          "ZeRO-3's offloaded parameters; set distributed.offload_params=none (LoRA's frozen base needs "
                          "no optimizer state: distributed.offload_optimizer=cpu or ZeRO-3 alone is enough)")
    if lora.r is None and lora.target_modules is not None:
        raise ConfigError(f"model.lora.target_modules={list(lora.target_modules)} is set but model.lora.r is null "
                          "(full fine-tuning); set model.lora.r (e.g. 8) to train LoRA adapters")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules=[] names no module; name some (e.g. [query, value]) or "
                          "leave it null for the model family's default")
    if (t.compile or t.cuda_graphs) and dist.zero_stage is not None:
        raise ConfigError(f"train.compile / train.cuda_graphs with distributed.zero_stage={dist.zero_stage}: DeepSpeed "
                          "runs its own engine; compile without DeepSpeed (distributed.zero_stage=null)")
    for name in cfg.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: {name!r} is not a tracker; use none or a list of {', '.join(TRACKERS)}")
    _validate_task_data(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other; pick one")


def _validate_task_data(cfg: Config) -> None:
    """A task section is for its task only; the configured task checks its own section."""
    for name in TASK_SECTIONS:
        if name == cfg.task:
            continue
        section = getattr(cfg, name)
        changed = [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != f.default]
        if changed:
            raise ConfigError(f"{name}.{changed[0]} is for task={name}; task={cfg.task} reads data.source")
    cfg.task_spec.check(cfg.data)


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: to_dict(getattr(cfg, f.name))
        if dataclasses.is_dataclass(getattr(cfg, f.name))
        else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def flat_dict(cfg: Any) -> dict[str, Any]:
    """{'train.lr': 2e-05, ...}: every leaf key, for comparisons and tracker hyperparameters."""
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def replace_keys(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted keys replaced, e.g. {"precision": "bf16", "train.max_grad_norm": 0.5}."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, _, leaf = name.rpartition(".")
        sections.setdefault(section, {})[leaf] = value
    top = sections.pop("", {})
    return dataclasses.replace(cfg, **top, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


def to_yaml(cfg: Config, derived: Derived | None = None) -> str:
    """The resolved config as YAML (+ the derived numbers). `resume` and `overwrite` say how one
    invocation treats the run directory, not what the run is: written as false, so that re-running
    from this file never deletes results by surprise."""
    data = {**to_dict(cfg), "resume": False, "overwrite": False}
    if derived is not None:
        data[DERIVED_KEY] = dataclasses.asdict(derived)
    return yaml.safe_dump(data, sort_keys=False)


def dump_resolved(cfg: Config, derived: Derived | None, path: Path) -> None:
    """Write the config that ran (plus the derived numbers) as YAML, atomically."""
    atomic_write_text(path, to_yaml(cfg, derived))


def help_text() -> str:
    """The config reference: every key, its type, default, resume rule, HF Trainer name and docstring."""
    import ast
    import inspect

    docs: dict[str, str] = {}

    def read_docs(cls: type, prefix: str) -> None:
        if cls is Config:  # made by _with_task_sections: the docs are in its base and sections
            read_docs(BaseConfig, prefix)
            for name, options in TASK_SECTIONS.items():
                read_docs(options, f"{prefix}{name}.")
            return
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[f"{prefix}{node.target.id}"] = " ".join(nxt.value.value.split())  # type: ignore[union-attr]
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                read_docs(tp, f"{prefix}{f.name}.")

    read_docs(Config, "")
    lines = []
    for name, info in KEYS.items():
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        notes = [f"default {default!r}"]
        if info.resume != "free":
            notes.append({"fixed": "fixed on resume", "grow": "may grow on resume"}[info.resume])
        aliases = [a for a, say in info.trainer.items() if say == name]
        if aliases:
            notes.append(f"HF Trainer: {', '.join(aliases)}")
        if info.formerly:
            notes.append(f"formerly {info.formerly}")
        lines.append(f"  {name} ({_type_name(info.type)}, {'; '.join(notes)})")
        if name in docs:
            lines.append(f"      {docs[name]}")
    return "\n".join(lines)
