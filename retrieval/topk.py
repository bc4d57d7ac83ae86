"""Top-k building blocks with deterministic ties (higher score first, then smaller id) and FAISS
padding (id -1, score -inf when fewer than k valid items exist)."""

from __future__ import annotations

from typing import Callable

import torch


def sort_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (-score, id). scores (B, M) float, ids (B, M) int64; -1 ids sort last."""
    key_ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    order = torch.sort(key_ids, dim=1, stable=True).indices
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), ids.gather(1, order)


def merge_topk(best_scores: torch.Tensor, best_ids: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k (B, k) with new candidates (B, c) -> the new top-k (B, k)."""
    s, i = sort_by_score_then_id(torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1))
    return s[:, :k], i[:, :k]


def empty_topk(batch: int, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((batch, k), float("-inf"), device=device),
            torch.full((batch, k), -1, dtype=torch.int64, device=device))


def pad_invalid(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Results scored -inf (excluded or absent) become id -1, as FAISS reports missing results."""
    return scores, torch.where(torch.isneginf(scores), torch.full_like(ids, -1), ids)


def chunked_topk(score_chunk: Callable[[int, int], torch.Tensor], num_items: int, batch: int, k: int,
                 chunk_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over items 0..num_items-1 scored chunk by chunk: ``score_chunk(start, end)`` -> (B, end-start).

    Memory stays O(B * (k + chunk_size)); the full (B, N) score matrix is never built.
    """
    best_s, best_i = empty_topk(batch, k, device)
    for start in range(0, num_items, chunk_size):
        end = min(start + chunk_size, num_items)
        s = score_chunk(start, end)
        ids = torch.arange(start, end, device=s.device).expand(batch, -1)
        best_s, best_i = merge_topk(best_s, best_i, s, ids, k)
    return pad_invalid(best_s, best_i)


def mask_excluded(scores: torch.Tensor, start: int, exclude: list[torch.Tensor] | None) -> torch.Tensor:
    """Set scores of excluded item ids (per query, absolute ids) inside [start, start + c) to -inf."""
    if not exclude:
        return scores
    c = scores.shape[1]
    for row, ids in enumerate(exclude):
        local = ids[(ids >= start) & (ids < start + c)] - start
        if local.numel():
            scores[row, local] = float("-inf")
    return scores


def unique_rows(ids: torch.Tensor) -> torch.Tensor:
    """(B, M) int64 with duplicates and -1s -> (B, M') sorted unique ids per row, padded with -1."""
    s = torch.sort(ids, dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s = torch.where(dup | (s < 0), torch.full_like(s, -1), s)
    key = torch.where(s < 0, torch.iinfo(torch.int64).max, s)
    s = s.gather(1, torch.sort(key, dim=1).indices)
    width = int((s >= 0).sum(1).max()) if s.numel() else 0
    return s[:, : max(width, 1)]
