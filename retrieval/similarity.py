"""Similarity functions phi(query, item) behind one interface: dot product and Mixture of Logits.

Every method takes query states and item embeddings and may also return the MoL gating weights
(None for dot product), which training needs for the load-balancing loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from genrec.kernels.mol_state import ItemCache
from genrec.retrieval.mol import MixtureOfLogits


class DotProductSimilarity:
    """phi(u, x) = <u, x> (cosine when both sides are L2-normalised, as the encoders output)."""

    name = "dot"
    cheap_pairwise = True  # scoring the whole catalogue costs one matmul

    def pairwise(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        """queries (B, D), items (N, D) -> scores (B, N)."""
        s = queries @ items.T
        return (s, None) if return_gates else s

    def per_query(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        """queries (B, D), items (B, R, D) -> scores (B, R): each query against its own items."""
        s = torch.einsum("bd,brd->br", queries, items)
        return (s, None) if return_gates else s

    def per_query_ids(self, queries: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, return_gates: bool = False):
        """queries (B, D), table (N, D), ids (B, R) int64 rows of the table -> scores (B, R)."""
        return self.per_query(queries, table[ids], return_gates)

    def aligned(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        """queries (B, D), items (B, D) -> (B,)."""
        s = (queries * items).sum(-1)
        return (s, None) if return_gates else s


class MoLSimilarity(nn.Module):
    """Mixture of Logits over encoder states (D_q) and item embeddings (D_x); trainable."""

    name = "mol"
    cheap_pairwise = False  # per-pair gating MLP: never score a whole catalogue per position

    def __init__(self, mol: MixtureOfLogits, train_precision: str = "float32", train_chunk_pairs: int = 0):
        super().__init__()
        if train_precision not in ("float32", "bfloat16"):
            raise ValueError(f"train_precision must be 'float32' or 'bfloat16', got {train_precision!r}")
        if train_chunk_pairs < 0:
            raise ValueError(f"train_chunk_pairs must be >= 0, got {train_chunk_pairs}")
        self.mol, self.train_precision, self.train_chunk_pairs = mol, train_precision, train_chunk_pairs

    def _score(self, q_states: torch.Tensor, cache: ItemCache, aligned: bool, return_gates: bool):
        """Scores (and gates) as float32. In training with train_precision bfloat16 the query encoder and the
        per-pair math (logits, gating MLP, softmax) run under bf16 autocast: the per-pair tensors are the
        bulk of a MoL step on CPU, and AMX / AVX512-BF16 matmuls halve their cost. The item side is encoded
        in float32 by the callers, outside it, so the gradient of an item that appears in many pairs is summed
        in float32. Eval is float32 throughout."""
        low = self.training and self.train_precision == "bfloat16"
        with torch.autocast(q_states.device.type, dtype=torch.bfloat16, enabled=low):
            phi, pi = self.mol.score(self.mol.encode_queries(q_states), cache, aligned=aligned, return_gates=True)
        if low:
            phi, pi = phi.float(), pi.float()
        return (phi, pi) if return_gates else phi

    def pairwise(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        return self._score(queries, self.mol.encode_items(items), False, return_gates)

    def per_query(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        b, r, d = items.shape
        return self._score(queries, self.mol.encode_items(items.reshape(b * r, d)), True, return_gates)

    def per_query_ids(self, queries: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, return_gates: bool = False):
        """queries (B, D_q), table (N, D_x), ids (B, R) int64 rows of the table -> scores (B, R) [, gates (B, R, P)].

        The item side (components, gating partial) is computed once per distinct item and gathered per
        pair, not once per (query, item) pair: with B*R pairs over a small catalogue that is the bulk of a
        training step. Equal to ``per_query(queries, table[ids])`` in eval mode; in training each item's
        dropout mask is shared by the pairs it appears in."""
        flat = ids.reshape(-1)
        if flat.numel() >= table.shape[0]:  # most of the catalogue appears: encode all of it
            cache, rows = self.mol.encode_items(table), flat
        else:
            distinct, rows = torch.unique(flat, return_inverse=True)
            cache = self.mol.encode_items(table[distinct])
        rows = rows.view(ids.shape)
        per_chunk = max(1, self.train_chunk_pairs // max(1, ids.shape[1]))  # queries per chunk
        if not (self.training and torch.is_grad_enabled() and self.train_chunk_pairs and per_chunk < len(ids)):
            phi, pi = self._score_rows(queries, cache.components, cache.gate, rows)
        else:
            # Chunks of queries under activation checkpointing: only each chunk's inputs are kept for backward
            # (its gathered components, logits and gating activations are recomputed there), so memory is
            # bounded by the chunk, not by B x R. The recomputation replays the saved RNG state: the same
            # gate-dropout masks.
            parts = [checkpoint(self._score_rows, queries[s:s + per_chunk], cache.components, cache.gate,
                                rows[s:s + per_chunk], use_reentrant=False) for s in range(0, len(ids), per_chunk)]
            phi, pi = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        return (phi, pi) if return_gates else phi

    def _score_rows(self, queries: torch.Tensor, components: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor):
        """Scores (B, R) and gates (B, R, P) of queries (B, D_q) against rows (B, R) of an item cache."""
        flat = rows.reshape(-1)
        # index_select: its backward is an index_add, far cheaper on CPU than indexing's accumulating index_put
        gathered = ItemCache(components.index_select(0, flat), gate.index_select(0, flat))
        return self._score(queries, gathered, True, True)

    def aligned(self, queries: torch.Tensor, items: torch.Tensor, return_gates: bool = False):
        phi, pi = self.per_query(queries, items.unsqueeze(1), return_gates=True)
        return (phi.squeeze(1), pi) if return_gates else phi.squeeze(1)


def build_similarity(cfg, query_dim: int, item_dim: int):
    """SimilarityConfig -> DotProductSimilarity or MoLSimilarity (an nn.Module to train)."""
    if cfg.type == "dot":
        return DotProductSimilarity()
    if cfg.type == "mol":
        return MoLSimilarity(MixtureOfLogits(
            query_dim, item_dim, cfg.query_components, cfg.item_components, cfg.component_dim, cfg.query_hidden,
            cfg.gating_hidden, cfg.tau, cfg.item_dropout, cfg.gating_dropout), cfg.train_precision, cfg.train_chunk_pairs)
    raise ValueError(f"unknown similarity {cfg.type!r}; use 'dot' or 'mol'")
