"""Resume a checkpoint on another number of processes: DDP and every ZeRO stage, converted on load.

    seconds = load_state(accelerator, ckpt, state, zero_stage)   # instead of accelerator.load_state

A checkpoint written on W processes is loaded on W' (any W' that splits the global batch; the
accumulation is derived as for a new run). What is resumed does not depend on the layout: the
data position is global (every rank walks the same seeded permutation, `optimizer_step` and
`step_in_epoch` say where), dropout is re-seeded per micro-batch from (seed, epoch, step, micro),
and the schedule is counted in optimizer steps. Only the sharded state must be mapped:

* DDP: nothing is sharded (model.safetensors and optimizer.bin hold everything); rank r of the new
  world takes the RNG states of rank r mod W.
* ZeRO 1/2/3 (with or without optimizer offload): DeepSpeed's files hold, per old rank, a slice of
  each parameter group's flat fp32 master weights and of Adam's exp_avg / exp_avg_sq. Every new
  rank reads all W files, rebuilds each parameter's full fp32 tensor and moments (stage 1/2 by the
  files' own `param_slice_mappings`, stage 3 by its fixed per-parameter partitions of
  ceil(numel / W)), and writes its own slice of them into the engine built for W' (the engine's
  own fragment addresses), with the optimizer's step count and the engine's counters. The model's
  working weights are the fp32 masters cast to their dtype, as after a DeepSpeed step.

Nothing is written to the checkpoint, and there is no separate command: the next checkpoint the
run saves is in the new layout. Each rank holds the full fp32 model and both moments in host
memory while it converts (12 bytes per parameter).
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_tune.errors import RunDirError

DS_FOLDER = "pytorch_model"  # accelerate's name for the DeepSpeed checkpoint tag
MOMENTS = ("exp_avg", "exp_avg_sq")


def load_state(accelerator: Any, ckpt: Path, state: dict[str, Any]) -> float | None:
    """Load `ckpt` into the prepared model and optimizer. Returns None when the checkpoint has this
    run's layout (loaded by accelerate as it was saved), else the seconds its conversion took."""
    saved, now = int(state["world_size"]), accelerator.num_processes
    if saved == now:
        accelerator.load_state(str(ckpt))
        return None
    t0 = time.perf_counter()
    if state.get("zero_stage") is None:
        accelerator.load_state(str(ckpt))  # nothing sharded; RNG files exist for ranks < saved only
    else:
        load_zero(accelerator, ckpt, saved)
    load_rng(ckpt / f"random_states_{accelerator.process_index % saved}.pkl")
    accelerator.wait_for_everyone()
    return time.perf_counter() - t0


def load_rng(path: Path) -> None:
    """The RNG states accelerate saved for one rank (the same fields its load_state restores)."""
    states = torch.load(path, weights_only=False)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        # One state per device the saving process saw; a node of another shape may have fewer.
        for i, cuda_state in enumerate(states["torch_cuda_manual_seed"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


# --------------------------------------------------------------------------- reading W old shards


def _optim_files(folder: Path, world: int) -> list[Path]:
    files = {}
    for p in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"):
        files[int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))] = p
    if sorted(files) != list(range(world)):
        raise RunDirError(f"{folder}: expected the ZeRO optimizer shards of {world} ranks, found ranks "
                          f"{sorted(files)}; resume with the processes it was saved with")
    return [files[r] for r in range(world)]


