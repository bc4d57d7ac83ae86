"""SASRec transformer block (the published baseline): pre-LN causal softmax attention + ReLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import ModelConfig


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.item_emb_dim
        if d % cfg.num_heads:
            raise ValueError(f"sasrec: item_emb_dim {d} must be divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.heads = cfg.num_heads
        self.norm_attn = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm_ffn = nn.LayerNorm(d)
        ffn = cfg.ffn_dim or d
        self.ffn_in = nn.Linear(d, ffn)
        self.ffn_out = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) right-padded; causal masking keeps valid rows from seeing padding."""
        b, n, d = x.shape
        p = self.cfg.dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm_attn(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.cfg.attn_dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)), p=p)
        h = F.dropout(F.relu(self.ffn_in(self.norm_ffn(x))), p=p)
        return x + F.dropout(self.ffn_out(h), p=p)
