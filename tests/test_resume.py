"""Exact mid-epoch resume under DeepSpeed ZeRO-2, through the rendered two-node SLURM script.

    python -m pytest -q tests/test_resume.py          # ~1 min: 3 jobs of 2 nodes x 1 CPU process

The DDP case (one node, 2 processes) is tests/test_slurm.py's preempt test. Here the job is the
multi-node form: the sbatch shim runs it with two "nodes" on this machine; srun starts one
`accelerate launch` per node, each with its own $SLURM_NODEID as machine rank and the first host
of `scontrol show hostnames` as the rendezvous (if every node believed it was rank 0, the
rendezvous would fail). SIGUSR1 mid-epoch -> both ranks save their ZeRO shards -> requeue ->
the restarted job skips damaged newer checkpoints and continues: the per-step losses, the final
MCC, the predictions and the exported model must equal those of a job that was never stopped.
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest
from shims.harness import (
    Cluster,
    final_dev,
    flat,
    job_id_with_free_port,
    losses_by_step,
    run_job,
    side_by_side,
    submit_cmd,
    write_job_config,
)


def test_zero2_two_nodes_preempt_resume_is_exact(tmp_path: Path, tiny_model: Path, cache_dir: Path,
                                                 cola_dir: Path) -> None:
    cluster = Cluster(tmp_path / "slurm")
    config = write_job_config(tmp_path / "job.yaml", tiny_model, cache_dir, cola_dir)
    common = ["--config", str(config), "--nodes", "2", "--gpus-per-node", "1", "--time", "00:10:00",
              "distributed.zero_stage=2"]

    ref_id = job_id_with_free_port()
    reference = tmp_path / "runs" / "reference"
    # Node names that resolve nowhere (not in /etc/hosts, no DNS): the rendezvous must take the
    # first node's address from SLURM (`scontrol show node`: NodeAddr), not its name.
    names = "dt-unresolvable-a,dt-unresolvable-b"
    for name in names.split(","):
        with pytest.raises(OSError):
            socket.getaddrinfo(name, None)
    env = {**cluster.env(ref_id), "SHIM_NODE_NAMES": names}
    proc, _ = run_job(submit_cmd([*common, "output_dir=runs/reference"]), env, tmp_path)
    assert proc.returncode == 0, proc.stdout + (reference / f"slurm-{ref_id}.err").read_text()[-4000:]
    out = (reference / f"slurm-{ref_id}.out").read_text()
    assert (f"on {names}: 2 node(s) x 1 process(es); rendezvous 127.0.0.1:{15000 + ref_id % 15000}") in out

    job_id = job_id_with_free_port()
    run_dir = tmp_path / "runs" / "preempted"
    proc, _ = run_job(submit_cmd([*common, "output_dir=runs/preempted"]), cluster.env(job_id), tmp_path,
                      run_dir=run_dir, signal_after=4, cluster=cluster)
    err1 = flat((run_dir / f"slurm-{job_id}.err").read_text())
    assert proc.returncode == 0, proc.stdout + err1[-4000:]
    k = int(re.search(r"stop signal 10 \(SIGUSR1\): checkpoint saved at optimizer step (\d+)", err1).group(1))
    assert 4 <= k < 40 and cluster.requeued() == [job_id]
    ckpt = run_dir / "checkpoints" / f"step_{k:08d}"
    # Both nodes wrote their ZeRO-2 optimizer shard into the one checkpoint.
    shards = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))
    assert [re.search(r"rank_(\d+)", s).group(1) for s in shards] == ["0", "1"], shards

    # A newer checkpoint with a flipped byte, and one without its COMPLETE manifest: both skipped.
    for step, damage in ((k + 2, "corrupt"), (k + 1, "unsealed")):
        bad = run_dir / "checkpoints" / f"step_{step:08d}"
        shutil.copytree(ckpt, bad)
        if damage == "corrupt":
            shard = next(bad.rglob("*optim_states.pt"))
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        else:
            (bad / "COMPLETE").unlink()

    proc, _ = run_job(["sbatch", str(run_dir / "job.sbatch")], cluster.env(job_id, restart=1), tmp_path)
    err = flat((run_dir / f"slurm-{job_id}.err").read_text())
    assert proc.returncode == 0, err[-4000:]
    assert f"checkpoint runs/preempted/checkpoints/step_{k + 2:08d} is damaged: " in err
    assert "_optim_states.pt is corrupted (sha256 mismatch)" in err
    assert (f"checkpoint runs/preempted/checkpoints/step_{k + 1:08d} is damaged: no COMPLETE manifest "
            "(interrupted while saving)") in err
    assert f"resumed from runs/preempted/checkpoints/step_{k:08d}" in err

    want, got = losses_by_step(reference), losses_by_step(run_dir)
    table = side_by_side(want, got, k)
    print(table)
    assert list(got) == list(range(1, 41)), table
    # Same stage, same world size, state restored from the shards: bitwise equal, like DDP.
    assert got == want, table
    ref_dev, dev = final_dev(reference), final_dev(run_dir)
    print(f"final dev MCC: uninterrupted {ref_dev['mcc']!r}, preempted+resumed {dev['mcc']!r}")
    assert dev["mcc"] == ref_dev["mcc"] and dev["world_size"] == ref_dev["world_size"] == 2
    assert (run_dir / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert (run_dir / "model" / "model.safetensors").read_bytes() == \
        (reference / "model" / "model.safetensors").read_bytes()


@pytest.mark.fast
def test_rotation_keeps_the_new_checkpoint_beside_a_damaged_newer_one(tmp_path: Path) -> None:
    """Resumed from step 2 because step 5 is damaged, then saving step 3 with keep=2: step 1 goes,
    step 2 and the new step 3 stay (the damaged step 5 is not counted as one of the newest)."""
    import torch
    from accelerate import Accelerator

    from distributed_tune import checkpoint

    acc = Accelerator(cpu=True)
    net = torch.nn.Linear(2, 2)
    acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    checkpoint.ensure_key()  # as a fresh run does
    for step in (1, 2):
        checkpoint.save(acc, tmp_path, step, {"optimizer_step": step}, keep=2)
    damaged = tmp_path / "checkpoints" / checkpoint.checkpoint_name(5)
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"truncated")
    assert checkpoint.latest_good(tmp_path, warn=lambda _: None).name == "step_00000002"
    checkpoint.save(acc, tmp_path, 3, {"optimizer_step": 3}, keep=2)
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000005"]
    assert checkpoint.latest_good(tmp_path, warn=lambda _: None).name == "step_00000003"
    assert checkpoint.read_trainer_state(tmp_path / "checkpoints" / "step_00000003") == {"optimizer_step": 3}
