"""CoLA loaders (local folder, the official zip over HTTP on 127.0.0.1, the hub offline), strict
TSV reading, the tokenization cache, collation and world-size-invariant batching.

The test data is written by tests/cola_data.py; the real release is read only by the tests marked
`needs_real_cola` (DT_COLA_DIR)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_real_cola, real_cola_dir

from distributed_tune.config import DataConfig
from distributed_tune.data import (
    HELDOUT,
    Tokenized,
    collate,
    eval_shard,
    global_batches,
    rank_micro_batches,
    split_heldout,
    tokenize,
    tokenizer_fingerprint,
    unknown_fraction,
)
from distributed_tune.errors import DataError
from distributed_tune.tasks import get_task
from distributed_tune.tasks.cola import IN_DOMAIN, OUT_OF_DOMAIN, download_official, read_tsv

pytestmark = pytest.mark.fast  # in this process, no launcher: the quick tier

COLA = get_task("cola")


def load(source: str, cache: Path | None = None):
    return COLA.read(DataConfig(source=source, cache_dir=str(cache or "/nonexistent-cache")))


def check_counts(data, first: str | None = None) -> None:
    """The release's counts (the test data has the same): 8551 / 527 / 516 rows."""
    assert data.counts() == {"train": 8551, "eval": 1043, IN_DOMAIN: 527, OUT_OF_DOMAIN: 516}
    assert sum(e.label for e in data.train) == 6023
    assert sum(e.label for e in data.eval if e.split == IN_DOMAIN) == 365
    assert sum(e.label for e in data.eval if e.split == OUT_OF_DOMAIN) == 354
    # No quote handling: the two training sentences with '"' keep them.
    assert sum('"' in e.text[0] for e in data.train) == 2
    if first is not None:
        assert data.train[0].text == (first,)
    assert data.label_names == ("unacceptable", "acceptable")


def test_test_data_has_the_release_layout_and_quirks(cola_raw: Path) -> None:
    ood = (cola_raw / "out_of_domain_dev.tsv").read_bytes()
    assert not ood.endswith(b"\n") and ood.count(b"\n") == 515  # `wc -l` says 515 for 516 rows
    rows = [line.split("\t") for line in ood.decode().splitlines()]
    assert sum(r[2] == " " for r in rows) == 1
    train = [line.split("\t") for line in (cola_raw / "in_domain_train.tsv").read_text().splitlines()]
    assert {len(r) for r in train} == {4}
    assert any(r[1] == "0" and r[2] == "" for r in train)  # unacceptable without a mark
    assert {r[2] for r in train} == {"", "*", "??", "?*", "*?"}
    assert any(not r[3][0].isupper() for r in train) and any(not r[3].isascii() for r in train)
    sources = {r[0] for r in train}
    dev_sources = {line.split("\t")[0] for line in (cola_raw / "in_domain_dev.tsv").read_text().splitlines()}
    assert len(sources) == 17 and dev_sources <= sources and not {r[0] for r in rows} & sources


def test_local_folder_raw_and_release_layout(cola_dir: Path, cola_raw: Path, tmp_path: Path) -> None:
    check_counts(load(str(cola_raw)))
    check_counts(load(str(cola_dir)))  # finds raw/ below
    release = tmp_path / "cola_public" / "raw"
    release.mkdir(parents=True)
    for f in cola_raw.iterdir():
        shutil.copy(f, release)
    data = load(str(tmp_path))
    check_counts(data)
    assert data.fingerprint["in_domain_train.tsv"] == hashlib.sha256(
        (cola_raw / "in_domain_train.tsv").read_bytes()).hexdigest()


