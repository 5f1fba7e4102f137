"""`report` on a real 2-seed sweep and on one of its runs: report.md with the numbers of the
metrics files, and PNG plots that decode with the expected pixel sizes.

    pytest tests/test_report.py -x -q
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from conftest import evals, read_jsonl, run_cli
from test_evaluate import make_decisive_model

from distributed_tune.cli import main

SIZES = {"training.png": (1000, 700), "evaluation.png": (1000, 550)}


@pytest.fixture(scope="module")
def sweep_dir(tiny_model: Path, cola_dir: Path, cola_raw: Path, cache_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    model = make_decisive_model(tiny_model, tmp / "decisive", cola_raw)
    run_cli(["sweep", "--seeds", "2", f"model.name={model}", f"data.source={cola_dir}", f"data.cache_dir={cache_dir}",
             "train.max_steps=6", "train.eval_every=2", "train.log_every=1", "train.global_batch_size=16",
             "train.micro_batch_size=8", "train.lr=1e-4", f"output_dir={tmp / 'sweep'}"])
    return tmp / "sweep"


def decoded(path: Path) -> tuple[int, int]:
    """The PNG's pixel size, after decoding every pixel; fails on a blank image."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, f"{path} looks blank"
        return im.size


def test_sweep_report(sweep_dir: Path, capsys) -> None:
    assert main(["report", str(sweep_dir)]) == 0
    out = sweep_dir / "report"
    assert capsys.readouterr().out.split() == ["sweep", "report:", *(str(out / f) for f in
                                               ("report.md", "training.png", "evaluation.png", "confusion.png"))]
    for name, size in SIZES.items():
        assert decoded(out / name) == size
    assert decoded(out / "confusion.png") == (2 * 450, 420)  # one 450x420 panel per seed

    md = (out / "report.md").read_text()
    for image in ("training.png", "evaluation.png", "confusion.png"):
        assert f"]({image})" in md
    assert "## Summary" in md and "| setting | runs | selected: mean ± std" in md
    for seed in (42, 43):
        run = sweep_dir / f"seed_{seed}"
        dev = [r for r in evals(run) if r["split"] == "dev"]
        best = max(dev, key=lambda r: (r["mcc"], -r["optimizer_step"]))
        assert (f"| (config) | seed {seed} | {best['mcc']:.4f} | {best['optimizer_step']} | {dev[-1]['mcc']:.4f} | "
                f"{dev[-1]['optimizer_step']} |") in md
        train = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert len(train) == 6
        samples = statistics.median(r["samples_per_s"] for r in train)
        tokens = statistics.median(r["tokens_per_s"] for r in train)
        padding = statistics.median(r["padding_fraction"] for r in train)
        whole = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "train_summary"]
        run_rate = f"{whole[-1]['samples_per_s']:.1f}" if whole else "-"
        assert f"| seed {seed} | 6 | {samples:.1f} | {tokens:.0f} | {padding:.3f} | {run_rate} |" in md
    assert "```yaml\nseed: 42\n" in md and "train:\n  epochs: " in md


def test_run_report(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    run = sweep_dir / "seed_43"
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.startswith("run report:")
    for name, size in SIZES.items():
        assert decoded(tmp_path / "r" / name) == size
    assert decoded(tmp_path / "r" / "confusion.png") == (450, 420)
    md = (tmp_path / "r" / "report.md").read_text()
    last = {r["split"]: r for r in evals(run) if r["optimizer_step"] == 6}
    dev = last["dev"]
    assert (f"| dev | 1043 | {dev['mcc']:.4f} | {dev['accuracy']:.4f} | {dev['confusion_matrix']} | "
            f"{'**yes**' if dev['collapsed'] else 'no'} |") in md, md
    assert "| last" in md and "(step 6) | in_domain_dev | 527 |" in md
    assert "```yaml\nseed: 43\n" in md


@pytest.mark.fast
def test_report_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json)" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
