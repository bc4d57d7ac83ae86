"""External item ids <-> internal rows 0..N-1, for every searcher and index."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class IdMap:
    """ids (N,) int64 unique external ids (None: the rows themselves). Lookup is a binary search over
    a sorted copy (16 bytes per item), not a Python dict, so it scales to 10^8 items."""

    def __init__(self, ids: np.ndarray | torch.Tensor | Sequence[int] | None, ntotal: int):
        self.ntotal = ntotal
        t = torch.arange(ntotal) if ids is None else torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: ids may be a read-only memmap
        if t.shape != (ntotal,):
            raise ValueError(f"{tuple(t.shape)} ids for {ntotal} items: need one int64 id per item")
        self.ids = t
        self._ids_numpy = t.numpy()  # a view, for results assembled on the host
        self.identity = bool(torch.equal(t, torch.arange(ntotal)))
        if not self.identity:
            self._sorted, self._order = torch.sort(t)
            if ntotal > 1 and bool((self._sorted[1:] == self._sorted[:-1]).any()):
                raise ValueError("item ids must be unique")

    def lookup(self, external: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """External ids (m,) -> internal rows (m,) int64, -1 where the id is unknown."""
        x = torch.as_tensor(np.asarray(external, dtype=np.int64).reshape(-1))
        if self.identity:
            return torch.where((x >= 0) & (x < self.ntotal), x, -1)
        if self.ntotal == 0:
            return torch.full_like(x, -1)
        pos = torch.searchsorted(self._sorted, x).clamp(max=self.ntotal - 1)
        return torch.where(self._sorted[pos] == x, self._order[pos], -1)

    def allowed_mask(self, allow: Sequence[int] | None = None, deny: Sequence[int] | None = None) -> torch.Tensor | None:
        """A request's id filter -> (N,) bool over internal rows, True where it lets the item through, or
        None for no filter. allow: only these external ids (unknown ones ignored); deny: never these."""
        if allow is None and deny is None:
            return None
        keep = torch.zeros(self.ntotal, dtype=torch.bool) if allow is not None else torch.ones(self.ntotal, dtype=torch.bool)
        if allow is not None:
            keep[self.rows(allow)] = True
        if deny is not None:
            keep[self.rows(deny)] = False
        return keep

    def rows(self, external: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """External ids (m,) -> internal rows (m',) int64 of the ids that exist (unknown ids dropped)."""
        r = self.lookup(external)
        return r[r >= 0]

    def external_numpy(self, rows: np.ndarray) -> np.ndarray:
        """``external`` on host arrays: internal rows (any shape, -1 = none) -> external ids (-1 kept)."""
        return np.where(rows < 0, -1, self._ids_numpy[np.maximum(rows, 0)])

    def external(self, rows: torch.Tensor) -> torch.Tensor:
        """Internal rows (any shape, -1 = none) -> external ids (-1 kept)."""
        return torch.where(rows < 0, torch.full_like(rows, -1), self.ids[rows.clamp(min=0)])

    def exclude_rows(self, exclude, nq: int) -> list[torch.Tensor] | None:
        """Per-query external ids to exclude -> per-query internal rows (checks one row per query)."""
        if exclude is None:
            return None
        if len(exclude) != nq:
            raise ValueError(f"exclude has {len(exclude)} rows for {nq} queries")
        return [self.rows(list(r)) for r in exclude]


def positions_in(subset: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (m,) -> their positions in ``subset`` (ascending rows), dropping rows it does not hold."""
    if len(subset) == 0 or len(rows) == 0:
        return rows.new_empty(0)
    pos = torch.searchsorted(subset, rows).clamp(max=len(subset) - 1)
    return pos[subset[pos] == rows]


def rows_of(subset: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Positions in ``subset`` (any shape, -1 = none) -> the rows they stand for (-1 kept)."""
    if len(subset) == 0:
        return torch.full_like(positions, -1)
    return torch.where(positions < 0, -1, subset[positions.clamp(min=0)])
