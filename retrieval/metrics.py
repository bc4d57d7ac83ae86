"""Full-corpus ranking metrics: HR@k, NDCG@k, MRR from the rank of each held-out target."""

from __future__ import annotations

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all candidates, ties broken by smaller item id.

    scores (B, N) float with excluded items at -inf; targets (B,) int64 column indices.
    Returns (B,) int64. Matches the order of a top-k that sorts by (-score, id).
    """
    t = scores.gather(1, targets[:, None])
    ids = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > t) | ((scores == t) & (ids < targets[:, None]))
    return ahead.sum(1)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] | list[int]) -> dict[str, float]:
    """ranks (U,) 0-based -> {"hr@k", "ndcg@k" for k in ks, "mrr"} averaged over users."""
    r = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
    out["mrr"] = (1.0 / (r + 1.0)).mean().item()
    return out


def recall_at(approx, exact, k: int) -> float:
    """Approximate vs exact top-k id lists, (nq, >= k) int64 arrays: mean |approx[:k] ∩ exact[:k]| / k
    (ties by id are already in the lists; exact ids -1, i.e. fewer than k items, do not count)."""
    vals = []
    for a, e in zip(approx[:, :k], exact[:, :k]):
        e = e[e >= 0]
        vals.append(len(set(a.tolist()) & set(e.tolist())) / max(len(e), 1))
    return float(sum(vals) / max(len(vals), 1))


def top1_in(approx, exact) -> float:
    """RAILS-style recall: the share of queries whose exact top-1 id is anywhere in the approximate list."""
    hits = [e[0] in set(a.tolist()) for a, e in zip(approx, exact)]
    return float(sum(hits) / max(len(hits), 1))
