"""Shared fixtures: CoLA-format data written by the tests, a tiny BERT built from it, real launches.

Training runs go through real subprocesses (`python -m distributed_tune`, `accelerate launch`,
`torchrun`), never through a mocked distributed layer. No test touches the network, and no test
needs anything outside this repository: the few that check the real CoLA release read it from
the folder named by DT_COLA_DIR (the release's `raw/*.tsv` and `cola_public_1.1.zip`) and are
skipped, with that reason, when it is unset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_COLA_ENV = "DT_COLA_DIR"

sys.path.insert(0, str(Path(__file__).parent))


def real_cola_dir() -> Path | None:
    value = os.environ.get(REAL_COLA_ENV)
    return Path(value).expanduser() if value else None


needs_real_cola = pytest.mark.skipif(
    real_cola_dir() is None,
    reason=f"set {REAL_COLA_ENV} to a folder with the real CoLA 1.1 release (raw/*.tsv, cola_public_1.1.zip)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Offline, CPU, one thread per process (torchrun's default for several processes, so that
    1-process and 2-process runs do the same arithmetic)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # DeepSpeed JIT-builds a CPU comm op once (~45 s); keep it across test runs.
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
    )
    # This checkout's package, also in processes that start elsewhere (a batch job's working
    # directory), whichever checkout the environment's editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        env.pop(key)
    env.update(extra)
    return env


def run_cli(args: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 600,
            env: dict[str, str] | None = None, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `distributed_tune` as a user would: plain python, `accelerate launch` or `torchrun`."""
    if launcher == "python":
        cmd = [sys.executable, "-m", "distributed_tune", *args]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "distributed_tune", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "distributed_tune", *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def snapshot(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (bytes, mtime): what a refused command must leave as it was.
    `ignore`: file names left out (a run lock records each new holder)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ignore}


def limit_file_size() -> None:
    """preexec_fn: files of this process and its children stop at 40 kB (EFBIG: a disk that fills up)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


@contextlib.contextmanager
def mounted(folder: Path, kind: str, size: str = "256k", source: Path | None = None) -> Iterator[bool]:
    """`folder` as a real small disk (kind "tmpfs": a write past `size` fails with ENOSPC) or a
    read-only view of `source` (kind "ro": a read-only bind mount; root ignores mode bits, not
    these). Yields False where this machine cannot mount (then the caller skips or limits file
    sizes instead); unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = (["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)] if kind == "tmpfs"
           else ["mount", "--bind", "-o", "ro", str(source), str(folder)])
    ok = shutil.which("mount") is not None and subprocess.run(cmd, capture_output=True).returncode == 0
    if ok and kind == "ro" and subprocess.run(["touch", str(folder / ".probe")], capture_output=True).returncode == 0:
        (folder / ".probe").unlink()  # an old kernel made the bind writable: not a read-only view
        subprocess.run(["umount", str(folder)], capture_output=True)
        ok = False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    from distributed_tune import records

    return [r["loss"] for r in records.train_steps(read_jsonl(run_dir / "metrics.jsonl"))]


def evals(run_dir: Path) -> list[dict]:
    from distributed_tune import records

    return records.evaluations(read_jsonl(run_dir / "metrics.jsonl"))


@pytest.fixture(scope="session")
def cola_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CoLA-format data in the release layout (tests/cola_data.py): <dir>/raw/*.tsv."""
    from cola_data import write_cola

    return write_cola(tmp_path_factory.mktemp("cola"))


@pytest.fixture(scope="session")
def cola_raw(cola_dir: Path) -> Path:
    return cola_dir / "raw"


@pytest.fixture(scope="session")
def tiny_model(cola_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), cola_dir)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dt-cache")


@pytest.fixture()
def base_args(tiny_model: Path, cache_dir: Path, cola_dir: Path) -> list[str]:
    """A short, fast run of the tiny model on the test's CoLA files."""
    return [
        f"model.name={tiny_model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}",
        "train.epochs=1", "train.max_steps=8", "train.log_every=1",
        "train.global_batch_size=16", "train.micro_batch_size=8", "train.lr=1e-3",
    ]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The lines a test under a pytest-xdist worker asked to show in CI's log (tests/test_slurm_cluster.py's
    `say`), printed by the main process once the test is done."""
    if report.when != "teardown" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    lines = [text for key, text in report.user_properties if key == "ci_log"]
    if lines and _CONFIG is not None:
        terminal = _CONFIG.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line("\n".join(lines))


_CONFIG: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config
