"""Chronological per-user item sequences with a saved id map, k-core filtering and leave-one-out.

Internal item ids are 1..num_items (0 is padding); ``item_ids[i - 1]`` is the raw id of item ``i``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genrec.data.loaders import DataFormatError, Interactions
from genrec.io import atomic_directory
from genrec.retrieval.keys import as_ids, load_ids, save_ids

PREPARED_FORMAT_VERSION = 1


@dataclass
class SequenceDataset:
    """All users' sequences as one jagged array.

    offsets: int64 (U+1,); items: int64 (E,) internal ids in 1..num_items, chronological per user;
    timestamps: int64 (E,) or None; ratings: float32 (E,) or None; user_ids: raw ids (U,);
    item_ids: raw ids (num_items,). Raw ids are int64, or ``str`` in an object array (SKUs, user names).
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    ratings: np.ndarray | None
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def describe(self) -> dict:
        lengths = self.lengths
        return {
            "users": int(self.num_users),
            "items": int(self.num_items),
            "interactions": int(len(self.items)),
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "has_timestamps": self.timestamps is not None,
        }


def kcore_filter(users: np.ndarray, items: np.ndarray, k: int, passes: int = 0) -> np.ndarray:
    """Boolean keep-mask leaving users and items with >= k events; ``passes`` 0 = until stable."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    _, u_inv = np.unique(users, return_inverse=True)
    _, i_inv = np.unique(items, return_inverse=True)
    done = 0
    while True:
        u_count = np.bincount(u_inv[keep], minlength=u_inv.max() + 1)
        i_count = np.bincount(i_inv[keep], minlength=i_inv.max() + 1)
        new_keep = keep & (u_count[u_inv] >= k) & (i_count[i_inv] >= k)
        done += 1
        changed = new_keep.sum() != keep.sum()
        keep = new_keep
        if not changed or (passes and done >= passes):
            return keep


def build_sequences(inter: Interactions, kcore: int = 0, kcore_passes: int = 0) -> SequenceDataset:
    """Group events per user in time order (stable: file order breaks timestamp ties)."""
    users, items = as_ids(inter.users, f"{inter.source}: users"), as_ids(inter.items, f"{inter.source}: items")
    ts, ratings = inter.timestamps, inter.ratings
    if len(users) == 0:
        raise DataFormatError(f"{inter.source}: no interactions")
    if kcore > 1:
        keep = kcore_filter(users, items, kcore, kcore_passes)
        users, items = users[keep], items[keep]
        ts = ts[keep] if ts is not None else None
        ratings = ratings[keep] if ratings is not None else None
        if len(users) == 0:
            raise DataFormatError(f"{inter.source}: nothing left after the {kcore}-core filter")
    user_ids, u_idx = np.unique(users, return_inverse=True)
    item_ids, i_idx = np.unique(items, return_inverse=True)
    keys = (u_idx,) if ts is None else (ts, u_idx)
    order = np.lexsort(keys)  # last key is primary: user, then time; lexsort is stable
    counts = np.bincount(u_idx, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SequenceDataset(
        offsets=offsets,
        items=(i_idx[order] + 1).astype(np.int64),
        timestamps=ts[order].astype(np.int64) if ts is not None else None,
        ratings=ratings[order].astype(np.float32) if ratings is not None else None,
        user_ids=user_ids,
        item_ids=item_ids,
    )


@dataclass
class Split:
    """Leave-one-out split over the users with enough events (shorter users only add training data).

    train_end[u]: exclusive end (absolute index into items) of u's training prefix.
    eval_users: user indices evaluated; their test target is items[offsets[u+1] - 1] (history = all but
    the last event) and, when ``validation``, their validation target items[offsets[u+1] - 2] (history =
    the training prefix). Without validation the second-to-last event is training data.
    """

    train_end: np.ndarray
    eval_users: np.ndarray
    validation: bool = True


def leave_one_out(ds: SequenceDataset, validation: bool = True) -> Split:
    """validation=True: the last event is the test target, the second-to-last the validation target, and
    users need >= 3 events to be evaluated. validation=False (the reference's protocol: it has no
    validation split): only the last event is held out, users with >= 2 events are evaluated."""
    held_out = 2 if validation else 1
    eval_users = np.flatnonzero(ds.lengths >= held_out + 1)
    train_end = ds.offsets[1:].copy()
    train_end[eval_users] -= held_out
    return Split(train_end=train_end, eval_users=eval_users, validation=validation)


def save_prepared(ds: SequenceDataset, out_dir: str | Path, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write a prepared dataset atomically: arrays in ``sequences.npz``, ids, ``meta.json``."""
    arrays = {"offsets": ds.offsets, "items": ds.items}
    if ds.timestamps is not None:
        arrays["timestamps"] = ds.timestamps
    if ds.ratings is not None:
        arrays["ratings"] = ds.ratings
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        np.savez(tmp / "sequences.npz", **arrays)
        save_ids(tmp, "user_ids", ds.user_ids)  # int64, or UTF-8 + offsets for string ids (never a pickle)
        save_ids(tmp, "item_ids", ds.item_ids)
        info = {"format_version": PREPARED_FORMAT_VERSION, **ds.describe(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_prepared(path: str | Path) -> SequenceDataset:
    p = Path(path)
    if not (p / "meta.json").is_file():
        raise DataFormatError(f"{p}: not a prepared dataset (no meta.json; run 'genrec data prepare')")
    meta = json.loads((p / "meta.json").read_text())
    if meta.get("format_version", 0) > PREPARED_FORMAT_VERSION:
        raise DataFormatError(f"{p}: prepared with a newer genrec (format {meta['format_version']})")
    with np.load(p / "sequences.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return SequenceDataset(
        offsets=arrays["offsets"],
        items=arrays["items"],
        timestamps=arrays.get("timestamps"),
        ratings=arrays.get("ratings"),
        user_ids=load_ids(p, "user_ids"),
        item_ids=load_ids(p, "item_ids"),
    )
