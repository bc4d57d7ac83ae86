"""Stage-1 threshold scan as one Triton kernel: score a (queries x items) tile in registers, and
append every hit at or above its query's threshold to that query's buffer through an atomic slot
counter. The nq x N score matrix is never written; one read of the item codes serves the whole
query block. Hits land in the buffer in arbitrary order (the caller's exact select sorts them) and
counts keep counting past ``capacity`` so overflow is visible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stage1_scan_kernel(q_ptr, codes_ptr, thr_ptr, out_s_ptr, out_i_ptr, count_ptr,
                        nq, n_items, dim, capacity, id_offset,
                        stride_q, stride_c, stride_o,
                        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok = offs_q < nq
    n_ok = offs_n < n_items
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        q = tl.load(q_ptr + offs_q[:, None] * stride_q + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(codes_ptr + offs_n[:, None] * stride_c + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0)
        acc += tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
    thr = tl.load(thr_ptr + offs_q, mask=q_ok, other=float("inf"))
    keep = (acc >= thr[:, None]) & q_ok[:, None] & n_ok[None, :]
    counters = count_ptr + offs_q[:, None] + tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
    slot = tl.atomic_add(counters, tl.full((BLOCK_Q, BLOCK_N), 1, tl.int32), mask=keep)
    ok = keep & (slot < capacity)
    out = offs_q[:, None] * stride_o + slot
    tl.store(out_s_ptr + out, acc, mask=ok)
    ids = (offs_n + id_offset).to(tl.int64)
    tl.store(out_i_ptr + out, ids[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int64), mask=ok)


def stage1_threshold_scan_triton(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                                 id_offset: int = 0, block_q: int = 16, block_n: int = 64,
                                 block_d: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`stage1_threshold_scan_reference` (buffer order aside).
    capacity None means "room for every item" (n per query)."""
    b, d = qv.shape
    n = codes.shape[0]
    cap = n if capacity is None else capacity
    qv, codes, thr = qv.float().contiguous(), codes.contiguous(), thr.float().contiguous()
    out_s = torch.full((b, cap), float("-inf"), device=qv.device)
    out_i = torch.full((b, cap), -1, dtype=torch.int64, device=qv.device)
    counts = torch.zeros(b, dtype=torch.int32, device=qv.device)
    if n and b:
        grid = (triton.cdiv(b, block_q), triton.cdiv(n, block_n))
        _stage1_scan_kernel[grid](qv, codes, thr, out_s, out_i, counts, b, n, d, cap, id_offset,
                                  qv.stride(0), codes.stride(0), out_s.stride(0),
                                  BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d)
    counts = counts.to(torch.int64)
    if capacity is None:  # trim to the widest row, as the reference does
        width = int(counts.max()) if b else 0
        out_s, out_i = out_s[:, :width], out_i[:, :width]
    return out_s, out_i, counts
