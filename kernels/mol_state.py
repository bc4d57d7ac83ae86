"""The tensors MoL stage 2 reads: item-side and query-side states, and the eval-time pair-gating weights.

Plain containers, so the op (``kernels.dispatch.mol_candidate_scores``) takes tensors, not a module;
``retrieval.mol.MixtureOfLogits`` produces all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ItemCache:
    """Item-side MoL state, computed once per corpus.

    components: (N, P_X, d_P) unit-norm (float32 or bf16); gate: (N, P) item-only gating partial b(x).
    """

    components: torch.Tensor
    gate: torch.Tensor

    def __len__(self) -> int:
        return self.components.shape[0]

    def take(self, ids: torch.Tensor) -> "ItemCache":
        """The rows ids (M,) int64: index_select, ~5x advanced indexing's gather for stage 2's K' rows on CPU."""
        return ItemCache(self.components.index_select(0, ids), self.gate.index_select(0, ids))

    def slice(self, start: int, end: int) -> "ItemCache":
        return ItemCache(self.components[start:end], self.gate[start:end])


@dataclass
class QueryState:
    """Query-side MoL state: components (B, P_Q, d_P) unit-norm; gate (B, P) query-only partial a(u)."""

    components: torch.Tensor
    gate: torch.Tensor

    def __len__(self) -> int:
        return self.components.shape[0]


@dataclass(eq=False)
class MoLGating:
    """The frozen pair-gating MLP and temperature of a trained MoL, P = P_Q * P_X logits:
    h = SiLU(l @ w1.T + b1), pair = h @ w2.T + b2, with w1 (H, P), b1 (H,), w2 (P, H), b2 (P,) float32
    and logits l = <f_i, g_j> / tau ordered p = i * P_X + j.

    ``packed`` holds per-backend layouts derived from these weights (the Triton kernel's permuted copies),
    built once on first use instead of on every call."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    tau: float
    packed: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        h, p = self.w1.shape
        if self.b1.shape != (h,) or self.w2.shape != (p, h) or self.b2.shape != (p,):
            raise ValueError(f"MoLGating shapes disagree: w1 {tuple(self.w1.shape)}, b1 {tuple(self.b1.shape)}, "
                             f"w2 {tuple(self.w2.shape)}, b2 {tuple(self.b2.shape)}")
        if not self.tau > 0:
            raise ValueError(f"MoLGating tau must be > 0, got {self.tau}")

    @property
    def num_logits(self) -> int:
        return self.w1.shape[1]

    def to(self, device: torch.device | str) -> "MoLGating":
        return MoLGating(self.w1.to(device), self.b1.to(device), self.w2.to(device), self.b2.to(device), self.tau)
