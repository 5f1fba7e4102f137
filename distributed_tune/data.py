"""Tokenize a task's examples once, and cut them into world-size-invariant batches.

Batching: the order of *global* batches depends only on (seed, epoch); process ``r`` of ``W``
takes, at accumulation step ``a``, micro-batch ``a * W + r`` of each global batch. So 1 process
with accumulation 2 sees exactly the micro-batches that 2 processes with accumulation 1 see.
Evaluation deals examples round-robin over processes in length order (`eval_shard`).
Task-agnostic: single sentences and pairs, classes and regression targets.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distributed_tune.files import WriteError, atomic_open
from distributed_tune.tasks import Example

HELDOUT = "heldout"  # the split held out of train for model selection (data.heldout_fraction)


@dataclass(frozen=True)
class Tokenized:
    """Examples as a right-padded [N, max_length] id matrix: a batch is one index operation."""

    ids: np.ndarray  # int32 [N, max_length], pad_id after each example
    lengths: np.ndarray  # int32 [N]
    labels: np.ndarray  # int64 class indices (-1: unlabeled) or float32 targets (nan: unlabeled)
    pad_id: int
    # int8 [N, max_length]: the segment (0: first text, 1: second) of each token, for sentence pairs
    # when the tokenizer makes token_type_ids (BERT); None for single sentences and for models
    # without them (RoBERTa, GPT-2). The model is then trained and evaluated with the segment ids
    # that `transformers.pipeline` and every other user of the export will give it.
    type_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


_IGNORED_INIT_KWARGS = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local",
                        "local_files_only", "backend", "_commit_hash", "cache_dir"}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's full serialized state: its pipeline (normalizer, pre-tokenizer, model,
    post-processor, added tokens) and its settings (add_bos_token, add_prefix_space, lowercasing,
    special tokens...), so two tokenizers that share a vocabulary never share cached ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings the last call left behind, not the tokenizer.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _IGNORED_INIT_KWARGS}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.pad_token_id, tokenizer.padding_side, tokenizer.truncation_side,
                         getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None),
                         getattr(tokenizer, "add_prefix_space", None)], default=str).encode())
    return h.hexdigest()


def _labels(examples: list[Example], regression: bool) -> np.ndarray:
    if regression:
        return np.array([np.nan if e.label is None else e.label for e in examples], dtype=np.float32)
    return np.array([-1 if e.label is None else e.label for e in examples], dtype=np.int64)


def tokenize(examples: list[Example], tokenizer: Any, max_length: int, cache_dir: Path | None,
             regression: bool = False, say: Callable[[str], None] = print) -> Tokenized:
    """Tokenize once (pairs as the tokenizer joins them); cached under `cache_dir`, keyed by the
    tokenizer's full state, the texts, the labels and `max_length`. A damaged cache file is
    rebuilt (and `say` tells so).

    Under several processes, call it on the (local) main process first: the others then load
    the cache instead of tokenizing again.
    """
    key = hashlib.sha256()
    key.update(b"format 2\n")  # 2: + type_ids (a cache written before holds pairs without them)
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(f"{max_length}\t{regression}".encode())
    for e in examples:
        key.update(f"{e.label}\t{chr(31).join(e.text)}\n".encode())
    path = cache_dir / "tokenized" / f"{key.hexdigest()[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                types = z["type_ids"] if "type_ids" in z.files else None
                return Tokenized(z["ids"], z["lengths"], z["labels"], int(z["pad_id"]), types)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            say(f"the tokenized cache {path} is damaged ({type(e).__name__}); rebuilding it")

    columns = list(zip(*(e.text for e in examples)))
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    enc = encoded["input_ids"]
    pad_id = tokenizer.pad_token_id
    ids = np.full((len(enc), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(enc), dtype=np.int32)
    for i, seq in enumerate(enc):
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    type_ids = None
    if len(columns) == 2 and "token_type_ids" in encoded:  # single sentences: all 0, the model's default
        type_ids = np.zeros((len(enc), max_length), dtype=np.int8)
        for i, seq in enumerate(encoded["token_type_ids"]):
            type_ids[i, : len(seq)] = seq
    out = Tokenized(ids, lengths, _labels(examples, regression), pad_id, type_ids)
    if path is not None:
        types = {} if type_ids is None else {"type_ids": type_ids}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.savez(f, ids=ids, lengths=lengths, labels=out.labels, pad_id=np.int64(pad_id), **types)
        except (OSError, WriteError) as e:  # a cache is an optimisation: a full or read-only disk must not stop the run
            say(f"could not cache the tokenized data in {path.parent} ({getattr(e, 'reason', None) or e.strerror or e}); "
                "going on without")
    return out


def unknown_fraction(data: Tokenized, tokenizer: Any) -> float:
    """The share of real (non-special, non-padding) tokens that the tokenizer maps to its
    unknown token: near 0 for a tokenizer that fits the data, near 1 for a broken one."""
    unk = tokenizer.unk_token_id
    if unk is None:  # byte-level BPE (GPT-2, RoBERTa) covers every input
        return 0.0
    special = np.array(sorted(set(tokenizer.all_special_ids) - {unk}), dtype=np.int64)
    mask = np.arange(data.ids.shape[1])[None, :] < data.lengths[:, None]
    tokens = data.ids[mask]
    tokens = tokens[~np.isin(tokens, special)]
    return float((tokens == unk).mean()) if len(tokens) else 0.0


def split_heldout(train: list[Example], fraction: float, regression: bool) -> tuple[list[Example], list[Example]]:
    """(the rest of train, a held-out slice of it): stratified by label for classes, the same
    rows whatever the seed (a fixed generator), so that seeds are compared on one slice."""
    if fraction <= 0:
        return train, []
    rng = np.random.default_rng(0)
    keys = np.zeros(len(train), dtype=np.int64) if regression else np.array([e.label for e in train])
    held = []
    for k in np.unique(keys):
        rows = np.flatnonzero(keys == k)
        held += rng.permutation(rows)[: round(fraction * len(rows))].tolist()
    chosen = set(held)
    rest = [e for i, e in enumerate(train) if i not in chosen]
    heldout = [Example(e.text, e.label, HELDOUT, e.source, e.idx) for i, e in enumerate(train) if i in chosen]
    return rest, heldout


# --------------------------------------------------------------------------- batching


def _generator(*seed_parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(seed_parts)))


def global_batches(
    lengths: np.ndarray, global_batch: int, seed: int, epoch: int, length_grouping: bool
) -> list[np.ndarray]:
    """This epoch's global batches (the last partial one dropped); a function of (seed, epoch).

    With `length_grouping`, examples of similar length share a batch: the permutation is cut
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


