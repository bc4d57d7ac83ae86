"""Stage-1 threshold scan, PyTorch reference (the CPU path and the test oracle of the Triton kernel).

For queries qv (B, d) and item codes (n, d), keep every (score, id) with score = <qv_b, codes_j> at or
above thr_b in a compact per-query buffer. Codes may be float32, bfloat16 or int8 (the per-dimension
int8 scales are folded into qv by the caller); scores accumulate in float32.
"""

from __future__ import annotations

import torch
from genrec.kernels.topk import chunked_topk


def stage1_threshold_scan_reference(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                                    id_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qv (B, d) float32, codes (n, d), thr (B,) float32 -> (scores (B, W) float32, ids (B, W) int64,
    counts (B,) int64).

    counts[b] is the number of items at or above thr[b], even past ``capacity`` (overflow: the caller
    must retry that query). Buffers hold min(counts, capacity) hits in ascending id order, padded with
    -inf / -1; W = capacity, or the largest count when capacity is None (never overflows).
    """
    s = qv.float() @ codes.float().T
    r, c = (s >= thr[:, None]).nonzero(as_tuple=True)
    counts = torch.bincount(r, minlength=s.shape[0])
    pos = torch.arange(r.numel(), device=s.device) - (torch.cumsum(counts, 0) - counts)[r]
    width = int(counts.max()) if capacity is None and r.numel() else (capacity or 0)
    fits = pos < width
    r, c, pos = r[fits], c[fits], pos[fits]
    out_s = torch.full((s.shape[0], width), float("-inf"), device=s.device)
    out_i = torch.full((s.shape[0], width), -1, dtype=torch.int64, device=s.device)
    out_s[r, pos] = s[r, c]
    out_i[r, pos] = c + id_offset
    return out_s, out_i, counts


def stage1_topk_reference(qv: torch.Tensor, codes: torch.Tensor, k: int, id_offset: int = 0,
                          chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per query by stage-1 score, ties by smaller id: (B, k) float32 scores and int64
    ids (+ id_offset), -inf / -1 padded when there are fewer than k items. Chunked: never (B, N)."""

    q = qv.float()
    scores, ids = chunked_topk(lambda a, b: q @ codes[a:b].float().T, codes.shape[0], q.shape[0], k, chunk_size, q.device)
    return scores, torch.where(ids >= 0, ids + id_offset, ids)
