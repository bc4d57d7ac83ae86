"""Categorical item attributes kept with an index (category, brand, in-stock flag, ...), for query-time
filters: ``index.search(q, k, where={"category": ["shoes", "boots"], "in_stock": ["true"]})`` lets through
the items whose every named column holds one of the listed values.

Stored per column as int32 codes (N,) into a vocabulary of strings (code -1: no value); the codes are
ordinary index arrays (``attr__<column>.npy``, checksummed by the manifest), the vocabularies live in the
manifest under ``attributes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

ARRAY_PREFIX = "attr__"
COLUMN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


@dataclass
class ItemAttributes:
    codes: dict[str, np.ndarray]   # column -> (N,) int32 codes, -1 = no value
    vocab: dict[str, list[str]]    # column -> the value of each code

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence], n: int) -> "ItemAttributes":
        """Per column N values (str-able; None / NaN = no value) -> codes and sorted vocabularies."""
        codes, vocab = {}, {}
        for name, values in columns.items():
            if not COLUMN.fullmatch(name):
                raise ValueError(f"attribute column {name[:80]!r}: use a letter then letters, digits or _ (<= 64)")
            if len(values) != n:
                raise ValueError(f"attribute column {name!r} has {len(values)} values for {n} items")
            text = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
            vocab[name] = sorted({t for t in text if t is not None})
            index = {v: i for i, v in enumerate(vocab[name])}
            codes[name] = np.array([-1 if t is None else index[t] for t in text], dtype=np.int32)
        return cls(codes, vocab)

    def arrays(self) -> dict[str, np.ndarray]:
        return {ARRAY_PREFIX + name: c for name, c in self.codes.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], vocab: dict[str, list[str]], n: int) -> "ItemAttributes":
        codes = {name: np.asarray(arrays[ARRAY_PREFIX + name]) for name in vocab}
        for name, c in codes.items():
            if c.shape != (n,) or c.dtype != np.int32 or (len(c) and (c.min() < -1 or c.max() >= len(vocab[name]))):
                raise ValueError(f"attribute column {name!r}: codes must be (N,) int32 within its vocabulary")
        return cls(codes, {k: list(v) for k, v in vocab.items()})

    def mask(self, where: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """(N,) bool: items whose every named column holds one of the listed values."""
        n = len(next(iter(self.codes.values()))) if self.codes else 0
        keep = np.ones(n, dtype=bool)
        for name, values in where.items():
            if name not in self.codes:
                raise ValueError(f"unknown attribute {str(name)[:80]!r} (this index has: {', '.join(self.codes) or 'none'})")
            wanted = [self.vocab[name].index(v) for v in values if v in self.vocab[name]]
            keep &= np.isin(self.codes[name], wanted)
        return torch.from_numpy(keep)


def split_attribute_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(index arrays, attribute arrays) of a loaded version's arrays."""
    attrs = {k: v for k, v in arrays.items() if k.startswith(ARRAY_PREFIX)}
    return {k: v for k, v in arrays.items() if k not in attrs}, attrs


def read_attributes(path: str, ids: np.ndarray) -> ItemAttributes:
    """A .parquet / .csv with an ``id`` column and categorical columns -> attributes aligned to ``ids``
    (the index's external ids in row order: int64, or its items' string ids); ids the file lacks get no
    value (code -1)."""
    import pandas as pd

    if path.endswith(".parquet"):
        df = pd.read_parquet(path)
    elif path.endswith(".csv"):
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    else:
        raise ValueError(f"{path}: metadata must be .parquet or .csv")
    if "id" not in df.columns:
        raise ValueError(f"{path}: needs an 'id' column, has {list(df.columns)[:20]}")
    if df["id"].duplicated().any():
        raise ValueError(f"{path}: item id {df['id'][df['id'].duplicated()].iloc[0]} appears more than once")
    string_ids = np.asarray(ids).dtype.kind in "OUS"
    try:
        file_ids = df["id"].astype(str if string_ids else np.int64).to_numpy()
    except (TypeError, ValueError):
        raise ValueError(f"{path}: the 'id' column must hold integer item ids (this index's ids are integers)") from None
    order = pd.Series(np.arange(len(df)), index=file_ids).reindex(ids).to_numpy()
    columns = {}
    for name in (c for c in df.columns if c != "id"):
        values = df[name].to_numpy(dtype=object)
        columns[name] = [None if np.isnan(o) else values[int(o)] for o in order]
    return ItemAttributes.from_columns(columns, len(ids))