def test_glue_layout_splits_dev_by_source(cola_raw: Path, tmp_path: Path) -> None:
    """GLUE's CoLA/ folder: train.tsv, dev.tsv (both dev files in one), test.tsv (index, sentence)."""
    glue = tmp_path / "glue_data" / "CoLA"
    glue.mkdir(parents=True)
    shutil.copy(cola_raw / "in_domain_train.tsv", glue / "train.tsv")
    dev = (cola_raw / "in_domain_dev.tsv").read_text() + (cola_raw / "out_of_domain_dev.tsv").read_text() + "\n"
    (glue / "dev.tsv").write_text(dev)
    (glue / "test.tsv").write_text("index\tsentence\n0\tThe cat slept.\n1\tHim saw she.\n")
    data = load(str(tmp_path / "glue_data"))
    check_counts(data)
    assert [e.text[0] for e in data.eval] == [line.split("\t")[3] for line in dev.splitlines()]
    assert [(e.idx, e.text[0], e.label) for e in data.test["test"]] == [(0, "The cat slept.", None),
                                                                        (1, "Him saw she.", None)]


@needs_real_cola
def test_real_release_counts_and_hashes() -> None:
    raw = real_cola_dir() / "raw"
    data = load(str(raw))
    check_counts(data, first="Our friends won't buy this analysis, let alone the next one we propose.")
    assert data.train[0].source == "gj04"
    assert data.fingerprint["in_domain_train.tsv"] == (
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


def release_zip(cola_raw: Path, path: Path) -> str:
    """A zip in the official archive's layout (cola_public/raw/*.tsv); its sha256."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("cola_public/README", "test archive\n")
        for f in sorted(cola_raw.iterdir()):
            z.write(f, f"cola_public/raw/{f.name}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_downloaded_once_checked_and_unpacked(cola_raw: Path, tmp_path: Path,
                                                      http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    sha = release_zip(cola_raw, root / "cola_public_1.1.zip")
    cache = tmp_path / "cache"
    raw = download_official(f"{url}/cola_public_1.1.zip", cache, sha256=sha)
    check_counts(load(str(raw)))
    assert hashlib.sha256((cache / "cola_public_1.1.zip").read_bytes()).hexdigest() == sha
    # Cached: a second call works with the server gone.
    (root / "cola_public_1.1.zip").unlink()
    assert download_official(f"{url}/cola_public_1.1.zip", cache, sha256=sha) == raw


def test_a_crafted_path_in_the_archive_stays_inside(cola_raw: Path, tmp_path: Path,
                                                    http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    path = root / "cola_public_1.1.zip"
    release_zip(cola_raw, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("cola_public/raw/../../../escaped.tsv", "x\t1\t\tEvil.\n")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    download_official(f"{url}/cola_public_1.1.zip", tmp_path / "cache", sha256=sha)
    assert not list(tmp_path.rglob("escaped.tsv"))


def test_checksum_mismatch_is_refused_and_nothing_is_cached(cola_raw: Path, tmp_path: Path,
                                                            http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    release_zip(cola_raw, root / "cola_public_1.1.zip")  # not the official bytes
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} does not match the official CoLA 1.1 archive"):
        load(f"{url}/cola_public_1.1.zip", cache)
    assert list(cache.iterdir()) == []


@needs_real_cola
def test_the_official_archive_through_the_config(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    url, root = http_dir
    shutil.copy(real_cola_dir() / "cola_public_1.1.zip", root / "cola_public_1.1.zip")
    data = load(f"{url}/cola_public_1.1.zip", tmp_path / "cache")
    check_counts(data, first="Our friends won't buy this analysis, let alone the next one we propose.")
    assert hashlib.sha256((tmp_path / "cache" / "cola_public_1.1.zip").read_bytes()).hexdigest() == (
        "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b")


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
        load("hub", tmp_path / "cache")


@pytest.mark.parametrize("line, message", [
    ("gj04\t1\t\tfine\textra\n", "expected 4 tab-separated columns (source, label, mark, sentence), got 5"),
    ("gj04\t1\n", "expected 4 tab-separated columns (source, label, mark, sentence), got 2"),
    ("gj04\t2\t\tA sentence.\n", "label must be 0 or 1, got '2'"),
    ("gj04\t1\t\t  \n", "empty text; fix or remove the line"),
])
def test_malformed_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "in_domain_train.tsv"
    p.write_text("gj04\t1\t\tGood one.\n" + line)
    with pytest.raises(DataError) as e:
        read_tsv(p, "train")
    assert str(e.value).startswith(f"{p}:2: {message}")


def test_non_utf8_empty_and_missing_files(tmp_path: Path) -> None:
    p = tmp_path / "in_domain_train.tsv"
    p.write_bytes("gj04\t1\t\tGood.\ngj04\t1\t\tCaf\xe9.\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_tsv(p, "train")
    assert str(e.value) == f"{p}:2: not UTF-8 text (byte 25); save the file as UTF-8"
    p.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_tsv(p, "train")
    with pytest.raises(DataError, match=r"missing in_domain_dev.tsv, out_of_domain_dev.tsv"):
        load(str(tmp_path))
    with pytest.raises(DataError, match=r"data.source=/nonexistent: no such folder"):
        load("/nonexistent")


# --------------------------------------------------------------------------- tokenizing, collation


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_tokenize_is_cached_and_identical(tokenizer, cola_raw: Path, tmp_path: Path) -> None:
    examples = read_tsv(cola_raw / "in_domain_dev.tsv", IN_DOMAIN)
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
    enc = tokenizer(examples[4].text[0])["input_ids"]
    assert first.ids[4, : len(enc)].tolist() == enc and first.lengths[4] == len(enc)
    assert (first.ids[4, len(enc):] == tokenizer.pad_token_id).all()

    # A damaged cache file is rebuilt, and said so.
    files[0].write_bytes(b"not a zip")
    said: list[str] = []
    rebuilt = tokenize(examples, tokenizer, 64, tmp_path, say=said.append)
    assert np.array_equal(rebuilt.ids, first.ids)
    assert len(said) == 1 and said[0].startswith(f"the tokenized cache {files[0]} is damaged") and "rebuilding" in said[0]
    assert np.load(files[0])["ids"].shape == (527, 64)


def test_cache_key_covers_the_tokenizers_whole_state(tiny_model: Path, cola_raw: Path, tmp_path: Path) -> None:
    """Same vocabulary, another post-processor (no [CLS]/[SEP]): other ids, another cache entry."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model)
    bare = AutoTokenizer.from_pretrained(tiny_model)
    bare.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert plain.get_vocab() == bare.get_vocab()
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(bare)
    examples = read_tsv(cola_raw / "in_domain_dev.tsv", IN_DOMAIN)[:20]
    a = tokenize(examples, plain, 32, tmp_path)
    b = tokenize(examples, bare, 32, tmp_path)
    assert (a.lengths == b.lengths + 2).all() and len(list((tmp_path / "tokenized").glob("*.npz"))) == 2


def test_unknown_fraction_tells_a_fitting_tokenizer_from_a_stub(tokenizer, cola_raw: Path, tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    examples = read_tsv(cola_raw / "in_domain_train.tsv", "train")[:500]
    good = tokenize(examples, tokenizer, 64, None)
    assert unknown_fraction(good, tokenizer) < 0.01
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    stub = BertTokenizerFast(vocab_file=str(vocab))
    assert unknown_fraction(tokenize(examples, stub, 64, None), stub) == 1.0


def test_heldout_slice_is_stratified_and_the_same_for_every_seed(cola_raw: Path) -> None:
    train = read_tsv(cola_raw / "in_domain_train.tsv", "train")
    rest, held = split_heldout(train, 0.1, regression=False)
    assert len(rest) + len(held) == 8551 and len(held) == round(0.1 * 6023) + round(0.1 * 2528)
    assert sum(e.label for e in held) == round(0.1 * 6023) and {e.split for e in held} == {HELDOUT}
    assert {(e.text, e.idx) for e in held}.isdisjoint({(e.text, e.idx) for e in rest})
    assert split_heldout(train, 0.1, regression=False)[1] == held
    assert split_heldout(train, 0.0, regression=False) == (train, [])


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


# --------------------------------------------------------------------------- data rules (README "Data rules")


def custom_files(cola_raw: Path, folder: Path, ext: str, edit=None) -> tuple[Path, Path]:
    """train/validation files of task=custom from the CoLA test rows: text + label (strings)."""
    import csv
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, name in (("train", "in_domain_train.tsv"), ("validation", "in_domain_dev.tsv")):
        rows[split] = [{"text": line.split("\t")[3], "label": ["bad", "good"][int(line.split("\t")[1])]}
                       for line in (cola_raw / name).read_text().splitlines()]
    if edit:
        edit(rows)
    paths = []
    for split, items in rows.items():
        path = folder / f"{split}.{ext}"
        if ext == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in items))
        else:
            with path.open("w", newline="") as f:
                w = csv.writer(f, delimiter="," if ext == "csv" else "\t", lineterminator="\n")
                w.writerow(["text", "label"])
                w.writerows([[r["text"], r["label"]] for r in items])
        paths.append(path)
    return paths[0], paths[1]


