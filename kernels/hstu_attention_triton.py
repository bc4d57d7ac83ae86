"""Jagged HSTU attention in Triton: forward and backward on values + offsets, no padding.

One program handles a block of query rows (forward, dQ) or key rows (dK, dV) of one sequence and one
head; the (rows x keys) logits live only in registers. Per tile:

    z = alpha * Q K^T + pos_table[p_j - p_i + n_max - 1] + time_table[bucket(next_ts_i - ts_j)]
    s = SiLU(z) * scale * visible(i, j)          out += s V

Backward recomputes z (nothing of size L x N is stored):
    dV = s^T dO      dz = (dO V^T) * scale * SiLU'(z) * visible      dQ = alpha dz K      dK = alpha dz^T Q
and the bias tables get dz summed per entry (atomic adds into fp32 buffers).

``visible``, position ids and the delta-q layout follow :func:`attention_geometry` in the reference:
query row r of sequence b is key row (len_k - len_q) + r; with targets, the last t key rows attend to
the history and themselves only and sit at position id len_k - t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrec.kernels.dispatch import triton_interpreted


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. IEEE: exact fp32 products (no TF32) for fp32 inputs. UPCAST: bf16
    operands multiplied as fp32 (the interpreter cannot multiply bf16; values are already rounded)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sequence(q_off, k_off, targets, b, HAS_TARGETS: tl.constexpr):
    """Sequence b's query / key extents; hist = key rows before the targets; shift = key row of query 0."""
    q_start = tl.load(q_off + b)
    len_q = tl.load(q_off + b + 1) - q_start
    k_start = tl.load(k_off + b)
    len_k = tl.load(k_off + b + 1) - k_start
    hist = len_k
    if HAS_TARGETS:
        hist -= tl.load(targets + b)
    return q_start, len_q, k_start, len_k, hist, len_k - len_q


