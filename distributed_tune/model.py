"""Model, tokenizer, optimizer and schedule: a pretrained encoder configured for the task.

    tokenizer = load_tokenizer(cfg.model)
    model, notes = load_model(cfg.model, label_names, regression, tokenizer.pad_token_id)

Loading is quiet (no weight-loading bars, no transformers load table): what matters is said once
in `notes` (a new classification head, a head re-initialised for another number of labels, encoder
weights that were missing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from distributed_tune import hub
from distributed_tune.config import Config, ModelConfig, TrainConfig
from distributed_tune.errors import ConfigError, DistributedTuneError, ModelError
from distributed_tune.tasks import Task, TaskData

HEAD_PREFIXES = ("classifier.", "score.", "pooler.", "pre_classifier.", "logits_proj", "sequence_summary.")


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _load_error(cfg: ModelConfig, what: str, e: Exception) -> ModelError:
    folder = Path(cfg.name).expanduser()
    if folder.exists() or cfg.name.startswith((".", "/", "~")):
        hint = f"the folder {cfg.name} is not a Hugging Face model folder (config.json and weights)"
        if not folder.exists():
            hint = f"the folder {cfg.name} does not exist"
        elif what == "model weights" and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
            hint = f"a weights file in {cfg.name} cannot be read: truncated or corrupt; copy the model again"
    else:
        hint = (
            f"'{cfg.name}' could not be fetched from the Hugging Face hub (no network, or no such model); "
            "set model.name to a local save_pretrained folder"
        )
    return ModelError(f"model.name={cfg.name}: cannot load the {what}: {hint} ({_reason(e)})")


PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def refuse_pickled_weights(folder: Path, key: str) -> None:
    """Model folders are loaded from safetensors only: a pickled pytorch_model.bin can run code
    when it is loaded, and weights_only loading refuses some as a traceback. One line instead."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled:
        raise ModelError(
            f"{key}: the folder holds only pickled weights ({', '.join(pickled)}), and model folders are loaded from "
            "safetensors only (a pickle can run code when it is loaded); convert them where you trust them "
            "(transformers: from_pretrained(folder, use_safetensors=False) then save_pretrained(folder)), or use "
            "the model's model.safetensors")


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained arguments; without a reachable hub, only local files are tried, so that an
    offline run fails at once instead of after the hub client's retries (~45 s)."""
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if not Path(cfg.name).expanduser().exists() and hub.offline_reason() is not None:
        kwargs["local_files_only"] = True
    return kwargs


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars ("Loading weights", "Writing model shards") and no load report table."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, padding on the right (also recorded in the export, so that a
    left-padding family such as Llama reloads it the same way); a model without a pad token
    (GPT-2) pads with its EOS token."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(cfg.name, **_hub_kwargs(cfg))
    except (OSError, ValueError, TypeError) as e:
        raise _load_error(cfg, "tokenizer", e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"model.name={cfg.name}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.init_kwargs["padding_side"] = "right"  # save_pretrained writes init_kwargs
    return tok


def read_data_and_tokenizer(task: Task, cfg: Config) -> tuple[TaskData, Any]:
    """The task's data and the model's tokenizer. When the data cannot be read the tokenizer is
    still tried, and both problems are one error: without network a default run lacks both the
    CoLA archive and the hub model, and a user should not need one attempt per key."""
    try:
        data = task.read(cfg.data)
    except DistributedTuneError as data_error:
        try:
            load_tokenizer(cfg.model)
        except ModelError as model_error:
            raise DistributedTuneError(f"2 problems: (1) {data_error}; (2) {model_error}") from None
        raise
    return data, load_tokenizer(cfg.model)


def max_positions(model_config: Any, tokenizer: Any) -> int | None:
    """How many tokens the model can take (position embeddings), if it says."""
    limits = [getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
              if isinstance(getattr(model_config, k, None), int)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 100_000:
        limits.append(int(tokenizer.model_max_length))
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") and limits:
        limits[0] -= 2  # position ids start after the padding index
    return min(limits) if limits else None


def load_model(cfg: ModelConfig, label_names: tuple[str, ...], regression: bool, pad_token_id: int,
               max_length: int, tokenizer: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[str]]:
    """AutoModelForSequenceClassification for the task's labels (or one regression output), and
    notes worth saying once (head initialised or replaced, missing weights).

    `dtype`: the weights' dtype as loaded (`load_dtype`). Under ZeRO-3 the accelerator built before
    this call has made transformers load inside DeepSpeed's zero.Init: each rank materialises only
    its own shard, never a full copy of the model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    refuse_pickled_weights(Path(cfg.name).expanduser(), f"model.name={cfg.name}")
    kwargs = _hub_kwargs(cfg)
    try:
        mcfg = AutoConfig.from_pretrained(cfg.name, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "model config", e) from None
    limit = max_positions(mcfg, tokenizer)
    if limit is not None and max_length > limit:
        raise ModelError(f"data.max_length={max_length} is more than model.name={cfg.name} takes ({limit} "
                         f"positions); set data.max_length={limit} or less")
    old_labels = getattr(mcfg, "num_labels", 2) if getattr(mcfg, "architectures", None) and any(
        a.endswith("ForSequenceClassification") for a in mcfg.architectures) else None
    mcfg.num_labels = len(label_names) if not regression else 1
    mcfg.problem_type = "regression" if regression else "single_label_classification"
    names = label_names if not regression else ("score",)
    mcfg.id2label = dict(enumerate(names))
    mcfg.label2id = {v: k for k, v in mcfg.id2label.items()}
    vocab = getattr(mcfg.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and pad_token_id >= vocab:
        raise ModelError(f"model.name={cfg.name}: the tokenizer's pad token {tokenizer.pad_token!r} (id {pad_token_id}) "
                         f"is not in the model's vocabulary ({vocab} tokens): the tokenizer files belong to another "
                         "model; copy the model's own tokenizer files into the folder")
    mcfg.pad_token_id = pad_token_id
    if cfg.dropout is not None:
        # Every config field that is a dropout probability (hidden, attention, classifier, ...).
        for key, value in list(mcfg.to_dict().items()):
            if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
                setattr(mcfg, key, cfg.dropout)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                cfg.name, config=mcfg, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=True,
                output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise _load_error(cfg, "model weights", e) from None
    notes = []
    mismatched = sorted(k for k, *_ in info.get("mismatched_keys", ()))
    missing = sorted(info.get("missing_keys", ()))
    head_new = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if mismatched:
        notes.append(f"model.name={cfg.name} had a {old_labels or '?'}-output head; it was replaced by a new "
                     f"{mcfg.num_labels}-output head ({', '.join(mismatched)}) for this task")
    elif head_new:
        notes.append(f"a new {mcfg.num_labels}-output classification head was initialised "
                     f"({', '.join(head_new)}): expected when fine-tuning a pretrained encoder")
    other = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if other:
        notes.append(f"warning: model.name={cfg.name} lacks {len(other)} encoder weights, initialised at random "
                     f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); is it the right checkpoint?")
    return model, notes


def load_dtype(cfg: Config) -> torch.dtype:
    """bf16 under DeepSpeed bf16: DeepSpeed keeps the fp32 master copy of what is trained itself, so an
    fp32 copy of the whole model at load time would only cost host memory (8B: 32 GB per rank). fp32
    otherwise, whatever the checkpoint's dtype (transformers 5 would keep a bf16 checkpoint in bf16):
    autocast (DDP, one process) needs fp32 weights."""
    if cfg.precision == "bf16" and cfg.distributed.zero_stage is not None:
        return torch.bfloat16
    return torch.float32


def class_weights(setting: str | tuple[float, ...], labels: Any, label_names: tuple[str, ...],
                  regression: bool) -> tuple[float, ...] | None:
    """train.class_weights as one weight per class (label order), or None for an unweighted loss.
    `auto`: n / (classes x count of the class) over the training labels (scikit-learn's "balanced")."""
    if setting == "none":
        return None
    if regression:
        raise ConfigError(f"train.class_weights={_shown(setting)} is for classes; this task is a regression "
                          "(one score): set train.class_weights=none")
    k = len(label_names)
    if setting == "auto":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
        if (counts == 0).any():
            absent = [label_names[i] for i in np.flatnonzero(counts == 0)]
            raise ConfigError(f"train.class_weights=auto: no training example has the label {', '.join(absent)}; "
                              "give the weights as a list")
        return tuple(float(len(labels) / (k * c)) for c in counts)
    if len(setting) != k:
        raise ConfigError(f"train.class_weights={_shown(setting)} has {len(setting)} weight(s) but the task has {k} "
                          f"classes ({', '.join(label_names)}); give one weight per class, in that order")
    return tuple(setting)


def _shown(setting: str | tuple[float, ...]) -> str:
    return setting if isinstance(setting, str) else str(list(setting))


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and normalisation weights (all 1-D tensors) get no weight decay. Judged by the
    parameter's full shape: under ZeRO-3 the model is loaded partitioned, and every parameter the
    optimizer sees is then an empty 1-D placeholder (`ds_shape` holds its real shape)."""
    return len(getattr(param, "ds_shape", param.shape)) < 2 or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Bias-corrected AdamW with decoupled weight decay on weight matrices only.

    (The classic BERT fine-tuning tutorials pass `weight_decay_rate` in these groups, a key AdamW
    ignores, so no decay was applied at all; here the groups use AdamW's real `weight_decay` key.)
    """
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": skip, "weight_decay": 0.0},
    ]
    impl = {"fused": True} if cfg.fused_adamw else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, **impl)


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 -> 1 over `warmup_steps`, then linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Stepped once per optimizer step by the loop itself (not by accelerate, which would step
    it once per process)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(warmup_steps, total_steps))


