"""Stage-1 threshold scan as a compiled CPU kernel (numba): the int8 codes are read once, in cache-sized
blocks, and every score is compared with its query's threshold while it is still in L1.

Layout: the kernel wants the codes transposed, (d, n) with unit stride along items, so the inner loop
over a block of items is a SIMD widen (int8 -> fp32) + FMA per dimension; ``Stage1Table`` keeps such a
copy (16 bytes per item at d = 16 int8, against 64 for the float32 copy the PyTorch path multiplies).
A (n, d) view of that copy is what the dispatcher passes in; any other layout is transposed per call.

Work split (``split_work``): a batch by queries, one group per thread, each streaming the codes once;
fewer queries than threads also by contiguous item segments. The tasks run on Python threads
(``cpu_threads.run_tasks``; the kernel releases the GIL). Each (segment, group) task writes its hits
to its own buffer in ascending id order; the merge concatenates segments in order, so the result is the
reference's exactly (ascending ids per query, counts past ``capacity`` still counted). Scores sum the d products in order in fp32 (with
FMA contraction), so they can differ from the reference's matmul in the last bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from genrec.kernels.cpu_threads import run_tasks

BLOCK = 4096  # items per block: its codes (d x 4 KB) stay in L2 while every query of a task scores them


@njit(fastmath={"contract"}, boundscheck=False, cache=True)
def _add_dims8(codes_t, w, j, start, m, acc, first):
    """acc[:m] (+)= sum over dims j..j+7 of w[dim] * codes_t[dim, start:start+m]: eight dims per pass, so
    the partial sums stay in SIMD registers and acc is read and written once per eight dims."""
    r0, r1 = codes_t[j, start : start + m], codes_t[j + 1, start : start + m]
    r2, r3 = codes_t[j + 2, start : start + m], codes_t[j + 3, start : start + m]
    r4, r5 = codes_t[j + 4, start : start + m], codes_t[j + 5, start : start + m]
    r6, r7 = codes_t[j + 6, start : start + m], codes_t[j + 7, start : start + m]
    w0, w1, w2, w3, w4, w5, w6, w7 = w[j], w[j + 1], w[j + 2], w[j + 3], w[j + 4], w[j + 5], w[j + 6], w[j + 7]
    if first:
        for i in range(m):
            acc[i] = (w0 * np.float32(r0[i]) + w1 * np.float32(r1[i]) + w2 * np.float32(r2[i]) + w3 * np.float32(r3[i])
                      + w4 * np.float32(r4[i]) + w5 * np.float32(r5[i]) + w6 * np.float32(r6[i]) + w7 * np.float32(r7[i]))
    else:
        for i in range(m):
            acc[i] += (w0 * np.float32(r0[i]) + w1 * np.float32(r1[i]) + w2 * np.float32(r2[i]) + w3 * np.float32(r3[i])
                       + w4 * np.float32(r4[i]) + w5 * np.float32(r5[i]) + w6 * np.float32(r6[i]) + w7 * np.float32(r7[i]))


@njit(fastmath={"contract"}, boundscheck=False, cache=True)
def _score_block(codes_t, w, start, m, acc):
    """acc[:m] = <w, codes_t[:, start:start+m]> (w (d,) float32): eight dims at a time, then one by one."""
    d = codes_t.shape[0]
    j = 0
    while j + 8 <= d:
        _add_dims8(codes_t, w, j, start, m, acc, j == 0)
        j += 8
    for jj in range(j, d):
        row, wj = codes_t[jj, start : start + m], w[jj]
        if jj == 0:
            for i in range(m):
                acc[i] = wj * np.float32(row[i])
        else:
            for i in range(m):
                acc[i] += wj * np.float32(row[i])
    if d == 0:
        acc[:m] = 0.0


@njit(nogil=True, fastmath={"contract"}, boundscheck=False, cache=True)
def _scan_task(codes_t, qv, thr, q_lo, q_hi, i_lo, i_hi, width, out_s, out_i, counts):
    """Queries q_lo..q_hi-1 over items i_lo..i_hi-1: out_s / out_i (B, width) and counts (B,) of this task's
    segment, hits in id order. Releases the GIL, so tasks run side by side on Python threads."""
    acc = np.empty(BLOCK, dtype=np.float32)
    for b0 in range(i_lo, i_hi, BLOCK):
        m = min(BLOCK, i_hi - b0)
        for q in range(q_lo, q_hi):
            _score_block(codes_t, qv[q], b0, m, acc)
            th, c = thr[q], counts[q]
            for i in range(m):
                if acc[i] >= th:
                    if c < width:
                        out_s[q, c] = acc[i]
                        out_i[q, c] = b0 + i
                    c += 1
            counts[q] = c


@njit(cache=True)
def _merge(out_s, out_i, counts, width, id_offset, scores, ids):
    """Concatenates the segments' hits per query (ids ascending) into scores / ids (B, width)."""
    nseg, nq = counts.shape
    for q in range(nq):
        pos = 0
        for t in range(nseg):
            take = min(counts[t, q], out_s.shape[2], width - pos)
            for c in range(take):
                scores[q, pos + c] = out_s[t, q, c]
                ids[q, pos + c] = out_i[t, q, c] + id_offset
            pos += take