def _set(split: str, i: int, key: str, value):
    def edit(rows):
        rows[split][i][key] = value
    return edit


RULES = {
    # case: (format, edit, the line after "error: <file>:")
    "JSONL null text": ("jsonl", _set("train", 4, "text", None),
                        "5: field 'text' text is null, not a string; write the text, or remove the line"),
    "JSONL number text": ("jsonl", _set("validation", 0, "text", 7),
                          "1: field 'text' text is int 7, not a string; write the text, or remove the line"),
    "CSV NaN label": ("csv", _set("train", 2, "label", "NaN"),
                      "4: label 'NaN' reads as a missing value, not a class; give the row its label or remove it"),
    "TSV label with spaces": ("tsv", _set("train", 0, "label", "good "),
                              "2: label 'good ' has spaces around it; write it without them"),
    "JSONL float label": ("jsonl", _set("train", 1, "label", 1.0),
                          "2: label 1.0 in 'label' is not a class name or an integer; write the class as a string or "
                          "an integer"),
    "CSV numbers and words": ("csv", _set("train", 6, "label", "1"),
                              "8: label '1' is an integer, but {train}:2 has the word 'good': labels are taken as "
                              "written, so these would be different classes; write every label the same way"),
    "JSONL 1 and \"1\"": ("jsonl", lambda rows: [r.update(label=int(r["label"] == "good"))
                                                for r in rows["train"] + rows["validation"]]
                          and rows["train"][3].update(label="1"),
                          "4: label '1' is an integer, but {train}:1 has the JSON integer 1: labels are taken as "
                          "written, so these would be different classes; write every label the same way"),
    "header-only train": ("csv", lambda rows: rows["train"].clear(),
                          " no rows after the header line; add examples (one per line)"),
    "header-only dev": ("tsv", lambda rows: rows["validation"].clear(),
                        " no rows after the header line; add examples (one per line)"),
}


