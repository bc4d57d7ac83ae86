"""Stage-1 selection of each query's top-K' items by threshold, for K' far above sorting top-k limits.

A sorting top-k over the whole corpus per chunk costs O(K') state per query and a merge per chunk; at
K' ~ 10^4-10^5 that merge dominates. Instead:

1. score a fixed random sample of m items and take, per query, the score of rank ~ slack * K' * m / N
   inside it: an estimate a little *below* the true K'-th score;
2. scan the corpus chunk by chunk, appending every (score, id) at or above the threshold to a compact
   per-query buffer (the full B x N matrix is never held);
3. overflow (buffer wider than ``capacity_factor * K'``): select the top-K' inside it and raise that
   query's threshold to its K'-th score, which can only be at or below the global K'-th score;
4. at the end, exact top-K' inside the buffer (ties by smaller id). Underflow (fewer than K' kept
   because the estimate was too high): rescan those queries with a lower threshold; after
   ``max_retries`` the threshold is -inf, which keeps everything.

The answer equals the exact top-K' of the stage-1 scores: every item scoring at or above the true K'-th
score is kept whenever the final threshold is at or below it, which underflow detection guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from genrec.retrieval.topk import select_topk

ScoreRange = Callable[[torch.Tensor, int, int], torch.Tensor]  # (queries, start, end) -> (B, end-start)
ScoreRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (queries, rows (m,)) -> (B, m)


@dataclass
class SelectionStats:
    """What the selection did, for logs and benchmarks."""

    retries: int = 0
    compactions: int = 0
    max_buffer: int = 0
    thresholds: list[float] = field(default_factory=list)


def sample_rows(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """A sorted, deterministic random subset of 0..n-1 (int64, at most ``size`` rows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values


def estimate_threshold(sample_scores: torch.Tensor, n: int, kprime: int, slack: float) -> torch.Tensor:
    """sample_scores (B, m) -> (B,) float32: the score of rank ceil(slack * K' * m / n) in the sample
    (-inf when that rank reaches past the sample: keep everything)."""
    m = sample_scores.shape[1]
    rank = math.ceil(slack * kprime * m / n)
    if rank >= m:
        return torch.full((sample_scores.shape[0],), float("-inf"))
    return torch.topk(sample_scores.float(), rank, dim=1).values[:, -1]


def _append_hits(buf_s: torch.Tensor, buf_i: torch.Tensor, s: torch.Tensor, start: int,
                 thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the (score, id) of every s[b, j] >= thr[b] to row b of the buffers (padded -inf / -1)."""
    r, c = (s >= thr[:, None]).nonzero(as_tuple=True)
    if r.numel() == 0:
        return buf_s, buf_i
    counts = torch.bincount(r, minlength=s.shape[0])
    pos = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
    width = int(counts.max())
    new_s = torch.full((s.shape[0], width), float("-inf"))
    new_i = torch.full((s.shape[0], width), -1, dtype=torch.int64)
    new_s[r, pos] = s[r, c].float()
    new_i[r, pos] = c + start
    return torch.cat([buf_s, new_s], 1), torch.cat([buf_i, new_i], 1)


def _scan(queries: torch.Tensor, score_range: ScoreRange, n: int, kprime: int, thr: torch.Tensor,
          chunk_size: int, capacity: int, stats: SelectionStats) -> tuple[torch.Tensor, torch.Tensor]:
    b = queries.shape[0]
    buf_s, buf_i = torch.empty(b, 0), torch.empty(b, 0, dtype=torch.int64)
    thr = thr.clone()
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        buf_s, buf_i = _append_hits(buf_s, buf_i, score_range(queries, start, end), start, thr)
        stats.max_buffer = max(stats.max_buffer, buf_s.shape[1])
        if buf_s.shape[1] > capacity:
            stats.compactions += 1
            buf_s, buf_i = select_topk(buf_s, buf_i, kprime)
            full = buf_i[:, -1] >= 0
            thr = torch.where(full, torch.maximum(thr, buf_s[:, -1]), thr)
    return select_topk(buf_s, buf_i, kprime) if buf_s.shape[1] else (buf_s, buf_i)


def threshold_topk(queries: torch.Tensor, score_range: ScoreRange, score_rows: ScoreRows, n: int, kprime: int,
                   chunk_size: int = 65536, sample_size: int = 16384, slack: float = 1.5,
                   capacity_factor: float = 4.0, max_retries: int = 2, seed: int = 0,
                   stats: SelectionStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K' of stage-1 scores per query, ties by smaller id.

    queries: (B, d) stage-1 query vectors passed through to the score functions.
    Returns scores (B, K') float32 descending and rows (B, K') int64, padded -inf / -1 when K' > n.
    """
    stats = stats if stats is not None else SelectionStats()
    b, kp = queries.shape[0], min(kprime, n)
    capacity = max(int(capacity_factor * kp), kp + 1)
    sample = sample_rows(n, sample_size, seed)
    thr = estimate_threshold(score_rows(queries, sample), n, kp, slack)
    out_s = torch.full((b, kprime), float("-inf"))
    out_i = torch.full((b, kprime), -1, dtype=torch.int64)
    todo = torch.arange(b)
    for attempt in range(max_retries + 1):
        if attempt == max_retries:
            thr = torch.full_like(thr, float("-inf"))
        stats.thresholds.append(float(thr.min()))
        s, i = _scan(queries[todo], score_range, n, kp, thr, chunk_size, capacity, stats)
        got = (i >= 0).sum(1) if i.numel() else torch.zeros(len(todo), dtype=torch.int64)
        done = (got >= kp) | torch.isneginf(thr)
        out_s[todo[done], : s.shape[1]] = s[done]
        out_i[todo[done], : i.shape[1]] = i[done]
        if bool(done.all()):
            break
        stats.retries += 1
        todo, thr = todo[~done], thr[~done]
        # underflow: the estimate sat above the K'-th score; step down the sample ranking
        slack *= 4.0
        thr = estimate_threshold(score_rows(queries[todo], sample), n, kp, slack)
    return out_s, out_i
