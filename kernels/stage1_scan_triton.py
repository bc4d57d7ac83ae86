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

from genrec.kernels.dispatch import triton_interpreted


@triton.jit
def _score_tile(q_ptr, codes_ptr, offs_q, offs_n, q_ok, n_ok, dim, stride_q, stride_c,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_BF16: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) fp32 stage-1 scores of queries offs_q x items offs_n.

    SPLIT_BF16 (int8 / bf16 codes): the codes are exact in bf16 and the fp32 query is split into
    hi + lo bf16 parts, so two tensor-core dots with fp32 accumulation give the score to ~2^-16 of
    |q| |c| (fp32 alone would be ~2^-24) at a fraction of the cost of an fp32 dot. Otherwise an
    IEEE fp32 dot (fp32 codes)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    rows = offs_n.to(tl.int64)[:, None] * stride_c  # int64: N * d passes 2^31 at 100M items
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        q = tl.load(q_ptr + offs_q[:, None] * stride_q + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(codes_ptr + rows + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0)
        if SPLIT_BF16:
            q_hi = q.to(tl.bfloat16)
            q_lo = (q - q_hi.to(tl.float32)).to(tl.bfloat16)
            if INTERPRETED:  # the interpreter mishandles bf16 casts and dots: the same values, widened
                c_t = tl.trans(c.to(tl.float32))
                acc += tl.dot(q_hi.to(tl.float32), c_t, input_precision="ieee")
                acc += tl.dot(q_lo.to(tl.float32), c_t, input_precision="ieee")
            else:
                c_t = tl.trans(c.to(tl.bfloat16))
                acc = tl.dot(q_hi, c_t, acc)
                acc = tl.dot(q_lo, c_t, acc)
        else:
            acc += tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def _stage1_scan_kernel(q_ptr, codes_ptr, thr_ptr, out_s_ptr, out_i_ptr, count_ptr,
                        nq, n_items, dim, capacity, id_offset,
                        stride_q, stride_c, stride_o,
                        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_BF16: tl.constexpr,
                        INTERPRETED: tl.constexpr, TILES: tl.constexpr):
    # one flat grid (axis 1 caps at 65535 tiles); the query blocks of one item tile run next to each
    # other, so a batch re-reads that tile from L2 rather than HBM. Each program scans TILES
    # consecutive item tiles (loads of the next tile overlap the current one's math).
    n_qb = tl.cdiv(nq, BLOCK_Q)
    pid = tl.program_id(0)
    pid_q = pid % n_qb
    pid_g = pid // n_qb
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < nq
    thr = tl.load(thr_ptr + offs_q, mask=q_ok, other=float("inf"))
    for t in range(TILES):
        offs_n = (pid_g * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_items
        acc = _score_tile(q_ptr, codes_ptr, offs_q, offs_n, q_ok, n_ok, dim, stride_q, stride_c, BLOCK_Q, BLOCK_N,
                          BLOCK_D, SPLIT_BF16, INTERPRETED)
        keep = (acc >= thr[:, None]) & q_ok[:, None] & n_ok[None, :]
        if tl.max(keep.to(tl.int32)) > 0:  # hits are rare (K' of N): most tiles skip the atomics and stores
            counters = count_ptr + offs_q[:, None] + tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
            slot = tl.atomic_add(counters, tl.full((BLOCK_Q, BLOCK_N), 1, tl.int32), mask=keep)
            ok = keep & (slot < capacity)
            out = offs_q[:, None] * stride_o + slot
            tl.store(out_s_ptr + out, acc, mask=ok)
            ids = (offs_n + id_offset).to(tl.int64)
            tl.store(out_i_ptr + out, ids[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int64), mask=ok)


def _split_bf16(codes: torch.Tensor, precision: str) -> bool:
    """Whether the tile dot runs as two bf16 tensor-core dots (see ``_score_tile``): 'auto' does so for
    int8 and bf16 codes, whose values bf16 holds exactly; 'ieee' forces the fp32 dot."""
    if precision not in ("auto", "ieee", "bf16x2"):
        raise ValueError(f"unknown precision {precision!r}; use auto, ieee or bf16x2")
    if precision == "auto":
        return codes.dtype in (torch.int8, torch.bfloat16)
    return precision == "bf16x2"


def _block_d(d: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(d, 1))))  # tl.dot needs K >= 16


