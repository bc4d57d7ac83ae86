"""What every index shares: external int64 ids, FAISS-shaped search, and a state to save and load.

A catalog whose items have string ids (SKUs) is indexed under int64 ids (the items' rows in the model's
item table); ``index.keys`` (:class:`~genrec.retrieval.keys.CatalogKeys`) maps those to the strings and back.

``D, I = index.search(queries, k)``: D (nq, k) float32 descending, I (nq, k) int64 external ids, with
-inf / -1 where fewer than k items exist. ``exclude`` (per query, external ids) removes items such as
a user's history before the top-k is taken.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from genrec.index.attributes import ItemAttributes
from genrec.retrieval.ids import IdMap
from genrec.retrieval.keys import CatalogKeys
from genrec.retrieval.search import SearchResult


@dataclass
class IndexState:
    """Everything needed to rebuild an index: arrays (saved as .npy, memory-mapped on load), small JSON
    parameters, and opaque blobs (saved as files, e.g. MoL weights or a serialized faiss index)."""

    kind: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


class FilterUnsupported(ValueError):
    """A search asked for an allow / deny filter that this index kind cannot apply inside its search."""


class Index(ABC):
    kind: str = ""

    def __init__(self, ids: np.ndarray | torch.Tensor | None, ntotal: int):
        self.ntotal = ntotal
        self.idmap = IdMap(ids, ntotal)
        self.ids = self.idmap.ids
        self.attributes: ItemAttributes | None = None  # categorical item metadata for `where` filters
        self.keys: CatalogKeys | None = None  # the items' string ids, when the catalog has them

    def external_ids(self) -> np.ndarray:
        """The items' ids as the user gave them, in row order: their string ids, else the int64 ids."""
        return self.keys.keys.ids if self.keys is not None else self.ids.numpy()

    def filter_rows(self, allow: Sequence[int] | None = None, deny: Sequence[int] | None = None,
                    where: Mapping[str, Sequence[str]] | None = None) -> torch.Tensor | None:
        """A request's filter (allow / deny ids, ``where`` attribute values) -> the ascending rows it lets
        through, or None when there is no filter."""
        keep = self.idmap.allowed_mask(allow, deny)
        if where:
            if self.attributes is None:
                raise ValueError("this index has no item attributes (build it with --metadata) to filter on")
            matching = self.attributes.mask(dict(where))  # a mapping, or (column, values) pairs (hashable batch keys)
            keep = matching if keep is None else keep & matching
        return None if keep is None else keep.nonzero().squeeze(1)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Query dimension."""

    @abstractmethod
    def search_with_certificate(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                                **params) -> SearchResult: ...

    @abstractmethod
    def state(self) -> IndexState: ...

    def vectors_finite(self) -> bool:
        """Whether vectors the loader could not check as saved arrays (inside blobs) are all finite."""
        return True

    @classmethod
    def bfloat16_arrays(cls, params: dict[str, Any]) -> set[str]:
        """Names of the saved arrays that hold bf16 bit patterns as int16 (numpy has no bf16), so that the
        loader checks them for NaN / Inf like the float arrays."""
        return set()

    @property
    @abstractmethod
    def bytes_per_item(self) -> float:
        """Bytes held per item at search time (all arrays, ids included)."""

    def search(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
        r = self.search_with_certificate(queries, k, exclude=exclude, **params)
        return r.scores, r.ids

    @property
    def device(self) -> torch.device:
        """Where searches run; results always come back as numpy arrays on the host."""
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "Index":
        """Moves the search-time arrays to ``device`` (kinds that can search there override this)."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.kind} indexes search on the CPU only, not on {device}")
        return self

    def _result(self, scores: torch.Tensor, rows: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> SearchResult:
        """Host tensors (or arrays) of internal rows -> a SearchResult of external ids (assembled in numpy)."""
        return SearchResult(scores.float().numpy(), self.idmap.external_numpy(np.asarray(rows)), np.asarray(exact),
                            np.asarray(bound, dtype=np.float32))