def split_work(b: int, n: int, threads: int) -> tuple[int, int]:
    """(item segments, queries per task) for b queries over n items on ``threads`` threads: a batch is
    split by queries (each task streams the codes once for its queries), fewer queries than threads
    by items too, never below one block of items per segment."""
    if b >= threads:
        return 1, math.ceil(b / threads)
    return max(1, min(math.ceil(threads / max(b, 1)), math.ceil(n / BLOCK))), 1


def _run(ct, q, th, nseg, group, width, out_s, out_i, counts) -> None:
    """The (segment, query group) tasks, on torch's thread count: inline when one, else on a thread pool."""
    b, n = q.shape[0], ct.shape[1]
    seg = -(-n // nseg)
    tasks = [(q0, min(b, q0 + group), t * seg, min(n, (t + 1) * seg), t) for t in range(nseg) for q0 in range(0, b, group)]
    run_tasks(lambda job: _scan_task(ct, q, th, job[0], job[1], job[2], job[3], width, out_s[job[4]], out_i[job[4]],
                                     counts[job[4]]), tasks)


def kernel_layout(codes: torch.Tensor) -> torch.Tensor:
    """(n, d) codes -> a (n, d) view of a (d, n) contiguous copy, the layout the kernel reads without a
    per-call transpose: int8 and float32 keep their dtype, bf16 (which numba lacks) is widened to float32."""
    wide = codes if codes.dtype in (torch.int8, torch.float32) else codes.float()
    return wide.t().contiguous().t()


def transposed_codes(codes: torch.Tensor) -> np.ndarray:
    """(n, d) int8 / float32 codes -> the kernel's (d, n) array (a view when ``codes`` is already a view
    of a (d, n) array; otherwise a copy)."""
    t = codes.t()
    if t.stride(1) != 1:
        t = t.contiguous()
    return t.numpy()


def stage1_threshold_scan_cpu(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                              id_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`stage1_threshold_scan_reference`: qv (B, d) float32, codes (n, d) int8 or
    float32 (best as a view of a (d, n) array), thr (B,) float32 -> scores (B, W) float32, ids (B, W)
    int64 ascending, -inf / -1 padded, counts (B,) int64. capacity None: W is the largest count (one
    more pass when a segment's first guess of its width was short)."""
    b, n = qv.shape[0], codes.shape[0]
    ct = transposed_codes(codes)
    q = np.ascontiguousarray(qv.detach().numpy(), dtype=np.float32)
    th = np.ascontiguousarray(thr.detach().numpy(), dtype=np.float32)
    nseg, group = split_work(b, n, torch.get_num_threads())
    guess = capacity if capacity is not None else min(math.ceil(n / nseg), 4096)
    while True:
        out_s = np.empty((nseg, b, guess), dtype=np.float32)
        out_i = np.empty((nseg, b, guess), dtype=np.int64)
        counts = np.zeros((nseg, b), dtype=np.int64)
        if n and b:
            _run(ct, q, th, nseg, group, guess, out_s, out_i, counts)
        if capacity is not None or counts.size == 0 or counts.max() <= guess:
            break
        guess = int(counts.max())  # capacity None and a segment overflowed its first buffer: rescan, exactly sized
    total = counts.sum(0)
    width = capacity if capacity is not None else (int(total.max()) if b and n else 0)
    scores = np.full((b, width), -np.inf, dtype=np.float32)
    ids = np.full((b, width), -1, dtype=np.int64)
    if width:
        _merge(out_s, out_i, counts, width, id_offset, scores, ids)
    return torch.from_numpy(scores), torch.from_numpy(ids), torch.from_numpy(total)
