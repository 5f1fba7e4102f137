"""CoLA: get it, read it strictly, tokenize it once, and cut it into world-size-invariant batches.

Sources (``data.source``):
  * a local folder with ``in_domain_train.tsv``, ``in_domain_dev.tsv``, ``out_of_domain_dev.tsv``
    (directly or under ``cola_public/raw/``);
  * the official archive URL, downloaded once into ``data.cache_dir``, sha256-checked, unpacked;
  * ``hub``: ``nyu-mll/glue``, config ``cola``, through ``datasets`` (GLUE's copy of release 1.0).

Batching: the order of *global* batches depends only on (seed, epoch); process ``r`` of ``W``
takes, at accumulation step ``a``, micro-batch ``a * W + r`` of each global batch. So 1 process
with accumulation 2 sees exactly the micro-batches that 2 processes with accumulation 1 see.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distributed_tune.config import DataConfig
from distributed_tune.errors import DataError

OFFICIAL_SHA256 = "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b"
HUB_DATASET = ("nyu-mll/glue", "cola")
TRAIN = "train"
IN_DOMAIN = "in_domain_dev"
OUT_OF_DOMAIN = "out_of_domain_dev"
DEV = "dev"  # the union of the two dev files: GLUE's 1043-sentence validation set
FILES = {TRAIN: "in_domain_train.tsv", IN_DOMAIN: "in_domain_dev.tsv", OUT_OF_DOMAIN: "out_of_domain_dev.tsv"}
LABELS = {0: "unacceptable", 1: "acceptable"}


@dataclass(frozen=True)
class Example:
    sentence: str
    label: int
    split: str  # which file it came from: train / in_domain_dev / out_of_domain_dev
    source: str  # the publication code (column 1), "" for the hub copy


@dataclass(frozen=True)
class CoLA:
    train: list[Example]
    dev: list[Example]  # in-domain first, then out-of-domain
    fingerprint: dict[str, str]  # file -> sha256, recorded in the run directory

    def counts(self) -> dict[str, int]:
        out = {TRAIN: len(self.train), DEV: len(self.dev)}
        for split in (IN_DOMAIN, OUT_OF_DOMAIN):
            out[split] = sum(e.split == split for e in self.dev)
        return out


# --------------------------------------------------------------------------- reading


def read_tsv(path: Path, split: str) -> list[Example]:
    """Read one raw CoLA file: 4 tab-separated columns, no header, no quote handling."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; data.source must hold the three CoLA TSV files")
    examples = []
    with path.open(encoding="utf-8", newline="") as f:
        # QUOTE_NONE: two training sentences contain '"', which must stay part of the text.
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            where = f"{path}:{lineno}"
            if len(row) != 4:
                raise DataError(
                    f"{where}: expected 4 tab-separated columns (source, label, mark, sentence), "
                    f"got {len(row)}; fix or remove the line"
                )
            source, label, _mark, sentence = row
            if label not in ("0", "1"):
                raise DataError(f"{where}: label must be 0 or 1, got {label!r}")
            if not sentence.strip():
                raise DataError(f"{where}: empty sentence; fix or remove the line")
            examples.append(Example(sentence, int(label), split, source))
    if not examples:
        raise DataError(f"{path}: file is empty; expected CoLA rows")
    return examples


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_raw_dir(folder: Path) -> Path:
    """The folder that holds the three raw files: `folder` itself or `folder/cola_public/raw`."""
    for candidate in (folder, folder / "cola_public" / "raw", folder / "raw"):
        if all((candidate / name).is_file() for name in FILES.values()):
            return candidate
    missing = [n for n in FILES.values() if not (folder / n).is_file()]
    raise DataError(
        f"data.source={folder}: missing {', '.join(missing)} (looked in the folder, cola_public/raw/ "
        "and raw/); point data.source at the unpacked CoLA release"
    )


