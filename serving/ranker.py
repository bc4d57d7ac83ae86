"""Server-side ranking for the Rank RPC: raw ids -> the ranker's item ids -> M-FALCON scores."""

from __future__ import annotations

import torch

from genrec.checkpoint import load_checkpoint, ranking_model_from_checkpoint
from genrec.retrieval.keys import KeyMap, plain_id
from genrec.serving.placement import resolve_device


class Ranker:
    """The ranking stage of a ``task: ranking`` checkpoint, run on ``device`` (cpu, cuda, cuda:N)."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        self.device = resolve_device(device)
        state = load_checkpoint(checkpoint)
        if "ranking_head" not in state:
            raise ValueError(f"{checkpoint}: not a ranking checkpoint (train with task: ranking)")
        self.model = ranking_model_from_checkpoint(state).to(self.device)
        self.items = KeyMap(state["item_ids"], f"{checkpoint}: item_ids")  # row r <-> model item id r + 1
        self.string_ids = self.items.is_string
        self.max_history = self.model.encoder.max_len - 1

    @torch.no_grad()
    def rank(self, history: list[int] | list[str], candidates: list[int] | list[str], timestamps: list[int] | None = None,
             request_time: int | None = None, microbatch: int = 256, ratings: list[float] | None = None):
        """-> (engagement logits (m,), ratings (m,), unknown raw ids). Unknown candidates score -inf. Ids are
        int64, or str for a checkpoint trained on string ids."""
        h_rows = torch.from_numpy(self.items.rows(history))
        keep = h_rows >= 0
        if not bool(keep.any()):
            raise KeyError(f"none of the {len(history)} history item ids is known to the ranker")
        hist = (h_rows[keep] + 1)[-self.max_history :]
        ts = None
        if timestamps is not None:
            ts = torch.as_tensor(timestamps, dtype=torch.int64)[keep][-self.max_history :]
        hist_ratings = None
        if ratings is not None:
            hist_ratings = torch.as_tensor(ratings, dtype=torch.float32)[keep][-self.max_history :]
        c_rows = torch.from_numpy(self.items.rows(candidates))
        known = c_rows >= 0
        scores = torch.full((len(candidates),), float("-inf"))
        ratings = torch.full((len(candidates),), float("nan"))
        if bool(known.any()):
            dev = self.device
            out = self.model.score(hist.to(dev), (c_rows[known] + 1).to(dev), None if ts is None else ts.to(dev),
                                   request_time, microbatch,
                                   history_ratings=None if hist_ratings is None else hist_ratings.to(dev)).cpu()
            scores[known], ratings[known] = out[:, 0], out[:, 1] * 5.0
        unknown = [plain_id(x) for x, ok in zip(history, keep.tolist()) if not ok]
        unknown += [plain_id(x) for x, ok in zip(candidates, known.tolist()) if not ok]
        return scores.numpy(), ratings.numpy(), unknown