@triton.jit
def _rows(ptr, start, rows, ok, stride_m, h, stride_h, cols, n_cols):
    """A (rows, cols) tile of head h from a jagged (L, H, d) tensor; rows outside ``ok`` read 0."""
    return tl.load(ptr + (start + rows)[:, None] * stride_m + h * stride_h + cols[None, :],
                   mask=ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _pos_index(offs_i, offs_j, hist, n_max, n_pos):
    """Position-table entry of (query row i, key row j): targets sit at position hist."""
    p_i = tl.minimum(offs_i, hist)
    p_j = tl.minimum(offs_j, hist)
    return tl.minimum(tl.maximum(p_j[None, :] - p_i[:, None] + n_max - 1, 0), n_pos - 1)


@triton.jit
def _time_bucket(nts_i, ts_j, time_divisor, n_buckets):
    """floor(log(max(|next_ts_i - ts_j|, 1)) / divisor) clamped to [0, n_buckets], as the reference."""
    dt = tl.maximum(tl.abs(nts_i[:, None] - ts_j[None, :]), 1).to(tl.float32)
    return tl.minimum(tl.maximum(tl.floor(tl.log(dt) / time_divisor), 0.0), n_buckets * 1.0).to(tl.int32)


@triton.jit
def _tile_logits(q, k, offs_i, offs_j, i_ok, j_ok, hist, nts_i, ts_base, pos_ptr, time_ptr,
                 alpha, n_max, n_pos, n_buckets, time_divisor,
                 HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_TARGETS: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """z (BLOCK_I, BLOCK_J) fp32 and the visibility mask for query rows offs_i x key rows offs_j
    (absolute indices within the key sequence)."""
    z = _mm(q, tl.trans(k), IEEE, UPCAST) * alpha
    visible = (offs_j[None, :] <= offs_i[:, None]) & i_ok[:, None] & j_ok[None, :]
    if HAS_TARGETS:
        visible = visible & ((offs_j[None, :] < hist) | (offs_j[None, :] == offs_i[:, None]))
    if HAS_POS:
        idx = _pos_index(offs_i, offs_j, hist, n_max, n_pos)
        z += tl.load(pos_ptr + idx, mask=visible, other=0.0).to(tl.float32)
    if HAS_TIME:
        bucket = _time_bucket(nts_i, tl.load(ts_base + offs_j, mask=j_ok, other=0), time_divisor, n_buckets)
        z += tl.load(time_ptr + bucket, mask=visible, other=0.0).to(tl.float32)
    return z, visible


@triton.jit
def _hstu_fwd_kernel(Q, K, V, OUT, q_off, k_off, targets, POS, TIME, q_nts, k_ts,
                     stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
                     alpha, scale, time_divisor, n_max, n_pos, n_buckets, dqk, dv,
                     HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_TARGETS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q, k_start, len_k, hist, shift = _sequence(q_off, k_off, targets, b, HAS_TARGETS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the sequence
    row_ok = rows < len_q
    offs_i = shift + rows
    d_qk = tl.arange(0, BLOCK_DQK)
    d_v = tl.arange(0, BLOCK_DV)
    q = _rows(Q, q_start, rows, row_ok, stride_qm, h, stride_qh, d_qk, dqk)
    nts_i = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if HAS_TIME:
        nts_i = tl.load(q_nts + q_start + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    hi = tl.minimum(len_k, shift + (pid_m + 1) * BLOCK_M)  # causal: no key beyond the block's last row
    hi = tl.where(pid_m * BLOCK_M < len_q, hi, 0)  # the grid covers the longest sequence: no rows here, no work
    for start_n in range(0, hi, BLOCK_N):
        offs_j = start_n + tl.arange(0, BLOCK_N)
        j_ok = offs_j < len_k
        k = _rows(K, k_start, offs_j, j_ok, stride_km, h, stride_kh, d_qk, dqk)
        v = _rows(V, k_start, offs_j, j_ok, stride_vm, h, stride_vh, d_v, dv)
        z, visible = _tile_logits(q, k, offs_i, offs_j, row_ok, j_ok, hist, nts_i, k_ts + k_start, POS, TIME,
                                  alpha, n_max, n_pos, n_buckets, time_divisor, HAS_POS, HAS_TIME, HAS_TARGETS, IEEE, UPCAST)
        s = tl.where(visible, z * tl.sigmoid(z) * scale, 0.0)
        acc += _mm(s.to(v.dtype), v, IEEE, UPCAST)
    tl.store(OUT + (q_start + rows)[:, None] * stride_om + h * stride_oh + d_v[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (d_v[None, :] < dv))


@triton.jit
def _hstu_bwd_dq_kernel(Q, K, V, DO, DQ, q_off, k_off, targets, POS, TIME, q_nts, k_ts,
                        stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
                        alpha, scale, time_divisor, n_max, n_pos, n_buckets, dqk, dv,
                        HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_TARGETS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dQ for one block of query rows; DO/DQ share Q's and OUT's strides respectively."""
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q, k_start, len_k, hist, shift = _sequence(q_off, k_off, targets, b, HAS_TARGETS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_i = shift + rows
    d_qk = tl.arange(0, BLOCK_DQK)
    d_v = tl.arange(0, BLOCK_DV)
    q = _rows(Q, q_start, rows, row_ok, stride_qm, h, stride_qh, d_qk, dqk)
    do = _rows(DO, q_start, rows, row_ok, stride_om, h, stride_oh, d_v, dv)
    nts_i = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if HAS_TIME:
        nts_i = tl.load(q_nts + q_start + rows, mask=row_ok, other=0)
    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    hi = tl.minimum(len_k, shift + (pid_m + 1) * BLOCK_M)
    hi = tl.where(pid_m * BLOCK_M < len_q, hi, 0)  # blocks past this sequence's rows: nothing to do
    for start_n in range(0, hi, BLOCK_N):
        offs_j = start_n + tl.arange(0, BLOCK_N)
        j_ok = offs_j < len_k
        k = _rows(K, k_start, offs_j, j_ok, stride_km, h, stride_kh, d_qk, dqk)
        v = _rows(V, k_start, offs_j, j_ok, stride_vm, h, stride_vh, d_v, dv)
        z, visible = _tile_logits(q, k, offs_i, offs_j, row_ok, j_ok, hist, nts_i, k_ts + k_start, POS, TIME,
                                  alpha, n_max, n_pos, n_buckets, time_divisor, HAS_POS, HAS_TIME, HAS_TARGETS, IEEE, UPCAST)
        ds = _mm(do, tl.trans(v), IEEE, UPCAST)
        sig = tl.sigmoid(z)
        dz = tl.where(visible, ds * scale * sig * (1.0 + z * (1.0 - sig)), 0.0)
        dq += _mm(dz.to(k.dtype), k, IEEE, UPCAST)
    tl.store(DQ + (q_start + rows)[:, None] * stride_qm + h * stride_qh + d_qk[None, :], (dq * alpha).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d_qk[None, :] < dqk))


@triton.jit
def _hstu_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DPOS, DTIME, n_rep, rep_pos, rep_time, q_off, k_off, targets, POS, TIME,
                          q_nts, k_ts,
                          stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
                          alpha, scale, time_divisor, n_max, n_pos, n_buckets, dqk, dv,
                          HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_TARGETS: tl.constexpr,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr, POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK, dV for one block of key rows (DK/DV share K's/V's strides) and the tables' gradients. The tables'
    gradients go to one of ``n_rep`` replicas (rows ``rep_pos`` / ``rep_time`` floats apart) picked by the
    program: every program adding into the same few hundred floats would serialise on their atomics."""
    pid_n, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rep = (pid_n + (b * tl.num_programs(2) + h) * 7) % n_rep
    q_start, len_q, k_start, len_k, hist, shift = _sequence(q_off, k_off, targets, b, HAS_TARGETS)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < len_k
    d_qk = tl.arange(0, BLOCK_DQK)
    d_v = tl.arange(0, BLOCK_DV)
    k = _rows(K, k_start, offs_j, j_ok, stride_km, h, stride_kh, d_qk, dqk)
    v = _rows(V, k_start, offs_j, j_ok, stride_vm, h, stride_vh, d_v, dv)
    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dvacc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # causal: only query rows at or after this block's first key; start on a BLOCK_M boundary
    first = tl.maximum(pid_n * BLOCK_N - shift, 0)
    first = (first // BLOCK_M) * BLOCK_M
    for start_m in range(first, len_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        offs_i = shift + rows
        q = _rows(Q, q_start, rows, row_ok, stride_qm, h, stride_qh, d_qk, dqk)
        do = _rows(DO, q_start, rows, row_ok, stride_om, h, stride_oh, d_v, dv)
        nts_i = tl.zeros((BLOCK_M,), dtype=tl.int64)
        if HAS_TIME:
            nts_i = tl.load(q_nts + q_start + rows, mask=row_ok, other=0)
        z, visible = _tile_logits(q, k, offs_i, offs_j, row_ok, j_ok, hist, nts_i, k_ts + k_start, POS, TIME,
                                  alpha, n_max, n_pos, n_buckets, time_divisor, HAS_POS, HAS_TIME, HAS_TARGETS, IEEE, UPCAST)
        sig = tl.sigmoid(z)
        s = tl.where(visible, z * sig * scale, 0.0)
        dvacc += _mm(tl.trans(s.to(do.dtype)), do, IEEE, UPCAST)
        ds = _mm(do, tl.trans(v), IEEE, UPCAST)
        dz = tl.where(visible, ds * scale * sig * (1.0 + z * (1.0 - sig)), 0.0)
        dk += _mm(tl.trans(dz.to(q.dtype)), q, IEEE, UPCAST)
        if POS_GRAD:
            tl.atomic_add(DPOS + rep * rep_pos + _pos_index(offs_i, offs_j, hist, n_max, n_pos), dz, mask=visible)
        if TIME_GRAD:
            bucket = _time_bucket(nts_i, tl.load(k_ts + k_start + offs_j, mask=j_ok, other=0), time_divisor, n_buckets)
            tl.atomic_add(DTIME + rep * rep_time + bucket, dz, mask=visible)
    tl.store(DK + (k_start + offs_j)[:, None] * stride_km + h * stride_kh + d_qk[None, :], (dk * alpha).to(DK.dtype.element_ty),
             mask=j_ok[:, None] & (d_qk[None, :] < dqk))
    tl.store(DV + (k_start + offs_j)[:, None] * stride_vm + h * stride_vh + d_v[None, :], dvacc.to(DV.dtype.element_ty),
             mask=j_ok[:, None] & (d_v[None, :] < dv))


GRAD_REPLICAS = 64  # copies of the bias tables' gradient buffers on a GPU (summed after the kernel)


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_table, time_table, offsets, q_offsets, targets, k_ts, q_nts, max_len, max_q_len,
                alpha, scale, time_divisor, block_m, block_n):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
        meta = _meta(q, k, v, pos_table, time_table, targets, block_m, block_n)
        dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
        args = (q_offsets, offsets, targets if targets is not None else dummy,
                pos_table if pos_table is not None else q, time_table if time_table is not None else q,
                q_nts if q_nts is not None else dummy, k_ts if k_ts is not None else dummy)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
        scalars = (alpha, scale, time_divisor, meta["n_max"], meta["n_pos"], meta["n_buckets"], q.shape[2], v.shape[2])
        batch, heads = offsets.numel() - 1, q.shape[1]
        if q.shape[0] and batch:
            _hstu_fwd_kernel[(triton.cdiv(max_q_len, block_m), batch, heads)](
                q, k, v, out, *args, *strides, *scalars, **meta["constexpr"])
        ctx.save_for_backward(q, k, v, pos_table, time_table, offsets, q_offsets, targets, k_ts, q_nts)
        ctx.setup = (args, strides, scalars, meta, max_len, max_q_len, batch, heads)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pos_table, time_table, *_ = ctx.saved_tensors
        args, strides, scalars, meta, max_len, max_q_len, batch, heads = ctx.setup
        dout = dout.contiguous()
        assert dout.stride() == (strides[6], strides[7], 1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        pos_grad = pos_table is not None and ctx.needs_input_grad[3]
        time_grad = time_table is not None and ctx.needs_input_grad[4]
        n_rep = GRAD_REPLICAS
        dpos = torch.zeros(n_rep, pos_table.numel() if pos_grad else 1, dtype=torch.float32, device=q.device)
        dtime = torch.zeros(n_rep, time_table.numel() if time_grad else 1, dtype=torch.float32, device=q.device)
        if q.shape[0] and batch:
            _hstu_bwd_dq_kernel[(triton.cdiv(max_q_len, meta["constexpr"]["BLOCK_M"]), batch, heads)](
                q, k, v, dout, dq, *args, *strides, *scalars, **meta["constexpr"])
            _hstu_bwd_dkdv_kernel[(triton.cdiv(max_len, meta["constexpr"]["BLOCK_N"]), batch, heads)](
                q, k, v, dout, dk, dv, dpos, dtime, n_rep, dpos.shape[1], dtime.shape[1], *args, *strides, *scalars,
                POS_GRAD=pos_grad, TIME_GRAD=time_grad, **meta["constexpr"])
        dpos, dtime = dpos.sum(0), dtime.sum(0)
        return (dq, dk, dv, dpos.to(pos_table.dtype) if pos_grad else None, dtime.to(time_table.dtype) if time_grad else None,
                *([None] * 12))


def _meta(q, k, v, pos_table, time_table, targets, block_m, block_n) -> dict:
    return {
        "n_max": (pos_table.numel() + 1) // 2 if pos_table is not None else 0,
        "n_pos": pos_table.numel() if pos_table is not None else 1,
        "n_buckets": time_table.numel() - 1 if time_table is not None else 0,
        "constexpr": dict(HAS_POS=pos_table is not None, HAS_TIME=time_table is not None, HAS_TARGETS=targets is not None,
                          IEEE=q.dtype == torch.float32,
                          UPCAST=q.dtype != torch.float32 and triton_interpreted(), BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_DQK=_block_dim(q.shape[2]), BLOCK_DV=_block_dim(v.shape[2])),
    }


def hstu_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int, *,
                          alpha: float, scale: float, pos_table: torch.Tensor | None = None,
                          time_table: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
                          next_timestamps: torch.Tensor | None = None, time_divisor: float = 0.301,
                          dropout: float = 0.0, training: bool = False, rab_cache: dict | None = None,
                          q_offsets: torch.Tensor | None = None, max_q_len: int | None = None,
                          num_targets: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Same contract as :func:`hstu_attention_reference` (differentiable in q, k, v and both tables).

    Attention dropout is not fused: the dispatcher sends training with ``dropout > 0`` to the reference.
    ``rab_cache`` is accepted and ignored (buckets are recomputed in registers)."""
    if dropout > 0 and training:
        raise NotImplementedError("the Triton HSTU attention has no attention dropout; use the reference backend")
    if q_offsets is None:
        q_offsets, max_q_len = offsets, max_len
    if time_table is not None and (timestamps is None or next_timestamps is None):
        raise ValueError("time_table needs timestamps (per key row) and next_timestamps (per query row)")
    targets = num_targets.to(torch.int64).contiguous() if num_targets is not None else None
    k_ts = timestamps.to(torch.int64).contiguous() if time_table is not None else None
    q_nts = next_timestamps.to(torch.int64).contiguous() if time_table is not None else None
    return _HSTUAttention.apply(q, k, v, pos_table, time_table, offsets.to(torch.int64).contiguous(),
                                q_offsets.to(torch.int64).contiguous(), targets, k_ts, q_nts, max_len, max_q_len,
                                float(alpha), float(scale), float(time_divisor), block_m, block_n)
