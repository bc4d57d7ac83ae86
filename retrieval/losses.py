"""Sampled softmax over uniformly drawn negatives (the HSTU/RAILS training loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, pos_ids: torch.Tensor,
                         neg_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of -log softmax([pos, negs] / T)[0].

    pos_logits (L,); neg_logits (L, R); pos_ids (L,) int64; neg_ids (L, R) or (R,) int64 (shared).
    A negative that equals the position's positive item is masked out (it is not a negative).
    """
    if neg_ids.dim() == 1:
        collide = neg_ids[None, :] == pos_ids[:, None]
    else:
        collide = neg_ids == pos_ids[:, None]
    neg = neg_logits.masked_fill(collide, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def sample_negatives(num_items: int, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform item ids in 1..num_items (0 is padding), int64 of ``shape``."""
    return torch.randint(1, num_items + 1, shape, device=device, generator=generator)
