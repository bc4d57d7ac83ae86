"""PyTorch reference for MoL stage 2 (the CPU path and the kernel's oracle): the same arithmetic as
``MixtureOfLogits.score`` in eval mode, on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.kernels.mol_state import ItemCache, MoLGating, QueryState


def mol_scores(gating: MoLGating, q: QueryState, items: ItemCache, aligned: bool = False) -> torch.Tensor:
    """phi (B, N) of every query against every item, or (B, R) when ``aligned`` and items holds R rows
    per query (B * R rows, query-major). Computed in the query components' dtype."""
    f = q.components
    g = items.components.to(f.dtype)
    px, dp = g.shape[1], g.shape[2]
    if aligned:
        logits = torch.einsum("bid,brjd->brij", f, g.view(len(q), -1, px, dp)).flatten(2) / gating.tau
        b = items.gate.to(logits.dtype).view(len(q), -1, items.gate.shape[-1])
    else:
        logits = torch.einsum("bid,njd->bnij", f, g).flatten(2) / gating.tau
        b = items.gate.to(logits.dtype).unsqueeze(0)
    pair = F.linear(F.silu(F.linear(logits, gating.w1, gating.b1)), gating.w2, gating.b2)
    pi = torch.softmax(F.silu(q.gate.unsqueeze(1) * b + pair), dim=-1)
    return (pi * logits).sum(-1)


def mol_candidate_scores_reference(gating: MoLGating, q: QueryState, cache: ItemCache,
                                   cand: torch.Tensor | None) -> torch.Tensor:
    """Exact MoL scores (B, C) float32 of query b against cache rows cand[b] (B, C) int64, -1 = no
    candidate (scores -inf); cand None scores every cached item: (B, N)."""
    if cand is None:
        return mol_scores(gating, q, cache).float()
    items = cache.take(cand.clamp(min=0).reshape(-1))
    return mol_scores(gating, q, items, aligned=True).float().masked_fill(cand < 0, float("-inf"))
