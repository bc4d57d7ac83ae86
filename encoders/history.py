"""Histories -> one jagged encoder batch -> the state after each history's last event.

The one packer that evaluation, the ranking stage and serving share. Each history keeps its most recent
``max_len`` events; ``next_timestamps`` holds the following event's time, and at a history's last
position the request time (``query_times``), or the last event's own time when none is given (what the
reference does at inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class PackedHistories:
    """items, timestamps, next_timestamps: (L,) int64 jagged by offsets (B+1,) int64; max_len: longest row."""

    items: torch.Tensor
    offsets: torch.Tensor
    max_len: int
    timestamps: torch.Tensor | None = None
    next_timestamps: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PackedHistories":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedHistories(move(self.items), move(self.offsets), self.max_len, move(self.timestamps),
                               move(self.next_timestamps))


def pack_rows(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged int64 rows -> (values (L,), offsets (B+1,)), both int64."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows).astype(np.int64, copy=False) if len(rows) else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(values), torch.from_numpy(offsets)


def pack_histories(items: Sequence[np.ndarray], max_len: int, timestamps: Sequence[np.ndarray] | None = None,
                   query_times: Sequence[int | None] | None = None) -> PackedHistories:
    """items[b]: (n_b,) int64 internal ids (n_b >= 1), oldest first; timestamps[b]: (n_b,) int64 event
    times; query_times[b]: the request time of history b (None: its last event's time)."""
    if not len(items):
        raise ValueError("no histories to pack")
    kept = [np.asarray(h, dtype=np.int64)[-max_len:] for h in items]
    if any(len(h) == 0 for h in kept):
        raise ValueError("every history needs at least one event")
    values, offsets = pack_rows(kept)
    packed = PackedHistories(values, offsets, max(len(h) for h in kept))
    if timestamps is not None:
        ts_in, ts_next = [], []
        for b, t in enumerate(timestamps):
            t = np.asarray(t, dtype=np.int64)[-max_len:]
            q = query_times[b] if query_times is not None and len(query_times) and query_times[b] is not None else t[-1]
            ts_in.append(t)
            ts_next.append(np.append(t[1:], np.int64(q)))
        packed.timestamps, packed.next_timestamps = pack_rows(ts_in)[0], pack_rows(ts_next)[0]
    return packed


def last_states(encoder: torch.nn.Module, packed: PackedHistories) -> torch.Tensor:
    """(B, D) float: the encoder's state at each history's last event (the user's query)."""
    states = encoder(packed.items, packed.offsets, packed.max_len, packed.timestamps, packed.next_timestamps)
    return states[packed.offsets[1:] - 1]
