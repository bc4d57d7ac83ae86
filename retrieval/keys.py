"""Ids as people have them: int64 or strings (SKUs such as ``sku-987``, users such as ``u_123``).

A catalog's ids are an array of one kind: int64, or ``object`` holding ``str``. Strings never travel as
pickles: on disk they are UTF-8 bytes + int64 offsets, two plain ``.npy`` arrays (checksummed and
memory-mapped like every other array), decoded through pyarrow.

:class:`KeyMap` looks ids up (``rows(values) -> int64 rows, -1 unknown``): int64 ids through
:class:`~genrec.retrieval.ids.IdMap` (a sorted copy, 16 bytes per item), strings through a pandas
hash index. :class:`CatalogKeys` ties an index's int64 ids to its items' string ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from genrec.retrieval.ids import IdMap

UTF8_SUFFIX, OFFSETS_SUFFIX = "_utf8", "_offsets"


def is_string_ids(values) -> bool:
    """Whether ``values`` (an array or sequence) holds string ids."""
    return as_ids(values).dtype == object


def as_ids(values, where: str = "ids") -> np.ndarray:
    """Ids of either kind -> (N,) int64, or (N,) object array of ``str`` (numpy 'U' and ``np.str_`` included)."""
    # numpy's fixed-width strings drop trailing NULs: "a\x00" would silently become "a". Only Python sequences
    # and object arrays can still hold one (an int64 array is not walked element by element).
    if isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.dtype == object):
        if any(isinstance(v, str) and "\x00" in v for v in values):
            raise ValueError(f"{where}: an id contains a NUL character")
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(v, (str, np.str_)) for v in arr)):
        out = np.empty(len(arr), dtype=object)
        out[:] = [str(v) for v in arr]
        return out
    if arr.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) for v in arr):
        return arr.astype(np.int64)
    if len(arr) == 0:
        return arr.astype(np.int64)
    raise ValueError(f"{where}: ids must be all integers or all strings, got {arr.dtype} values such as {arr[0]!r}")


def plain_id(value):
    """One id as a plain Python int or str (for JSON, CSV and protobuf fields)."""
    return value.item() if isinstance(value, np.generic) else value


def encode_utf8(keys: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings (N,) -> (UTF-8 bytes (B,) uint8, offsets (N+1,) int64): string i is bytes[offsets[i]:offsets[i+1]]."""
    arr = pa.array(list(keys), type=pa.large_string())
    if arr.null_count:
        raise ValueError("string ids may not be missing (None)")
    _, offsets, data = arr.buffers()
    off = np.frombuffer(offsets, dtype=np.int64)[: len(arr) + 1]
    raw = np.frombuffer(data, dtype=np.uint8)[: int(off[-1])] if data is not None else np.zeros(0, np.uint8)
    return raw.copy(), (off - off[0]).copy()


