"""The model card of an export: `model/README.md` in the Hugging Face Hub's format, so that the
folder can be published as it is (`python -m distributed_tune push RUN --repo-id you/name`).

    write(model_dir, run_dir)            # at every export, and when the run ends (its training time)
    huggingface_hub.ModelCard.load(model_dir / "README.md").data.eval_results   # what the hub reads

The YAML metadata (rendered by huggingface_hub's ModelCardData): base_model (a hub id; left out
when the model was a local folder, whose hub id is unknown), pipeline_tag, library_name, datasets,
metrics, tags and a model-index holding each metric of the exported step on every evaluated split.
The text: what was selected and why, a collapse warning, the results, how to load it, the recipe,
seed, world size, training time and the data fingerprint. Everything is read from the run
directory's own files (config.yaml, data_fingerprint.json, metrics.jsonl, model/training_info.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distributed_tune import records
from distributed_tune.config import load_config
from distributed_tune.files import atomic_write_text
from distributed_tune.summary import evaluation_at
from distributed_tune.tasks import Task

CARD = "README.md"
# Our metric names -> the names the Hub (and `evaluate`) use.
HUB_METRICS = {"mcc": "matthews_correlation", "accuracy": "accuracy", "f1": "f1", "pearson": "pearsonr",
               "spearman": "spearmanr", "eval_loss": "loss"}
EXAMPLE = {"cola": "The sailors rode the breeze clear of the rocks."}


def base_model(name: str) -> str | None:
    """A hub id ('bert-base-uncased', 'org/model'); None for a local folder."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def card_data(config: dict[str, Any], task: Task, info: dict[str, Any], evaluation: dict[str, dict[str, Any]],
              model_name: str) -> Any:
    """The card's metadata: huggingface_hub's ModelCardData with one EvalResult per split and metric."""
    from huggingface_hub import EvalResult, ModelCardData

    metrics = [*task.metrics, "eval_loss"]
    dataset = {"dataset_type": task.hub_dataset or "csv", "dataset_name": task.dataset_name or task.name}
    if task.hub_dataset:
        dataset["dataset_config"] = task.name
    results = [
        EvalResult(task_type="text-classification", task_name="Text Classification", **dataset, dataset_split=split,
                   metric_type=HUB_METRICS[m], metric_name=f"{split} {m}", metric_value=round(float(values[m]), 6))
        for split, values in evaluation.items() for m in metrics if values.get(m) is not None
    ]
    return ModelCardData(
        base_model=base_model(config["model"]["name"]), library_name="transformers", pipeline_tag="text-classification",
        datasets=[task.hub_dataset] if task.hub_dataset else None, metrics=[HUB_METRICS[m] for m in metrics],
        tags=["distributed_tune", task.name, "text-classification"], model_name=model_name,
        eval_results=results or None,
    )


