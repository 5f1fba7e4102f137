"""LoRA (model.lora) and the model/ export it makes, for real: tiny random models of three families
written by fixtures (BERT, a Llama-architecture and a Qwen2-architecture decoder), 1 and 2 CPU
processes, DDP and DeepSpeed ZeRO 1-3.

    python -m pytest -q tests/test_lora.py -m fast     # config, targets, heads: seconds
    python -m pytest -q tests/test_lora.py             # + the launched runs, ~5 minutes on 2 cores

One module-scoped set of runs (8 optimizer steps, global batch 16, a checkpoint every 4, dropout
off) serves the launched tests:
  * 1 process x accumulation 2 and 2 processes log the same losses (BERT and Llama, DDP);
  * LoRA under ZeRO-1, 2 and 3 logs the DDP losses (BERT, 2 processes);
  * ZeRO-3 + LoRA on 2 processes trains, and a copy cut back to its step-4 checkpoint resumes
    with the same losses for steps 5..8 (BERT and Qwen2);
  * model/ (merged) reloaded by pipeline() in a new process gives the run's own dev MCC;
    model/adapter/ loads with PeftModel.from_pretrained and predicts the same;
  * the head in the export differs from the initial head and equals the checkpoint's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, evals, run_cli, subprocess_env, train_losses
from test_deepspeed import LOSS_TOL_FP32 as ZERO_TOL  # ZeRO 1-3 against DDP: its bound for full fine-tuning
from test_deepspeed import cut_back_to

from distributed_tune.config import load_config
from distributed_tune.errors import ConfigError

STEPS, HALF = 8, 4
GC = ["train.gradient_checkpointing=true"]
# Gradient checkpointing recomputes the same forward in the backward pass: measured 0.0 (bitwise
# equal losses) in every pair below; the bound leaves room for a kernel that sums in another order.
GC_TOL = 1e-6
# 2 processes against 1 process x accumulation 2: the same arithmetic summed in another order.
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def llama(cola_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), cola_dir, "llama")


@pytest.fixture(scope="module")
def qwen(cola_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), cola_dir, "qwen2")


@pytest.fixture(scope="module")
def decisive_bert(tiny_model: Path, cola_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with predictions that depend on the sentence (two classes predicted)."""
    from test_evaluate import make_decisive_model

    return make_decisive_model(tiny_model, tmp_path_factory.mktemp("decisive"), cola_raw)


# --------------------------------------------------------------------------- in process


