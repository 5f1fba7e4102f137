"""The run's `model/` folder: the kept weights as a `save_pretrained` folder users load as is.

    out = export_model(accelerator, model, tokenizer, run_dir, info, zero_stage)   # collective

fp32 safetensors whatever the training precision (gathered from the shards under ZeRO-3), the
tokenizer, and `training_info.json` (which step, why it was kept). Written as `.tmp-model/` and
renamed over `model/`: a failed export keeps the previous model/ and leaves no half-written folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from distributed_tune import model_card
from distributed_tune.errors import RunDirError
from distributed_tune.files import atomic_write_json
from distributed_tune.model import quiet_transformers

MODEL_DIR, TMP_MODEL_DIR, TRAINING_INFO = "model", ".tmp-model", "training_info.json"


def export_model(accelerator: Any, model: Any, tokenizer: Any, run_dir: Path, info: dict[str, Any],
                 zero_stage: int | None) -> Path:
    """Collective (every rank gathers under ZeRO-3); rank 0 writes. Returns run_dir/model."""
    state = accelerator.get_state_dict(model)  # collective under ZeRO-3; None off rank 0
    out = run_dir / MODEL_DIR
    failure = [None]
    if accelerator.is_main_process:
        tmp = run_dir / TMP_MODEL_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unwrapped = accelerator.unwrap_model(model)
            if zero_stage == 3:
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
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = [f"could not export the model to {out} ({e.strerror or e}); "
                       f"{'the previous model/ is kept; ' if out.exists() else ''}free disk space and resume "
                       "with --resume"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(failure, from_process=0)
    if failure[0]:
        raise RunDirError(failure[0])
    accelerator.wait_for_everyone()
    return out