def stage1_threshold_scan_triton(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                                 id_offset: int = 0, block_q: int = 16, block_n: int = 256, block_d: int | None = None,
                                 num_warps: int = 4, precision: str = "auto", tiles: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`stage1_threshold_scan_reference` (buffer order aside).
    capacity None means "room for every item" (n per query). Block sizes, warps and item tiles per
    program are tuning knobs (``genrec bench kernels --scan-configs``); the defaults are the best
    of that sweep on an H200 at 100M x 64 (benchmarks/results/kernels/kernels_gpu_h200_tiles.md): 8 tiles per
    program up to 16 queries, 1 above. precision: see ``_split_bf16``."""
    b, d = qv.shape
    tiles = tiles or (8 if b <= 16 else 1)
    n = codes.shape[0]
    cap = n if capacity is None else capacity
    use_bf16 = _split_bf16(codes, precision)
    qv, codes, thr = qv.float().contiguous(), codes.contiguous(), thr.float().contiguous()
    out_s = torch.full((b, cap), float("-inf"), device=qv.device)
    out_i = torch.full((b, cap), -1, dtype=torch.int64, device=qv.device)
    counts = torch.zeros(b, dtype=torch.int32, device=qv.device)
    if n and b:
        grid = (triton.cdiv(b, block_q) * triton.cdiv(n, block_n * tiles),)
        _stage1_scan_kernel[grid](qv, codes, thr, out_s, out_i, counts, b, n, d, cap, id_offset,
                                  qv.stride(0), codes.stride(0), out_s.stride(0),
                                  BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d or _block_d(d), SPLIT_BF16=use_bf16, INTERPRETED=triton_interpreted(),
                                  TILES=tiles, num_warps=num_warps)
    counts = counts.to(torch.int64)
    if capacity is None:  # trim to the widest row, as the reference does
        width = int(counts.max()) if b else 0
        out_s, out_i = out_s[:, :width], out_i[:, :width]
    return out_s, out_i, counts


# ---- running top-k (k <= 1024) ----

@triton.jit
def _ranking_keys(scores, ids):
    """(score desc, id asc) as one int64 per item: the float's bits made order-preserving as a signed
    int32 in the high half, 2^32 - 1 - id in the low half (so a smaller id is a larger key)."""
    bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - ids.to(tl.int64))


@triton.jit
def _stage1_topk_kernel(q_ptr, codes_ptr, out_ptr, nq, n_items, dim, items_per_split,
                        stride_q, stride_c, stride_ob, stride_os,
                        K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_BF16: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    """One (query block, item split): a running top-K in registers over tiles of K items; the K best
    keys of the split are written to out[q, split, :]."""
    pid_q, split = tl.program_id(0), tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < nq
    lowest = tl.full((BLOCK_Q, K), -9223372036854775807 - 1, tl.int64)
    best = lowest
    start = split * items_per_split
    stop = tl.minimum(start + items_per_split, n_items)
    cols = tl.arange(0, K)
    for t0 in range(start, stop, K):
        offs_n = t0 + cols
        n_ok = offs_n < stop
        acc = _score_tile(q_ptr, codes_ptr, offs_q, offs_n, q_ok, n_ok, dim, stride_q, stride_c, BLOCK_Q, K, BLOCK_D,
                         SPLIT_BF16, INTERPRETED)
        keys = tl.where(n_ok[None, :], _ranking_keys(acc, offs_n[None, :] + tl.zeros((BLOCK_Q, K), tl.int32)), lowest)
        merged = tl.sort(tl.reshape(tl.join(best, keys), (BLOCK_Q, 2 * K)), dim=1, descending=True)
        best, _ = tl.split(tl.permute(tl.reshape(merged, (BLOCK_Q, 2, K)), (0, 2, 1)))
    tl.store(out_ptr + offs_q[:, None] * stride_ob + split * stride_os + cols[None, :], best, mask=q_ok[:, None])


def decode_ranking_keys(keys: torch.Tensor, id_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys from the kernel -> (float32 scores, int64 ids); the lowest key (empty slot) -> -inf, -1."""
    empty = keys == torch.iinfo(torch.int64).min
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    ids = (4294967295 - (keys & 0xFFFFFFFF)).masked_fill(empty, -1)
    return scores, torch.where(empty, ids, ids + id_offset)


def stage1_topk_triton(qv: torch.Tensor, codes: torch.Tensor, k: int, id_offset: int = 0, splits: int | None = None,
                       block_q: int = 16, block_d: int | None = None, num_warps: int = 4,
                       precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`stage1_topk_reference`. The corpus is cut into ``splits`` ranges scanned in
    parallel (default: enough to fill a GPU); each writes its k best keys, and one topk over the
    (B, splits * K) keys (a small fraction of N) gives the answer: keys sort as (score desc, id asc)."""
    if not 0 < k <= 1024:
        raise ValueError(f"the top-k scan keeps k <= 1024 in registers, got {k}; use the threshold scan")
    if codes.shape[0] >= 2**31:
        raise ValueError("one top-k scan call takes < 2^31 items; scan in slices with id_offset")
    b, n = qv.shape[0], codes.shape[0]
    kk = max(16, triton.next_power_of_2(k))
    splits = splits or max(1, min(triton.cdiv(n, kk), 1024))  # ~8 programs per SM on a 132-SM GPU
    per_split = max(1, triton.cdiv(triton.cdiv(n, splits), kk)) * kk
    splits = max(1, triton.cdiv(n, per_split))
    use_bf16 = _split_bf16(codes, precision)
    qv, codes = qv.float().contiguous(), codes.contiguous()
    out = torch.empty(b, splits, kk, dtype=torch.int64, device=qv.device)
    if b and n:
        _stage1_topk_kernel[(triton.cdiv(b, block_q), splits)](qv, codes, out, b, n, qv.shape[1], per_split,
                                                              qv.stride(0), codes.stride(0), out.stride(0), out.stride(1),
                                                              K=kk, BLOCK_Q=block_q, BLOCK_D=block_d or _block_d(qv.shape[1]),
                                                              SPLIT_BF16=use_bf16, INTERPRETED=triton_interpreted(),
                                                              num_warps=num_warps)
        keys = torch.topk(out.view(b, -1), min(k, splits * kk), dim=1).values
    else:
        keys = torch.full((b, 0), torch.iinfo(torch.int64).min, dtype=torch.int64, device=qv.device)
    if keys.shape[1] < k:
        keys = torch.cat([keys, keys.new_full((b, k - keys.shape[1]), torch.iinfo(torch.int64).min)], dim=1)
    return decode_ranking_keys(keys, id_offset)
