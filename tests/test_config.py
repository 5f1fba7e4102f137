"""Config parsing, overrides, every error message, derived numbers, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distributed_tune.cli import main
from distributed_tune.config import derive, dump_resolved, load_config, read_yaml
from distributed_tune.errors import ConfigError

pytestmark = pytest.mark.fast  # in this process, no launcher: the quick tier

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides_merge(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "seed: 7\ntrain:\n  lr: 3.0e-5\n  epochs: 2\n"),
                      ["train.epochs=4", "model.name=/m", "train.adam_betas=[0.9, 0.98]", "train.max_steps=null"])
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs, cfg.model.name) == (7, 3e-5, 4, "/m")
    assert cfg.train.adam_betas == (0.9, 0.98) and cfg.train.max_steps is None
    assert cfg.train.micro_batch_size is None  # default kept: derived from the global batch
    # YAML reads 2e-5 (no dot) as a string: accepted as a float all the same.
    assert load_config(None, ["train.lr=2e-5"]).train.lr == 2e-5


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  lrr: 1\n", [], "c.yaml: unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("trian:\n  lr: 1\n", [], "c.yaml: unknown key 'trian'; did you mean 'train'?"),
    ("train:\n  epochs: three\n", [], "c.yaml: train.epochs must be int, got 'three'"),
    ("precision: fp8\n", [], "c.yaml: precision must be 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
    ("model:\n  dropout: yes\n", [], "c.yaml: model.dropout must be float or null, got True"),
    ("", ["train.epoch=3"], "override: unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    ("", ["train.epochs"], "override 'train.epochs' must look like key=value (e.g. train.epochs=4)"),
    ("", ["resume=maybe"], "override: resume must be bool, got 'maybe'"),
    ("", ["distributed.zero_stage=4"], "distributed.zero_stage=4 must be 0, 1, 2, 3 or null (plain DDP)"),
    ("train:\n  learning_rate: 1\n", [], "c.yaml: unknown key 'train.learning_rate'; that is the HF Trainer's name: "
     "here it is train.lr"),
    ("", ["train.num_train_epochs=3"], "override: unknown key 'train.num_train_epochs'; that is the HF Trainer's "
     "name: here it is train.epochs"),
    ("", ["train.weight_decay=-5"], "train.weight_decay=-5.0 must be 0 (off) or positive"),
    ("", ["train.max_grad_norm=-1"], "train.max_grad_norm=-1.0 must be 0 (off) or positive"),
    ("", ["data.pad_to_multiple_of=-3"], "data.pad_to_multiple_of=-3 must be at least 1"),
    ("", ["train.lr=inf"], "train.lr=inf must be a finite number"),
    ("train:\n  lr: .nan\n", [], "train.lr=nan must be a finite number"),
    ("", ["train.adam_betas=[0.9,1.5]"], "train.adam_betas=[0.9, 1.5] must each be in [0, 1) (e.g. [0.9, 0.999])"),
    ("", ["train.adam_eps=-1"], "train.adam_eps=-1.0 must be positive (e.g. 1e-8)"),
    ("", ["task=sst3"], "task='sst3' is not a task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, custom); "
     "did you mean 'sst2'?"),
    ("", ["task=custom"], "task=custom needs custom.train_file, custom.validation_file, custom.text_fields (e.g. "
     "custom.train_file=train.csv custom.validation_file=dev.csv custom.text_fields=[sentence])"),
    ("", ["custom.train_file=x.csv"], "custom.train_file is for task=custom; task=cola reads data.source"),
    ("custom:\n  regression: true\n", ["task=sst2"], "custom.regression is for task=custom; task=sst2 reads data.source"),
    ("", ["task=custom", "custom.train_file=a.csv", "custom.validation_file=b.csv", "custom.text_fields=[a, b, c]"],
     "custom.text_fields=['a', 'b', 'c'] must name one or two columns"),
    ("", ["task=custom", "custom.train_file=a.csv", "custom.validation_file=b.csv", "custom.text_fields=[a]",
          "data.source=/data"], "task=custom reads custom.train_file / custom.validation_file; leave data.source unset"),
    ("", ["report_to=[tensorbord]"], "report_to: 'tensorbord' is not a tracker; use none or a list of tensorboard, "
     "wandb, mlflow"),
    ("", ["distributed.offload_params=cpu", "distributed.zero_stage=2"],
     "distributed.offload_params=cpu needs distributed.zero_stage=3 (now 2); parameter offload exists only in ZeRO-3"),
    ("", ["distributed.offload_optimizer=cpu", "distributed.zero_stage=0"],
     "distributed.offload_optimizer=cpu needs DeepSpeed ZeRO stage 1, 2 or 3; set distributed.zero_stage (now 0)"),
    ("", ["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5 must be between 0 and 1"),
    ("", ["train.micro_batch_size=0"], "train.micro_batch_size=0 must be at least 1"),
    ("", ["resume=true", "overwrite=true"], "resume=true and overwrite=true contradict each other; pick one"),
])
def test_errors_name_the_key_and_the_fix(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert str(e.value).endswith(message), str(e.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "seed: 1\ntrain:\n  lr: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: YAML syntax error: .*; fix the file"):
        read_yaml(p)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(write(tmp_path, "train:\n  lrr: 1\n"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'c.yaml'}: unknown key 'train.lrr'; did you mean 'train.lr'?"]


def test_derived_numbers_and_batch_arithmetic() -> None:
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8", "train.epochs=3",
                             "train.warmup_ratio=0.1", "precision=bf16"])
    d = derive(cfg, world_size=2, train_examples=8551)
    assert (d.gradient_accumulation_steps, d.steps_per_epoch, d.total_steps, d.warmup_steps) == (2, 267, 801, 81)
    assert d.pad_to_multiple_of == 8  # mixed precision pads to multiples of 8
    assert derive(load_config(None, ["train.max_steps=10"]), 1, 8551).total_steps == 10
    assert derive(load_config(None, ["train.warmup_steps=7"]), 1, 8551).warmup_steps == 7  # replaces the ratio
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 is not a multiple of train.micro_batch_size=8 "
                                          r"x world size 3 = 24; pick a global batch that is a multiple of 24"):
        derive(cfg, world_size=3, train_examples=8551)


@pytest.mark.parametrize("world, cap, expected", [
    (1, 32, (32, 1)), (2, 32, (16, 1)), (4, 32, (8, 1)), (8, 32, (4, 1)), (16, 32, (2, 1)), (32, 32, (1, 1)),
    (1, 8, (8, 4)), (2, 8, (8, 2)), (1, 12, (8, 4)), (1, 5, (4, 8)),
])
def test_micro_batch_is_derived_from_the_global_batch(world: int, cap: int, expected: tuple[int, int]) -> None:
    """The global batch is the recipe: the same config runs on 1, 2, 4, ... processes; accumulation
    only where global / world exceeds the per-device cap (the smallest accumulation that fits)."""
    cfg = load_config(None, ["train.global_batch_size=32", f"train.max_micro_batch_size={cap}"])
    d = derive(cfg, world_size=world, train_examples=8551)
    assert (d.micro_batch_size, d.gradient_accumulation_steps) == expected
    assert d.micro_batch_size * d.gradient_accumulation_steps * world == 32


def test_a_global_batch_no_world_size_can_split_is_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        derive(load_config(None, ["train.global_batch_size=32"]), world_size=3, train_examples=8551)
    assert str(e.value) == ("train.global_batch_size=32 cannot be split over world size 3; pick a global batch that "
                            "is a multiple of 3 (e.g. 33) or another number of processes")


def test_config_command_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write(tmp_path, "train:\n  lr: 3.0e-5\n")
    assert main(["config", "--config", str(cfg_file), "train.epochs=2", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert (data["train"]["lr"], data["train"]["epochs"], data["task"]) == (3e-5, 2, "cola")
    assert data["data"]["source"] == "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"  # the task's default
    assert out.rstrip().splitlines()[-1] == "# world size 8: micro batch 4 x accumulation 1 = global batch 32"
    assert main(["config", "--keys"]) == 0
    assert "  train.lr (float, default 2e-05; fixed on resume; HF Trainer: learning_rate)" in capsys.readouterr().out


def test_config_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m distributed_tune config --keys | head -1", shell=True,
                          capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.startswith("  seed (int, default 42; fixed on resume)") and "Traceback" not in proc.stderr, proc.stderr


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=3e-5", "distributed.zero_stage=2", "train.micro_batch_size=8"])
    d = derive(cfg, 4, 8551)
    dump_resolved(cfg, d, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["derived"]["world_size"] == 4 and data["derived"]["total_steps"] == 5 * 267
    assert data["derived"]["micro_batch_size"] == 8
    assert load_config(tmp_path / "config.yaml") == cfg  # the derived section is a record, not input


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir.startswith("runs/")
    assert path.read_text().startswith("#")  # opens with the command that runs it


def test_non_utf8_yaml_and_a_directory_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 text \(byte 13\); save the file as UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"is a directory; pass a YAML file"):
        load_config(tmp_path)


def test_readme_config_reference_is_current() -> None:
    """README's config reference is `config --keys`; UPDATE_README=1 rewrites it after a key changed."""
    import os
    import re

    from distributed_tune.config import help_text

    readme = REPO / "README.md"
    text = readme.read_text()
    if os.environ.get("UPDATE_README") == "1":
        block = re.compile(r"(`python -m distributed_tune config --keys` prints this list:\n\n```\n).*?(\n```)", re.S)
        assert block.search(text), "README lost its config reference block"
        readme.write_text(block.sub(lambda m: m.group(1) + help_text() + m.group(2), text, count=1))
        text = readme.read_text()
    assert help_text() in text, "regenerate README's config reference: UPDATE_README=1 pytest tests/test_config.py"


