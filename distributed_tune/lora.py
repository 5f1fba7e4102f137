"""LoRA adapters through peft, with the classification head always trained and always saved.

    model, note = apply_lora(model, cfg.model)          # model.lora.r set; else the model as it is
    peft_config(cfg.model, model)                       # the same peft LoraConfig, e.g. for the export

The head (`classifier` / `score` / `pooler` / `pre_classifier`, whichever the family has) goes into
peft's `modules_to_save`: it is trained in full and written with the adapter (the classic casualty of
Trainer + peft, where a reloaded model predicts at random). `model.lora.target_modules: null` takes the
family's default below; a target that matches no module is one line naming modules that do exist.
Imports peft only inside the functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from distributed_tune.config import ModelConfig
from distributed_tune.errors import ConfigError

# The attention projections LoRA adapts by default (the LoRA paper's W_q and W_v), by model_type.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet", "xlm", "megatron-bert"),
                    ("query", "value")),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
                     "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "starcoder2"), ("q_proj", "v_proj")),
    "gpt2": ("c_attn",),
    "distilbert": ("q_lin", "v_lin"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "modernbert": ("Wqkv",),
    "albert": ("query", "value"),
}
# Head modules: trained in full and saved with the adapter (matched as a module name's last part).
HEAD_NAMES = ("classifier", "score", "pooler", "pre_classifier")


def enabled(cfg: ModelConfig) -> bool:
    return cfg.lora.r is not None


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Dotted names of the linear layers peft can adapt (torch Linear, transformers' Conv1D)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def head_modules(model: torch.nn.Module) -> list[str]:
    """The head's module names present in `model` (at most two levels deep: `classifier`, `bert.pooler`)."""
    found = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES and name.count(".") <= 1 and leaf not in found:
            found.append(leaf)
    return found


def targets(cfg: ModelConfig, model: torch.nn.Module) -> tuple[str, ...] | str:
    """model.lora.target_modules, or the family's default; checked against the model's modules."""
    model_type = getattr(model.config, "model_type", "?")
    chosen = cfg.lora.target_modules
    if chosen is None:
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"model.lora.target_modules: no default for model type {model_type!r} "
                              f"(model.name={cfg.name}); set it, e.g. model.lora.target_modules="
                              f"[{', '.join(_examples(model))}] or all-linear")
        chosen = DEFAULT_TARGETS[model_type]
    if tuple(chosen) == ("all-linear",):
        return "all-linear"
    linear = _linear_names(model)
    missing = [t for t in chosen if not any(n == t or n.endswith(f".{t}") for n in linear)]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} not among the linear layers of "
                          f"model.name={cfg.name} ({model_type}); it has e.g. {', '.join(_examples(model))}: set "
                          "model.lora.target_modules to some of those (or all-linear)")
    return tuple(chosen)


def _examples(model: torch.nn.Module, n: int = 6) -> list[str]:
    """A few distinct last names of the model's linear layers, the head left out."""
    out: list[str] = []
    for name in _linear_names(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in out and not any(part in HEAD_NAMES for part in name.split(".")):
            out.append(leaf)
    return out[:n]


def peft_config(cfg: ModelConfig, model: torch.nn.Module) -> Any:
    """peft's LoraConfig for `model` (a transformers sequence classifier, not yet wrapped)."""
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=targets(cfg, model), modules_to_save=head_modules(model))


def base_name(cfg: ModelConfig) -> str:
    """What the adapter's base_model_name_or_path says: a local folder as an absolute path (the
    adapter is loaded from elsewhere), a hub id as it is."""
    folder = Path(cfg.name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else cfg.name


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable); under ZeRO-3 a partitioned parameter's full size (ds_numel)."""
    total = trainable = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> tuple[torch.nn.Module, str | None]:
    """The model wrapped in LoRA adapters (model.lora.r set), else unchanged; and a note saying what
    is trained."""
    if not enabled(cfg):
        return model, None
    from peft import get_peft_model

    config = peft_config(cfg, model)
    heads = list(config.modules_to_save)  # peft adds its SEQ_CLS defaults (classifier, score) to the list
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(model, config)
    shown = config.target_modules if isinstance(config.target_modules, str) else ", ".join(sorted(config.target_modules))
    note = (f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g} on {shown}; "
            f"head trained in full and saved: {', '.join(heads)}")
    return wrapped, note
