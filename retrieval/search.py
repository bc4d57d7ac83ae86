"""FAISS-shaped top-k search under a learned similarity: ``scores, ids = searcher.search(queries, k)``.

Methods (all return the exact MoL scores of what they return):
  exact               chunked scan of the whole corpus with a running top-k.
  topk_per_embedding  per (query component i, item component j) dot-product top-``budget``; exact MoL on
                      the union. Carries a certificate: any missed item scores at most
                      bound = max_ij (budget-th best l_ij), so the answer is provably exact when the k-th
                      returned score is above it.
  topk_avg            one MIPS of sum_i f_i(u) against mean_j g_j(x), top-``budget``; exact MoL on those.
  combined            union of the two candidate sets (certificate from the per-embedding part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from genrec.kernels.dispatch import mol_candidate_scores
from genrec.retrieval.ids import IdMap
from genrec.retrieval.mol import ItemCache, MixtureOfLogits, MoLGating, QueryState, topk_avg_vectors
from genrec.kernels.topk import (chunked_topk, empty_topk, mask_excluded, merge_topk, pad_invalid, select_topk,
                                   unique_rows)

Method = Literal["exact", "topk_per_embedding", "topk_avg", "combined"]
METHODS = ("exact", "topk_per_embedding", "topk_avg", "combined")
CERTIFICATE_MARGIN = 1e-4  # relative; logits are bounded by 1/tau, so this is far above float32 rounding


@dataclass
class SearchResult:
    """scores (nq, k) float32 descending, ids (nq, k) int64 (-1 / -inf padded);
    exact (nq,) bool: provably the exact top-k; bound (nq,) float32: no missed item scores above it
    (-inf when exact by construction, +inf when the method gives no bound)."""

    scores: np.ndarray
    ids: np.ndarray
    exact: np.ndarray
    bound: np.ndarray


def validate_queries(queries, dim: int, k: int) -> torch.Tensor:
    """Check a query batch the way users of FAISS expect errors; returns a float32 (nq, dim) tensor."""
    if isinstance(queries, torch.Tensor):
        q = queries.detach().cpu()
        if not torch.is_floating_point(q):
            raise ValueError(f"queries must be floating point, got dtype {q.dtype}")
        q = q.float()
    else:
        arr = np.asarray(queries)
        if arr.dtype.kind != "f":
            raise ValueError(f"queries must be floating point, got dtype {arr.dtype}")
        q = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if q.dim() != 2:
        raise ValueError(f"queries must be 2-D (nq, {dim}), got shape {tuple(q.shape)}")
    if q.shape[0] == 0:
        raise ValueError("empty query batch (nq = 0)")
    if q.shape[1] != dim:
        raise ValueError(f"query dim {q.shape[1]} does not match the index dim {dim}")
    finite = np.isfinite(q.numpy()).all(1)  # numpy: no tensor op (and no host read) on the search path
    if not finite.all():
        raise ValueError(f"queries contain NaN or Inf (first at row {int(np.flatnonzero(~finite)[0])})")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return q


class MoLSearcher:
    """Top-k MoL search over a fixed corpus whose item-side state is cached once.

    mol: a trained :class:`MixtureOfLogits` (put in eval mode here). items: (N, D_x) item embeddings or a
    prebuilt :class:`ItemCache`. ids: optional (N,) int64 external ids (default 0..N-1).
    """

    def __init__(self, mol: MixtureOfLogits, items: torch.Tensor | ItemCache, ids: Sequence[int] | np.ndarray | None = None,
                 chunk_size: int = 8192, cache_dtype: torch.dtype = torch.float32):
        self.mol = mol.eval()
        self.gating = mol.gating()
        with torch.no_grad():
            cache = items if isinstance(items, ItemCache) else mol.encode_items(torch.as_tensor(items, dtype=torch.float32))
        self.cache = ItemCache(cache.components.to(cache_dtype), cache.gate.to(cache_dtype))
        self.avg_items = topk_avg_vectors(self.cache.components, query=False).to(cache_dtype)  # (N, d_P)
        self.ntotal = len(self.cache)
        self.idmap = IdMap(ids, self.ntotal)
        self.ids = self.idmap.ids
        self.chunk_size = chunk_size
        self.query_dim = mol.query_mlp[0].gate.in_features

    # ---- public API ----
    def search(self, queries, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """queries (nq, D_q) float -> (scores (nq, k) float32, ids (nq, k) int64)."""
        r = self.search_with_certificate(queries, k, **kwargs)
        return r.scores, r.ids

    @torch.no_grad()
    def search_with_certificate(self, queries, k: int, method: Method = "exact", budget: int = 1024,
                                avg_budget: int | None = None, exclude: list[Sequence[int]] | None = None) -> SearchResult:
        """exclude: per query, external ids never to return (e.g. the user's history)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"budget must be a positive integer, got {budget!r}")
        u = validate_queries(queries, self.query_dim, k)
        excl = self.idmap.exclude_rows(exclude, len(u))
        q = self.mol.encode_queries(u)
        if method == "exact":
            scores, rows = self._exact(q, k, excl)
            exact = torch.ones(len(u), dtype=torch.bool)
            bound = torch.full((len(u),), float("-inf"))
        else:
            parts, bound = [], torch.full((len(u),), float("inf"))
            if method in ("topk_per_embedding", "combined"):
                cand, bound = self._per_embedding_candidates(q, budget)
                parts.append(cand)
            if method in ("topk_avg", "combined"):
                parts.append(self._avg_candidates(q, avg_budget or budget))
            scores, rows = self._rescore(q, unique_rows(torch.cat(parts, 1)), k, excl)
            # phi and the scanned l_ij come from different reductions: demand a margin over rounding.
            slack = torch.where(torch.isfinite(bound), CERTIFICATE_MARGIN * bound.abs().clamp(min=1.0), 0.0)
            exact = scores[:, -1] > bound + slack
        return SearchResult(scores.float().numpy(), self.idmap.external(rows).numpy(), exact.numpy(), bound.float().numpy())

    # ---- internals (row = internal 0..N-1 index) ----
    def _exact(self, q: QueryState, k: int, excl) -> tuple[torch.Tensor, torch.Tensor]:
        def score(start: int, end: int) -> torch.Tensor:
            return mask_excluded(mol_candidate_scores(self.gating, q, self.cache.slice(start, end), None), start, excl)

        return chunked_topk(score, self.ntotal, len(q), k, self.chunk_size)

    def _per_embedding_candidates(self, q: QueryState, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Union over (i, j) of the top-``budget`` items by l_ij; the certificate bound in logit units."""
        b, p = len(q), self.mol.num_logits
        budget = min(budget, self.ntotal)

        def score(start: int, end: int) -> torch.Tensor:  # one row per (query, logit): (B * P, c)
            logits = self.mol.logits(q, self.cache.slice(start, end)).float()  # (B, c, P)
            return logits.permute(0, 2, 1).reshape(b * p, -1)

        best_s, best_i = chunked_topk(score, self.ntotal, b * p, budget, self.chunk_size)
        # An item outside every per-(i,j) list has l_ij <= that list's last score for all (i,j), and
        # phi <= max_ij l_ij, so it cannot score above the largest of those last scores. A full list
        # (budget = N) misses nothing.
        kth = best_s[:, -1].reshape(b, p)
        bound = kth.max(1).values if budget < self.ntotal else torch.full((b,), float("-inf"))
        return best_i.reshape(b, p * budget), bound

    def _avg_candidates(self, q: QueryState, budget: int) -> torch.Tensor:
        query = topk_avg_vectors(q.components, query=True)  # (B, d_P)
        budget = min(budget, self.ntotal)

        def score(start: int, end: int) -> torch.Tensor:
            return query @ self.avg_items[start:end].float().T

        return chunked_topk(score, self.ntotal, len(q), budget, self.chunk_size)[1]

    def _rescore(self, q: QueryState, cand: torch.Tensor, k: int, excl) -> tuple[torch.Tensor, torch.Tensor]:
        return rescore_candidates(self.gating, q, self.cache, cand, k, excl, max(1, self.chunk_size // 4))


def rescore_candidates(gating: MoLGating, q: QueryState, cache: ItemCache, cand: torch.Tensor, k: int,
                       excl: list[torch.Tensor] | None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MoL of each query against its own candidate rows, top-k.

    gating: the MoL's frozen weights (``MixtureOfLogits.gating()``); cand (B, C) int64 internal rows, -1 = none (sorted ascending per row gathers memory in order);
    excl: per query rows never to return. Returns (B, k) float32 scores and rows, -inf / -1 padded.
    """
    def scores(rows: torch.Tensor) -> torch.Tensor:  # -inf where rows < 0 or excluded
        s = mol_candidate_scores(gating, q, cache, rows)
        for r, ex in enumerate(excl or []):
            if ex.numel():
                s[r, torch.isin(rows[r], ex)] = float("-inf")
        return s

    if k <= cand.shape[1] <= chunk:  # one call: a single top-k, no merge
        return pad_invalid(*select_topk(scores(cand), cand, k))
    best_s, best_i = empty_topk(len(q), k, cand.device)
    for start in range(0, cand.shape[1], chunk):
        rows = cand[:, start : start + chunk]
        best_s, best_i = merge_topk(best_s, best_i, scores(rows), rows, k)
    return pad_invalid(best_s, best_i)
