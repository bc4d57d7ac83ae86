"""Export item embeddings (+ raw ids) from a checkpoint for offline index builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.io import atomic_write, atomic_write_json, sha256_file


def export_item_embeddings(checkpoint: str | Path, out: str | Path) -> dict:
    """Write ``out`` (N, D) float32 L2-normalised item embeddings, ``<stem>.ids.npy`` (N,) raw ids and
    ``<stem>.json`` (dims, count, checkpoint sha256). Row i is the item whose raw id is ids[i]."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy, got {out}")
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state)
    with torch.no_grad():
        emb = model.item_embeddings()[1:].float().numpy()
    ids = np.asarray(state["item_ids"])
    atomic_write(out, lambda f: np.save(f, emb, allow_pickle=False))
    ids_path = out.with_suffix(".ids.npy")
    atomic_write(ids_path, lambda f: np.save(f, ids, allow_pickle=False))
    meta = {"embeddings": out.name, "ids": ids_path.name, "count": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "dtype": "float32", "normalized": True, "encoder": cfg.model.encoder,
            "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint)}
    atomic_write_json(out.with_suffix(".json"), meta)
    return meta
