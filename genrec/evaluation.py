"""Full-corpus leave-one-out evaluation of an encoder (and of the popularity baseline)."""

from __future__ import annotations

import numpy as np
import torch

from genrec.data.batches import SequenceBatch, eval_batches, target_positions
from genrec.data.sequences import SequenceDataset, Split
from genrec.encoders.history import last_states
from genrec.encoders.model import SequentialEncoder
from genrec.retrieval.keys import plain_id
from genrec.retrieval.metrics import metrics_from_ranks, target_ranks
from genrec.retrieval.similarity import DotProductSimilarity


def mask_history(scores: torch.Tensor, batch: SequenceBatch) -> None:
    """Set padding (column 0) and every item of each row's history to -inf, in place."""
    scores[:, 0] = float("-inf")
    rows = torch.repeat_interleave(torch.arange(scores.shape[0], device=scores.device),
                                   batch.history_offsets[1:] - batch.history_offsets[:-1])
    scores[rows, batch.history_items] = float("-inf")


@torch.no_grad()
def model_target_ranks(model: SequentialEncoder, ds: SequenceDataset, split: Split, stage: str, batch_size: int = 256,
                       exclude_history: bool = True, device: torch.device | None = None,
                       similarity=None) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each evaluation user's held-out target over the full item corpus.

    Returns (users, ranks): users int64 (U,) internal user indices (``split.eval_users``), ranks int64 (U,)
    0-based (0 = the target scored first; ties broken by smaller item id), history excluded unless told.
    """
    device = device or next(model.parameters()).device
    similarity = similarity or DotProductSimilarity()
    was_training = model.training
    model.eval()
    sim_was_training = isinstance(similarity, torch.nn.Module) and similarity.training
    if isinstance(similarity, torch.nn.Module):
        similarity.eval()
    items = model.item_embeddings().float()
    ranks = []
    for batch in eval_batches(ds, split, stage, model.max_len, batch_size):
        batch = batch.to(device)
        users = last_states(model, batch.packed()).float()
        scores = similarity.pairwise(users, items)
        if exclude_history:
            mask_history(scores, batch)
        else:
            scores[:, 0] = float("-inf")
        ranks.append(target_ranks(scores, batch.targets).cpu())
    model.train(was_training)
    if sim_was_training:
        similarity.train()
    return np.asarray(split.eval_users, dtype=np.int64), torch.cat(ranks).numpy()


def evaluate_model(model: SequentialEncoder, ds: SequenceDataset, split: Split, stage: str, ks: tuple[int, ...],
                   batch_size: int = 256, exclude_history: bool = True, device: torch.device | None = None,
                   similarity=None) -> dict[str, float]:
    """HR@k, NDCG@k (k in ks) and MRR over all evaluation users, ranking the full item corpus."""
    _, ranks = model_target_ranks(model, ds, split, stage, batch_size, exclude_history, device, similarity)
    return metrics_from_ranks(torch.from_numpy(ranks), ks)


def per_user_rank_rows(ds: SequenceDataset, stage: str, users: np.ndarray, ranks: np.ndarray) -> list[dict]:
    """One row per evaluation user: raw user id, raw id of the held-out target, its 1-based rank."""
    targets = ds.items[target_positions(ds, users, stage)]
    return [{"user": plain_id(ds.user_ids[u]), "target": plain_id(ds.item_ids[t - 1]), "rank": int(r) + 1}
            for u, t, r in zip(users, targets, ranks)]


def evaluate_popularity(ds: SequenceDataset, split: Split, stage: str, ks: tuple[int, ...],
                        batch_size: int = 1024, exclude_history: bool = True) -> dict[str, float]:
    """Baseline: score every item by its count in the training part, same protocol as the model."""
    train_mask = np.zeros(len(ds.items), dtype=bool)
    for u in range(ds.num_users):
        train_mask[ds.offsets[u] : split.train_end[u]] = True
    counts = np.bincount(ds.items[train_mask], minlength=ds.num_items + 1).astype(np.float32)
    popularity = torch.from_numpy(counts)
    ranks = []
    for batch in eval_batches(ds, split, stage, max_len=1, batch_size=batch_size):
        scores = popularity.expand(len(batch.targets), -1).clone()
        if exclude_history:
            mask_history(scores, batch)
        else:
            scores[:, 0] = float("-inf")
        ranks.append(target_ranks(scores, batch.targets))
    return metrics_from_ranks(torch.cat(ranks), ks)


def format_metrics_table(rows: dict[str, dict[str, float]], ks: tuple[int, ...]) -> str:
    """Markdown table: one row per system, HR@k / NDCG@k / MRR columns ("-" where a row lacks one, e.g. a
    rerank depth shallower than k)."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    lines = ["| system | " + " | ".join(c.upper() for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" if c in m else "-" for c in cols) + " |")
    return "\n".join(lines)
