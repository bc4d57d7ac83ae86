"""Export item embeddings (+ raw ids) from a checkpoint for offline index builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.io import atomic_write, atomic_write_json, sha256_file
from genrec.retrieval.keys import as_ids, id_arrays, ids_path_pair


def export_item_embeddings(checkpoint: str | Path, out: str | Path) -> dict:
    """Write ``out`` (N, D) float32 L2-normalised item embeddings, the (N,) raw ids (``<stem>.ids.npy`` int64,
    or for string ids ``<stem>.ids_utf8.npy`` + ``<stem>.ids_offsets.npy``) and ``<stem>.json`` (dims, count,
    checkpoint sha256). Row i is the item whose raw id is ids[i]."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy, got {out}")
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state)
    with torch.no_grad():
        emb = model.item_embeddings()[1:].float().numpy()
    ids = as_ids(state["item_ids"], "checkpoint item_ids")
    atomic_write(out, lambda f: np.save(f, emb, allow_pickle=False))
    arrays = id_arrays("ids", ids)
    paths = [out.with_suffix(".ids.npy")] if "ids" in arrays else list(ids_path_pair(out.with_suffix(".ids.npy")))
    for path, arr in zip(paths, arrays.values()):
        atomic_write(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
    meta = {"embeddings": out.name, "ids": paths[0].name, "id_kind": "string" if ids.dtype == object else "int64",
            **({"ids_offsets": paths[1].name} if len(paths) > 1 else {}), "count": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "dtype": "float32", "normalized": True, "encoder": cfg.model.encoder,
            "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint)}
    atomic_write_json(out.with_suffix(".json"), meta)
    return meta
