"""Publish a run's exported model (weights, tokenizer, model card) to the Hugging Face Hub.

    python -m distributed_tune push runs/cola_bert_base --repo-id you/bert-base-cola
    python -m distributed_tune push runs/cola_bert_base --repo-id you/bert-base-cola --private

Uploads RUN/model/ through huggingface_hub into the repository (created if missing), with its
model card (model/README.md) rendered again from the run under the repository's name, so that the
published folder says how to load it from there. Needs network and a Hub token (`hf auth login`
or HF_TOKEN). Without network (HF_HUB_OFFLINE set, or the hub's address unreachable) it is refused
with one line before anything is sent. A collapsed model is pushed with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distributed_tune.errors import ConfigError, DistributedTuneError, RunDirError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distributed_tune push", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN_DIR", help="a run directory whose training exported model/")
    ap.add_argument("--repo-id", required=True, help="the hub repository, OWNER/NAME (created if missing)")
    ap.add_argument("--private", action="store_true", help="create the repository private")
    ap.add_argument("--commit-message", default="distributed_tune: upload model/", help="the hub commit's message")
    return ap


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from distributed_tune import hub, model_card
    from distributed_tune.trained import resolve_target

    run_dir = Path(args.run).expanduser()
    if run_dir.name == "model" and (run_dir.parent / "config.yaml").is_file():
        run_dir = run_dir.parent  # RUN/model given: its run
    model_dir = run_dir / "model"
    if not (model_dir / "training_info.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory with an exported model (config.yaml, model/"
                          "training_info.json); push the output_dir of a run that has evaluated at least once")
    if len(args.repo_id.split("/")) != 2 or not all(args.repo_id.split("/")):
        raise ConfigError(f"--repo-id {args.repo_id}: expected OWNER/NAME, e.g. you/bert-base-cola")
    offline = hub.offline_reason()
    if offline is not None:
        raise ConfigError(f"push needs the Hugging Face Hub, and it cannot be used here ({offline}); push from a "
                          f"machine with network, or upload {model_dir} as it is (its README.md is the model card)")
    warning = resolve_target(str(run_dir), []).collapse_warning()
    if warning:
        print(warning, file=sys.stderr)
    model_card.write(model_dir, run_dir, repo_id=args.repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=args.repo_id, folder_path=model_dir, repo_type="model",
                          commit_message=args.commit_message)
    except Exception as e:  # the hub client raises HTTP, connection and validation errors of many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistributedTuneError(f"push to {args.repo_id} failed ({reason}); check the name and your token "
                                   "(`hf auth login`, or HF_TOKEN with write access)") from None
    print(f"pushed {model_dir} to {url}")
    return 0
