"""PyTorch reference for MoL stage 2 (the CPU path and the kernel's oracle)."""

from __future__ import annotations

import torch

from genrec.retrieval.mol import ItemCache, MixtureOfLogits, QueryState


def mol_candidate_scores_reference(mol: MixtureOfLogits, q: QueryState, cache: ItemCache,
                                   cand: torch.Tensor | None) -> torch.Tensor:
    """Exact MoL scores (B, C) float32 of query b against cache rows cand[b] (B, C) int64, -1 = no
    candidate (scores -inf); cand None scores every cached item: (B, N)."""
    if cand is None:
        return mol.score(q, cache).float()
    items = cache.take(cand.clamp(min=0).reshape(-1))
    return mol.score(q, items, aligned=True).float().masked_fill(cand < 0, float("-inf"))