def download_official(url: str, cache_dir: Path, sha256: str = OFFICIAL_SHA256) -> Path:
    """Download the release archive once, check its sha256, unpack it; return the raw folder."""
    target = cache_dir / "cola_public_1.1"
    if (target / "COMPLETE").is_file():
        return find_raw_dir(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / "cola_public_1.1.zip"
    if not archive.is_file() or sha256_file(archive) != sha256:
        tmp = archive.with_suffix(f".part{os.getpid()}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"could not download CoLA from {url} ({getattr(e, 'reason', e)}); without network, "
                "set data.source to a local folder holding the raw CoLA TSVs"
            ) from None
        got = sha256_file(tmp)
        if got != sha256:
            tmp.unlink()
            raise DataError(
                f"{url}: sha256 {got} does not match the official CoLA 1.1 archive ({sha256}); "
                "the download is corrupted or not CoLA 1.1; retry or set data.source to a local copy"
            )
        tmp.replace(archive)
    staging = cache_dir / f"cola_public_1.1.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if m.startswith("cola_public/raw/") and m.endswith(".tsv")]
        z.extractall(staging, members)
    (staging / "COMPLETE").write_text(sha256 + "\n")
    if not target.exists():
        staging.replace(target)
    shutil.rmtree(staging, ignore_errors=True)
    return find_raw_dir(target)


def _load_hub() -> CoLA:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("data.source=hub needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(*HUB_DATASET)
    except Exception as e:  # datasets raises many types for "no network"
        raise DataError(
            f"could not load the hub dataset {'/'.join(HUB_DATASET)} ({type(e).__name__}); "
            "without network, set data.source to a local folder holding the raw CoLA TSVs"
        ) from None
    train = [Example(r["sentence"], int(r["label"]), TRAIN, "") for r in ds["train"]]
    val = ds["validation"]
    n_in = 527  # GLUE's dev.tsv is in_domain_dev (527) followed by out_of_domain_dev (516)
    dev = [
        Example(r["sentence"], int(r["label"]), IN_DOMAIN if i < n_in else OUT_OF_DOMAIN, "")
        for i, r in enumerate(val)
    ]
    fp = {"hub": f"{'/'.join(HUB_DATASET)}@{getattr(ds['train'], '_fingerprint', '?')}"}
    return CoLA(train, dev, fp)


def load_cola(cfg: DataConfig) -> CoLA:
    """Read CoLA from the configured source; every row validated, file hashes recorded."""
    if cfg.source == "hub":
        return _load_hub()
    if cfg.source.startswith(("http://", "https://")):
        raw = download_official(cfg.source, Path(cfg.cache_dir).expanduser())
    else:
        folder = Path(cfg.source).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data.source={cfg.source}: no such folder; use a folder with the raw CoLA TSVs, "
                "the official URL, or 'hub'"
            )
        raw = find_raw_dir(folder)
    splits = {split: read_tsv(raw / name, split) for split, name in FILES.items()}
    fingerprint = {name: sha256_file(raw / name) for name in FILES.values()}
    return CoLA(splits[TRAIN], splits[IN_DOMAIN] + splits[OUT_OF_DOMAIN], fingerprint)


# --------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Tokenized:
    """Sentences as a right-padded [N, max_length] id matrix: a batch is one index operation."""

    ids: np.ndarray  # int32 [N, max_length], pad_id after each sentence
    lengths: np.ndarray  # int32 [N]
    labels: np.ndarray  # int64 [N]
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.pad_token_id, tokenizer.cls_token, tokenizer.sep_token,
                         tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "do_lower_case", None)]).encode())
    return h.hexdigest()


def tokenize(examples: list[Example], tokenizer: Any, max_length: int, cache_dir: Path | None) -> Tokenized:
    """Tokenize once; the result is cached under `cache_dir` keyed by tokenizer, data and length.

    Under several processes, call it on the (local) main process first: the others then load
    the cache instead of tokenizing again.
    """
    key = hashlib.sha256()
    key.update(_tokenizer_fingerprint(tokenizer).encode())
    key.update(str(max_length).encode())
    for e in examples:
        key.update(f"{e.label}\t{e.sentence}\n".encode())
    path = cache_dir / "tokenized" / f"{key.hexdigest()[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return Tokenized(z["ids"], z["lengths"], z["labels"], int(z["pad_id"]))

    enc = tokenizer([e.sentence for e in examples], truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id
    ids = np.full((len(enc), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(enc), dtype=np.int32)
    for i, seq in enumerate(enc):
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    labels = np.array([e.label for e in examples], dtype=np.int64)
    out = Tokenized(ids, lengths, labels, pad_id)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=ids, lengths=lengths, labels=labels, pad_id=np.int64(pad_id))
        tmp.replace(path)
    return out


# --------------------------------------------------------------------------- batching


def _generator(*seed_parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(seed_parts)))


def global_batches(
    lengths: np.ndarray, global_batch: int, seed: int, epoch: int, length_grouping: bool
) -> list[np.ndarray]:
    """This epoch's global batches (the last partial one dropped); a function of (seed, epoch).

    With `length_grouping`, sentences of similar length share a batch: the permutation is cut
    into windows of 64 global batches, each window sorted by length and cut into batches, and
    the batches shuffled again, so the order stays random but padding almost disappears.
    """
    rng = _generator(seed, epoch)
    n_batches = len(lengths) // global_batch
    order = rng.permutation(len(lengths))[: n_batches * global_batch]
    if length_grouping:
        window = 64 * global_batch
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(n_batches, global_batch)
        batches = batches[rng.permutation(n_batches)]
    else:
        batches = order.reshape(n_batches, global_batch)
    return list(batches)


def rank_micro_batches(
    batches: list[np.ndarray], rank: int, world_size: int, accumulation: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """The micro-batches process `rank` runs, in order, from optimizer step `start_step` on."""
    for batch in batches[start_step:]:
        micro = np.split(batch, world_size * accumulation)
        for a in range(accumulation):
            yield micro[a * world_size + rank]


def eval_shard(lengths: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Indices this rank evaluates: length-sorted, dealt round-robin, padded with -1.

    Every rank gets the same count (ZeRO-3's forward is a collective: all ranks must run the same
    number of batches). The -1 slots are run on example 0 and dropped before gathering.
    """
    order = np.argsort(lengths, kind="stable")
    per_rank = -(-len(order) // world_size)
    padded = np.full(per_rank * world_size, -1, dtype=np.int64)
    padded[: len(order)] = order
    return padded.reshape(per_rank, world_size)[:, rank]


def collate(data: Tokenized, index: np.ndarray, pad_to_multiple_of: int) -> dict[str, Any]:
    """One batch: ids cut to the longest sentence (rounded up), mask, labels, example indices."""
    import torch

    safe = np.where(index < 0, 0, index)
    width = int(data.lengths[safe].max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    width = min(width, data.ids.shape[1])
    ids = torch.from_numpy(data.ids[safe, :width].astype(np.int64))
    lengths = torch.from_numpy(data.lengths[safe].astype(np.int64))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.from_numpy(data.labels[safe]),
        "index": torch.from_numpy(index),
    }