def batch_width(data: Tokenized, index: np.ndarray, pad_to_multiple_of: int) -> int:
    safe = np.where(index < 0, 0, index)
    width = int(data.lengths[safe].max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return min(width, data.ids.shape[1])


class Batcher:
    """Training batches made on the device: the tokenized set is copied there once, and a batch is
    an index_select of it (no per-step host collation or copy of ids and masks). The same values
    as `collate`, on any device."""

    def __init__(self, data: Tokenized, device: Any, pad_to_multiple_of: int) -> None:
        import torch

        self.data, self.device, self.pad = data, device, pad_to_multiple_of
        self.ids = torch.from_numpy(data.ids).to(device)  # int32: half the memory; int64 per batch
        self.lengths = torch.from_numpy(data.lengths.astype(np.int64)).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.type_ids = torch.from_numpy(data.type_ids).to(device) if data.type_ids is not None else None
        self.positions = torch.arange(data.ids.shape[1], device=device)

    def width(self, index: np.ndarray) -> int:
        """The batch's padded width, from host-side lengths: no device sync."""
        return batch_width(self.data, index, self.pad)

    def __call__(self, index: np.ndarray) -> dict[str, Any]:
        import torch

        width = self.width(index)
        rows = torch.from_numpy(np.where(index < 0, 0, index)).to(self.device, non_blocking=True)
        lengths = self.lengths.index_select(0, rows)
        batch = {
            "input_ids": self.ids[:, :width].index_select(0, rows).long(),
            "attention_mask": (self.positions[:width][None, :] < lengths[:, None]).long(),
            "labels": self.labels.index_select(0, rows),
        }
        if self.type_ids is not None:  # sentence pairs: the second text's segment
            batch["token_type_ids"] = self.type_ids[:, :width].index_select(0, rows).long()
        return batch


def collate(data: Tokenized, index: np.ndarray, pad_to_multiple_of: int) -> dict[str, Any]:
    """One batch: ids cut to the longest example (rounded up), mask, labels, example indices, and
    the segment ids of sentence pairs (`token_type_ids`) where the tokenizer made them."""
    import torch

    safe = np.where(index < 0, 0, index)
    width = batch_width(data, index, pad_to_multiple_of)
    ids = torch.from_numpy(data.ids[safe, :width].astype(np.int64))
    lengths = torch.from_numpy(data.lengths[safe].astype(np.int64))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.from_numpy(data.labels[safe]),
        "index": torch.from_numpy(index),
    }
    if data.type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(data.type_ids[safe, :width].astype(np.int64))
    return batch
