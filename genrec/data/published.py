"""Published benchmark datasets: found where they are kept, checked, decompressed once into ``data/``.

Redistribution terms forbid shipping them, so genrec looks for the file in ``$GENREC_DATA_DIR`` and then
in ``../shared/data/`` beside the checkout, verifies its sha256, and writes the decompressed text next
to the configs' default path (``data/``, ignored by git). Every harness and config names a dataset by
its key here (``ml1m``).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from genrec.data.loaders import DataFormatError
from genrec.io import atomic_write, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PublishedDataset:
    """file: the compressed file's name where it is kept; out: the decompressed file's name in data/."""

    key: str
    file: str
    sha256: str
    out: str
    format: str
    description: str


PUBLISHED = {
    "ml1m": PublishedDataset(
        "ml1m", "ml-1m.sasrec.txt.gz", "8ef14e8274d61a667ac548f0c61c8b96c430dc760dc2cc46532217bbb3652722",
        "ml-1m.sasrec.txt", "sasrec",
        "MovieLens-1M in the SASRec text format (6,040 users, 3,706 items, 1,000,209 events; no timestamps): "
        "the set the HSTU and RAILS papers publish on"),
}


class DatasetUnavailable(DataFormatError):
    """The dataset's file is not in any of the places genrec looks."""


def search_dirs() -> list[Path]:
    """Where kept datasets are looked for, in order: $GENREC_DATA_DIR, then ../shared/data of the checkout."""
    dirs = [Path(os.environ["GENREC_DATA_DIR"])] if os.environ.get("GENREC_DATA_DIR") else []
    return dirs + [REPO_ROOT.parent / "shared" / "data"]


def ensure_dataset(key: str, data_dir: str | Path = "data", registry: dict[str, PublishedDataset] | None = None) -> Path:
    """The decompressed file of dataset ``key`` under ``data_dir`` (decompressed on first use, after its
    sha256 is checked). Raises DatasetUnavailable naming where it looked, DataFormatError on a bad hash."""
    registry = PUBLISHED if registry is None else registry
    if key not in registry:
        raise DataFormatError(f"unknown dataset {key!r}; known: {', '.join(sorted(registry))}")
    spec = registry[key]
    out = Path(data_dir) / spec.out
    if out.is_file():
        return out
    dirs = search_dirs()
    source = next((d / spec.file for d in dirs if (d / spec.file).is_file()), None)
    if source is None:
        raise DatasetUnavailable(f"dataset {key}: {spec.file} is in none of {', '.join(str(d) for d in dirs)}; "
                                 f"put it in one of them or set GENREC_DATA_DIR")
    digest = sha256_file(source)
    if digest != spec.sha256:
        raise DataFormatError(f"{source}: sha256 {digest} is not the expected {spec.sha256} for dataset {key}")
    out.parent.mkdir(parents=True, exist_ok=True)

    def decompress(f) -> None:
        with gzip.open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    return atomic_write(out, decompress)
