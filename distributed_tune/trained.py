"""A trained model and the run it came from: what `evaluate` and `predict` point at.

    target = resolve_target("runs/cola", overrides=["data.source=/data/cola"])
    model, tokenizer = load_trained(target)          # fp32, eval mode; the task's labels checked

A run directory is read with its own config.yaml (the one config reader, `load_config`); a bare
save_pretrained folder with the task its training_info.json names (else `task=`, default cola).
Imports no torch at module level.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_tune.config import Config, ModelConfig, load_config
from distributed_tune.errors import ModelError, RunDirError

ADAPTER_CONFIG = "adapter_config.json"  # peft's; a LoRA adapter folder (RUN/model/adapter)


@dataclass(frozen=True)
class Target:
    """What the user pointed at: the model folder, the run (if any) and its config."""

    model_dir: Path
    run_dir: Path | None
    cfg: Config

    @property
    def training_info(self) -> dict[str, Any] | None:
        path = self.model_dir / "training_info.json"
        if not path.is_file() and (self.model_dir / ADAPTER_CONFIG).is_file():
            path = self.model_dir.parent / "training_info.json"  # RUN/model/adapter: the merged model's
        return json.loads(path.read_text()) if path.is_file() else None

    def logged_evaluation(self) -> dict[str, Any] | None:
        """The run's own evaluation of the weights in model/ (the step in training_info.json, else
        the last one), split -> record; None for a bare model folder."""
        if self.run_dir is None or not (self.run_dir / "metrics.jsonl").is_file():
            return None
        from distributed_tune import records

        evals = records.evaluations(records.read(self.run_dir / "metrics.jsonl"))
        if not evals:
            return None
        info = self.training_info or {}
        step = info.get("optimizer_step", evals[-1]["optimizer_step"])
        at_step = [r for r in evals if r["optimizer_step"] == step] or evals
        return {r["split"]: r for r in at_step}

    def collapse_warning(self) -> str | None:
        """A warning when the run found these weights collapsed (one class predicted on the selection
        split at their step), else None. Read from training_info.json, which travels with the folder;
        an export older than its `collapsed` field is looked up in the run's metrics.jsonl."""
        info = self.training_info or {}
        task = self.cfg.task_spec
        split = info["metric"].split("/")[0] if "metric" in info else task.selection_split
        evaluation = info.get("evaluation") if "collapsed" in info else self.logged_evaluation()
        record = (evaluation or {}).get(split, {})
        if not info.get("collapsed", record.get("collapsed")):
            return None
        what = "value" if task.regression else "class"
        return (f"warning: {self.model_dir} is collapsed: at optimizer step {info.get('optimizer_step', '?')} it "
                f"predicted a single {what} on {split} ({task.main_metric} {record.get(task.main_metric, 0.0):.4f}); "
                "its labels carry no information: train it again (another train.lr or seed)")


def resolve_target(path: str, overrides: list[str]) -> Target:
    """A run directory (RUN/model + RUN/config.yaml) or a save_pretrained folder (config.json)."""
    p = Path(path).expanduser()
    if (p / ADAPTER_CONFIG).is_file():
        # A LoRA adapter (peft's format): RUN/model/adapter, or a folder copied elsewhere.
        run_dir = p.parent.parent if p.parent.name == "model" and (p.parent.parent / "config.yaml").is_file() else None
        if run_dir is not None:
            return Target(p, run_dir, load_config(run_dir / "config.yaml", overrides))
        info_path = p.parent / "training_info.json"
        task = json.loads(info_path.read_text()).get("task") if info_path.is_file() else None
        return Target(p, None, load_config(None, ([f"task={task}"] if task else []) + overrides))
    if (p / "config.json").is_file():
        run_dir = p.parent if p.name == "model" and (p.parent / "config.yaml").is_file() else None
        if run_dir is not None:
            return Target(p, run_dir, load_config(run_dir / "config.yaml", overrides))
        info_path = p / "training_info.json"
        task = json.loads(info_path.read_text()).get("task") if info_path.is_file() else None
        return Target(p, None, load_config(None, ([f"task={task}"] if task else []) + overrides))
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        if not (p / "model" / "config.json").is_file():
            raise RunDirError(
                f"{p}: run directory without a model/ folder (the run has not finished or failed); "
                "evaluate a finished run or a save_pretrained folder"
            )
        return Target(p / "model", p, load_config(p / "config.yaml", overrides))
    raise ModelError(
        f"{p}: neither a run directory (config.yaml + model/), a save_pretrained folder (config.json + weights) "
        "nor a LoRA adapter folder (adapter_config.json); pass one of those"
    )


def load_trained(target: Target, label_names: tuple[str, ...] | None = None) -> tuple[Any, Any]:
    """(model in eval mode, fp32; tokenizer) from the target's model folder; the model's labels
    must be the task's."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    from distributed_tune.model import load_tokenizer, quiet_transformers, refuse_pickled_weights

    refuse_pickled_weights(target.model_dir, str(target.model_dir))
    tokenizer = load_tokenizer(ModelConfig(name=str(target.model_dir)))
    task = target.cfg.task_spec
    names = label_names or task.label_names
    try:
        with quiet_transformers():
            # fp32 whatever the saved dtype: CPU-safe and exact.
            if (target.model_dir / ADAPTER_CONFIG).is_file():
                model = _merged_adapter(target.model_dir, names, task.regression, tokenizer.pad_token_id)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(target.model_dir, dtype=torch.float32,
                                                                           use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{target.model_dir}: cannot load the model ({reason}); "
                         "pass a save_pretrained folder with config.json and weights") from None
    outputs = 1 if task.regression else len(names)
    if model.config.num_labels != outputs:
        raise ModelError(f"{target.model_dir}: the model has {model.config.num_labels} outputs; task={task.name} "
                         f"needs {outputs}; pass task= for the task it was trained on")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _merged_adapter(folder: Path, names: tuple[str, ...], regression: bool, pad_token_id: int) -> Any:
    """A LoRA adapter folder onto its base model (adapter_config.json's base_model_name_or_path),
    merged: the same model as the run's merged model/ export."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{folder}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path); set it to the "
                         "model the adapter was trained on")
    labels = ("score",) if regression else names
    base = AutoModelForSequenceClassification.from_pretrained(
        base_name, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, pad_token_id=pad_token_id, dtype=torch.float32,
        ignore_mismatched_sizes=True)  # the head comes from the adapter folder (peft's modules_to_save)
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, folder).merge_and_unload()


def label_names(target: Target) -> tuple[str, ...]:
    """The task's labels; a custom task's live in the model's id2label."""
    task = target.cfg.task_spec
    if task.label_names or task.regression:
        return task.label_names
    path = target.model_dir / "config.json"
    if not path.is_file():  # an adapter folder next to its merged model
        path = target.model_dir.parent / "config.json"
    config = json.loads(path.read_text())
    return tuple(config["id2label"][str(i)] for i in range(len(config["id2label"])))
