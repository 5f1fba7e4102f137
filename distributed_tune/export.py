"""The run's `model/` folder: the kept weights as a `save_pretrained` folder users load as is.

    out = export_model(accelerator, model, tokenizer, run_dir, info, zero_stage)   # collective

fp32 safetensors whatever the training precision (gathered from the shards under ZeRO-3), the
tokenizer, and `training_info.json` (which step, why it was kept). Written as `.tmp-model/` and
renamed over `model/`: a failed export keeps the previous model/ and leaves no half-written folder.

With LoRA (model.lora.r), `model/` is the merged model (base + (alpha/r) B A, merged in fp32, the
trained head included): `pipeline()` and AutoModelForSequenceClassification load it without peft.
`model/adapter/` holds the same run in peft's format (adapter + head, `PeftModel.from_pretrained`
onto the base model.name) with the tokenizer. Both come from one gathered state dict (ZeRO-3: the
full parameters), loaded on rank 0 into a fresh copy of the model: the training model is untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distributed_tune import model_card
from distributed_tune.errors import RunDirError
from distributed_tune.files import WriteError, atomic_write_json, remove, writing
from distributed_tune.model import quiet_transformers

MODEL_DIR, TMP_MODEL_DIR, TRAINING_INFO, ADAPTER_DIR = "model", ".tmp-model", "training_info.json", "adapter"


def export_model(accelerator: Any, model: Any, tokenizer: Any, run_dir: Path, info: dict[str, Any],
                 zero_stage: int | None, base_model: str | None = None,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Collective (every rank gathers under ZeRO-3); rank 0 writes. `extra(folder)` writes more
    files into the export before it is renamed into place (the model's own dev predictions).
    Returns run_dir/model."""
    state = accelerator.get_state_dict(model)  # collective under ZeRO-3; None off rank 0
    out = run_dir / MODEL_DIR
    failure = [None]
    if accelerator.is_main_process:
        tmp = run_dir / TMP_MODEL_DIR
        try:
            remove(run_dir, [tmp], "exporting the model")
            with writing(tmp):
                unwrapped = accelerator.unwrap_model(model)
                if hasattr(unwrapped, "peft_config"):
                    with _no_zero_init(), warnings.catch_warnings():
                        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers flag
                        unwrapped, state = _merged(unwrapped, state, tokenizer, tmp / ADAPTER_DIR, base_model)
                elif zero_stage == 3:
                    # Loading under ZeRO-3 records transformers' legacy renamings (LayerNorm gamma/beta),
                    # which save_pretrained would write back; the default mapping writes today's names.
                    unwrapped._weight_conversions = None
                # One rule for every backend: the export is fp32. save_pretrained pops tensors out of
                # the dict it gets: it gets its own.
                fp32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
                unwrapped.config.dtype = torch.float32
                with quiet_transformers():
                    unwrapped.save_pretrained(tmp, state_dict=fp32, safe_serialization=True)
                    tokenizer.save_pretrained(tmp)
                atomic_write_json(tmp / TRAINING_INFO, info)
                model_card.write(tmp, run_dir)  # model/README.md
                if extra is not None:
                    extra(tmp)
            remove(run_dir, [out], "exporting the model")
            tmp.replace(out)
        except (WriteError, OSError) as e:  # writing() turned any library's error into a WriteError
            failed = e if isinstance(e, WriteError) else WriteError(out, e)
            with contextlib.suppress(OSError, RunDirError):
                remove(run_dir, [tmp], "cleaning up")
            failure = [f"could not export the model to {out} ({failed.reason}); "
                       f"{'the previous model/ is kept; ' if out.exists() else ''}{failed.fix} and resume "
                       "with --resume"]
        except RunDirError as e:  # the deleter's refusal
            failure = [str(e)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(failure, from_process=0)
    if failure[0]:
        raise RunDirError(failure[0])
    accelerator.wait_for_everyone()
    return out


@contextlib.contextmanager
def _no_zero_init() -> Iterator[None]:
    """The fresh copy of the model is built whole on rank 0's host: neither transformers nor peft
    may see ZeRO-3 here (zero.Init and GatheredParameters are collectives the other ranks would not
    join). transformers reads the setting from one module-level weak reference (accelerate's
    DeepSpeed plugin sets it): cleared for the block, then restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _merged(peft_model: Any, state: dict[str, torch.Tensor], tokenizer: Any, adapter_dir: Path,
            base_model: str | None) -> tuple[Any, dict]:
    """A fresh fp32 copy of the peft model loaded with `state` (the gathered training state); writes
    its adapter (+ head, + tokenizer; base_model_name_or_path: `base_model`) to `adapter_dir`;
    returns (merged model, its state dict)."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(peft_model.peft_config["default"])
    base_config = peft_model.get_base_model().config
    fresh = AutoModelForSequenceClassification.from_config(base_config, dtype=torch.float32)
    fresh = get_peft_model(fresh, config)
    fresh.peft_config["default"].base_model_name_or_path = base_model
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    with quiet_transformers():
        fresh.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
    merged = fresh.merge_and_unload()
    return merged, merged.state_dict()
