"""Server-side user encoding for SearchByUser: raw item-id histories -> encoder states (queries)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.retrieval.ids import IdMap
from genrec.serving.placement import resolve_device


@dataclass
class EncodedUsers:
    states: np.ndarray              # (B, D) float32
    known: list[np.ndarray]         # per user: raw ids the encoder knows (used and excluded)
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
        raw = np.asarray(state["item_ids"], dtype=np.int64)
        self.items = IdMap(raw, len(raw))  # row r <-> model item id r + 1 (0 is padding)
        self.dim = self.cfg.model.item_emb_dim
        self.uses_time = self.model.time_emb is not None or self.cfg.model.relative_time_bias

    @torch.no_grad()
    def encode(self, histories: list[list[int]], timestamps: list[list[int]] | None = None,
               query_times: list[int | None] | None = None) -> EncodedUsers:
        items, times, next_times, offsets, known, unknown = [], [], [], [0], [], []
        for u, hist in enumerate(histories):
            raw = np.asarray(hist, dtype=np.int64)
            rows = self.items.lookup(raw).numpy()
            ok = rows >= 0
            if not ok.any():
                raise KeyError(f"user {u}: none of the {len(raw)} history item ids is known to the encoder")
            known.append(raw[ok])
            unknown.append(raw[~ok])
            ids = (rows[ok] + 1)[-self.model.max_len :]
            items.append(ids)
            if timestamps is not None:
                ts = np.asarray(timestamps[u], dtype=np.int64)[ok][-self.model.max_len :]
                qt = query_times[u] if query_times and query_times[u] is not None else int(ts[-1])
                times.append(ts)
                next_times.append(np.append(ts[1:], qt))
            offsets.append(offsets[-1] + len(ids))
        dev = self.device
        flat = torch.from_numpy(np.concatenate(items)).to(dev)
        off = torch.tensor(offsets, dtype=torch.int64)
        ts = torch.from_numpy(np.concatenate(times)).to(dev) if timestamps is not None else None
        nts = torch.from_numpy(np.concatenate(next_times)).to(dev) if timestamps is not None else None
        max_len = int((off[1:] - off[:-1]).max())
        off = off.to(dev)
        states = self.model(flat, off, max_len, ts, nts)[off[1:] - 1]
        return EncodedUsers(states.float().cpu().numpy(), known, unknown)
