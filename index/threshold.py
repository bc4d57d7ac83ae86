"""Stage-1 selection of each query's top-K' items by threshold, for K' far above sorting top-k limits.

A sorting top-k over the whole corpus per chunk costs O(K') state per query and a merge per chunk; at
K' ~ 10^4-10^5 that merge dominates. Instead:

1. score a fixed random sample of m items and take, per query, the score of rank ~ slack * K' * m / N
   inside it: an estimate a little *below* the true K'-th score;
2. scan the corpus chunk by chunk, appending every (score, id) at or above the threshold to a compact
   per-query buffer (the full B x N matrix is never held);
3. buffer wider than ``capacity_factor * K'``: select the top-K' inside it and raise that query's
   threshold to its K'-th score, which can only be at or below the global K'-th score;
4. at the end, exact top-K' inside the buffer (ties by smaller id). Underflow (fewer than K' kept
   because the estimate was too high): rescan those queries with a lower threshold. Overflow of a
   fixed per-chunk buffer (the GPU kernel's ``chunk_capacity``): rescan with a higher one. After
   ``max_retries`` the threshold is -inf, which keeps everything.

The chunk scan itself is ``kernels.dispatch.stage1_threshold_scan``: PyTorch on CPU, one fused
Triton kernel on GPU.

The answer equals the exact top-K' of the stage-1 scores: every item scoring at or above the true K'-th
score is kept whenever the final threshold is at or below it, which underflow detection guarantees.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from genrec.kernels.topk import ascending_rows, ranking_key, select_topk

# (queries, start, end, thresholds (B,), capacity | None) -> (scores (B, W), ids (B, W), counts (B,)):
# every item of start..end-1 scoring >= its query's threshold (kernels.dispatch.stage1_threshold_scan)
ScanRange = Callable[[torch.Tensor, int, int, torch.Tensor, "int | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
ScoreSample = Callable[[torch.Tensor], torch.Tensor]  # queries -> (B, m) scores of a fixed random sample


@dataclass
class SelectionStats:
    """What the selection did, for logs and benchmarks."""

    retries: int = 0
    static_fallbacks: int = 0  # queries the one-pass static selection handed to threshold_topk
    overflows: int = 0
    compactions: int = 0
    max_buffer: int = 0
    thresholds: list[float] = field(default_factory=list)


@functools.lru_cache(maxsize=64)  # filtered searches ask for the same (n, size) every call: a randperm of n each
def sample_rows(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """A sorted, deterministic random subset of 0..n-1 (int64, at most ``size`` rows; shared: do not modify)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values


def estimate_threshold(sample_scores: torch.Tensor, n: int, kprime: int, slack: torch.Tensor) -> torch.Tensor:
    """sample_scores (B, m), slack (B,) -> (B,) float32: per query the score of rank
    ceil(slack * K' * m / n) in the sample; -inf where that rank reaches past the sample (keep all)."""
    m = sample_scores.shape[1]
    rank = torch.ceil(slack.double() * kprime * m / n).long().clamp(min=1)
    top = torch.topk(sample_scores.float(), int(rank.clamp(max=m).max()), dim=1).values
    thr = top.gather(1, (rank.clamp(max=m) - 1)[:, None]).squeeze(1)
    return torch.where(rank >= m, torch.full_like(thr, float("-inf")), thr)


def _scan(queries: torch.Tensor, scan: ScanRange, n: int, kprime: int, thr: torch.Tensor, chunk_size: int,
          capacity: int, chunk_capacity: int | None, stats: SelectionStats, order_ties: bool = True):
    """One pass over the corpus -> (top-K' scores, ids, overflowed (B,) bool)."""
    b, dev = queries.shape[0], queries.device
    buf_s, buf_i = torch.empty(b, 0, device=dev), torch.empty(b, 0, dtype=torch.int64, device=dev)
    overflow = torch.zeros(b, dtype=torch.bool, device=dev)
    thr = thr.clone()
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        s, i, counts = scan(queries, start, end, thr, chunk_capacity)
        overflow |= counts > s.shape[1]
        if s.shape[1]:
            buf_s, buf_i = torch.cat([buf_s, s.float()], 1), torch.cat([buf_i, i], 1)
        stats.max_buffer = max(stats.max_buffer, buf_s.shape[1])
        if buf_s.shape[1] > capacity:
            stats.compactions += 1
            buf_s, buf_i = select_topk(buf_s, buf_i, kprime, order_ties=False)  # scores still descend
            full = buf_i[:, -1] >= 0
            thr = torch.where(full, torch.maximum(thr, buf_s[:, -1]), thr)
    s, i = select_topk(buf_s, buf_i, kprime, order_ties) if buf_s.shape[1] else (buf_s, buf_i)
    return s, i, overflow


