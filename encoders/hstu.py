"""HSTU layer (Hierarchical Sequential Transduction Unit) on jagged sequences.

Per layer, with X of shape (L, D):
    U, V, Q, K = split(phi(LayerNorm(X) @ W_uvqk))            phi = SiLU
    A(i, j)    = SiLU(alpha <Q_i, K_j> + rab(i, j)) / n       causal: j <= i
    Y          = X + W_o(Dropout(U * LayerNorm(A V)))
n is the model's max sequence length (the padded length of the reference), so a row's output never
depends on which other rows share its batch. rab adds a relative-position table and a log-bucketed
time-gap table, each optional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import ModelConfig
from genrec.kernels import hstu_attention


class HSTULayer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        d, h = cfg.item_emb_dim, cfg.num_heads
        self.cfg = cfg
        self.max_len = max_len
        self.heads, self.dqk, self.dv = h, cfg.dqk, cfg.dv
        self.uvqk = nn.Parameter(torch.empty(d, 2 * h * cfg.dv + 2 * h * cfg.dqk))
        if cfg.uvqk_init == "normal":
            nn.init.normal_(self.uvqk, std=0.02)
        elif cfg.uvqk_init == "xavier":
            nn.init.xavier_uniform_(self.uvqk)
        else:
            raise ValueError(f"unknown model.uvqk_init {cfg.uvqk_init!r}; use 'normal' or 'xavier'")
        out_in = h * cfg.dv * (3 if cfg.output_mode == "concat" else 1)
        self.out = nn.Linear(out_in, d)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.pos_table = nn.Parameter(torch.randn(2 * max_len - 1) * 0.02) if cfg.relative_position_bias else None
        self.time_table = nn.Parameter(torch.randn(cfg.num_time_buckets + 1) * 0.02) if cfg.relative_time_bias else None

    # The layer in three steps, shared by the jagged forward here and the ranking paths (encoders/ranking.py).
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (L, D) -> u (L, H*dv), v (L, H, dv), q (L, H, dqk), k (L, H, dqk)."""
        cfg, h = self.cfg, self.heads
        uvqk = F.layer_norm(x, x.shape[-1:]) @ self.uvqk.to(x.dtype)
        if cfg.uvqk_activation == "silu":
            uvqk = F.silu(uvqk)
        u, v, q, k = torch.split(uvqk, [h * self.dv, h * self.dv, h * self.dqk, h * self.dqk], dim=-1)
        if cfg.uvqk_activation == "silu_u_only":
            u = F.silu(u)
        return u, v.reshape(-1, h, self.dv), q.reshape(-1, h, self.dqk), k.reshape(-1, h, self.dqk)

    @property
    def alpha(self) -> float:
        return 1.0 / math.sqrt(self.dqk) if self.cfg.qk_scale == "inv_sqrt_dqk" else 1.0

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual output from the attention result attn (L, H, dv)."""
        attn = attn.reshape(-1, self.heads * self.dv)
        gated = u * F.layer_norm(attn, attn.shape[-1:])
        o = torch.cat([u, attn, gated], dim=-1) if self.cfg.output_mode == "concat" else gated
        return x + self.out(F.dropout(o, p=self.cfg.dropout, training=self.training))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int,
                timestamps: torch.Tensor | None = None, next_timestamps: torch.Tensor | None = None,
                rab_cache: dict | None = None) -> torch.Tensor:
        """x: (L, D) float; offsets: (B+1,) int64; timestamps/next_timestamps: (L,) int64 or None;
        rab_cache: a dict shared by all layers of one forward pass."""
        cfg = self.cfg
        u, v, q, k = self.project(x)
        use_time = self.time_table is not None and timestamps is not None
        attn = hstu_attention(
            q, k, v, offsets, max_len,
            backend=cfg.attention_backend,
            alpha=self.alpha,
            scale=1.0 / self.max_len,
            pos_table=self.pos_table,
            time_table=self.time_table if use_time else None,
            timestamps=timestamps if use_time else None,
            next_timestamps=next_timestamps if use_time else None,
            time_divisor=cfg.time_bucket_divisor,
            dropout=cfg.attn_dropout,
            training=self.training,
            rab_cache=rab_cache,
        )
        return self.finish(x, u, attn)