@pytest.mark.parametrize("case", list(RULES))
def test_data_is_taken_as_written_or_refused_with_file_and_line(cola_raw: Path, tiny_model: Path, cache_dir: Path,
                                                                tmp_path: Path, case: str) -> None:
    from conftest import run_cli, snapshot

    ext, edit, line = RULES[case]
    train, dev = custom_files(cola_raw, tmp_path / "data", ext, edit)
    before = snapshot(tmp_path / "data")
    proc = run_cli(["task=custom", f"custom.train_file={train}", f"custom.validation_file={dev}", "custom.text_fields=[text]",
                    f"model.name={tiny_model}", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}"],
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    bad = dev if case in ("JSONL number text", "header-only dev") else train
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {bad}:{line.format(train=train)}", last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    assert snapshot(tmp_path / "data") == before


def test_a_csv_field_over_131072_characters_is_taken(cola_raw: Path, tiny_model: Path, cache_dir: Path,
                                                     tmp_path: Path) -> None:
    """The csv module's default field limit refused it as "not valid CSV"; JSONL took it."""
    from conftest import run_cli

    long_text = " ".join(["The happy sailors saw the birds."] * 5000)  # 164,999 characters
    train, dev = custom_files(cola_raw, tmp_path / "data", "csv", _set("train", 0, "text", long_text))
    run_cli(["task=custom", f"custom.train_file={train}", f"custom.validation_file={dev}", "custom.text_fields=[text]",
             f"model.name={tiny_model}", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}",
             "train.max_steps=2", "train.global_batch_size=16"])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
