"""Top-k building blocks with deterministic ties (higher score first, then smaller id) and FAISS
padding (id -1, score -inf when fewer than k valid items exist)."""

from __future__ import annotations

from typing import Callable

import torch


MAX_ID = 2**31 - 2  # ids must fit the low 32 bits of the ranking key


def ranking_key(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """An int64 key whose descending order is (score descending, id ascending, id -1 last).

    scores: float (any float dtype; compared as float32), ids: int64 in [-1, MAX_ID], same shape.
    High 32 bits: the float32 bit pattern made order-preserving as a signed int (negative floats have
    their magnitude bits flipped; -0.0 is folded into +0.0 first). Low 32 bits: MAX_ID + 1 - id, so a
    smaller id ranks higher, and 0 for id -1. NaN scores are not supported.
    """
    bits = (scores.float() + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    low = torch.where(ids < 0, 0, MAX_ID + 1 - ids)
    return (bits << 32) + low


def _sort_by_key(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.topk(ranking_key(scores, ids), k, dim=1, sorted=True).indices
    return scores.gather(1, order), ids.gather(1, order)


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, order_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row by (score desc, id asc): scores (B, M) float, ids (B, M) int64 -> (B, min(k, M)) each.

    A plain float ``torch.topk`` of k + 1 picks the set and shows whether it is ambiguous: only where the
    (k+1)-th score equals the k-th (a tie across the cut, so the set depends on ids) is the row redone on
    the packed int64 key. The k winners are then ordered by the key. Cost: one top-k over the row, no
    further pass over it. ``order_ties=False`` skips that last ordering: the set is the same and scores
    still descend, but equal scores keep no id order (for callers that re-sort, e.g. by row).
    """
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        if not order_ties:
            s, order = torch.sort(scores, dim=1, descending=True)
            return s, ids.gather(1, order)
        return _sort_by_key(scores, ids, k)
    top_s, idx = torch.topk(scores, k + 1, dim=1, sorted=True)
    tied = (top_s[:, k] == top_s[:, k - 1]).nonzero().squeeze(1)
    top_s, top_i = top_s[:, :k].contiguous(), ids.gather(1, idx[:, :k])
    if tied.numel():
        top_s[tied], top_i[tied] = _sort_by_key(scores[tied], ids[tied], k)
    return _sort_by_key(top_s, top_i, k) if order_ties else (top_s, top_i)


def sort_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (-score, id). scores (B, M) float, ids (B, M) int64; -1 ids sort last."""
    return select_topk(scores, ids, scores.shape[1])


def merge_topk(best_scores: torch.Tensor, best_ids: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k (B, k) with new candidates (B, c) -> the new top-k (B, k)."""
    if scores.shape[1] > k:  # cut the chunk to its own top-k first: the merge then sorts 2k, not k + c
        scores, ids = select_topk(scores, ids, k)
    return select_topk(torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1), k)


def empty_topk(batch: int, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((batch, k), float("-inf"), device=device),
            torch.full((batch, k), -1, dtype=torch.int64, device=device))


def pad_invalid(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Results scored -inf (excluded or absent) become id -1, as FAISS reports missing results."""
    return scores, torch.where(torch.isneginf(scores), torch.full_like(ids, -1), ids)


class _RunningTopk:
    """The survivors of chunk-by-chunk top-k: each chunk's own top-k is kept and they are merged only
    when they outgrow ``max(chunk_size, 4k)`` columns. Memory O(B * (k + chunk_size))."""

    def __init__(self, batch: int, k: int, chunk_size: int, device: torch.device | None):
        pad_s, pad_i = empty_topk(batch, k, device)  # guarantees k columns when there are fewer items
        self.k, self.kept_s, self.kept_i = k, [pad_s], [pad_i]
        self.width, self.limit = k, max(chunk_size, 4 * k)

    def add(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        self.kept_s.append(scores)
        self.kept_i.append(ids)
        self.width += scores.shape[1]
        if self.width > self.limit:
            merged_s, merged_i = select_topk(torch.cat(self.kept_s, 1), torch.cat(self.kept_i, 1), self.k)
            self.kept_s, self.kept_i, self.width = [merged_s], [merged_i], self.k

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_invalid(*select_topk(torch.cat(self.kept_s, 1), torch.cat(self.kept_i, 1), self.k))


def chunked_topk(score_chunk: Callable[[int, int], torch.Tensor], num_items: int, batch: int, k: int,
                 chunk_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over items 0..num_items-1 scored chunk by chunk: ``score_chunk(start, end)`` -> (B, end-start).

    Each chunk is cut to its own top-k at once (while its scores are still in cache); the survivors are
    merged only when they outgrow ``max(chunk_size, 4k)`` columns. ``score_chunk`` may return a view of
    one buffer it reuses for every chunk. Memory stays O(B * (k + chunk_size));
    the full (B, N) score matrix is never built.
    """
    running = _RunningTopk(batch, k, chunk_size, device)
    for start in range(0, num_items, chunk_size):
        end = min(start + chunk_size, num_items)
        s = score_chunk(start, end)
        ids = torch.arange(start, end, device=s.device).expand(batch, -1)
        running.add(*(select_topk(s, ids, k) if s.shape[1] > k else (s.clone(), ids)))  # s may be a reused buffer
    return running.result()


GROUP = 64  # items per group in the group-max pre-selection


def column_block_topk(block: torch.Tensor, start: int, k: int, group: int = GROUP,
                      batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each of the first ``batch`` (default all) columns of a (C, W) score block (item rows
    start..start+C-1, one column per query) -> (batch, min(k, C)) scores and ids, exactly as
    ``select_topk`` on the transposed block.

    C must be a multiple of ``group``. The rows are cut into groups; only the k+1 groups with the
    largest maxima are read again. That holds every score >= the (k+1)-th best whenever the (k+1)-th
    group maximum is strictly above the (k+2)-th (then each group left out has a maximum below the
    (k+1)-th best score), so ties are resolved on the same candidates. A column whose group cut is
    tied is redone on the whole column. Cost: one max over the block instead of a top-k over it, which
    on CPU is ~6x cheaper.
    """
    c, width = block.shape
    b = batch or width
    if c % group:
        raise ValueError(f"column_block_topk: {c} rows is not a multiple of group {group}")
    full, block = block, block[:, :b]
    if c // group < k + 2:
        return select_topk(block.T, torch.arange(start, start + c, device=block.device).expand(b, -1), k)
    group_max = _group_max(full.view(c // group, group, width))[:, :b]  # (C / group, B); all W columns: see _group_max
    top_max, top_group = torch.topk(group_max, k + 2, dim=0)  # (k + 2, B)
    rows = (top_group[: k + 1].T.unsqueeze(2) * group
            + torch.arange(group, device=block.device)).reshape(b, -1)  # (B, (k + 1) * group)
    s, i = select_topk(block.T.gather(1, rows), rows + start, k)
    tied = (top_max[k] == top_max[k + 1]).nonzero().squeeze(1)
    if tied.numel():
        ids = torch.arange(start, start + c, device=block.device).expand(len(tied), -1)
        s[tied], i[tied] = select_topk(block.T[tied], ids, k)
    return s, i


def _group_max(groups: torch.Tensor) -> torch.Tensor:
    """(G, group, B) -> (G, B) max over each group. torch's strided max over the middle dim is fast on CPU
    only when B is 1 or a multiple of 32 (measured ~25x slower at B = 8..31); otherwise halve the group
    with elementwise maxima, whose loads are contiguous whatever B is."""
    b = groups.shape[2]
    if b == 1 or b % 32 == 0 or groups.shape[1] & (groups.shape[1] - 1):
        return groups.amax(1)
    while groups.shape[1] > 1:
        half = groups.shape[1] // 2
        groups = torch.maximum(groups[:, :half], groups[:, half:])
    return groups[:, 0]


def chunked_topk_columns(score_block: Callable[[int, int, torch.Tensor], None], num_items: int, batch: int, k: int,
                         chunk_size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                         width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_topk`` for scores produced item-major: ``score_block(start, end, out)`` writes the
    (end - start, width) scores of items start..end-1 into ``out`` (e.g. ``torch.mm(items, q.T, out=out)``,
    which on CPU runs ~1.5x faster than the query-major product at small B); only the first ``batch``
    columns (default width = batch) are ranked. Each chunk is reduced by ``column_block_topk``; rows past
    ``end`` up to the next multiple of ``GROUP`` score -inf (their ids come back as -1 if ever selected).
    chunk_size is rounded up to a multiple of ``GROUP``."""
    width = width or batch
    chunk_size = -(-chunk_size // GROUP) * GROUP
    buffer = torch.empty(min(chunk_size, -(-num_items // GROUP) * GROUP) * width, dtype=dtype, device=device)
    running = _RunningTopk(batch, k, chunk_size, device)
    for start in range(0, num_items, chunk_size):
        end = min(start + chunk_size, num_items)
        padded = -(-(end - start) // GROUP) * GROUP
        block = buffer[: padded * width].view(padded, width)
        score_block(start, end, block[: end - start])
        block[end - start:] = float("-inf")
        running.add(*column_block_topk(block, start, k, batch=batch))
    return running.result()


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


def ascending_rows(rows: torch.Tensor) -> torch.Tensor:
    """(B, M) int64 rows already distinct per row (-1 = none) -> each row ascending, -1s last; one sort
    and no host sync (``unique_rows`` also drops duplicates and trims the width)."""
    top = torch.iinfo(torch.int64).max
    s = torch.sort(torch.where(rows < 0, top, rows), dim=1).values
    return torch.where(s == top, -1, s)


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
