"""CoLA loaders (local folder, the official zip over HTTP on 127.0.0.1, the hub offline),
strict TSV reading, tokenization cache, collation and world-size-invariant batching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import COLA_DIR, COLA_RAW, COLA_ZIP

from distributed_tune.config import DataConfig
from distributed_tune.data import (
    DEV,
    IN_DOMAIN,
    OUT_OF_DOMAIN,
    TRAIN,
    Tokenized,
    collate,
    download_official,
    eval_shard,
    global_batches,
    load_cola,
    rank_micro_batches,
    read_tsv,
    tokenize,
)
from distributed_tune.errors import DataError


def check_counts(cola) -> None:
    assert cola.counts() == {TRAIN: 8551, DEV: 1043, IN_DOMAIN: 527, OUT_OF_DOMAIN: 516}
    assert sum(e.label for e in cola.train) == 6023
    assert sum(e.label for e in cola.dev if e.split == IN_DOMAIN) == 365
    assert sum(e.label for e in cola.dev if e.split == OUT_OF_DOMAIN) == 354
    # No quote handling: the two training sentences with '"' keep them.
    assert sum('"' in e.sentence for e in cola.train) == 2
    assert cola.train[0].sentence == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola.train[0].source == "gj04"


def test_local_folder_raw_and_release_layout(tmp_path: Path) -> None:
    check_counts(load_cola(DataConfig(source=str(COLA_RAW))))
    check_counts(load_cola(DataConfig(source=str(COLA_DIR))))  # finds raw/ below
    release = tmp_path / "cola_public" / "raw"
    release.mkdir(parents=True)
    for f in COLA_RAW.iterdir():
        shutil.copy(f, release)
    cola = load_cola(DataConfig(source=str(tmp_path)))
    check_counts(cola)
    assert cola.fingerprint["in_domain_train.tsv"] == (
        "f320a10f92d3bce6b29152fde322a362eac39238e50d8de0c8815457fdf4fc12")


@pytest.fixture()
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_official_zip_downloaded_once_checked_and_unpacked(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    shutil.copy(COLA_ZIP, root / "cola_public_1.1.zip")
    cache = tmp_path / "cache"
    cola = load_cola(DataConfig(source=f"{url}/cola_public_1.1.zip", cache_dir=str(cache)))
    check_counts(cola)
    assert hashlib.sha256((cache / "cola_public_1.1.zip").read_bytes()).hexdigest() == (
        "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b")
    # Cached: a second load works with the server gone.
    (root / "cola_public_1.1.zip").unlink()
    check_counts(load_cola(DataConfig(source=f"{url}/cola_public_1.1.zip", cache_dir=str(cache))))


def test_checksum_mismatch_is_refused_and_nothing_is_cached(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    data = bytearray(COLA_ZIP.read_bytes())
    data[1000] ^= 0xFF
    (root / "cola_public_1.1.zip").write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} does not match the official CoLA 1.1 archive"):
        load_cola(DataConfig(source=f"{url}/cola_public_1.1.zip", cache_dir=str(cache)))
    assert list(cache.iterdir()) == []


def test_unreachable_url_and_offline_hub_say_how_to_go_local(tmp_path: Path, http_dir: tuple[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = http_dir
    with pytest.raises(DataError, match=r"could not download CoLA from .*without network, set data.source to a "
                                        r"local folder holding the raw CoLA TSVs"):
        download_official(f"{url}/missing.zip", tmp_path / "c")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"could not load the hub dataset nyu-mll/glue/cola .*set data.source"):
        load_cola(DataConfig(source="hub"))


@pytest.mark.parametrize("line, message", [
    ("gj04\t1\t\tfine\textra\n", "expected 4 tab-separated columns (source, label, mark, sentence), got 5"),
    ("gj04\t1\n", "expected 4 tab-separated columns (source, label, mark, sentence), got 2"),
    ("gj04\t2\t\tA sentence.\n", "label must be 0 or 1, got '2'"),
    ("gj04\t1\t\t  \n", "empty sentence; fix or remove the line"),
])
def test_malformed_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "in_domain_train.tsv"
    p.write_text("gj04\t1\t\tGood one.\n" + line)
    with pytest.raises(DataError) as e:
        read_tsv(p, TRAIN)
    assert str(e.value).startswith(f"{p}:2: {message}")


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "in_domain_train.tsv").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_tsv(tmp_path / "in_domain_train.tsv", TRAIN)
    with pytest.raises(DataError, match=r"missing in_domain_dev.tsv, out_of_domain_dev.tsv"):
        load_cola(DataConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match=r"data.source=/nonexistent: no such folder"):
        load_cola(DataConfig(source="/nonexistent"))


# --------------------------------------------------------------------------- tokenizing, collation


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_tokenize_is_cached_and_identical(tokenizer, tmp_path: Path) -> None:
    examples = read_tsv(COLA_RAW / "in_domain_dev.tsv", IN_DOMAIN)
    first = tokenize(examples, tokenizer, 64, tmp_path)
    files = list((tmp_path / "tokenized").glob("*.npz"))
    assert len(files) == 1
    again = tokenize(examples, tokenizer, 64, tmp_path)
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.lengths, again.lengths)
    assert first.ids.shape == (527, 64) and int(first.labels.sum()) == 365
    # A different max length is a different cache entry.
    tokenize(examples, tokenizer, 32, tmp_path)
    assert len(list((tmp_path / "tokenized").glob("*.npz"))) == 2
    # Each row: [CLS] ... [SEP] then pad, exactly as the tokenizer encodes it.
    enc = tokenizer(examples[4].sentence)["input_ids"]
    assert first.ids[4, : len(enc)].tolist() == enc and first.lengths[4] == len(enc)
    assert (first.ids[4, len(enc):] == tokenizer.pad_token_id).all()


def test_collate_pads_to_longest_rounded_up() -> None:
    ids = np.zeros((4, 16), dtype=np.int32)
    lengths = np.array([3, 9, 5, 2], dtype=np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(1, n + 1)
    data = Tokenized(ids, lengths, np.array([0, 1, 1, 0]), pad_id=0)
    batch = collate(data, np.array([0, 2, 3]), pad_to_multiple_of=1)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 2]
    assert batch["labels"].tolist() == [0, 1, 0] and batch["index"].tolist() == [0, 2, 3]
    assert collate(data, np.array([0, 1]), pad_to_multiple_of=8)["input_ids"].shape == (2, 16)
    assert collate(data, np.array([0, 2]), pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


# --------------------------------------------------------------------------- batching


LENGTHS = np.random.default_rng(0).integers(3, 40, size=1000)


@pytest.mark.parametrize("grouping", [False, True])
def test_global_batches_depend_only_on_seed_and_epoch(grouping: bool) -> None:
    a = global_batches(LENGTHS, 32, seed=1, epoch=0, length_grouping=grouping)
    assert len(a) == 1000 // 32
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == len(flat) == 31 * 32  # each example at most once
    assert all(np.array_equal(x, y) for x, y in zip(a, global_batches(LENGTHS, 32, 1, 0, grouping)))
    assert not np.array_equal(np.concatenate(global_batches(LENGTHS, 32, 1, 1, grouping)), flat)
    assert not np.array_equal(np.concatenate(global_batches(LENGTHS, 32, 2, 0, grouping)), flat)


def test_length_grouping_cuts_padding() -> None:
    def padding(batches: list[np.ndarray]) -> float:
        return sum(LENGTHS[b].max() * len(b) - LENGTHS[b].sum() for b in batches) / sum(LENGTHS[b].sum() for b in batches)

    assert padding(global_batches(LENGTHS, 32, 0, 0, True)) < 0.2 * padding(global_batches(LENGTHS, 32, 0, 0, False))


@pytest.mark.parametrize("world, accumulation", [(1, 4), (2, 2), (4, 1)])
def test_sharding_is_world_size_invariant(world: int, accumulation: int) -> None:
    batches = global_batches(LENGTHS, 32, seed=3, epoch=0, length_grouping=True)
    per_rank = [list(rank_micro_batches(batches, r, world, accumulation)) for r in range(world)]
    for step, batch in enumerate(batches):
        # Micro-batch m = a * world + r of each global batch: together they are the global batch,
        # in the same order whatever the layout.
        micro = [per_rank[r][step * accumulation + a] for a in range(accumulation) for r in range(world)]
        assert np.array_equal(np.concatenate(micro), batch)
    shards = [set(np.concatenate(p).tolist()) for p in per_rank]
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == 31 * 32  # disjoint, complete
    # Resuming at step 5 yields exactly the remaining micro-batches.
    rest = list(rank_micro_batches(batches, 0, world, accumulation, start_step=5))
    assert all(np.array_equal(x, y) for x, y in zip(rest, per_rank[0][5 * accumulation:], strict=True))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_eval_shards_cover_each_example_once_with_equal_counts(world: int) -> None:
    lengths = np.random.default_rng(1).integers(3, 40, size=1043)
    shards = [eval_shard(lengths, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of batches on every rank (ZeRO-3)
    real = np.concatenate([s[s >= 0] for s in shards])
    assert sorted(real.tolist()) == list(range(1043))
    assert sum((s < 0).sum() for s in shards) == len(shards[0]) * world - 1043
