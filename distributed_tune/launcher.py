"""Render the accelerate / DeepSpeed setup of a run from its training config (the library side of
the `launch` and `submit` commands).

    topo = Topology(nodes=2, processes_per_node=8)
    paths = render(cfg, topo)                 # config.yaml, accelerate.yaml, ds_config.json
    cmd = launch_command(paths, topo)         # accelerate launch ... -m distributed_tune --config ...

Every number in those files comes from the training config (one source of truth); the training
processes rebuild the same DeepSpeed dict from it and check it matches. `processes_per_node` is
GPUs per machine, or CPU processes on machines without GPUs. Imports no torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distributed_tune import checkpoint
from distributed_tune.config import Config, batch_layout, dump_resolved
from distributed_tune.distributed import deepspeed_config
from distributed_tune.files import atomic_write_text

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    """Where a run's processes live: machines, processes per machine (one per GPU, or CPU
    processes), GPUs per machine (0 on CPU-only machines), and the rendezvous."""

    nodes: int = 1
    processes_per_node: int = 1
    gpus_per_node: int = 1
    main_process_ip: str | None = None
    main_process_port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def describe(self) -> str:
        kind = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else "no GPU"
        return (f"{self.nodes} node(s) x {self.processes_per_node} process(es) ({kind} per node) = "
                f"{self.world_size} training process(es)")


def accelerate_config(cfg: Config, topo: Topology, ds_config_path: Path | None) -> dict[str, Any]:
    """The accelerate config file (the keys its own loader accepts, nothing else)."""
    deepspeed = cfg.distributed.zero_stage is not None
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED" if deepspeed else ("MULTI_GPU" if topo.world_size > 1 else "NO"),
        "mixed_precision": {"fp32": "no"}.get(cfg.precision, cfg.precision),
        # Never use_cpu: accelerate then starts a single process, and turns DeepSpeed off.
        # On a machine without CUDA the training processes pick the CPU themselves.
        "use_cpu": False,
        "debug": False,
        "num_machines": topo.nodes,
        "num_processes": topo.world_size,
        "machine_rank": 0,  # SLURM scripts pass --machine_rank per node
        "main_process_port": topo.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
        "dynamo_config": {"dynamo_backend": "NO"},  # train.compile: the loop compiles itself
    }
    if topo.main_process_ip:
        out["main_process_ip"] = topo.main_process_ip
    if deepspeed:
        # Precision lives in ds_config.json; accelerate refuses a second copy beside the file.
        del out["mixed_precision"]
        out["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_config_path),
            # torchrun on every node instead of pdsh: no passwordless ssh needed.
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        }
    return out


def render(cfg: Config, topo: Topology, run_dir: Path | None = None) -> dict[str, Path]:
    """Write config.yaml, accelerate.yaml and (DeepSpeed) ds_config.json; return their paths."""
    batch_layout(cfg.train, topo.world_size)
    run_dir = Path(run_dir or cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"config": run_dir / "config.yaml", "accelerate": run_dir / "accelerate.yaml"}
    ds_path = None
    if cfg.distributed.zero_stage is not None:
        ds_path = paths["deepspeed"] = run_dir / "ds_config.json"
        atomic_write_text(ds_path, json.dumps(deepspeed_config(cfg, topo.world_size), indent=2) + "\n")
    dump_resolved(cfg, None, paths["config"])
    acc = accelerate_config(cfg, topo, ds_path.resolve() if ds_path else None)
    atomic_write_text(paths["accelerate"], yaml.safe_dump(acc, sort_keys=False))
    return paths


def launch_command(paths: dict[str, Path], topo: Topology, flags: tuple[str, ...] = (),
                   python: str = sys.executable) -> list[str]:
    """`accelerate launch ...`, or the plain single-process fallback for a world of one; `flags`
    (--resume / --overwrite) travel on the command line, never in the rendered config."""
    train = ["-m", "distributed_tune", "--config", str(paths["config"]), *flags]
    if topo.world_size == 1 and "deepspeed" not in paths:
        return [python, *train]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(paths["accelerate"]), *train]


def check_resumable(cfg: Config) -> None:
    """With --resume, refuse before anything starts what the training processes would each refuse
    after their imports (checkpoint.check_resumable): say it once. Any number of processes that
    splits the global batch may resume a run (its checkpoint is converted on load)."""
    if not cfg.resume:
        return
    ckpt = checkpoint.latest_good(Path(cfg.output_dir), warn=lambda _: None, resuming=True)
    if ckpt is None:
        return
    checkpoint.check_resumable(ckpt, checkpoint.read_trainer_state(ckpt), cfg)