def _param_shapes(folder: Path) -> tuple[list[dict[str, torch.Size]], dict[str, int]]:
    model_states = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    sd = torch.load(model_states[0], map_location="cpu", weights_only=False)
    return sd["param_shapes"], {k: sd[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in sd}


def full_state(folder: Path, world: int, stage: int) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor,
                                                              dict[str, Any], dict[str, Any]]:
    """name -> {"fp32", "exp_avg", "exp_avg_sq"} (full, flat tensors) from the W shards; Adam's step
    count; the engine's counters; the optimizer's loss scaling (fp16)."""
    shards = [torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for p in _optim_files(folder, world)]
    shapes, counters = _param_shapes(folder)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    if stage in (1, 2):
        # Each rank's partition of group g: for every parameter it holds a slice of, where in the
        # partition (start, numel); the slices of one parameter are in rank order.
        for sd in shards:
            base = sd["base_optimizer_state"]["state"]
            for g, mapping in enumerate(sd["param_slice_mappings"]):
                flats = {"fp32": sd["single_partition_of_fp32_groups"][g],
                         **{k: base[g][k] for k in MOMENTS}}
                for name, frag in mapping.items():
                    for k, flat in flats.items():
                        parts.setdefault(name, {}).setdefault(k, []).append(flat.narrow(0, frag.start, frag.numel))
        step = shards[0]["base_optimizer_state"]["state"][0]["step"]
    else:
        # Stage 3: every parameter is split in `world` partitions of ceil(numel / world) (the last
        # padded), laid out in param_shapes order across the rank's sub-groups.
        flats = []
        for sd in shards:
            base = sd["optimizer_state_dict"]["state"]
            order = sorted(base)
            flats.append({"fp32": torch.cat(list(sd["fp32_flat_groups"])),
                          **{k: torch.cat([base[i][k] for i in order]) for k in MOMENTS}})
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                pn = math.ceil(math.prod(shape) / world)
                parts[name] = {k: [f[k].narrow(0, offset, pn) for f in flats] for k in flats[0]}
                offset += pn
        step = shards[0]["optimizer_state_dict"]["state"][0]["step"]
    numel = {name: math.prod(shape) for group in shapes for name, shape in group.items()}
    full = {name: {k: torch.cat(v)[: numel[name]] for k, v in kinds.items()} for name, kinds in parts.items()}
    for name, n in numel.items():
        if name not in full or any(t.numel() != n for t in full[name].values()):
            raise RunDirError(f"{folder}: parameter {name} cannot be rebuilt from the ZeRO shards of {world} ranks")
    scaling = {k: shards[0][k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in shards[0]}
    return full, step, counters, scaling


# --------------------------------------------------------------------------- writing W' new shards


def load_zero(accelerator: Any, ckpt: Path, saved_world: int) -> None:
    engine = accelerator.deepspeed_engine_wrapped.engine
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    full, step, counters, scaling = full_state(ckpt / DS_FOLDER, saved_world, stage)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    missing = [n for n, p in engine.module.named_parameters() if p.requires_grad and n not in full]
    if missing:
        raise RunDirError(f"{ckpt} holds no ZeRO state for {', '.join(missing[:3])}: it was saved from another model")
    if stage == 3:
        flats = _zero3_slices(opt, full, names)
    else:
        flats = _zero12_slices(opt, full, names)
    # Adam's state of each flat fp32 partition the base optimizer steps (keyed by the tensor, as
    # torch keeps it; its step count on the device for fused / capturable AdamW, as torch puts it).
    base = opt.optimizer
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for flat, moments in flats:
        base.state[flat] = {"step": step.detach().clone().to(torch.float32).to(flat.device if on_device else "cpu"),
                            **{k: v.to(device=flat.device, dtype=flat.dtype) for k, v in moments.items()}}
    for k, v in counters.items():
        setattr(engine, k, v)
    for k, v in scaling.items():
        setattr(opt, k, v)


def _zero12_slices(opt: Any, full: dict, names: dict) -> list:
    """ZeRO 1/2 (and DeepSpeed's bf16 optimizer): each parameter's fragment of this rank's flat fp32
    partition, by the engine's own hp/lp fragment addresses."""
    if hasattr(opt, "single_partition_of_fp32_groups"):
        hp_flats, lp_groups = opt.single_partition_of_fp32_groups, opt.bit16_groups
    elif hasattr(opt, "fp32_groups_flat_partition"):
        hp_flats, lp_groups = opt.fp32_groups_flat_partition, opt.bf16_groups
    else:
        raise RunDirError(f"cannot map ZeRO state onto DeepSpeed's {type(opt).__name__}; resume with the "
                          "number of processes the checkpoint was saved with")
    out = []
    with torch.no_grad():
        for hp_flat, lp_params in zip(hp_flats, lp_groups):
            moments = {k: torch.zeros_like(hp_flat) for k in MOMENTS}
            for p in lp_params:
                whole = full[names[id(p)]]
                p.data.copy_(whole["fp32"].view(p.shape).to(p.dtype))  # every rank holds the whole weight
                m = p._hp_mapping
                if m is None:
                    continue
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                for k, dest in (("fp32", hp_flat), *moments.items()):
                    dest.narrow(0, hp.start, hp.numel).copy_(whole[k].narrow(0, lp.start, lp.numel))
            out.append((hp_flat, moments))
    return out


def _zero3_slices(opt: Any, full: dict, names: dict) -> list:
    """ZeRO-3: this rank's partition of each parameter (the working copy in `ds_tensor`, the fp32
    master and moments at the parameter's place in its sub-group's flat partition)."""
    import deepspeed.comm as dist

    world = dist.get_world_size(group=opt.dp_process_group)
    rank = dist.get_rank(group=opt.dp_process_group)
    hp_flats = opt.fp32_partitioned_groups_flat
    moments = [{k: torch.zeros_like(f) for k in MOMENTS} for f in hp_flats]
    with torch.no_grad():
        for group in opt.fp16_groups:
            for p in group:
                whole = full[names[id(p)]]
                pn = p.ds_tensor.ds_numel
                g, offset, n = opt.grad_position[opt.get_param_id(p)]

                mine = {k: _partition(whole[k], pn * world, rank * pn, n) for k in ("fp32", *MOMENTS)}
                p.ds_tensor.data.narrow(0, 0, n).copy_(mine["fp32"].to(p.ds_tensor.dtype))
                hp_flats[g].narrow(0, offset, n).copy_(mine["fp32"])
                for k in MOMENTS:
                    moments[g][k].narrow(0, offset, n).copy_(mine[k])
    return list(zip(hp_flats, moments))


def _partition(t: torch.Tensor, padded_numel: int, start: int, n: int) -> torch.Tensor:
    padded = torch.zeros(padded_numel, dtype=t.dtype)
    padded[: t.numel()] = t
    return padded.narrow(0, start, n)
