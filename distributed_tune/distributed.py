"""The accelerate / DeepSpeed setup of one training process, the settings users make in accelerate,
and the guards against its traps.

The same function serves every launch mode: plain `python -m distributed_tune` (one process),
`accelerate launch` / `torchrun` (N processes), SLURM (N nodes x M processes). On a machine
without a CUDA device the CPU is used with the gloo backend, without any flag.

accelerate's own settings (`accelerate config`, `accelerate launch --mixed_precision bf16
--use_deepspeed --zero_stage 2 ...`) reach the processes as ACCELERATE_* variables. A setting made
there applies when our config does not set the same thing; when both set it and disagree, the
run stops with one line naming both values (`resolve_accelerate_settings`). Imports no torch at
module level.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from distributed_tune.config import Config, batch_layout, flat_dict, replace_keys, validate
from distributed_tune.errors import ConfigError

PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
# accelerate's DeepSpeed variables, consumed here (the plugin we build carries their values).
_DS_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
           "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "ACCELERATE_CONFIG_DS_FIELDS",
           "ACCELERATE_DEEPSPEED_ZERO3_INIT", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")


def env_world_size() -> int:
    """The world size the launcher promised (torchrun/accelerate/our SLURM script set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- accelerate's settings


def accelerate_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """What `accelerate launch` (flags or config file) asked for, as our config keys; only what
    it really sets (its default mixed precision 'no' is indistinguishable from none)."""
    out: dict[str, Any] = {}
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", ""):
        if mp not in PRECISIONS:
            raise ConfigError(f"accelerate's mixed_precision={mp} is not supported here; use no, bf16 or fp16")
        out["precision"] = PRECISIONS[mp]
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and ds_file not in ("none", ""):
        out.update(_deepspeed_file_settings(ds_file))
    elif env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        out["distributed.zero_stage"] = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 2)  # accelerate's default
        for key, var in (("distributed.offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                         ("distributed.offload_params", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
            if env.get(var, "none").lower() not in ("none", ""):
                if env[var].lower() != "cpu":
                    raise ConfigError(f"accelerate's {var}={env[var]}: only cpu offload is supported here")
                out[key] = "cpu"
        if env.get("ACCELERATE_GRADIENT_CLIPPING", "auto").lower() not in ("auto", "none", ""):
            out["train.max_grad_norm"] = float(env["ACCELERATE_GRADIENT_CLIPPING"])
        if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto").lower() not in ("auto", ""):
            out["gradient_accumulation_steps"] = int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() not in ("NO", ""):
        out["train.compile"] = True
    return out


def _deepspeed_file_settings(path: str) -> dict[str, Any]:
    """Our config keys as a DeepSpeed JSON named in accelerate's config sets them ("auto" = unset).
    Whatever else the file says must match what we render (check_rendered_deepspeed_file)."""
    import json

    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"accelerate's deepspeed_config_file {path}: cannot read it as JSON ({e})") from None
    zero = ds.get("zero_optimization") or {}
    out: dict[str, Any] = {"distributed.zero_stage": int(zero.get("stage", 0))}
    for key, section in (("distributed.offload_optimizer", "offload_optimizer"),
                         ("distributed.offload_params", "offload_param")):
        device = (zero.get(section) or {}).get("device", "none")
        if device not in ("none", "cpu"):
            raise ConfigError(f"{path}: {section} device {device!r}: only cpu offload is supported here")
        if device == "cpu":
            out[key] = "cpu"
    for precision in ("bf16", "fp16"):
        if (ds.get(precision) or {}).get("enabled") is True:
            out["precision"] = precision
    if isinstance(ds.get("gradient_clipping"), (int, float)):
        out["train.max_grad_norm"] = float(ds["gradient_clipping"])
    if isinstance(ds.get("gradient_accumulation_steps"), int):
        out["gradient_accumulation_steps"] = ds["gradient_accumulation_steps"]
    return out


def resolve_accelerate_settings(cfg: Config, explicit: frozenset[str], env: Mapping[str, str] | None = None) -> Config:
    """`cfg` with accelerate's settings applied where `cfg` leaves them unset (`explicit` holds the
    keys the config file and overrides did set). A conflict, or an accelerate mode this package
    cannot honour, is one ConfigError."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("accelerate is set up for FSDP, which distributed_tune does not run; use DeepSpeed "
                          "(distributed.zero_stage=3 shards parameters too) or remove FSDP from the accelerate config")
    if "WORLD_SIZE" not in env and "MASTER_ADDR" in env and "ACCELERATE_USE_CPU" in env:
        # accelerate's simple launcher ran: it starts one process whatever --num_processes says.
        raise ConfigError("accelerate launch started 1 process for --num_processes > 1: on a machine without "
                          "GPUs add --multi_gpu (accelerate's CPU launcher starts one process), e.g. accelerate "
                          "launch --multi_gpu --num_processes 2 -m distributed_tune ...")
    wanted = accelerate_settings(env)
    accumulation = wanted.pop("gradient_accumulation_steps", None)
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    from_file = set(_deepspeed_file_settings(ds_file)) if ds_file not in ("none", "") and \
        env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else set()
    ours = flat_dict(cfg)
    changes: dict[str, Any] = {}
    for key, value in wanted.items():
        if key in explicit and ours[key] != value:
            where = f"the DeepSpeed file {ds_file}" if key in from_file else "accelerate (its config file or launch flags)"
            raise ConfigError(f"{key}={ours[key]} in the config but {where} says {value}; make them agree or remove one")
        if key not in explicit:
            changes[key] = value
    cfg = replace_keys(cfg, changes)
    if accumulation is not None:
        world = env_world_size()
        micro, ours = batch_layout(cfg.train, world)
        if ours != accumulation:
            g = cfg.train.global_batch_size
            if "train.micro_batch_size" in explicit or g % (world * accumulation):
                raise ConfigError(
                    f"accelerate says gradient_accumulation_steps={accumulation} but train.global_batch_size={g} on "
                    f"{world} process(es) with micro batch {micro} gives {ours}; remove it from the accelerate "
                    "config (accumulation is derived from the global batch) or make them agree")
            cfg = replace_keys(cfg, {"train.micro_batch_size": g // (world * accumulation)})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, rendered from the training config: the only place its numbers come from.

    No optimizer or scheduler section: those stay in our code (model.py), so that the loop and
    the learning-rate curve are the same under DDP and every ZeRO stage.
    """
    dist, t = cfg.distributed, cfg.train
    micro, accumulation = batch_layout(t, world_size)
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dist.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if dist.zero_stage == 3:
        # Without this, the final save_pretrained folder would hold empty ZeRO-3 shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    f = cfg.fp16
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
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


def check_hardware(cfg: Config, world_size: int | None = None) -> None:
    """Combinations that cannot run on this machine, checked before anything starts."""
    if cfg.precision == "fp16" and not cuda_available():
        raise ConfigError(
            "precision=fp16 needs a CUDA device and none is visible; use precision=bf16 or fp32 on CPU"
        )
    if cfg.train.cuda_graphs and not cuda_available():
        raise ConfigError("train.cuda_graphs=true needs a CUDA device and none is visible; use train.compile=true "
                          "(or neither) on CPU")
    if cfg.train.cuda_graphs and (world_size or env_world_size()) > 1:
        raise ConfigError("train.cuda_graphs=true runs one process (a graph cannot hold the data-parallel "
                          "all-reduce); use train.compile=true with several processes")


def check_rendered_deepspeed_file(ds_config: dict[str, Any]) -> None:
    """`accelerate launch` names a DeepSpeed file (ACCELERATE_DEEPSPEED_CONFIG_FILE: ours from
    `launch`, or the user's); the processes use the dict built from the training config. Refuse to
    run if the file says something else, rather than silently ignore it."""
    import json

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none" or not os.path.isfile(path):
        return
    with open(path) as f:
        on_disk = json.load(f)
    if on_disk == ds_config:
        return
    keys = sorted(k for k in set(on_disk) | set(ds_config) if on_disk.get(k) != ds_config.get(k))
    raise ConfigError(
        f"{path} differs from what the training config renders (keys: {', '.join(keys)}); DeepSpeed settings come "
        "from the training config (distributed.*, precision, train.*): set them there and launch again"
    )


def check_world_size(accelerator: Any) -> None:
    """The silent trap: the launcher started N processes, but each believes it is alone
    (and would train / evaluate on all the data)."""
    world = env_world_size()
    if accelerator.num_processes != world:
        raise ConfigError(
            f"the environment says WORLD_SIZE={world} but the accelerator sees "
            f"{accelerator.num_processes} process(es): each process would work on all the data; "
            "launch with `accelerate launch --multi_gpu` or `torchrun`, not the simple launcher"
        )


def quiet_deepspeed() -> None:
    """DeepSpeed announces its accelerator on import ("Setting accelerator to CPU ...") even in runs
    that do not use it; keep its logger to warnings about real problems."""
    import logging

    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def build_accelerator(cfg: Config, project_dir: str | None = None) -> Any:
    """An Accelerator for this process; fails loudly on the setups that silently run wrong.
    `cfg` is already resolved against accelerate's settings (resolve_accelerate_settings)."""
    import datetime

    quiet_deepspeed()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, GradScalerKwargs, InitProcessGroupKwargs

    check_hardware(cfg)
    world = env_world_size()
    _, accumulation = batch_layout(cfg.train, world)
    use_cpu = not cuda_available()
    deepspeed = cfg.distributed.zero_stage is not None
    for var in _DS_ENV:  # merged into cfg already; accelerate must not apply them a second time
        os.environ.pop(var, None)
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
        "dynamo_backend": "no",  # train.compile: the loop compiles the model itself
    }
    if cfg.report_to:
        kwargs["log_with"] = list(cfg.report_to)
        kwargs["project_dir"] = project_dir
    if deepspeed:
        if "RANK" not in os.environ:
            # A world of one from plain `python`: DeepSpeed still wants a process group.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        ds_config = deepspeed_config(cfg, world)
        check_rendered_deepspeed_file(ds_config)
        os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
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
