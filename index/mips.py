"""Dot-product (MIPS) indexes: exact flat scan in torch, and faiss IVF / HNSW wrappers for comparison.

Queries are encoder states (D,) and items the item embeddings (N, D): what a dot-product HSTU serves.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from genrec.index.base import Index, IndexState
from genrec.index.stage1 import from_numpy
from genrec.retrieval.ids import positions_in, rows_of
from genrec.retrieval.search import SearchResult, validate_queries
from genrec.kernels.topk import chunked_topk_columns, empty_topk, mask_excluded, pad_invalid, select_topk


SCORE_BLOCK_FLOATS = 1 << 22  # one chunk's (width, c) score block: 16 MiB (measured best of 2^20..2^24 over nq 1-64; 32 MiB+ blocks fault in fresh pages each call)
GPU_SCORE_BLOCK_FLOATS = 1 << 26  # on CUDA: 256 MiB blocks, so 100M items take ~400 chunks' launches at nq 1, not ~25,000
SMALL_SEARCH_SCORES = 1 << 17  # up to nq x N scores this many, one mm + one selection: the chunked scan's fixed
# per-call cost (~60 small ops) is then most of the time (1K items, nq 1: 0.37 vs 0.74 ms; 16K x 8: 1.1 vs 1.5 ms)


def mm_width(nq: int) -> int:
    """How many query columns to compute for a batch of nq: MKL's (N, d) @ (d, nq) runs up to ~2x slower
    at widths that are not a multiple of 8, and at 8 itself, than at the next such width >= 16 (measured
    on this project's CPUs: nq 31 -> 26 ms, padded to 32 -> 13.5 ms over 200K x 64), so zero query rows
    are appended and their columns ignored. Up to 4 the plain width is fastest."""
    return nq if nq <= 4 else max(16, -(-nq // 8) * 8)


class FlatMIPS(Index):
    """Exact inner-product top-k: chunked mm + top-k (ties by smaller id). Always exact.

    A batch of nq queries scans ``min(chunk_size, max(1024, SCORE_BLOCK_FLOATS / nq))`` items per chunk into one
    reused score buffer: a large batch then never writes (and faults in) an (nq, N) matrix, which on CPU
    costs more than the mm itself. Scores are made item-major (items @ q.T, ~1.5x faster than q @ items.T
    on CPU at small nq) and each chunk is cut by a group-max pre-selection (``column_block_topk``). Up to
    ``SMALL_SEARCH_SCORES`` scores (nq x N) in all, one mm and one exact selection do it instead."""

    kind = "mips"

    def __init__(self, items, ids=None, chunk_size: int = 262144):
        self.items = items if isinstance(items, torch.Tensor) else from_numpy(np.asarray(items), "float32")
        if self.items.dim() != 2:
            raise ValueError(f"item embeddings must be 2-D (N, D), got shape {tuple(self.items.shape)}")
        super().__init__(ids, self.items.shape[0])
        self.chunk_size = chunk_size

    @property
    def dim(self) -> int:
        return self.items.shape[1]

    @property
    def bytes_per_item(self) -> float:
        return self.dim * self.items.element_size() + 8

    @property
    def device(self) -> torch.device:
        return self.items.device

    def to(self, device: torch.device | str) -> "FlatMIPS":
        """Moves the item embeddings to ``device``; searches then run there (ids stay on the host)."""
        self.items = self.items.to(device)
        return self

    @torch.no_grad()
    def search_with_certificate(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                                allow: Sequence[int] | None = None, deny: Sequence[int] | None = None,
                                where: Mapping[str, Sequence[str]] | None = None) -> SearchResult:
        """allow / deny (external ids) and where (attribute values): a filter for the whole batch; the
        scan then covers only the items it lets through (gathered once per call), so the answer is the
        exact top-k among them."""
        dev = self.items.device
        q = validate_queries(queries, self.dim, k).to(dev)
        excl = self.idmap.exclude_rows(exclude, len(q))
        subset = self.filter_rows(allow, deny, where)
        if subset is not None and excl is not None:
            excl = [positions_in(subset, e) for e in excl]
        if excl is not None:
            excl = [e.to(dev) for e in excl]
        items = self.items if subset is None else self.items[subset.to(dev)]

        nq = len(q)
        small = nq * len(items) <= SMALL_SEARCH_SCORES
        s, rows = self._search_small(q, k, excl, items) if small else self._search_chunked(q, k, excl, items)
        s, rows = s.cpu(), rows.cpu()
        if subset is not None:
            rows = rows_of(subset, rows)
        return self._result(s, rows, torch.ones(nq, dtype=torch.bool), torch.full((nq,), float("-inf")))

    def _search_chunked(self, q: torch.Tensor, k: int, excl: list[torch.Tensor] | None,
                        items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item-major score chunks into one reused buffer, each cut by the group-max pre-selection."""
        nq, dev = len(q), q.device
        if dev.type == "cuda":  # MKL's width quirk is a CPU matter; a GPU wants few, large chunks
            width = nq
            chunk = max(1024, GPU_SCORE_BLOCK_FLOATS // width)
        else:
            width = mm_width(nq)
            chunk = min(self.chunk_size, max(1024, SCORE_BLOCK_FLOATS // width))
        qt = q.T if width == nq else torch.cat([q, q.new_zeros(width - nq, q.shape[1])]).T

        def score(start: int, end: int, out: torch.Tensor) -> None:  # out: (end - start, width)
            torch.mm(items[start:end].float(), qt, out=out)
            mask_excluded(out.T, start, excl)

        return chunked_topk_columns(score, len(items), nq, k, chunk, dtype=q.dtype, device=dev, width=width)

    def _search_small(self, q: torch.Tensor, k: int, excl: list[torch.Tensor] | None,
                      items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All (nq, N) scores at once, then the top k by (score desc, row asc), -1 / -inf padded to k."""
        nq = len(q)
        scores = torch.mm(q, items.float().T)
        mask_excluded(scores, 0, excl)
        s, rows = select_topk(scores, torch.arange(len(items), device=q.device).expand(nq, -1), k)
        if s.shape[1] < k:  # fewer items than k
            pad_s, pad_rows = empty_topk(nq, k - s.shape[1], q.device)
            s, rows = torch.cat([s, pad_s], 1), torch.cat([rows, pad_rows], 1)
        return pad_invalid(s, rows)

    def state(self) -> IndexState:
        return IndexState(self.kind, {"factory": "Flat", "chunk_size": self.chunk_size},
                          {"ids": self.ids.numpy(), "items": self.items.contiguous().cpu().numpy()})

    @classmethod
    def from_state(cls, st: IndexState) -> "FlatMIPS":
        return cls(st.arrays["items"], st.arrays["ids"], chunk_size=st.params.get("chunk_size", 262144))


class FaissMIPS(Index):
    """A faiss index built by ``index_factory(d, factory, METRIC_INNER_PRODUCT)`` (e.g. "IVF1024,Flat",
    "HNSW32"). Search parameters (nprobe, efSearch) go through faiss' ParameterSpace. Approximate:
    ``exact`` is False and no bound is known. Exclusion over-fetches k + |excluded| then filters; allow /
    deny / where filters go to faiss as an IDSelectorBitmap, applied inside its search (an HNSW graph walk
    under a very selective filter can return fewer than k items: faiss' own behaviour)."""

    kind = "mips-faiss"

    def __init__(self, index, ids=None, factory: str = "", search_params: dict | None = None):
        super().__init__(ids, index.ntotal)
        self.index, self.factory = index, factory
        self.search_params = dict(search_params or {})

    @classmethod
    def build(cls, items: np.ndarray, factory: str, ids=None, search_params: dict | None = None, seed: int = 0) -> "FaissMIPS":
        import faiss

        x = np.ascontiguousarray(items, dtype=np.float32)
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            train = x if len(x) <= 262144 else x[np.sort(rng.choice(len(x), 262144, replace=False))]
            index.train(train)
        index.add(x)
        return cls(index, ids, factory, search_params)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def bytes_per_item(self) -> float:
        import faiss

        return len(faiss.serialize_index(self.index)) / max(self.ntotal, 1) + 8

    def search_with_certificate(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                                allow: Sequence[int] | None = None, deny: Sequence[int] | None = None,
                                where: Mapping[str, Sequence[str]] | None = None, **params) -> SearchResult:
        import faiss

        q = validate_queries(queries, self.dim, k).numpy()
        excl = self.idmap.exclude_rows(exclude, len(q))
        ps = faiss.ParameterSpace()
        for name, value in {**self.search_params, **params}.items():
            ps.set_index_parameter(self.index, name, value)
        extra = max((len(e) for e in excl), default=0) if excl else 0
        passing = self.filter_rows(allow, deny, where)
        bitmap = None
        if passing is not None:  # faiss applies the filter inside its search: an IDSelector over rows
            keep = np.zeros(self.ntotal, dtype=bool)
            keep[passing.numpy()] = True
            bitmap = np.packbits(keep, bitorder="little")  # the selector reads it: keep it alive through the search
            d, i = self.index.search(q, k + extra, params=self._filtered(faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))))
        else:
            d, i = self.index.search(q, k + extra)
        scores, rows = torch.from_numpy(d), torch.from_numpy(i)
        scores[rows < 0] = float("-inf")  # faiss pads with -1 / -FLT_MAX (e.g. when a filter passes too few items)
        if excl:
            for r, ex in enumerate(excl):
                scores[r, torch.isin(rows[r], ex)] = float("-inf")
            rows = torch.where(torch.isneginf(scores), torch.full_like(rows, -1), rows)
            scores, rows = select_topk(scores, rows, k)
        rows = torch.where(torch.isneginf(scores) | (rows < 0), torch.full_like(rows, -1), rows)
        nq = len(q)
        return self._result(scores[:, :k], rows[:, :k], torch.zeros(nq, dtype=torch.bool), torch.full((nq,), float("inf")))

    def _filtered(self, selector):
        """Search parameters carrying ``selector`` and the index's current efSearch / nprobe (a parameters
        object replaces what ParameterSpace set on the index, so they are copied in)."""
        import faiss

        if hasattr(self.index, "hnsw"):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.index.hnsw.efSearch)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
        return faiss.SearchParameters(sel=selector)

    def state(self) -> IndexState:
        import faiss

        return IndexState(self.kind, {"factory": self.factory, "search_params": self.search_params},
                          {"ids": self.ids.numpy()}, {"faiss.index": faiss.serialize_index(self.index).tobytes()})

    def vectors_finite(self, block: int = 1 << 16) -> bool:
        """Vectors of a faiss index that stores them (Flat, HNSW-Flat, ...), reconstructed block by block;
        kinds that cannot reconstruct (e.g. IVF without a direct map) count as finite."""
        try:
            return all(np.isfinite(self.index.reconstruct_n(s, min(block, self.ntotal - s))).all()
                       for s in range(0, self.ntotal, block))
        except RuntimeError:
            return True

    @classmethod
    def from_state(cls, st: IndexState) -> "FaissMIPS":
        import faiss

        index = faiss.deserialize_index(np.frombuffer(st.blobs["faiss.index"], dtype=np.uint8))
        return cls(index, st.arrays["ids"], st.params["factory"], st.params.get("search_params"))
