"""A sweep: one config over seeds and a grid of settings (what it is, where its runs live, and its
summary). The library side of the `sweep` and `report` commands; runs nothing.

    sweep = Sweep(config, sha, overrides, parse_grid(["train.lr=2e-5,5e-5"]), seeds=(42, 43, 44))
    for setting, seed, run_dir in sweep.runs(sweep_dir): ...
    write_summary(sweep_dir)          # sweep_summary.json / .md: selected and final values per setting
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distributed_tune import checkpoint
from distributed_tune.config import Config, load_config, parse_overrides
from distributed_tune.errors import ConfigError, RunDirError
from distributed_tune.files import atomic_write_json, atomic_write_text
from distributed_tune.summary import RunResult, describe, fmt, honest, pick_winner, run_result, summarize

SUMMARY_JSON, SUMMARY_MD, SWEEP_JSON, SBATCH = "sweep_summary.json", "sweep_summary.md", "sweep.json", "sweep.sbatch"
RESERVED = ("seed", "output_dir", "resume", "overwrite")
SWEEP_LOCK = ".sweep.lock"  # held by the sweep running in the folder


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its overrides and its folder name."""

    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return ",".join(self.overrides)


@dataclass(frozen=True)
class Sweep:
    """What a sweep is (recorded in sweep.json; a rerun must be the same sweep)."""

    config: str | None
    config_sha256: str | None
    overrides: tuple[str, ...]
    grid: tuple[tuple[str, tuple[str, ...]], ...]
    seeds: tuple[int, ...]

    def settings(self) -> list[Setting]:
        keys = [k for k, _ in self.grid]
        return [Setting(tuple(f"{k}={v}" for k, v in zip(keys, values)))
                for values in itertools.product(*(vs for _, vs in self.grid))]

    def run_dir(self, sweep_dir: Path, setting: Setting, seed: int) -> Path:
        return (sweep_dir / setting.name if setting.overrides else sweep_dir) / f"seed_{seed}"

    def runs(self, sweep_dir: Path) -> list[tuple[Setting, int, Path]]:
        return [(st, s, self.run_dir(sweep_dir, st, s)) for st in self.settings() for s in self.seeds]

    def run_overrides(self, sweep_dir: Path, setting: Setting, seed: int) -> list[str]:
        """What a run adds to the config: the sweep's overrides, the setting, its seed and folder."""
        base = [o for o in self.overrides if not o.startswith("output_dir=")]
        return [*base, *setting.overrides, f"seed={seed}", f"output_dir={self.run_dir(sweep_dir, setting, seed)}"]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "config_sha256": self.config_sha256, "overrides": list(self.overrides),
                "grid": {k: list(v) for k, v in self.grid}, "seeds": list(self.seeds)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sweep:
        return cls(data.get("config"), data.get("config_sha256"), tuple(data.get("overrides", [])),
                   tuple((k, tuple(v)) for k, v in data.get("grid", {}).items()), tuple(data["seeds"]))


