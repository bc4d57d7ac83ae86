"""Full-corpus ranking metrics: HR@k, NDCG@k, MRR from the rank of each held-out target; per-user values and a
paired bootstrap to compare two systems on the same users; recall of approximate top-k lists."""

from __future__ import annotations

import numpy as np
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


def per_user_metric(ranks, metric: str):
    """Each user's contribution to a metric: ranks (U,) 0-based int array -> float64 (U,) array whose mean is
    ``metrics_from_ranks(ranks)[metric]``; metric is "hr@k", "ndcg@k" or "mrr"."""
    r = np.asarray(ranks, dtype=np.float64)
    name, _, k = metric.partition("@")
    if metric == "mrr":
        return 1.0 / (r + 1.0)
    if name in ("hr", "ndcg") and k.isdigit():
        hit = r < int(k)
        return hit.astype(np.float64) if name == "hr" else np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}: expected hr@k, ndcg@k or mrr")


def paired_bootstrap(a, b, num_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over paired units (users) with a percentile bootstrap interval over the units.

    a, b: float (U,) per-user values of two systems on the same users in the same order. Returns delta (the
    observed mean difference), lo / hi (the ``level`` interval) and p (two-sided: twice the smaller share of
    resampled means on either side of zero, capped at 1).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    for lo in range(0, num_resamples, 1000):  # bounded memory: 1000 x U indices at a time
        n = min(1000, num_resamples - lo)
        means[lo : lo + n] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    p = min(1.0, 2.0 * min((means <= 0).mean(), (means >= 0).mean()))
    return {"delta": float(d.mean()), "lo": float(np.quantile(means, tail)), "hi": float(np.quantile(means, 1 - tail)),
            "p": float(p)}


def paired_metric(ranks_a, ranks_b, metric: str, num_resamples: int = 10_000) -> dict[str, float]:
    """Two systems on the same users: ranks_a, ranks_b are lists (one per seed) of (U,) 0-based rank arrays.
    Each user's ``metric`` is averaged over that system's seeds, then compared user by user: a and b (the
    means over users), delta = a - b with its bootstrap 95% interval lo / hi and p (``paired_bootstrap``),
    and ratio = a / b (nan when b is 0)."""
    a = np.mean([per_user_metric(r, metric) for r in ranks_a], axis=0)
    b = np.mean([per_user_metric(r, metric) for r in ranks_b], axis=0)
    stats = paired_bootstrap(a, b, num_resamples=num_resamples)
    return {"a": float(a.mean()), "b": float(b.mean()), **stats,
            "ratio": float(a.mean() / b.mean()) if b.mean() > 0 else float("nan")}


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
