"""Sequential encoder: item + position (+ time) input features -> HSTU or SASRec blocks -> L2 norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genrec.config import ModelConfig
from genrec.encoders.hstu import HSTULayer
from genrec.encoders.sasrec import SASRecBlock
from genrec.kernels.hstu_attention_reference import time_bucket
from genrec.kernels.jagged import jagged_to_padded, padded_to_jagged, positions


class SequentialEncoder(nn.Module):
    """Maps jagged item histories to L2-normalised query states, one per position.

    Items are internal ids in 1..num_items (0 = padding). ``max_len`` is the longest history the model
    accepts (callers keep the most recent ``max_len`` items).
    """

    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        d = cfg.item_emb_dim
        self.cfg, self.num_items, self.max_len = cfg, num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(max_len, d)
        nn.init.trunc_normal_(self.pos_emb.weight, std=math.sqrt(1.0 / d))
        self.time_emb = nn.Embedding(cfg.num_time_buckets + 1, d) if cfg.input_time_embedding else None
        if cfg.encoder == "hstu":
            self.blocks = nn.ModuleList(HSTULayer(cfg, max_len) for _ in range(cfg.num_blocks))
            self.final_norm = None
        elif cfg.encoder == "sasrec":
            self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_blocks))
            self.final_norm = nn.LayerNorm(d)
        else:
            raise ValueError(f"unknown encoder {cfg.encoder!r}; use 'hstu' or 'sasrec'")

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings: (len(ids), D), or all (num_items + 1, D) with row 0 = 0."""
        w = self.item_emb.weight if ids is None else self.item_emb(ids)
        return F.normalize(w, dim=-1, eps=1e-6)

    def input_features(self, items: torch.Tensor, pos: torch.Tensor, timestamps: torch.Tensor | None = None,
                       next_timestamps: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The rows the blocks see: scaled item embedding + position (+ extra, e.g. the ranker's rating
        embedding) (+ time-gap bucket when the model has a time embedding and timestamps are given),
        then input dropout. items, pos (L,) int64; timestamps, next_timestamps (L,) int64; extra (L, D).
        Returns (L, D) float32."""
        x = self.item_emb(items) * math.sqrt(self.cfg.item_emb_dim) + self.pos_emb(pos)
        if extra is not None:
            x = x + extra
        if self.time_emb is not None and timestamps is not None:
            x = x + self.time_emb(time_bucket(next_timestamps - timestamps, self.cfg.time_bucket_divisor, self.cfg.num_time_buckets))
        return F.dropout(x, p=self.cfg.input_dropout, training=self.training)

    def forward(self, items: torch.Tensor, offsets: torch.Tensor, max_len: int,
                timestamps: torch.Tensor | None = None, next_timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """items: (L,) int64; offsets: (B+1,) int64; max_len: longest row (<= self.max_len);
        timestamps: (L,) int64 event times; next_timestamps: (L,) int64 time of the prediction made at
        each position (the next event's time in training). Returns (L, D) float32, unit-norm rows."""
        if max_len > self.max_len:
            raise ValueError(f"batch row length {max_len} exceeds the model's max_len {self.max_len}")
        x = self.input_features(items, positions(offsets, items.numel()), timestamps, next_timestamps)
        if self.cfg.encoder == "hstu":
            use_time = self.cfg.relative_time_bias and timestamps is not None
            rab_cache: dict = {}
            for block in self.blocks:
                x = block(x, offsets, max_len, timestamps if use_time else None,
                          next_timestamps if use_time else None, rab_cache)
        else:
            padded = jagged_to_padded(x, offsets, max_len)
            for block in self.blocks:
                padded = block(padded)
            x = padded_to_jagged(self.final_norm(padded), offsets)
        return F.normalize(x, dim=-1, eps=1e-6)
