"""Server-side user encoding for SearchByUser: raw item-id histories -> encoder states (queries)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.encoders.history import last_states, pack_histories
from genrec.retrieval.keys import KeyMap
from genrec.serving.placement import resolve_device


@dataclass
class EncodedUsers:
    states: np.ndarray              # (B, D) float32
    known: list[np.ndarray]         # per user: raw ids the encoder knows (used and excluded); int64 or str
    unknown: list[np.ndarray]       # per user: raw ids it does not know (skipped)


class UserEncoder:
    """Unknown item ids are skipped (and reported); a history with no known item is an error, since
    there is nothing to encode. Histories longer than the model's max_len keep their most recent part.
    The model runs on ``device`` (cpu, cuda, cuda:N); states come back as host arrays."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        self.device = resolve_device(device)  # before reading the checkpoint: a wrong device fails fast
        state = load_checkpoint(checkpoint)
        self.model, self.cfg = model_from_checkpoint(state)
        self.model.to(self.device)
        self.items = KeyMap(state["item_ids"], f"{checkpoint}: item_ids")  # row r <-> model item id r + 1 (0 is padding)
        self.string_ids = self.items.is_string
        self.dim = self.cfg.model.item_emb_dim
        self.uses_time = self.model.time_emb is not None or self.cfg.model.relative_time_bias

    @torch.no_grad()
    def encode(self, histories: list[list[int]] | list[list[str]], timestamps: list[list[int]] | None = None,
               query_times: list[int | None] | None = None) -> EncodedUsers:
        rows_kept, times, known, unknown = [], [], [], []
        for u, hist in enumerate(histories):
            raw = np.asarray(hist, dtype=object if self.string_ids else np.int64)
            rows = self.items.rows(raw)
            ok = rows >= 0
            if not ok.any():
                raise KeyError(f"user {u}: none of the {len(raw)} history item ids is known to the encoder")
            known.append(raw[ok])
            unknown.append(raw[~ok])
            rows_kept.append(rows[ok] + 1)
            if timestamps is not None:
                times.append(np.asarray(timestamps[u], dtype=np.int64)[ok])
        packed = pack_histories(rows_kept, self.model.max_len, times if timestamps is not None else None, query_times)
        states = last_states(self.model, packed.to(self.device))
        return EncodedUsers(states.float().cpu().numpy(), known, unknown)
