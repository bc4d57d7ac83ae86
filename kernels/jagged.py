"""Jagged tensors: ``values`` (L, ...) holding B variable-length rows, ``offsets`` (B+1,) int64.

Row b is ``values[offsets[b]:offsets[b+1]]``. Plain torch; no fbgemm.
"""

from __future__ import annotations

import torch


def complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """lengths (B,) int -> offsets (B+1,) int64 starting at 0."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def segment_ids(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(L,) int64: which row each value belongs to."""
    lengths = lengths_from_offsets(offsets)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total)


def positions(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(L,) int64: index of each value within its row."""
    seg = segment_ids(offsets, total)
    return torch.arange(seg.numel(), device=offsets.device) - offsets[seg]


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int, pad_value: float = 0.0) -> torch.Tensor:
    """values (L, *F) -> padded (B, max_len, *F); rows right-padded with ``pad_value``.

    Raises ValueError if a row is longer than ``max_len``.
    """
    b = offsets.numel() - 1
    lengths = lengths_from_offsets(offsets)
    if b > 0 and int(lengths.max()) > max_len:
        raise ValueError(f"jagged row of length {int(lengths.max())} exceeds max_len {max_len}")
    out = values.new_full((b, max_len, *values.shape[1:]), pad_value)
    seg = segment_ids(offsets, values.shape[0])
    pos = torch.arange(values.shape[0], device=values.device) - offsets[seg]
    out[seg, pos] = values
    return out


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """padded (B, N, *F) -> values (L, *F) keeping the first ``length`` entries of each row."""
    total = int(offsets[-1])
    seg = segment_ids(offsets, total)
    pos = torch.arange(total, device=padded.device) - offsets[seg]
    return padded[seg, pos]


def last_of_each_row(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(L, *F) -> (B, *F): the last value of every (non-empty) row."""
    return values[offsets[1:] - 1]
