"""The accelerate / DeepSpeed setup for one training process, and the guards against its traps.

The same function serves every launch mode: plain `python -m distributed_tune` (one process),
`accelerate launch` / `torchrun` (N processes), SLURM (N nodes x M processes). On a machine
without a CUDA device the CPU is used with the gloo backend, without any flag.
See ../shared/guide/PLATFORM.md for the traps guarded against here.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from distributed_tune.config import Config, check_batch_arithmetic
from distributed_tune.errors import ConfigError


def env_world_size() -> int:
    """The world size the launcher promised (torchrun/accelerate/our SLURM script set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, rendered from the training config: the only place its numbers come from.

    No optimizer or scheduler section: those stay in our code (model.py), so that the loop and
    the learning-rate curve are the same under DDP and every ZeRO stage.
    """
    d, t = cfg.distributed, cfg.train
    accumulation = check_batch_arithmetic(cfg, world_size)
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        # Without this, the final save_pretrained folder would hold empty ZeRO-3 shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    f = cfg.fp16
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": f.initial_scale_power,
            "loss_scale_window": f.loss_scale_window,
            "hysteresis": f.hysteresis,
            "min_loss_scale": f.min_loss_scale,
        },
        # Keep our torch AdamW under offload (DeepSpeedCPUAdam would need a C++ build at start).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def check_hardware(cfg: Config) -> None:
    """Combinations that cannot run on this machine, checked before anything starts."""
    if cfg.precision == "fp16" and not cuda_available():
        raise ConfigError(
            "precision=fp16 needs a CUDA device and none is visible; use precision=bf16 or fp32 on CPU"
        )


def check_rendered_deepspeed_file(ds_config: dict[str, Any]) -> None:
    """`accelerate launch` names the rendered ds_config.json (ACCELERATE_DEEPSPEED_CONFIG_FILE);
    the processes use the dict built from config.yaml. Refuse to run if the file was edited by
    hand, rather than silently ignore the edit."""
    import json

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not os.path.isfile(path):
        return
    with open(path) as f:
        on_disk = json.load(f)
    if on_disk == ds_config:
        return
    keys = sorted(k for k in set(on_disk) | set(ds_config) if on_disk.get(k) != ds_config.get(k))
    raise ConfigError(
        f"{path} differs from what the training config renders (keys: {', '.join(keys)}); it is generated: "
        "change the training config (config.yaml or key=value overrides) and launch again"
    )


def check_world_size(accelerator: Any) -> None:
    """PLATFORM.md's silent trap: the launcher started N processes, but each believes it is alone
    (and would train / evaluate on all the data)."""
    world = env_world_size()
    if accelerator.num_processes != world:
        raise ConfigError(
            f"the environment says WORLD_SIZE={world} but the accelerator sees "
            f"{accelerator.num_processes} process(es): each process would work on all the data; "
            "launch with `accelerate launch --multi_gpu` or `torchrun`, not the simple launcher"
        )


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_accelerator(cfg: Config) -> Any:
    """An Accelerator for this process; fails loudly on the setups that silently run wrong."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, GradScalerKwargs, InitProcessGroupKwargs

    check_hardware(cfg)
    world = env_world_size()
    accumulation = check_batch_arithmetic(cfg, world)
    use_cpu = not cuda_available()
    deepspeed = cfg.distributed.zero_stage is not None
    pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    f = cfg.fp16
    # fp16 loss scaling outside DeepSpeed (torch's GradScaler); DeepSpeed reads the same keys from its JSON.
    scaler = GradScalerKwargs(init_scale=2.0**f.initial_scale_power, growth_interval=f.loss_scale_window)
    kwargs: dict[str, Any] = {
        "mixed_precision": {"fp32": "no"}.get(cfg.precision, cfg.precision),
        "kwargs_handlers": [pg, scaler],
        # We step the LR schedule once per optimizer step ourselves; accelerate would step it
        # num_processes times.
        "step_scheduler_with_optimizer": False,
        # Also under DeepSpeed: accelerate copies the JSON's value only inside prepare(), and
        # until then `accumulate()` and the check below would see its default of 1.
        "gradient_accumulation_steps": accumulation,
    }
    if deepspeed:
        if "RANK" not in os.environ:
            # A world of one from plain `python`: DeepSpeed still wants a process group.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if use_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ds_config = deepspeed_config(cfg, world)
        check_rendered_deepspeed_file(ds_config)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    else:
        # cpu=True also makes torchrun-started processes join one gloo group; it must not be set
        # with DeepSpeed, which it would silently turn off.
        kwargs["cpu"] = use_cpu
    if use_cpu and "RANK" in os.environ:
        # A process group on CPU is gloo; without saying so, DeepSpeed believes it runs alone.
        pg.backend = "gloo"
    accelerator = Accelerator(**kwargs)

    check_world_size(accelerator)
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(
            f"distributed.zero_stage={cfg.distributed.zero_stage} is set but accelerate runs "
            f"{accelerator.distributed_type.value}, not DeepSpeed; do not pass --cpu / use_cpu with DeepSpeed"
        )
    if accelerator.gradient_accumulation_steps != accumulation:
        raise ConfigError(
            f"accelerate uses {accelerator.gradient_accumulation_steps} accumulation steps but the "
            f"config derives {accumulation}; remove gradient_accumulation_steps from accelerate/DeepSpeed files"
        )
    return accelerator
