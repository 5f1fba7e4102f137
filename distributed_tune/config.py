"""The training config: typed dataclasses are the single source of truth.

    python -m distributed_tune --config configs/cola_bert_base.yaml train.epochs=4 precision=bf16

A YAML file is merged over the dataclass defaults, then ``a.b=value`` overrides over that.
Unknown keys and wrong types are rejected with the key, the expected type and the closest
valid key. Everything derived from the config and the world size (accumulation, steps, warmup)
is computed once in :func:`derive` and written, with the resolved config, into the run directory.

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

OFFICIAL_COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "bert-base-uncased"
    """Hub name or local folder of any Hugging Face sequence-classification model."""
    dropout: float | None = None
    """Overrides every dropout probability in the model config; null keeps the model's own."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off: only enable for repositories you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; null takes the default branch."""


@dataclass(frozen=True)
class DataConfig:
    source: str = OFFICIAL_COLA_URL
    """A local folder with the raw CoLA TSVs, the official zip URL, or `hub` (nyu-mll/glue, cola)."""
    cache_dir: str = "~/.cache/distributed_tune"
    """Where the downloaded archive and the tokenized dataset are cached."""
    max_length: int = 128
    """Tokens per sentence at most (CoLA's longest is ~47 BERT tokens)."""
    pad_to_multiple_of: int | None = None
    """Pad each batch to a multiple of this; null means 8 under fp16/bf16, else 1."""
    length_grouping: bool = True
    """Group sentences of similar length into the same global batch (less padding, same data)."""
    num_workers: int = 0
    """DataLoader workers; batches are pre-tokenized, so 0 is usually fastest."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    """Passes over the training set at most. More than the BERT paper's 3: CoLA runs often peak
    late, and early stopping ends the ones that do not (Mosbach et al. 2021)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (evaluation still runs at the end); null: epochs."""
    global_batch_size: int = 32
    """Sentences per optimizer step, summed over all processes and accumulation steps."""
    micro_batch_size: int = 32
    """Sentences per forward pass on one process; accumulation is derived from the two."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """Decoupled weight decay, not applied to biases and LayerNorm weights."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    fused_adamw: bool = True
    """One fused kernel per AdamW step instead of ~6 passes over memory (4x faster on CPU)."""
    warmup_ratio: float = 0.1
    """Fraction of the total optimizer steps spent in linear warmup, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 10
    """Log loss, lr, grad norm and throughput every this many optimizer steps."""
    eval_every: int = 50
    """Evaluate every this many optimizer steps (0: only at the end of each epoch). 50 is about 5
    evaluations per epoch at batch 32: CoLA runs can peak and fall within an epoch."""
    early_stopping_patience: int = 10
    """Stop after this many evaluations without a better dev MCC (0: never stop early); 10 is about
    two epochs at batch 32 (Dodge et al. 2020: stop bad runs early)."""
    select_best: bool = True
    """The final model/ folder holds the weights of the best dev-MCC evaluation (training_info.json
    says which step), not the last ones. Note: chosen on the dev set that is also reported."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = 2
    """How many of the newest complete checkpoints to keep."""


@dataclass(frozen=True)
class DistributedConfig:
    zero_stage: int | None = None
    """null: plain data parallel (DDP, or one process); 0-3: DeepSpeed with this ZeRO stage."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """DeepSpeed optimizer-state offload (ZeRO 1-3)."""
    offload_params: Literal["none", "cpu"] = "none"
    """DeepSpeed parameter offload (ZeRO 3 only)."""
    timeout_s: int = 600
    """Collective timeout: a dead rank ends the job after this long instead of hanging it."""


@dataclass(frozen=True)
class Fp16Config:
    """Dynamic loss scaling for fp16: DeepSpeed uses all four; torch's GradScaler (DDP, one GPU)
    uses initial_scale_power and loss_scale_window."""

    initial_scale_power: int = 16
    """The first loss scale is 2**this."""
    loss_scale_window: int = 1000
    """Steps without overflow before the scale grows."""
    hysteresis: int = 2
    """Overflows tolerated before the scale shrinks (DeepSpeed only)."""
    min_loss_scale: float = 1.0
    """The scale never drops below this (DeepSpeed only)."""


@dataclass(frozen=True)
class Config:
    seed: int = 42
    """Seeds the model head, the data order (seed, epoch) and dropout (seed, step, micro-batch)."""
    output_dir: str = "runs/cola"
    """The run directory: config, metrics.jsonl, predictions, checkpoints, final model."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision; fp16 needs a CUDA device."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir (start fresh if none)."""
    overwrite: bool = False
    """Delete an existing run directory's results before starting."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)


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

    def describe(self) -> str:
        return (
            f"world {self.world_size} x micro {self.micro_batch_size} x accumulation "
            f"{self.gradient_accumulation_steps} = global batch {self.global_batch_size}; "
            f"{self.steps_per_epoch} optimizer steps/epoch, {self.total_steps} total, "
            f"{self.warmup_steps} warmup"
        )