@pytest.mark.fast
def test_lora_keys_parse_and_null_is_full_fine_tuning(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.lora.r=8", "model.lora.target_modules=[query, key]", "model.lora.alpha=32"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (8, 32.0, ("query", "key"))
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora: null\n")
    assert load_config(path).model.lora.r is None
    assert load_config(None).model.lora.r is None


@pytest.mark.fast
@pytest.mark.parametrize(("overrides", "message"), [
    (["model.lora.r=8", "distributed.zero_stage=3", "distributed.offload_params=cpu"],
     "model.lora.r is set with distributed.offload_params=cpu"),
    (["model.lora.target_modules=[query]"], "model.lora.target_modules=['query'] is set but model.lora.r is null"),
    (["model.lora.r=0"], "model.lora.r=0 must be at least 1"),
    (["model.lora.r=4", "model.lora.target_modules=[]"], "model.lora.target_modules=[] names no module"),
])
def test_impossible_combinations_are_refused_before_loading(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


@pytest.mark.fast
def test_the_head_of_each_family_is_trained_and_saved(tiny_model: Path, llama: Path, qwen: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from distributed_tune import lora

    expected = {tiny_model: (["pooler", "classifier"], ("query", "value")), llama: (["score"], ("q_proj", "v_proj")),
                qwen: (["score"], ("q_proj", "v_proj"))}
    cfg = load_config(None, ["model.lora.r=4"]).model
    for folder, (heads, targets) in expected.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert lora.head_modules(model) == heads
        assert lora.targets(cfg, model) == targets
        wrapped, note = lora.apply_lora(model, cfg)
        trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
        assert {h for h in heads if any(f"{h}.modules_to_save" in n for n in trainable)} == set(heads)
        assert note is not None and "head trained in full and saved: " + ", ".join(heads) in note


@pytest.mark.fast
def test_target_modules_that_do_not_exist_name_the_ones_that_do(llama: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from distributed_tune import lora

    model = AutoModelForSequenceClassification.from_pretrained(llama)
    cfg = load_config(None, ["model.lora.r=4", "model.lora.target_modules=[query, value]"]).model
    with pytest.raises(ConfigError) as e:
        lora.apply_lora(model, cfg)
    line = str(e.value)
    assert "\n" not in line and line.startswith("model.lora.target_modules: query, value not among the linear layers")
    assert "it has e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj" in line
    assert "set model.lora.target_modules to some of those (or all-linear)" in line


# --------------------------------------------------------------------------- launched runs


def args(model: Path, cache_dir: Path, cola_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"model.name={model}", "model.dropout=0", f"data.source={cola_dir}",
            f"data.cache_dir={cache_dir}", "train.epochs=1", f"train.max_steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", f"train.checkpoint_every={HALF}", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.lr=1e-3", "model.lora.r=4", *extra]


@pytest.fixture(scope="module")
def runs(decisive_bert: Path, llama: Path, qwen: Path, cache_dir: Path, cola_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> run directory; `<name>_resumed` resumed a copy of `<name>` from its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("lora")
    models = {"bert": decisive_bert, "llama": llama, "qwen": qwen}
    plan = {  # name: (model, processes, extra)
        "bert_1": ("bert", 1, []), "bert_2": ("bert", 2, []),
        "llama_1": ("llama", 1, []), "llama_2": ("llama", 2, []),
        "bert_z1": ("bert", 2, ["distributed.zero_stage=1"]),
        "bert_z2": ("bert", 2, ["distributed.zero_stage=2"]),
        "bert_z3": ("bert", 2, ["distributed.zero_stage=3"]),
        "qwen_z3": ("qwen", 2, ["distributed.zero_stage=3"]),
        # train.gradient_checkpointing against the runs above: LoRA (1 process, DDP, ZeRO-3), full fine-tuning.
        "bert_1_gc": ("bert", 1, GC), "llama_2_gc": ("llama", 2, GC),
        "qwen_z3_gc": ("qwen", 2, ["distributed.zero_stage=3", *GC]),
        "llama_full": ("llama", 1, ["model.lora.r=null"]), "llama_full_gc": ("llama", 1, ["model.lora.r=null", *GC]),
    }
    out = {}
    for name, (model, nproc, extra) in plan.items():
        out[name] = root / name
        launcher = "python" if nproc == 1 else "torchrun"
        run_cli(args(models[model], cache_dir, cola_dir, out[name], *extra), nproc=nproc, launcher=launcher)
        if name.endswith("_z3"):
            resumed = out[f"{name}_resumed"] = root / f"{name}_resumed"
            cut_back_to(out[name], resumed, HALF)
            run_cli(["--resume", *args(models[model], cache_dir, cola_dir, resumed, *extra)], nproc=2,
                    launcher="torchrun")
    return out


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_one_process_with_accumulation_equals_two_processes(runs, family: str) -> None:
    one, two = train_losses(runs[f"{family}_1"]), train_losses(runs[f"{family}_2"])
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, abs=LOSS_TOL)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lora_under_each_zero_stage_logs_the_ddp_losses(runs, stage: int) -> None:
    ddp, zero = train_losses(runs["bert_2"]), train_losses(runs[f"bert_z{stage}"])
    assert len(ddp) == len(zero) == STEPS
    assert zero == pytest.approx(ddp, abs=ZERO_TOL)
    assert {r["n"] for r in evals(runs[f"bert_z{stage}"]) if r["split"] == "dev"} == {1043}


@pytest.mark.parametrize("name", ["bert_z3", "qwen_z3"])
def test_zero3_lora_resumes_exactly_and_exports(runs, name: str) -> None:
    full, resumed = train_losses(runs[name]), train_losses(runs[f"{name}_resumed"])
    assert len(full) == STEPS
    assert resumed == full  # the same losses, steps 1-4 kept from the log, 5-8 trained again
    shards = {p.name for p in (runs[name] / "checkpoints" / "step_00000008" / "pytorch_model").iterdir()}
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in shards
    for run in (runs[name], runs[f"{name}_resumed"]):
        assert {p.name for p in (run / "model").iterdir()} >= {"config.json", "model.safetensors", "adapter"}
        assert {p.name for p in (run / "model" / "adapter").iterdir()} >= {"adapter_config.json",
                                                                             "adapter_model.safetensors"}
        assert {r["n"] for r in evals(run) if r["split"] == "dev"} == {1043}  # every dev sentence once


@pytest.mark.parametrize(("with_gc", "without"), [("bert_1_gc", "bert_1"), ("llama_2_gc", "llama_2"),
                                                  ("qwen_z3_gc", "qwen_z3"), ("llama_full_gc", "llama_full")])
def test_gradient_checkpointing_gives_the_same_losses(runs, with_gc: str, without: str) -> None:
    on, off = train_losses(runs[with_gc]), train_losses(runs[without])
    assert len(on) == len(off) == STEPS
    assert on == pytest.approx(off, abs=GC_TOL)


def test_a_resume_with_another_rank_or_targets_is_refused(runs, decisive_bert: Path, cache_dir: Path,
                                                          cola_dir: Path) -> None:
    from conftest import snapshot

    run = runs["bert_1"]
    before = snapshot(run, ignore=(".lock",))
    for change, key in ((["model.lora.r=8"], "model.lora.r"),
                        (["model.lora.target_modules=[query, key]"], "model.lora.target_modules")):
        proc = run_cli(["--resume", *args(decisive_bert, cache_dir, cola_dir, run, *change), "train.max_steps=12"],
                       check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert key in proc.stderr
    assert snapshot(run, ignore=(".lock",)) == before


def _head(state: dict, prefix: str = "") -> dict:
    names = ("classifier.weight", "classifier.bias", "score.weight")
    return {n: state[prefix + n] for n in names if prefix + n in state}


@pytest.mark.parametrize("name", ["bert_2", "bert_z3"])
def test_the_exported_head_trained_and_is_the_checkpoints(runs, decisive_bert: Path, name: str) -> None:
    import torch
    from safetensors.torch import load_file

    run = runs[name]
    exported = _head(load_file(run / "model" / "model.safetensors"))
    initial = _head(load_file(decisive_bert / "model.safetensors"))
    ckpt = run / "checkpoints" / "step_00000008"
    if name == "bert_2":
        saved = load_file(ckpt / "model.safetensors")
    else:  # ZeRO-3 shards, consolidated by DeepSpeed's own tool
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        saved = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    in_ckpt = {n: saved[f"base_model.model.{n.replace('.', '.modules_to_save.default.', 1)}"] for n in exported}
    assert set(exported) == {"classifier.weight", "classifier.bias"}
    for n in exported:
        assert not torch.equal(exported[n], initial[n]), n
        assert torch.equal(exported[n], in_ckpt[n].float()), n


RELOAD = r"""
import json, sys
import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

torch.set_num_threads(1)
model_dir, rows = sys.argv[1], [json.loads(l) for l in open(sys.argv[2])]
gold, texts = [r["label"] for r in rows], [r["sentence"] for r in rows]
clf = pipeline("text-classification", model=model_dir, device="cpu")
merged = [int(o["label"] == "acceptable") for o in clf(texts, batch_size=64)]
adapter = model_dir + "/adapter"
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
tok = AutoTokenizer.from_pretrained(adapter)
peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), adapter).eval()
with torch.no_grad():
    logits = torch.cat([peft(**tok(texts[i:i + 64], padding=True, return_tensors="pt")).logits
                        for i in range(0, len(texts), 64)])
print(json.dumps({"pipeline_mcc": matthews_corrcoef(gold, merged), "adapter_mcc": matthews_corrcoef(gold, logits.argmax(-1).tolist()),
                  "agree": float(np.mean(np.array(merged) == logits.argmax(-1).numpy()))}))
"""


def test_merged_export_reloaded_by_pipeline_gives_the_runs_mcc(runs) -> None:
    run = runs["bert_z3"]
    logged = {r["split"]: r for r in evals(run) if r["optimizer_step"] == STEPS}["dev"]
    assert not logged["collapsed"]  # two classes predicted: the MCC says something
    rows = [json.loads(line) for line in (run / "model" / "dev_predictions.jsonl").read_text().splitlines()]
    dev = run / "dev.jsonl"
    dev.write_text("".join(json.dumps({"sentence": r["sentence"], "label": r["label"]}) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(run / "model"), str(dev)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["pipeline_mcc"] == pytest.approx(logged["mcc"], abs=1e-9)
    assert got["adapter_mcc"] == pytest.approx(logged["mcc"], abs=1e-9) and got["agree"] == 1.0


def test_evaluate_takes_the_merged_model_or_the_adapter(runs, tmp_path: Path) -> None:
    run = runs["bert_z3"]
    logged = {r["split"]: r for r in evals(run) if r["optimizer_step"] == STEPS}["dev"]["mcc"]
    for i, target in enumerate([run, run / "model", run / "model" / "adapter"]):
        run_cli(["evaluate", str(target), "--out", str(tmp_path / str(i))])
        result = json.loads((tmp_path / str(i) / "metrics.json").read_text())
        assert result["splits"]["dev"]["mcc"] == pytest.approx(logged, abs=1e-9), target


def test_target_modules_that_do_not_exist_is_one_line_exit_2(llama: Path, cache_dir: Path, cola_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(args(llama, cache_dir, cola_dir, out, "model.lora.target_modules=[query]"), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.lora.target_modules: query not among the linear layers" in lines[0]
    assert not (out / "metrics.jsonl").exists()


def test_predict_takes_the_merged_model_or_the_adapter(runs, tmp_path: Path) -> None:
    run = runs["bert_z3"]
    rows = [json.loads(line) for line in (run / "model" / "dev_predictions.jsonl").read_text().splitlines()][:20]
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("".join(r["sentence"] + "\n" for r in rows))
    got = {}
    for name, target in (("merged", run / "model"), ("adapter", run / "model" / "adapter")):
        out = tmp_path / f"{name}.jsonl"
        run_cli(["predict", str(target), "--file", str(sentences), "--out", str(out)])
        got[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["pred_label"] for g in got["merged"]] == [g["pred_label"] for g in got["adapter"]] == [r["pred_label"] for r in rows]
    assert [g["prob"] for g in got["adapter"]] == pytest.approx([g["prob"] for g in got["merged"]], abs=1e-5)
