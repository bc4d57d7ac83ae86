"""PyTorch reference for jagged HSTU pointwise attention (the CPU path and the kernels' oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.encoders.jagged import jagged_to_padded, padded_to_jagged


def time_bucket(delta: torch.Tensor, divisor: float, num_buckets: int) -> torch.Tensor:
    """bucket(dt) = floor(log(max(|dt|, 1)) / divisor) clamped to [0, num_buckets]; int64."""
    dt = delta.abs().clamp(min=1).to(torch.float32)
    return (torch.log(dt) / divisor).floor().clamp(0, num_buckets).to(torch.int64)


class _TableLookup(torch.autograd.Function):
    """table[idx] whose backward is a weighted bincount: millions of indices hit ~100 table entries, where
    the generic scatter-add of advanced indexing serialises on CPU (about 8x slower)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.size = table.numel()
        return table[idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        g = torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.size)
        return g.to(grad.dtype), None


def table_lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table (T,) float, idx (...) int64 in [0, T) -> (...) table values; differentiable in table."""
    return _TableLookup.apply(table, idx)


def relative_bias(
    n: int,
    pos_table: torch.Tensor | None,
    time_table: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    next_timestamps: torch.Tensor | None,
    time_divisor: float,
    cache: dict | None = None,
) -> torch.Tensor | None:
    """Relative attention bias for padded rows of length n.

    pos_table: (2*N_max - 1,), entry N_max - 1 + (j - i) is the bias of query i on key j.
    time_table: (num_buckets + 1,), indexed by bucket(next_ts[i] - ts[j]).
    timestamps, next_timestamps: (B, n) int64 padded. Returns (B or 1, n, n) or None.
    cache: optional per-forward dict; bucket indices are computed once and reused by every layer.
    """
    bias = None
    if pos_table is not None:
        n_max = (pos_table.numel() + 1) // 2
        i = torch.arange(n, device=pos_table.device)
        idx = (i[None, :] - i[:, None] + n_max - 1).clamp(0, pos_table.numel() - 1)
        bias = table_lookup(pos_table, idx).unsqueeze(0)
    if time_table is not None and timestamps is not None:
        buckets = cache.get("time_buckets") if cache is not None else None
        if buckets is None:
            buckets = time_bucket(next_timestamps[:, :, None] - timestamps[:, None, :], time_divisor, time_table.numel() - 1)
            if cache is not None:
                cache["time_buckets"] = buckets
        tb = table_lookup(time_table, buckets)
        bias = tb if bias is None else bias + tb
    return bias


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    *,
    alpha: float,
    scale: float,
    pos_table: torch.Tensor | None = None,
    time_table: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    next_timestamps: torch.Tensor | None = None,
    time_divisor: float = 0.301,
    dropout: float = 0.0,
    training: bool = False,
    rab_cache: dict | None = None,
) -> torch.Tensor:
    """out_i = sum_{j <= i} SiLU(alpha * <q_i, k_j> + rab(i, j)) * scale * v_j, per row and head.

    q, k: (L, H, dqk); v: (L, H, dv); offsets: (B+1,) int64; max_len: longest row in the batch.
    timestamps / next_timestamps: (L,) int64, needed when ``time_table`` is given.
    rab_cache: optional dict shared by the layers of one forward pass (reuses time buckets).
    Returns (L, H, dv) in v's dtype.
    """
    qp = jagged_to_padded(q, offsets, max_len).transpose(1, 2)  # (B, H, N, dqk)
    kp = jagged_to_padded(k, offsets, max_len).transpose(1, 2)
    vp = jagged_to_padded(v, offsets, max_len).transpose(1, 2)  # (B, H, N, dv)
    logits = torch.matmul(qp, kp.transpose(-1, -2)) * alpha  # (B, H, N, N)
    ts = nts = None
    if time_table is not None:
        ts = jagged_to_padded(timestamps, offsets, max_len)
        nts = jagged_to_padded(next_timestamps, offsets, max_len)
    bias = relative_bias(max_len, pos_table, time_table, ts, nts, time_divisor, rab_cache)
    if bias is not None:
        logits = logits + bias.unsqueeze(1).to(logits.dtype)
    causal = torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()
    weights = F.silu(logits) * scale * causal
    if dropout > 0 and training:
        weights = F.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, vp).transpose(1, 2)  # (B, N, H, dv)
    return padded_to_jagged(out, offsets)
