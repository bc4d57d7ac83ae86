"""Mixture of Logits (MoL): a learned similarity phi(u, x) = sum_p pi_p(u, x) * l_p(u, x).

Query components f(u) (B, P_Q, d_P) come from a SwiGLU MLP; item components g(x) (N, P_X, d_P) from a
linear map; both are L2-normalised, so each of the P = P_Q * P_X logits l_ij = <f_i, g_j> / tau lies in
[-1/tau, 1/tau]. Gating weights pi = softmax(SiLU(a(u) * b(x) + c(l))) mix them, so
min_p l_p <= phi <= max_p l_p. Everything item-side (g(x) and the gating partial b(x)) is cacheable.
The state containers (``ItemCache``, ``QueryState``, ``MoLGating``) live in ``kernels.mol_state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.kernels.mol_state import ItemCache, MoLGating, QueryState


def topk_avg_vectors(components: torch.Tensor, query: bool) -> torch.Tensor:
    """RAILS' TopKAvg embedding: item side mean_j g_j(x), query side sum_i f_i(u); (n, P, d_P) -> (n, d_P)
    float32. Not re-normalised: with even gates phi ~ <sum_i f_i, mean_j g_j> / (P_Q tau), and the norm
    of the item mean (how much its components agree) is part of that score."""
    c = components.float()
    return c.sum(1) if query else c.mean(1)


class SwiGLU(nn.Module):
    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_in, d_hidden)
        self.up = nn.Linear(d_in, d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate(x)) * self.up(x)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class MixtureOfLogits(nn.Module):
    """MoL similarity between query states u (B, D_q) and item embeddings x (N, D_x)."""

    def __init__(self, query_dim: int, item_dim: int, query_components: int = 8, item_components: int = 4,
                 component_dim: int = 64, query_hidden: int = 512, gating_hidden: int = 128, tau: float = 0.05,
                 item_dropout: float = 0.1, gating_dropout: float = 0.2, user_id_buckets: int = 0,
                 user_id_components: int = 0):
        super().__init__()
        # constructor arguments, saved beside the weights so an index can rebuild this module
        self.init_kwargs = dict(query_dim=query_dim, item_dim=item_dim, query_components=query_components,
                                item_components=item_components, component_dim=component_dim,
                                query_hidden=query_hidden, gating_hidden=gating_hidden, tau=tau,
                                item_dropout=item_dropout, gating_dropout=gating_dropout,
                                user_id_buckets=user_id_buckets, user_id_components=user_id_components)
        self.pq, self.px, self.dp = query_components, item_components, component_dim
        self.num_logits = (query_components + user_id_components) * item_components
        self.tau, self.item_dropout, self.gating_dropout = tau, item_dropout, gating_dropout
        self.query_mlp = nn.Sequential(SwiGLU(query_dim, query_hidden), nn.Linear(query_hidden, query_components * component_dim))
        self.item_proj = nn.Linear(item_dim, item_components * component_dim)
        self.user_id_emb = (nn.Embedding(user_id_buckets, user_id_components * component_dim)
                            if user_id_buckets and user_id_components else None)
        self.gate_query = _mlp(query_dim, gating_hidden, self.num_logits)
        self.gate_item = _mlp(item_dim, gating_hidden, self.num_logits)
        self.gate_pair = _mlp(self.num_logits, gating_hidden, self.num_logits)

    # ---- the two cacheable halves ----
    def encode_items(self, x: torch.Tensor) -> ItemCache:
        """x (N, D_x) -> ItemCache with components (N, P_X, d_P) and gate (N, P)."""
        g = F.dropout(self.item_proj(x), p=self.item_dropout, training=self.training)
        g = F.normalize(g.view(x.shape[0], self.px, self.dp), dim=-1, eps=1e-6)
        return ItemCache(g, self.gate_item(x))

    def encode_queries(self, u: torch.Tensor, user_ids: torch.Tensor | None = None) -> QueryState:
        """u (B, D_q) [+ user_ids (B,) int64 hashed into buckets] -> QueryState."""
        f = self.query_mlp(u).view(u.shape[0], self.pq, self.dp)
        if self.user_id_emb is not None:
            if user_ids is None:
                raise ValueError("this MoL has user-id components: pass user_ids")
            extra = self.user_id_emb(user_ids % self.user_id_emb.num_embeddings).view(u.shape[0], -1, self.dp)
            f = torch.cat([f, extra], dim=1)
        return QueryState(F.normalize(f, dim=-1, eps=1e-6), self.gate_query(u))

    def gating(self) -> MoLGating:
        """The frozen pair-gating weights stage 2 scores with (``kernels.dispatch.mol_candidate_scores``),
        detached float32 copies: take them again after further training."""
        lin1, lin2 = self.gate_pair[0], self.gate_pair[2]
        return MoLGating(lin1.weight.detach().float(), lin1.bias.detach().float(), lin2.weight.detach().float(),
                         lin2.bias.detach().float(), float(self.tau))

    # ---- scoring ----
    def logits(self, q: QueryState, items: ItemCache, aligned: bool = False) -> torch.Tensor:
        """All-pairs (B, N, P), or aligned (B, R, P) when items holds R items per query (B*R rows)."""
        # 1/tau folded into the small query side: one scale of (B, P_Q, d_P), not a divide of (B, N, P)
        f = q.components / self.tau
        g = items.components.to(f.dtype)
        if aligned:
            # (B, R * P_X, d_P) @ (B, d_P, P_Q): g is used as laid out (no copy of the big side), then only
            # the small (B, R, P_X, P_Q) result is transposed into the (i, j) order of the gating
            b = len(q)
            lg = torch.bmm(g.reshape(b, -1, self.dp), f.transpose(1, 2)).view(b, -1, self.px, f.shape[1])
            return lg.transpose(2, 3).flatten(2)
        return torch.einsum("bid,njd->bnij", f, g).flatten(2)

    def mix(self, q: QueryState, items: ItemCache, logits: torch.Tensor, aligned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Gating weights pi (B, N, P) and scores phi (B, N) for precomputed logits."""
        b = items.gate.to(logits.dtype)
        b = b.view(len(q), -1, b.shape[-1]) if aligned else b.unsqueeze(0)
        h = F.silu(q.gate.unsqueeze(1) * b + self.gate_pair(logits))
        if self.training and self.gating_dropout > 0:
            # Dropout of the gates, renormalised: softmax(h) * mask / sum(softmax(h) * mask) is the softmax
            # of h over the kept entries, so drop entries before the softmax (one masked fill instead of a
            # dropout, a scale and a renormalisation over (B, N, P)).
            # uniform < p is exactly Bernoulli(p) and, on CPU, half the time of bernoulli_ over these shapes
            dropped = torch.rand(h.shape, device=h.device) < self.gating_dropout
            pi = torch.softmax(h.masked_fill(dropped, torch.finfo(h.dtype).min), dim=-1)
            if self.gating_dropout ** h.shape[-1] > 1e-15:
                # a row with every gate dropped has zero gates, as after dropout; with the published
                # P = 32 and p = 0.2 that has probability 4e-23 a pair, and the pass is skipped
                pi = pi.masked_fill(dropped.all(-1, keepdim=True), 0.0)
        else:
            pi = torch.softmax(h, dim=-1)
        return pi, (pi * logits).sum(-1)

    def score(self, q: QueryState, items: ItemCache, aligned: bool = False, return_gates: bool = False):
        """phi (B, N) for every query against every item (or aligned (B, R))."""
        logits = self.logits(q, items, aligned)
        pi, phi = self.mix(q, items, logits, aligned)
        return (phi, pi) if return_gates else phi


def mutual_information_loss(pi: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss L = -H(mean pi) + mean H(pi) over all (query, item) pairs.

    pi: (..., P) gating weights summing to 1. Minimising it spreads use across components (high entropy of
    the average) while keeping each pair's mixture decisive (low per-pair entropy).
    """
    p = pi.reshape(-1, pi.shape[-1]).float()
    entropy = lambda d: -(d * torch.log(d.clamp(min=1e-12))).sum(-1)  # noqa: E731
    return -entropy(p.mean(0)) + entropy(p).mean()
