"""CoLA, the Corpus of Linguistic Acceptability: acceptable (1) or not (0); Matthews correlation.

Sources (``data.source``):
  * the official release 1.1 archive URL (the default): downloaded once into ``data.cache_dir``,
    sha256-checked, unpacked;
  * a local folder with the raw release files ``in_domain_train.tsv``, ``in_domain_dev.tsv``,
    ``out_of_domain_dev.tsv`` (directly, or under ``cola_public/raw/`` or ``raw/``);
  * a folder of GLUE's files ``train.tsv``, ``dev.tsv`` (+ ``test.tsv``): GLUE's copy of release 1.0;
  * ``hub`` (``nyu-mll/glue``, ``cola`` through ``datasets``), or a ``datasets`` folder saved with
    ``save_to_disk``.

Evaluation: in-domain dev (527), out-of-domain dev (516) and both together (``dev``, GLUE's 1043
validation sentences); the best model is the one with the best MCC on ``dev``.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from distributed_tune.errors import DataError
from distributed_tune.files import sha256_file
from distributed_tune.tasks.base import DataSource, Example, Task, TaskData, check_text, read_rows, require
from distributed_tune.tasks.glue import HUB_DATASET, is_datasets_folder, load_hub

OFFICIAL_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"
OFFICIAL_SHA256 = "2cf856f46df11c143d38e0cf2f9f34ff2fdb088c521cd859f5c4b9581683278b"
TRAIN, IN_DOMAIN, OUT_OF_DOMAIN, DEV = "train", "in_domain_dev", "out_of_domain_dev", "dev"
RAW_FILES = {TRAIN: "in_domain_train.tsv", IN_DOMAIN: "in_domain_dev.tsv", OUT_OF_DOMAIN: "out_of_domain_dev.tsv"}
LABELS = ("unacceptable", "acceptable")
IN_DOMAIN_DEV_ROWS = 527  # GLUE's validation split is in-domain dev followed by out-of-domain dev


def read_tsv(path: Path, split: str) -> list[Example]:
    """One CoLA-format file: 4 tab-separated columns (source, label, mark, sentence), no header,
    no quote handling (two training sentences contain '"', which stays part of the text)."""
    _, rows = read_rows(path, "\t", header=False)
    examples = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        require(len(row) == 4, f"{where}: expected 4 tab-separated columns (source, label, mark, sentence), "
                               f"got {len(row)}; fix or remove the line")
        source, label, _mark, sentence = row
        require(label in ("0", "1"), f"{where}: label must be 0 or 1, got {label!r}")
        examples.append(Example((check_text(path, lineno, sentence),), int(label), split, source, len(examples)))
    return examples


def find_raw_dir(folder: Path) -> Path | None:
    """The folder holding the three raw release files: `folder`, `folder/cola_public/raw` or `folder/raw`."""
    for candidate in (folder, folder / "cola_public" / "raw", folder / "raw"):
        if all((candidate / name).is_file() for name in RAW_FILES.values()):
            return candidate
    return None


def download_official(url: str, cache_dir: Path, sha256: str = OFFICIAL_SHA256) -> Path:
    """Download the release archive once, check its sha256, unpack it; return the raw folder."""
    target = cache_dir / "cola_public_1.1"
    if (target / "COMPLETE").is_file() and find_raw_dir(target):
        return find_raw_dir(target)  # type: ignore[return-value]
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
        # Only the raw TSVs, and never a path that leaves the staging folder (a crafted ../ entry).
        members = [m for m in z.namelist() if m.startswith("cola_public/raw/") and m.endswith(".tsv")
                   and ".." not in Path(m).parts]
        z.extractall(staging, members)
    (staging / "COMPLETE").write_text(sha256 + "\n")
    if not target.exists():
        staging.replace(target)
    shutil.rmtree(staging, ignore_errors=True)
    raw = find_raw_dir(target)
    require(raw is not None, f"{archive}: the archive holds no cola_public/raw/*.tsv files")
    return raw  # type: ignore[return-value]


def _split_dev(dev: list[Example], train_sources: set[str]) -> list[Example]:
    """GLUE's dev.tsv holds both dev files: a row whose source book also occurs in train is
    in-domain (the 17 in-domain books), the others out-of-domain (6 other books)."""
    return [Example(e.text, e.label, IN_DOMAIN if e.source in train_sources else OUT_OF_DOMAIN, e.source, e.idx)
            for e in dev]


def _glue_test(path: Path) -> list[Example]:
    head, rows = read_rows(path, "\t", header=True)
    require(head == ["index", "sentence"], f"{path}:1: expected the header 'index<TAB>sentence', got {head}")
    for n, r in rows:  # (a short row or a non-numeric index used to end in IndexError / ValueError)
        require(len(r) == 2, f"{path}:{n}: expected 2 tab-separated columns (index, sentence), got {len(r)}; "
                             "fix or remove the line")
        require(r[0].strip().isdigit(), f"{path}:{n}: index {r[0]!r} is not a whole number")
    return [Example((check_text(path, n, r[1]),), None, "test", "", int(r[0])) for n, r in rows]


def load(task: Task, cfg: DataSource) -> TaskData:
    source = cfg.source or OFFICIAL_URL
    if source.startswith(("http://", "https://")):
        raw = download_official(source, Path(cfg.cache_dir).expanduser())
        return _from_raw(raw)
    if source == "hub" or is_datasets_folder(Path(source).expanduser()):
        data = load_hub(task, cfg)
        # The hub copy has no source column: GLUE's validation is in-domain dev, then out-of-domain.
        dev = [Example(e.text, e.label, IN_DOMAIN if i < IN_DOMAIN_DEV_ROWS else OUT_OF_DOMAIN, "", e.idx)
               for i, e in enumerate(data.eval)]
        return TaskData(data.train, dev, data.test, LABELS, data.fingerprint)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.source={source}: no such folder; use a folder with the raw CoLA TSVs, "
                        "GLUE's CoLA folder, the official URL, or 'hub'")
    raw = find_raw_dir(folder)
    if raw is not None:
        return _from_raw(raw)
    glue = folder / "CoLA" if (folder / "CoLA" / "train.tsv").is_file() else folder
    if (glue / "train.tsv").is_file() and (glue / "dev.tsv").is_file():
        train = read_tsv(glue / "train.tsv", TRAIN)
        dev = _split_dev(read_tsv(glue / "dev.tsv", "dev"), {e.source for e in train})
        dev.sort(key=lambda e: e.split != IN_DOMAIN)  # stable: in-domain first, as in the raw release
        files = [glue / n for n in ("train.tsv", "dev.tsv", "test.tsv") if (glue / n).is_file()]
        test = {"test": _glue_test(glue / "test.tsv")} if (glue / "test.tsv").is_file() else {}
        return TaskData(train, dev, test, LABELS, {f.name: sha256_file(f) for f in files})
    missing = [n for n in RAW_FILES.values() if not (folder / n).is_file()]
    raise DataError(
        f"data.source={folder}: missing {', '.join(missing)} (looked in the folder, cola_public/raw/ and raw/; "
        "GLUE's layout needs train.tsv and dev.tsv); point data.source at the unpacked CoLA release"
    )


def _from_raw(raw: Path) -> TaskData:
    splits = {split: read_tsv(raw / name, split) for split, name in RAW_FILES.items()}
    fingerprint = {name: sha256_file(raw / name) for name in RAW_FILES.values()}
    return TaskData(splits[TRAIN], splits[IN_DOMAIN] + splits[OUT_OF_DOMAIN], {}, LABELS, fingerprint)


TASK = Task(
    name="cola",
    text_fields=("sentence",),
    label_names=LABELS,
    eval_splits=(IN_DOMAIN, OUT_OF_DOMAIN),
    combined_split=DEV,
    metrics=("mcc", "accuracy"),
    selection_split=DEV,
    load=load,
    default_source=OFFICIAL_URL,
    submission={"test": "CoLA.tsv"},
    read_file=read_tsv,
    hub_dataset=HUB_DATASET,
    dataset_name="CoLA",
    description="Corpus of Linguistic Acceptability (release 1.1 by default): Matthews correlation",
)