def check_batch_arithmetic(cfg: Config, world_size: int) -> int:
    """Return the gradient accumulation steps, or fail on batch sizes that cannot be made."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x world size {world_size} = {per_step}; "
            f"pick a global batch that is a multiple of {per_step} or change the micro batch"
        )
    return t.global_batch_size // per_step


def derive(cfg: Config, world_size: int, train_examples: int) -> Derived:
    accumulation = check_batch_arithmetic(cfg, world_size)
    steps_per_epoch = train_examples // cfg.train.global_batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the training set "
            f"({train_examples} examples); lower it"
        )
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    pad = cfg.data.pad_to_multiple_of or (8 if cfg.precision != "fp32" else 1)
    return Derived(
        world_size=world_size,
        micro_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        global_batch_size=cfg.train.global_batch_size,
        train_examples=train_examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
        pad_to_multiple_of=pad,
    )


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _optional_inner(tp) is not None:
        return f"{_type_name(_optional_inner(tp))} or null"
    return getattr(tp, "__name__", str(tp)).replace("tuple", "list of 2 floats")


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
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise bad()
        return tuple(_coerce(v, t, key, where) for v, t in zip(value, typing.get_args(tp)))
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
                return float(value)
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
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key, e.g. ['seed', ..., 'train.lr', ...]."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"{where}: unknown key '{full}'{_suggest(full, valid + all_keys())}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", where)
        else:
            kwargs[key] = _coerce(value, tp, full, where)
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


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`['train.lr=3e-5', 'model.name=/m']` -> nested dict; values are read as YAML scalars."""
    tree: dict[str, Any] = {}
    valid = all_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=4)")
        key, raw = item.split("=", 1)
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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
    """Defaults <- YAML file <- `a.b=value` overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    cfg = _build(Config, data, "", where)
    if overrides:
        merged = _merge(to_dict(cfg), parse_overrides(overrides))
        cfg = _build(Config, merged, "", "override")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks of single values and of combinations that need no hardware knowledge."""
    t, d = cfg.train, cfg.distributed
    positive = {
        "train.epochs": t.epochs,
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.log_every": t.log_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "data.max_length": cfg.data.max_length,
        "distributed.timeout_s": d.timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key, value in {"train.eval_every": t.eval_every, "train.checkpoint_every": t.checkpoint_every,
                       "train.early_stopping_patience": t.early_stopping_patience}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be 0 (off) or positive")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be at least 1 (or null for all epochs)")
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must be between 0 and 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if d.zero_stage is not None and d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage={d.zero_stage} must be 0, 1, 2, 3 or null (plain DDP)")
    if d.offload_optimizer != "none" and not d.zero_stage:
        raise ConfigError(
            "distributed.offload_optimizer=cpu needs DeepSpeed ZeRO stage 1, 2 or 3; "
            f"set distributed.zero_stage (now {d.zero_stage})"
        )
    if d.offload_params != "none" and d.zero_stage != 3:
        raise ConfigError(
            f"distributed.offload_params=cpu needs distributed.zero_stage=3 (now {d.zero_stage}); "
            "parameter offload exists only in ZeRO-3"
        )
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other; pick one")


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: to_dict(getattr(cfg, f.name))
        if dataclasses.is_dataclass(getattr(cfg, f.name))
        else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def dump_resolved(cfg: Config, derived: Derived | None, path: Path) -> None:
    """Write the config that ran (plus the derived numbers) as YAML, atomically. `resume` and
    `overwrite` say how one invocation treats the run directory, not what the run is: they are
    written as false, so that re-running from this file never deletes results by surprise."""
    data = {**to_dict(cfg), "resume": False, "overwrite": False}
    if derived is not None:
        data[DERIVED_KEY] = dataclasses.asdict(derived)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def help_text() -> str:
    """The config reference: every key, its type, default and docstring."""
    import ast
    import inspect

    lines = []

    def docs(cls: type) -> dict[str, str]:
        out, tree = {}, ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                out[node.target.id] = nxt.value.value.strip()  # type: ignore[union-attr]
        return out

    def walk(cls: type, prefix: str) -> None:
        doc = docs(cls)
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r})")
            if f.name in doc:
                lines.append(f"      {doc[f.name]}")

    walk(Config, "")
    return "\n".join(lines)
