"""Readers for the interaction formats people already have on disk.

Every reader returns an :class:`Interactions` table. Parsing uses pandas' C parser for speed; when it
fails, the file is rescanned line by line so the error names the file, the line and the problem.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd


class DataFormatError(ValueError):
    """Input data that cannot be parsed; the message names the file, line and problem."""


@dataclass
class Interactions:
    """One row per event, in file order.

    users, items: raw ids (int64 or str), shape (E,). timestamps: int64 seconds (E,) or None when the
    format has no time (then file order is the chronology). ratings: float32 (E,) or None.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    ratings: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.users)


FORMATS = ("ml-1m", "ml-20m", "ml-100k", "recbole", "csv", "parquet", "sasrec")
_DEFAULT_FILES = {"ml-1m": "ratings.dat", "ml-20m": "ratings.csv", "ml-100k": "u.data"}


def _resolve(path: str | Path, fmt: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if fmt in _DEFAULT_FILES:
            p = p / _DEFAULT_FILES[fmt]
        elif fmt == "recbole":
            found = sorted(p.glob("*.inter"))
            if not found:
                raise DataFormatError(f"{path}: no *.inter file in this directory")
            p = found[0]
        else:
            raise DataFormatError(f"{path}: is a directory; give the {fmt} file itself")
    if not p.is_file():
        raise DataFormatError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise DataFormatError(f"{p}: file is empty")
    return p


INT64_MAX = 2**63 - 1


def _is_number(s: str, integer: bool) -> bool:
    """Whether ``s`` parses as an int64 (``integer``) or a float."""
    try:
        return -INT64_MAX - 1 <= int(s) <= INT64_MAX if integer else (float(s), True)[1]
    except ValueError:
        return False


def _scan_for_error(
    path: Path,
    split: Callable[[str], list[str]],
    names: list[str],
    integer_fields: set[int],
    float_fields: set[int],
    skip_header: bool,
    exact: bool = False,
) -> DataFormatError:
    """Find the first bad line of a delimited text file and describe it (``exact``: a fixed layout, where
    extra fields are an error too)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if skip_header and lineno == 1:
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                return DataFormatError(f"{path}:{lineno}: empty line")
            fields = split(line)
            if len(fields) < len(names) or (exact and len(fields) > len(names)):
                return DataFormatError(
                    f"{path}:{lineno}: expected {len(names)} fields ({', '.join(names)}), "
                    f"got {len(fields)}: {line[:80]!r}"
                )
            for i in sorted(integer_fields | float_fields):
                value = fields[i].strip()
                if not _is_number(value, integer=i in integer_fields):
                    if i in integer_fields and value.lstrip("+-").isdigit():
                        return DataFormatError(f"{path}:{lineno}: field '{names[i]}' is outside the int64 range: {value[:40]!r}")
                    kind = "an integer" if i in integer_fields else "a number"
                    return DataFormatError(f"{path}:{lineno}: field '{names[i]}' must be {kind}, got {value!r}")
    return DataFormatError(f"{path}: could not be parsed")


def _read_delimited(
    path: Path,
    sep: str,
    names: list[str],
    usecols: list[int],
    integer_fields: set[int],
    float_fields: set[int],
    header: bool,
    split: Callable[[str], list[str]],
) -> pd.DataFrame:
    """Fast C-parser read; rescans for a precise message when the data is malformed. When ``usecols``
    names every field (a fixed layout such as MovieLens), a line with extra fields is malformed too."""
    exact = sorted(usecols) == list(range(len(names)))
    raw = path.read_bytes()
    if sep == "::":
        raw, sep = raw.replace(b"::", b"\t"), "\t"
    dtypes = {names[i]: ("int64" if i in integer_fields else "float64") for i in usecols if i in integer_fields | float_fields}
    try:
        df = pd.read_csv(
            io.BytesIO(raw),
            sep=sep,
            header=None,
            skiprows=1 if header else 0,
            names=names,
            usecols=None if exact else usecols,  # without usecols the C parser refuses extra fields
            dtype=dtypes or None,
            engine="c",
            skip_blank_lines=False,
        )
    except (ValueError, OverflowError, pd.errors.ParserError, IndexError):
        raise _scan_for_error(path, split, names, integer_fields, float_fields, header, exact) from None
    if df.isna().to_numpy().any():
        raise _scan_for_error(path, split, names, integer_fields, float_fields, header, exact)
    if len(df) == 0:
        raise DataFormatError(f"{path}: no interactions (only a header?)")
    return df


def _frame_to_interactions(df: pd.DataFrame, source: str, time: bool, rating: bool) -> Interactions:
    return Interactions(
        users=df["user"].to_numpy(),
        items=df["item"].to_numpy(),
        timestamps=df["timestamp"].to_numpy().astype(np.int64) if time else None,
        ratings=df["rating"].to_numpy().astype(np.float32) if rating else None,
        source=source,
    )


def read_movielens(path: str | Path, fmt: str) -> Interactions:
    """ML-1M ``ratings.dat`` (``::``), ML-20M/25M ``ratings.csv`` (header), ML-100K ``u.data`` (tab)."""
    p = _resolve(path, fmt)
    names = ["user", "item", "rating", "timestamp"]
    sep, header = {"ml-1m": ("::", False), "ml-20m": (",", True), "ml-100k": ("\t", False)}[fmt]
    splitter = (lambda s: s.split(sep)) if sep != "\t" else (lambda s: s.split("\t"))
    df = _read_delimited(p, sep, names, [0, 1, 2, 3], {0, 1, 3}, {2}, header, splitter)
    return _frame_to_interactions(df, str(p), time=True, rating=True)


def read_recbole(path: str | Path) -> Interactions:
    """RecBole atomic ``.inter`` file: tab-separated, header of ``name:type`` fields."""
    p = _resolve(path, "recbole")
    with open(p, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DataFormatError(f"{p}:1: header has no '{required}' field (found {', '.join(header)})")
    cols = {n: i for i, n in enumerate(names)}
    has_time, has_rating = "timestamp" in cols, "rating" in cols
    use = [cols["user_id"], cols["item_id"]] + ([cols["timestamp"]] if has_time else []) + ([cols["rating"]] if has_rating else [])
    floats = ({cols["timestamp"]} if has_time else set()) | ({cols["rating"]} if has_rating else set())
    df = _read_delimited(p, "\t", names, use, set(), floats, True, lambda s: s.split("\t"))
    df = df.rename(columns={"user_id": "user", "item_id": "item"})
    if has_time:
        df["timestamp"] = df["timestamp"].astype(np.int64)
    return _frame_to_interactions(df, str(p), time=has_time, rating=has_rating)


def read_sasrec_text(path: str | Path) -> Interactions:
    """SASRec text format: ``user item`` per line, already chronological within each user."""
    p = _resolve(path, "sasrec")
    names = ["user", "item"]
    df = _read_delimited(p, r"\s+", names, [0, 1], {0, 1}, set(), False, lambda s: s.split())
    return _frame_to_interactions(df, str(p), time=False, rating=False)


def read_table(path: str | Path, fmt: str, user_col: str, item_col: str, time_col: str | None,
               rating_col: str | None, delimiter: str = ",", column_names: list[str] | None = None) -> Interactions:
    """Generic CSV or Parquet of (user, item[, timestamp][, rating]) with named columns.

    ``column_names`` names the columns of a CSV that has no header row (e.g. Amazon ratings dumps)."""
    p = _resolve(path, fmt)
    wanted = {"user": user_col, "item": item_col}
    if time_col:
        wanted["timestamp"] = time_col
    if rating_col:
        wanted["rating"] = rating_col
    if fmt == "parquet":
        try:
            df = pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataFormatError(f"{p}: not a readable Parquet file ({e})") from None
        line_of = lambda row: f"row {row}"  # noqa: E731
    else:
        try:
            df = pd.read_csv(p, sep=delimiter, dtype=str, keep_default_na=False, engine="c",
                             header=None if column_names else "infer", names=column_names)
        except (ValueError, pd.errors.ParserError) as e:
            match = re.search(r"line (\d+)", str(e))
            where = f":{match.group(1)}" if match else ""
            raise DataFormatError(f"{p}{where}: malformed CSV ({e})") from None
        first = 1 if column_names else 2  # 1-based line of the first data row
        line_of = lambda row: f"{row + first}"  # noqa: E731
    missing = [c for c in wanted.values() if c not in df.columns]
    if missing:
        raise DataFormatError(f"{p}: missing column(s) {missing}; columns are {list(df.columns)}")
    if len(df) == 0:
        raise DataFormatError(f"{p}: no interactions")
    out = pd.DataFrame({k: df[c] for k, c in wanted.items()})
    for key in ("user", "item"):
        col = out[key].astype(str)
        empty = np.flatnonzero((col.str.strip() == "").to_numpy())
        if len(empty):
            raise DataFormatError(f"{p}:{line_of(int(empty[0]))}: empty '{wanted[key]}'")
        as_int = pd.to_numeric(col, errors="coerce")
        out[key] = as_int.astype(np.int64) if not as_int.isna().any() else col
    for key in ("timestamp", "rating"):
        if key in out:
            values = pd.to_numeric(out[key], errors="coerce")
            if key == "timestamp" and values.isna().any():
                parsed = pd.to_datetime(out[key], errors="coerce", utc=True, format="ISO8601")
                if not parsed.isna().any():
                    values = parsed.astype("int64") // 10**9
            bad = np.flatnonzero(values.isna().to_numpy())
            if len(bad):
                raise DataFormatError(
                    f"{p}:{line_of(int(bad[0]))}: field '{wanted[key]}' must be a number, "
                    f"got {out[key].iloc[int(bad[0])]!r}"
                )
            out[key] = values
    return _frame_to_interactions(out, str(p), time="timestamp" in out, rating="rating" in out)


def load_interactions(fmt: str, path: str | Path, *, user_col: str = "user_id", item_col: str = "item_id",
                      time_col: str | None = "timestamp", rating_col: str | None = None,
                      delimiter: str = ",", column_names: list[str] | None = None) -> Interactions:
    """Read ``path`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt in ("ml-1m", "ml-20m", "ml-100k"):
        return read_movielens(path, fmt)
    if fmt == "recbole":
        return read_recbole(path)
    if fmt == "sasrec":
        return read_sasrec_text(path)
    if fmt in ("csv", "parquet"):
        return read_table(path, fmt, user_col, item_col, time_col, rating_col, delimiter, column_names)
    raise DataFormatError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS + ('synthetic', 'prepared'))}")