def parse_grid(items: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """['train.lr=2e-5,5e-5'] -> (('train.lr', ('2e-5', '5e-5')),); every value is validated as an override."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like KEY=v1,v2 (e.g. --grid train.lr=2e-5,5e-5)")
        key, raw = item.split("=", 1)
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        if key in RESERVED:
            raise ConfigError(f"--grid {key}: the sweep sets {key} itself (use --seeds / --first-seed)")
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        for v in values:
            parse_overrides([f"{key}={v}"])
        grid.append((key, values))
    return tuple(grid)


# --------------------------------------------------------------------------- summary


def collect(sweep: Sweep, sweep_dir: Path, cfg: Config) -> dict[str, list[RunResult]]:
    task = cfg.task_spec
    out: dict[str, list[RunResult]] = {}
    for setting, seed, run_dir in sweep.runs(sweep_dir):
        out.setdefault(setting.name, []).append(run_result(run_dir, task, label=f"seed {seed}"))
    return out


def write_summary(sweep_dir: Path, echo: bool = True) -> dict[str, Any]:
    """Recompute the summary from the run folders; write the .json and .md (atomically)."""
    sweep, cfg = read_sweep(sweep_dir)
    task = cfg.task_spec
    heldout = cfg.data.heldout_fraction > 0
    per_setting = collect(sweep, sweep_dir, cfg)
    settings = {name: summarize(results) for name, results in per_setting.items()}
    winner, no_winner = pick_winner(settings, heldout)
    metric = f"{task.selection_split} {task.main_metric}"
    payload = {
        "sweep_dir": str(sweep_dir), "task": task.name, "metric": metric, "heldout_selection": heldout,
        "honest": "dev value at the held-out selection" if heldout else "final value",
        "winner": winner, "no_winner": no_winner,
        "settings": {name: {"summary": s, "runs": [asdict(r) for r in per_setting[name]]} for name, s in settings.items()},
    }
    atomic_write_json(sweep_dir / SUMMARY_JSON, payload)
    atomic_write_text(sweep_dir / SUMMARY_MD, summary_markdown(payload))
    if echo:
        print(summary_markdown(payload))
        print(f"wrote {sweep_dir / SUMMARY_JSON} and {sweep_dir / SUMMARY_MD}")
    return payload


def summary_markdown(payload: dict[str, Any]) -> str:
    metric, heldout = payload["metric"], payload["heldout_selection"]
    lines = [f"# Sweep {payload['sweep_dir']} ({payload['task']}, {metric})", "",
             f"Selected = the best evaluation (the model kept; chosen on {'the held-out slice' if heldout else 'the same dev set: optimistic'}); "
             f"final = the last evaluation. Settings are ranked by the median of the {payload['honest']}. "
             "runs = finished / all: an unfinished run is listed below, not counted.", ""]
    head = "| setting | runs | selected: mean ± std (median, min..max) | final: mean ± std (median, min..max) |"
    sep = "| --- | ---: | --- | --- |"
    if heldout:
        head += " dev at held-out selection |"
        sep += " --- |"
    head += " collapsed (selected / final) |"
    sep += " ---: |"
    lines += [head, sep]
    for name, entry in sorted(payload["settings"].items(),
                              key=lambda kv: -(honest(kv[1]["summary"], heldout)["median"] or -9)):
        s = entry["summary"]
        mark = " **(winner)**" if name == payload["winner"] else ""
        row = f"| {name or '(config)'}{mark} | {s['scored']}/{s['runs']} | {describe(s['selected'])} | {describe(s['final'])} |"
        if heldout:
            row += f" {describe(s['selected_dev'])} |"
        row += f" {s['collapsed_selected']} / {s['collapsed_final']} |"
        lines.append(row)
    lines += ["", "| setting | run | selected | at step | final | at step | collapsed (sel/final) | evaluations | "
              "first 2-class evaluation | status |", "| --- | --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: | --- |"]
    for name, entry in payload["settings"].items():
        for r in entry["runs"]:
            coll = "-" if r["best_collapsed"] is None else f"{'yes' if r['best_collapsed'] else 'no'}/" \
                                                           f"{'yes' if r['final_collapsed'] else 'no'}"
            lines.append(f"| {name or '(config)'} | {r['label']} | {fmt(r['best_value'])} | {r['best_step'] or '-'} | "
                         f"{fmt(r['final_value'])} | {r['final_step'] or '-'} | {coll} | {r['evaluations']} | "
                         f"{r['first_non_collapsed_step'] or '-'} | {r['status']} |")
    if payload["winner"] is not None:
        lines += ["", f"winner (median of the {payload['honest']}): {payload['winner'] or '(config)'}"]
    elif payload.get("no_winner"):
        lines += ["", f"no winner: {payload['no_winner']}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the sweep directory


def read_sweep(sweep_dir: Path) -> tuple[Sweep, Config]:
    meta = sweep_dir / SWEEP_JSON
    if not meta.is_file():
        raise RunDirError(f"{sweep_dir}: no {SWEEP_JSON}; is this a sweep directory?")
    sweep = Sweep.from_json(json.loads(meta.read_text()))
    first = sweep.runs(sweep_dir)[0]
    cfg = load_config(first[2] / "config.yaml") if (first[2] / "config.yaml").is_file() else \
        load_config(None, [o for o in sweep.overrides if o.split("=", 1)[0] in ("task", "data.heldout_fraction")])
    return sweep, cfg


def check_same_sweep(sweep_dir: Path, sweep: Sweep) -> None:
    """A rerun into a sweep folder must be the same sweep (or --overwrite)."""
    meta = sweep_dir / SWEEP_JSON
    if not meta.is_file():
        return
    old = Sweep.from_json(json.loads(meta.read_text()))
    # Overrides: only those that differ (the full lists repeat the model, data and paths).
    before = [o for o in old.overrides if o not in sweep.overrides]
    now = [o for o in sweep.overrides if o not in old.overrides]
    diffs = [f"{name}: {a} before, {b} now" for name, a, b in (
        ("config file content", old.config_sha256, sweep.config_sha256),
        ("overrides", " ".join(before) or "(none)", " ".join(now) or "(none)"),
        ("grid", dict(old.grid), dict(sweep.grid)), ("seeds", list(old.seeds), list(sweep.seeds)))
        if a != b]
    if diffs:
        raise RunDirError(f"{sweep_dir} holds another sweep ({'; '.join(diffs)}); use another output_dir, "
                          "or --overwrite to start it over")


def check_run_matches(run_dir: Path, expected: Config) -> None:
    """A finished run is reused only if it trained what this sweep asks for."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    have = checkpoint.trajectory(load_config(path))
    want = checkpoint.trajectory(expected)
    changed = [f"{k}: {have[k]} in the run, {want[k]} now" for k in want if have.get(k) != want[k]]
    if changed:
        raise RunDirError(f"{run_dir} was trained with other settings ({'; '.join(changed)}); use another "
                          "output_dir, or --overwrite to rerun it")
