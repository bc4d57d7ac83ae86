"""Jagged mini-batches for training (every prefix position supervised) and leave-one-out evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from genrec.data.sequences import SequenceDataset, Split
from genrec.encoders.history import PackedHistories, pack_histories, pack_rows


@dataclass
class SequenceBatch:
    """items, timestamps, next_timestamps: (L,) int64 jagged by offsets (B+1,) int64.

    targets: (L,) next item per position when training, (B,) one held-out item per row when
    evaluating. history: (B+1,) offsets + (H,) items of each row's full history (for exclusion).
    """

    items: torch.Tensor
    offsets: torch.Tensor
    max_len: int
    targets: torch.Tensor
    timestamps: torch.Tensor | None = None
    next_timestamps: torch.Tensor | None = None
    users: np.ndarray | None = None
    history_items: torch.Tensor | None = None
    history_offsets: torch.Tensor | None = None

    def to(self, device: torch.device) -> "SequenceBatch":
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return SequenceBatch(**{k: move(v) for k, v in self.__dict__.items()})

    def packed(self) -> PackedHistories:
        """The encoder input of this batch (no copy)."""
        return PackedHistories(self.items, self.offsets, self.max_len, self.timestamps, self.next_timestamps)


def stochastic_length(length: int, max_len: int, alpha: float, rng: np.random.Generator) -> np.ndarray | None:
    """Stochastic Length (HSTU): for a history of ``length`` > m = ceil(max_len^(alpha/2)), keep a random
    order-preserving subsequence of m events with probability 1 - m^2 / length^2. Returns the kept
    indices, or None to keep everything. Expected attention cost drops to O(max_len^alpha)."""
    m = int(np.ceil(max_len ** (alpha / 2)))
    if length <= m or rng.random() >= 1.0 - (m * m) / (length * length):
        return None
    return np.sort(rng.choice(length, size=m, replace=False))


def train_batches(ds: SequenceDataset, split: Split, max_len: int, batch_size: int, rng: np.random.Generator,
                  stochastic_length_alpha: float | None = None) -> Iterator[SequenceBatch]:
    """Shuffled batches of training prefixes: the last max_len + 1 events of each user's training part
    give inputs seq[:-1] and targets seq[1:]; users with fewer than 2 training events are skipped."""
    starts = ds.offsets[:-1]
    ends = split.train_end
    users = np.flatnonzero(ends - starts >= 2)
    rng.shuffle(users)
    for lo in range(0, len(users), batch_size):
        chunk = users[lo : lo + batch_size]
        inputs, targets, ts_in, ts_next = [], [], [], []
        for u in chunk:
            a, e = max(starts[u], ends[u] - max_len - 1), ends[u]
            idx = np.arange(a, e)
            if stochastic_length_alpha is not None:
                keep = stochastic_length(len(idx), max_len, stochastic_length_alpha, rng)
                if keep is not None:
                    idx = idx[keep]
            seq = ds.items[idx]
            inputs.append(seq[:-1])
            targets.append(seq[1:])
            if ds.timestamps is not None:
                t = ds.timestamps[idx]
                ts_in.append(t[:-1])
                ts_next.append(t[1:])
        items, offsets = pack_rows(inputs)
        batch = SequenceBatch(items=items, offsets=offsets, max_len=max(len(p) for p in inputs),
                              targets=pack_rows(targets)[0], users=chunk)
        if ts_in:
            batch.timestamps, batch.next_timestamps = pack_rows(ts_in)[0], pack_rows(ts_next)[0]
        yield batch


def history_batch(ds: SequenceDataset, users: np.ndarray, history_ends: np.ndarray, max_len: int,
                  query_times: np.ndarray | None = None) -> SequenceBatch:
    """Encoder input for each user's history items[offsets[u]:history_ends[u]] (last max_len kept).

    next_timestamps: the next event's time inside the history; at the last position ``query_times``
    (request time) when given, else the last event's own time (as the reference does at inference).
    """
    full = [ds.items[ds.offsets[u] : history_ends[row]] for row, u in enumerate(users)]
    times = None
    if ds.timestamps is not None:
        times = [ds.timestamps[ds.offsets[u] : history_ends[row]] for row, u in enumerate(users)]
    packed = pack_histories(full, max_len, times, query_times)
    hist_items, hist_offsets = pack_rows(full)
    return SequenceBatch(items=packed.items, offsets=packed.offsets, max_len=packed.max_len,
                         targets=torch.zeros(0, dtype=torch.int64), timestamps=packed.timestamps,
                         next_timestamps=packed.next_timestamps, users=users,
                         history_items=hist_items, history_offsets=hist_offsets)


def target_positions(ds: SequenceDataset, users: np.ndarray, stage: str) -> np.ndarray:
    """Leave-one-out targets' positions in ``ds.items`` (int64, like ``users``): 'valid' the second-to-last
    event of each user, 'test' the last."""
    if stage not in ("valid", "test"):
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
    return ds.offsets[users + 1] - (2 if stage == "valid" else 1)


def eval_batches(ds: SequenceDataset, split: Split, stage: str, max_len: int, batch_size: int) -> Iterator[SequenceBatch]:
    """Leave-one-out batches. stage 'valid': history = training part, target = second-to-last event;
    'test': history = all but the last event, target = the last event."""
    if stage == "valid" and not split.validation:
        raise ValueError("no validation targets: this run trained on them (train.validation: false)")
    users = split.eval_users
    target_pos = target_positions(ds, users, stage)
    for lo in range(0, len(users), batch_size):
        u, tp = users[lo : lo + batch_size], target_pos[lo : lo + batch_size]
        batch = history_batch(ds, u, tp, max_len)
        batch.targets = torch.from_numpy(ds.items[tp])
        yield batch