def test_readme_metrics_schema_is_current() -> None:
    """README's table of metrics.jsonl is records.markdown_table(); UPDATE_README=1 rewrites it."""
    import os
    import re

    from distributed_tune import records

    readme = REPO / "README.md"
    text = readme.read_text()
    if os.environ.get("UPDATE_README") == "1":
        block = re.compile(r"(<!-- records -->\n).*?(\n<!-- /records -->)", re.S)
        assert block.search(text), "README lost its metrics.jsonl table"
        readme.write_text(block.sub(lambda m: m.group(1) + records.markdown_table() + m.group(2), text, count=1))
        text = readme.read_text()
    assert records.markdown_table() in text, "regenerate README's metrics.jsonl table: UPDATE_README=1 pytest tests/test_config.py"


def test_every_key_declares_its_rules_on_the_field() -> None:
    """The resume rule, Trainer names and accelerate settings live on each key (config.key); the
    tables the package uses are derived from them. A key declared without a resume rule fails at
    import; this pins which keys a resume may not change (the README's "Runs you can trust")."""
    import dataclasses
    import typing

    from distributed_tune.config import KEYS, LENGTH_KEYS, TRAINER_NAMES, TRAJECTORY_KEYS, Config
    from distributed_tune.distributed import accelerate_settings

    def leaves(cls: type, prefix: str = "") -> list[str]:
        out, hints = [], typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out += leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                assert f.metadata.get("resume") in ("fixed", "grow", "free"), f"{prefix}{f.name} has no resume rule"
                out.append(f"{prefix}{f.name}")
        return out

    assert leaves(Config) == list(KEYS)
    assert LENGTH_KEYS == ("train.epochs", "train.max_steps")
    assert set(TRAJECTORY_KEYS) == {
        "seed", "task", "precision", "model.name", "model.revision", "model.dropout", "model.lora.r",
        "model.lora.alpha", "model.lora.dropout", "model.lora.target_modules", "data.source",
        "custom.train_file", "custom.validation_file", "custom.text_fields", "custom.label_field",
        "custom.regression", "data.max_length", "data.pad_to_multiple_of", "data.length_grouping", "data.heldout_fraction",
        "train.epochs", "train.max_steps", "train.global_batch_size", "train.lr", "train.weight_decay",
        "train.adam_betas", "train.adam_eps", "train.class_weights", "train.warmup_ratio", "train.warmup_steps", "train.max_grad_norm",
        "distributed.zero_stage", "fp16.initial_scale_power", "fp16.loss_scale_window", "fp16.hysteresis",
        "fp16.min_loss_scale"}
    assert TRAINER_NAMES["learning_rate"] == "train.lr" and TRAINER_NAMES["fp16"] == "precision=fp16"
    assert all(say.split(" ")[0].split("=")[0] in KEYS or say.startswith("--") or "/" in say
               for say in TRAINER_NAMES.values()), TRAINER_NAMES
    # Every key accelerate's settings can supply says so on the key.
    env = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu", "ACCELERATE_GRADIENT_CLIPPING": "0.5",
           "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}
    supplied = set(accelerate_settings(env))
    assert supplied == {k for k, info in KEYS.items() if info.accelerate}, supplied