def threshold_topk(queries: torch.Tensor, scan: ScanRange, score_sample: ScoreSample, n: int, kprime: int,
                   chunk_size: int = 65536, slack: float = 1.5, capacity_factor: float = 4.0,
                   chunk_capacity: int | None = None, max_retries: int = 2,
                   stats: SelectionStats | None = None, final_chunk_size: int | None = None,
                   order_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K' of stage-1 scores per query, ties by smaller id.

    queries: (B, d) stage-1 query vectors passed through to ``scan`` and ``score_sample`` (a scorer of
    a fixed uniform sample of the corpus, drawn once by the caller). chunk_capacity: a fixed per-query
    buffer for each scanned chunk (a GPU kernel's); a query whose hits overflow it is rescanned with a
    higher threshold. Returns scores (B, K') float32 descending and rows (B, K') int64, padded
    -inf / -1 when K' > n.
    """
    stats = stats if stats is not None else SelectionStats()
    b, kp, dev = queries.shape[0], min(kprime, n), queries.device
    capacity = max(int(capacity_factor * kp), kp + 1)
    slack_q = torch.full((b,), float(slack), device=dev)
    sample_scores = score_sample(queries)
    thr = estimate_threshold(sample_scores, n, kp, slack_q)
    out_s = torch.full((b, kprime), float("-inf"), device=dev)
    out_i = torch.full((b, kprime), -1, dtype=torch.int64, device=dev)
    todo = torch.arange(b, device=dev)
    for attempt in range(max_retries + 1):
        last = attempt == max_retries
        if last:  # keep everything; with a bounded chunk buffer, that buffer must hold a whole chunk
            thr = torch.full_like(thr, float("-inf"))
            chunk_capacity = None
            chunk_size = final_chunk_size or chunk_size
        stats.thresholds.append(float(thr.min()))
        s, i, overflow = _scan(queries if attempt == 0 else queries[todo], scan, n, kp, thr, chunk_size, capacity,
                               chunk_capacity, stats, order_ties)
        got = (i >= 0).sum(1) if i.numel() else torch.zeros(len(todo), dtype=torch.int64, device=dev)
        done = ((got >= kp) | torch.isneginf(thr)) & ~overflow
        if bool(done.all()):
            if attempt == 0:  # the common case: no boolean indexing (each costs a host sync on a GPU)
                out_s[:, : s.shape[1]], out_i[:, : i.shape[1]] = s, i
            else:
                out_s[todo, : s.shape[1]], out_i[todo, : i.shape[1]] = s, i
            break
        out_s[todo[done], : s.shape[1]] = s[done]
        out_i[todo[done], : i.shape[1]] = i[done]
        stats.retries += 1
        stats.overflows += int(overflow.sum())
        # overflow: the estimate sat far below the K'-th score, step up; underflow: above it, step down
        slack_q[todo] = torch.where(overflow, slack_q[todo] / 4, slack_q[todo] * 4)
        todo = todo[~done]
        thr = estimate_threshold(sample_scores[todo], n, kp, slack_q[todo])
    return out_s, out_i


def static_threshold_topk(queries: torch.Tensor, scan: ScanRange, score_sample: ScoreSample, n: int, kprime: int,
                          slack: float = 1.5, capacity_factor: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of :func:`threshold_topk` with static shapes and no host reads (CUDA-graph safe).

    The threshold rank in the sample is a host constant (ceil(slack * K' * m / n)), the whole corpus is
    one ``scan`` into a fixed buffer of ``capacity_factor * K'`` hits per query, and the K' best hits are
    picked by the packed (score, id) key, so nothing depends on how many items passed. Returns rows
    (B, K') int64 ascending (-1 last) and ok (B,) bool: False where the buffer overflowed or held fewer
    than K' hits; those rows are not the exact top-K' and the caller redoes them with ``threshold_topk``.
    """
    b, kp, dev = queries.shape[0], min(kprime, n), queries.device
    sample_scores = score_sample(queries)
    m = sample_scores.shape[1]
    rank = math.ceil(slack * kp * m / n)
    if rank >= m:  # the sample cannot place the cut: keep everything
        thr, capacity = torch.full((b,), float("-inf"), device=dev), n
    else:
        thr = torch.topk(sample_scores, rank, dim=1).values[:, rank - 1]
        capacity = min(n, max(int(capacity_factor * kp), kp + 1))
    hit_s, hit_i, counts = scan(queries, 0, n, thr, capacity)
    best = torch.topk(ranking_key(hit_s, hit_i), kp, dim=1, sorted=False).indices
    ok = (counts >= kp) & (counts <= capacity)
    return ascending_rows(hit_i.gather(1, best)), ok
