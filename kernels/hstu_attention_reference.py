"""PyTorch reference for jagged HSTU pointwise attention (the CPU path and the kernels' oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.kernels.jagged import jagged_to_padded, padded_to_jagged


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


def attention_geometry(offsets: torch.Tensor, max_len: int, q_offsets: torch.Tensor, max_q_len: int,
                       num_targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which keys each query row sees, and the position ids the relative bias uses.

    Query row r of sequence b is key row i = (len_k - len_q) + r of that sequence (delta-q: the new rows
    sit at the end of the key sequence). With t = num_targets[b] the last t key rows are targets: the
    first h = len_k - t rows attend causally among themselves, a target row attends to those h rows and
    to itself only, and every target takes position id h. Without targets h = len_k (plain causal).
    Returns visible (B, max_q_len, max_len) bool, query position ids (B, max_q_len), key position ids
    (B, max_len), all int64 but visible.
    """
    len_k = offsets[1:] - offsets[:-1]
    len_q = q_offsets[1:] - q_offsets[:-1]
    hist = len_k - (num_targets.to(len_k) if num_targets is not None else 0)
    i = (len_k - len_q)[:, None] + torch.arange(max_q_len, device=offsets.device)[None, :]  # (B, Mq)
    j = torch.arange(max_len, device=offsets.device)[None, :]  # (1, N)
    visible = j[:, None, :] <= i[:, :, None]
    if num_targets is not None:
        visible &= (j[:, None, :] < hist[:, None, None]) | (j[:, None, :] == i[:, :, None])
    return visible, torch.minimum(i, hist[:, None]), torch.minimum(j, hist[:, None])


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
    q_offsets: torch.Tensor | None = None,
    max_q_len: int | None = None,
    num_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """out_i = sum_{j visible to i} SiLU(alpha * <q_i, k_j> + rab(i, j)) * scale * v_j, per row and head.

    k: (L, H, dqk), v: (L, H, dv) with offsets (B+1,) int64; max_len: longest key row.
    q: (L, H, dqk) on the same offsets, or, in delta-q mode, (Lq, H, dqk) on ``q_offsets`` (B+1,) with
    longest row ``max_q_len``: the new rows, which are the last rows of each key sequence (M-FALCON
    scores candidates against a cached history this way).
    num_targets: (B,) int64 or None; the target-aware mask of :func:`attention_geometry` (ranking).
    timestamps: (L,) int64 per key row; next_timestamps: one per query row; both needed with
    ``time_table``. rab_cache: optional dict shared by the layers of one forward pass.
    Returns one (H, dv) row per query row in v's dtype.
    """
    plain = q_offsets is None and num_targets is None
    if q_offsets is None:
        q_offsets, max_q_len = offsets, max_len
    kp = jagged_to_padded(k, offsets, max_len).transpose(1, 2)  # (B, H, N, dqk)
    vp = jagged_to_padded(v, offsets, max_len).transpose(1, 2)  # (B, H, N, dv)
    qp = jagged_to_padded(q, q_offsets, max_q_len).transpose(1, 2)  # (B, H, Mq, dqk)
    logits = torch.matmul(qp, kp.transpose(-1, -2)) * alpha  # (B, H, Mq, N)
    if plain:  # one (N, N) geometry shared by every row; time buckets cached across layers
        ts = nts = None
        if time_table is not None:
            ts = jagged_to_padded(timestamps, offsets, max_len)
            nts = jagged_to_padded(next_timestamps, offsets, max_len)
        bias = relative_bias(max_len, pos_table, time_table, ts, nts, time_divisor, rab_cache)
        visible = torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()
    else:
        visible, q_pos, k_pos = attention_geometry(offsets, max_len, q_offsets, max_q_len, num_targets)
        bias = None
        if pos_table is not None:
            n_max = (pos_table.numel() + 1) // 2
            idx = (k_pos[:, None, :] - q_pos[:, :, None] + n_max - 1).clamp(0, pos_table.numel() - 1)
            bias = table_lookup(pos_table, idx)
        if time_table is not None:
            ts = jagged_to_padded(timestamps, offsets, max_len)
            nts = jagged_to_padded(next_timestamps, q_offsets, max_q_len)
            tb = table_lookup(time_table, time_bucket(nts[:, :, None] - ts[:, None, :], time_divisor, time_table.numel() - 1))
            bias = tb if bias is None else bias + tb
    if bias is not None:
        logits = logits + bias.unsqueeze(1).to(logits.dtype)
    weights = F.silu(logits) * scale * visible.unsqueeze(-3)
    if dropout > 0 and training:
        weights = F.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, vp).transpose(1, 2)  # (B, Mq, H, dv)
    return padded_to_jagged(out, q_offsets)