def decode_utf8(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_utf8` -> (N,) object array of ``str``; refuses offsets or bytes that do
    not form valid UTF-8 strings (a damaged file)."""
    data, offsets = np.ascontiguousarray(data, dtype=np.uint8), np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
        raise ValueError(f"string id offsets do not describe {len(data)} bytes")
    arr = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid as e:
        raise ValueError(f"string ids are not valid UTF-8 ({e})") from None
    return arr.to_numpy(zero_copy_only=False)


def id_arrays(name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Ids -> the arrays that store them: ``{name: int64}``, or ``{name_utf8, name_offsets}`` for strings."""
    ids = as_ids(ids, name)
    if ids.dtype == np.int64:
        return {name: ids}
    data, offsets = encode_utf8(ids)
    return {name + UTF8_SUFFIX: data, name + OFFSETS_SUFFIX: offsets}


def ids_from_arrays(name: str, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The inverse of :func:`id_arrays` (None when ``arrays`` holds neither form); pops what it used."""
    if name + UTF8_SUFFIX in arrays:
        return decode_utf8(arrays.pop(name + UTF8_SUFFIX), arrays.pop(name + OFFSETS_SUFFIX))
    return None if name not in arrays else np.asarray(arrays.pop(name), dtype=np.int64)


def save_ids(directory: str | Path, name: str, ids: np.ndarray) -> list[Path]:
    """Write ids as ``<name>.npy`` (int64) or ``<name>_utf8.npy`` + ``<name>_offsets.npy`` (strings)."""
    paths = []
    for key, arr in id_arrays(name, ids).items():
        path = Path(directory) / f"{key}.npy"
        np.save(path, arr, allow_pickle=False)
        paths.append(path)
    return paths


def load_ids(directory: str | Path, name: str) -> np.ndarray:
    """Ids written by :func:`save_ids` (either form)."""
    d = Path(directory)
    if (d / f"{name}{UTF8_SUFFIX}.npy").is_file():
        return decode_utf8(np.load(d / f"{name}{UTF8_SUFFIX}.npy", allow_pickle=False),
                           np.load(d / f"{name}{OFFSETS_SUFFIX}.npy", allow_pickle=False))
    path = d / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (no {name} ids)")
    return as_ids(np.load(path, allow_pickle=False), str(path))


def ids_path_pair(path: Path) -> tuple[Path, Path]:
    """``items.ids.npy`` -> the two files its string form uses (``items.ids_utf8.npy``, ``items.ids_offsets.npy``)."""
    stem = path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + UTF8_SUFFIX + ".npy"), path.with_name(stem + OFFSETS_SUFFIX + ".npy")


class KeyMap:
    """Unique ids (N,) of either kind -> rows. ``rows(values)`` (m,) -> int64 (m,), -1 where unknown; a
    value of the other kind (an int against string ids, or the reverse) is unknown too."""

    def __init__(self, ids, where: str = "ids"):
        self.ids = as_ids(ids, where)
        self.is_string = self.ids.dtype == object
        if self.is_string:
            self._index = pd.Index(self.ids, dtype=object)
            if not self._index.is_unique:
                raise ValueError(f"{where}: ids are not unique")
            if len(self.ids) and (self._index == "").any():
                raise ValueError(f"{where}: an id is the empty string (it marks 'no item' in results)")
        else:
            self._idmap = IdMap(self.ids, len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, values) -> np.ndarray:
        values = list(values) if not isinstance(values, np.ndarray) else values
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        if self.is_string:
            return self._index.get_indexer(pd.Index(np.asarray(values, dtype=object), dtype=object)).astype(np.int64)
        arr = np.asarray(values)
        if arr.dtype.kind not in "iu":
            return np.full(len(arr), -1, dtype=np.int64)
        return self._idmap.lookup(arr).numpy()

    def values(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any shape, -1 = none) -> ids (``""`` / -1 where none)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = self.ids[np.maximum(rows, 0)] if len(self.ids) else np.zeros(rows.shape, dtype=self.ids.dtype)
        return np.where(rows < 0, "" if self.is_string else -1, out)


class CatalogKeys:
    """An index's items by their string ids: ``keys[r]`` is the string id of the item whose int64 index id
    is ``ids[r]`` (a string-keyed catalog is indexed under int64 ids: its rows in the model's item table).

    ``ids_of(strings) -> int64 ids`` (-1 unknown) for exclusions and filters; ``keys_of(ids) -> strings``
    (``""`` for -1) for results."""

    def __init__(self, keys, ids: np.ndarray):
        self.keys = KeyMap(keys, "item keys")
        if not self.keys.is_string:
            raise ValueError("CatalogKeys holds string ids")
        self.ids = np.asarray(ids, dtype=np.int64)
        if self.ids.shape != (len(self.keys),):
            raise ValueError(f"{len(self.keys)} item keys for {self.ids.shape[0]} ids")
        self._by_id = KeyMap(self.ids, "index ids")

    def __len__(self) -> int:
        return len(self.ids)

    def ids_of(self, keys) -> np.ndarray:
        rows = self.keys.rows(keys)
        return np.where(rows < 0, -1, self.ids[np.maximum(rows, 0)]) if len(self.ids) else rows

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return self.keys.values(self._by_id.rows(ids.reshape(-1)).reshape(ids.shape))

    def arrays(self) -> dict[str, np.ndarray]:
        """What an index saves (``item_keys_utf8``, ``item_keys_offsets``; aligned with its rows)."""
        return id_arrays(CATALOG_KEYS, self.keys.ids)

    @classmethod
    def concat(cls, parts: Sequence["CatalogKeys"]) -> "CatalogKeys":
        return cls(np.concatenate([p.keys.ids for p in parts]), np.concatenate([p.ids for p in parts]))


CATALOG_KEYS = "item_keys"