def render(run_dir: Path, info: dict[str, Any], model_name: str, load_as: str) -> str:
    """The whole card: YAML metadata between '---' lines, then markdown."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    fingerprint = json.loads((run_dir / "data_fingerprint.json").read_text())
    rows = records.read(run_dir / "metrics.jsonl")
    step = info["optimizer_step"]
    evaluation = info.get("evaluation") or evaluation_at(rows, step)
    task = load_config(run_dir / "config.yaml").task_spec
    t, d, derived = config["train"], config["data"], config["derived"]
    main = task.main_metric
    selection = info["metric"].split("/")[0]
    summary = next(reversed(records.events(rows, records.TRAIN_SUMMARY)), None)
    end = records.last_end(rows)

    lines = [f"# {model_name}", "",
             f"`{config['model']['name']}` fine-tuned on the `{task.name}` task with distributed_tune "
             "(accelerate + DeepSpeed, its own training loop).", "",
             f"These are the weights of optimizer step {step} ({info['selected']}"
             + (f", {info['metric']} = {info['value']:.4f}" if info.get("value") is not None else "") + ")"
             + (f" of a run that ended at step {end['optimizer_step']} ({end.get('outcome', end['event'])})."
                if end else " of a run still training when this card was written."), ""]
    if info.get("collapsed"):
        lines += [f"**Collapsed:** at this step the model predicted a single class on {selection} ({main} "
                  f"{evaluation[selection][main]:.4f}): its labels carry no information. Train again (another "
                  "learning rate or seed) before using or publishing it.", ""]
    columns = ["n", *task.metrics, "eval_loss"]
    lines += [f"## Results (step {step})", "", "| split | " + " | ".join(columns) + " | collapsed |",
              "| --- |" + " ---: |" * len(columns) + " :---: |"]
    for split, values in evaluation.items():
        cells = [str(values["n"]), *(f"{values[m]:.4f}" if values.get(m) is not None else "-" for m in columns[1:])]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {'yes' if values.get('collapsed') else 'no'} |")
    example = EXAMPLE.get(task.name, "An example sentence.")
    lines += ["", f"The selection split is `{selection}`"
              + (" (a held-out slice of train: the dev numbers are honest)." if selection == "heldout" else
                 ": the dev numbers are those the model was selected on (optimistic)."),
              "", "## How to use", "", "```python", "from transformers import pipeline", "",
              f'classifier = pipeline("text-classification", model="{load_as}")',
              f"classifier({json.dumps(example)})", "```", "",
              "## Training", "",
              "| | |", "| --- | --- |",
              f"| seed | {config['seed']} |",
              f"| world size | {derived['world_size']} (world {derived['world_size']} x micro "
              f"{derived['micro_batch_size']} x accumulation {derived['gradient_accumulation_steps']} = global batch "
              f"{derived['global_batch_size']}) |",
              f"| precision, DeepSpeed | {config['precision']}, " + (
                  f"ZeRO-{zero}" if (zero := config["distributed"]["zero_stage"]) is not None else "none") + " |",
              f"| optimizer | AdamW lr {t['lr']}, weight decay {t['weight_decay']}, betas {t['adam_betas']}, "
              f"eps {t['adam_eps']}, clipping {t['max_grad_norm']} |",
              f"| schedule | linear warmup for {derived['warmup_steps']} step(s), then linear decay to 0; "
              f"{derived['total_steps']} optimizer steps in all ({derived['steps_per_epoch']} per epoch; epochs {t['epochs']}, "
              f"max_steps {t['max_steps']}) |",
              f"| evaluation, selection | every {t['eval_every']} steps and at epoch ends; best {info['metric']} kept "
              f"(select_best {t['select_best']}), early stopping patience {t['early_stopping_patience']} |",
              f"| max length | {d['max_length']} tokens |"]
    if summary:
        lines.append(f"| training time | {summary['train_seconds']:.1f} s training + {summary['eval_seconds']:.1f} s "
                     f"evaluation ({summary['samples_per_s']:.1f} samples/s; the last attempt) |")
    lines += ["", "## Data", "", f"Task `{task.name}`, data.source `{d['source']}`: "
              + ", ".join(f"{k} {v}" for k, v in fingerprint["counts"].items())
              + (f"; {fingerprint['heldout']} training examples held out for selection" if fingerprint.get("heldout")
                 else "") + ".", "", "| file | sha256 |", "| --- | --- |"]
    lines += [f"| {name} | `{sha}` |" for name, sha in fingerprint["sha256"].items()]
    lines += ["", "`config.yaml` of the run (next to this folder when it was exported) trains it again: "
              "`python -m distributed_tune --config config.yaml`.", ""]
    return card_data(config, task, info, evaluation, model_name).to_yaml().join(["---\n", "\n---\n\n"]) + "\n".join(lines)


def write(model_dir: Path, run_dir: Path, repo_id: str | None = None) -> Path:
    """model_dir/README.md from the run directory (atomically); `repo_id` names the card and its
    loading example after the hub repository it is pushed to."""
    info = json.loads((model_dir / "training_info.json").read_text())
    name = repo_id or Path(info.get("run_dir", run_dir)).name
    path = model_dir / CARD
    atomic_write_text(path, render(run_dir, info, name.split("/")[-1], repo_id or str((run_dir / "model").resolve())))
    return path