@pytest.mark.parametrize("text, line", [
    ("train:\n  lr: 1.0e-3\n  epochs: 2\nseed: 3\ntrain:\n  epochs: 5\n",
     "{f}:5: key 'train' is given twice (lines 1 and 5); only the last would be used: keep one"),
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "{f}:3: key 'train.lr' is given twice (lines 2 and 3); only the last would "
                                            "be used: keep one"),
    ("seed: 1\nseed: 1\n", "{f}:2: key 'seed' is given twice (lines 1 and 2); only the last would be used: keep one"),
])
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path, text: str, line: str) -> None:
    """PyYAML keeps the last of two equal keys: the first `train:` block's settings vanished."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    cfg = write(tmp_path, text)
    for command in (["config"], ["train", f"output_dir={tmp_path / 'run'}"]):
        proc = subprocess.run([sys.executable, "-m", "distributed_tune", command[0], "--config", str(cfg), *command[1:]],
                              capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {line.format(f=cfg)}", proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_torch_or_numpy_cannot_take_is_refused_before_anything_is_written(tmp_path: Path, seed: str) -> None:
    """seed=-1 once crashed in numpy's SeedSequence after config.yaml was written."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    proc = subprocess.run([sys.executable, "-m", "distributed_tune", f"seed={seed}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: seed={seed} must be between 0 and 2**64 - 1 (torch and numpy take no other seed)"), proc.stderr
    assert not (tmp_path / "run").exists()