def continue_schedule(scheduler: Any, step: int) -> None:
    """After a resume that made the run longer: the learning rate of `step` in the new (longer)
    schedule, in every parameter group. (The loaded optimizer state holds the old schedule's rate,
    0 at the end of a finished run; the loaded scheduler only its step count.)"""
    scheduler.last_epoch = step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def training_flops_per_token(model: torch.nn.Module) -> float:
    """~6 FLOPs per parameter per token (forward + backward), embeddings excluded: a lookup is
    no matmul. Attention scores are left out; on ~11-token CoLA sentences they are negligible."""
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return 6.0 * (sum(p.numel() for p in model.parameters()) - embedding)


# Dense peak TFLOP/s by GPU name and precision, for model FLOP utilisation (MFU).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # fp32 runs as TF32 matmuls
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}


def peak_flops(precision: str) -> float | None:
    """The CUDA device's dense peak in FLOP/s, or None off CUDA / for an unknown card."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision] * 1e12
    return None


def enable_gradient_checkpointing(model: torch.nn.Module, lora: bool) -> None:
    """train.gradient_checkpointing: transformers' own, non-reentrant (torch.utils.checkpoint with
    use_reentrant=False), not DeepSpeed's activation checkpointing. DeepSpeed's would need its
    `checkpointing.checkpoint` called inside the model's layers (Megatron-style models do that;
    Hugging Face models call torch's checkpoint through `gradient_checkpointing_enable`), so with
    both on the two would fight over the same layers; transformers' version works the same under one
    process, DDP and every ZeRO stage. Non-reentrant: it supports frozen inputs (LoRA's frozen
    embeddings) and keyword arguments; the reentrant one would silently compute no gradient for a
    layer whose inputs need none."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        # LoRA freezes the embeddings: make their output require grad so that the first checkpointed
        # layer's recomputation is part of the graph (peft's own advice; harmless when non-reentrant).
        model.enable_input_require_grads()


def what_runs(model: torch.nn.Module, accelerator: Any, cfg: Config) -> str:
    """One line: parameters total / trainable, the weights' dtype and the memory of this rank now
    (after the model and optimizer are placed; every rank holds the same under DDP, its shard under
    ZeRO-3)."""
    from distributed_tune.lora import count_parameters

    total, trainable = count_parameters(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if torch.cuda.is_available():
        memory = f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB CUDA allocated per rank"
    else:
        import psutil

        memory = f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB host RSS per rank"
    mode = f"ZeRO-{cfg.distributed.zero_stage}" if cfg.distributed.zero_stage is not None else "no DeepSpeed"
    return (f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%), "
            f"{dtype} weights; {mode} on {accelerator.num_processes} process(es); {memory}")
