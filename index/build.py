"""Offline index builds: read item embeddings, build the index a spec names, measure it, save it.

Inputs (any one):
  --embeddings items.npy      (N, D) float32 from ``genrec embed``; ids from items.ids.npy beside it
                              (or --ids), else 0..N-1. Memory-mapped: N may exceed RAM for stage 1.
  --embeddings items.parquet  columns ``id`` (int64) and ``embedding`` (list of floats).
  --checkpoint run/checkpoint_best.pt   the trained item embeddings and raw item ids.
A mol-hindexer also needs the checkpoint for the MoL weights (``similarity.type=mol``).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, similarity_from_checkpoint
from genrec.index.distill import noisy_item_queries
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FaissMIPS, FlatMIPS
from genrec.index.spec import IndexSpec
from genrec.io import sha256_file
from genrec.retrieval.keys import CatalogKeys, as_ids, decode_utf8, ids_path_pair
from genrec.retrieval.metrics import recall_at, top1_in
from genrec.retrieval.search import MoLSearcher

log = logging.getLogger(__name__)


@dataclass
class ItemInputs:
    """items (N, D) float32 (possibly a read-only memmap), ids (N,) int64, provenance for the manifest;
    keys (N,) str when the catalog's ids are strings (then ids are the rows 0..N-1: the model's item table)."""

    items: np.ndarray
    ids: np.ndarray
    source: dict[str, Any]
    keys: np.ndarray | None = None

    @classmethod
    def of(cls, items: np.ndarray, raw_ids, source: dict[str, Any]) -> "ItemInputs":
        """Raw ids of either kind: int64 ids are the index's ids; string ids become its keys."""
        raw = as_ids(raw_ids, source.get("embeddings", source.get("checkpoint", "ids")))
        if raw.dtype == object:
            return cls(items, np.arange(len(raw), dtype=np.int64), source, raw)
        return cls(items, raw, source)

    def catalog_keys(self, rows: tuple[int, int] | None = None) -> CatalogKeys | None:
        """The string ids of items[rows] (None for int64 catalogs)."""
        if self.keys is None:
            return None
        start, end = rows or (0, len(self.ids))
        return CatalogKeys(self.keys[start:end], self.ids[start:end])


def _check_items(items: np.ndarray, ids: np.ndarray, where: str, chunk: int = 1 << 20) -> None:
    if items.ndim != 2 or items.shape[0] == 0:
        raise ValueError(f"{where}: item embeddings must be a non-empty 2-D (N, D) array, got shape {items.shape}")
    if items.dtype.kind != "f":
        raise ValueError(f"{where}: item embeddings must be floating point, got {items.dtype}")
    for s in range(0, len(items), chunk):
        block = np.asarray(items[s : s + chunk])
        if not np.isfinite(block).all():
            row = s + int(np.nonzero(~np.isfinite(block).all(1))[0][0])
            raise ValueError(f"{where}: item embedding row {row} holds NaN or Inf")
    if ids.shape != (items.shape[0],):
        raise ValueError(f"{where}: {ids.shape[0] if ids.ndim else 0} ids for {items.shape[0]} items")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: item ids are not unique")


def _embed_sidecar(path: Path) -> dict:
    """The JSON ``genrec embed`` writes beside its .npy (model, checkpoint sha256), or {} when absent."""
    side = path.with_suffix(".json")
    if path.suffix != ".npy" or not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("embeddings") == path.name else {}


def read_id_file(path: Path, required: bool) -> np.ndarray | None:
    """Item ids from ``path`` (.npy of int64 or of strings), or from the UTF-8 + offsets pair ``genrec embed``
    writes for string ids beside it (``items.ids_utf8.npy``, ``items.ids_offsets.npy``); None if absent."""
    utf8, offsets = ids_path_pair(path)
    if path.is_file():
        return np.load(path, allow_pickle=False)
    if utf8.is_file() and offsets.is_file():
        return decode_utf8(np.load(utf8, allow_pickle=False), np.load(offsets, allow_pickle=False))
    if required:
        raise FileNotFoundError(f"ids file not found: {path}")
    return None


def read_items(embeddings: str | None = None, ids: str | None = None, checkpoint: str | None = None) -> ItemInputs:
    if embeddings is None:
        if checkpoint is None:
            raise ValueError("give --embeddings (.npy/.parquet) or --checkpoint")

        state = load_checkpoint(checkpoint)
        model, _ = model_from_checkpoint(state)
        with torch.no_grad():
            items = model.item_embeddings()[1:].float().numpy()
        out = ItemInputs.of(items, state["item_ids"], {"checkpoint": str(checkpoint)})
    else:
        path = Path(embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"embeddings file not found: {path}")
        if path.suffix == ".npy":
            try:
                items = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: not a readable .npy array ({e})") from None
            id_arr = read_id_file(Path(ids) if ids else path.with_suffix(".ids.npy"), required=bool(ids))
            if id_arr is None:
                id_arr = np.arange(len(items), dtype=np.int64)
        elif path.suffix == ".parquet":
            import pandas as pd

            df = pd.read_parquet(path)
            if not {"id", "embedding"} <= set(df.columns):
                raise ValueError(f"{path}: needs columns 'id' and 'embedding', has {list(df.columns)}")
            items = np.stack(df["embedding"].to_numpy()).astype(np.float32)
            id_arr = df["id"].to_numpy()
        else:
            raise ValueError(f"{path}: embeddings must be .npy or .parquet")
        out = ItemInputs.of(items, id_arr, {"embeddings": str(path)})
        if checkpoint:
            out.source["checkpoint"] = str(checkpoint)
        else:  # vectors from `genrec embed` name their model in a sidecar: keep the index paired with it
            sidecar = _embed_sidecar(path)
            if sidecar.get("checkpoint_sha256"):
                out.source["checkpoint_sha256"] = str(sidecar["checkpoint_sha256"])
    where = out.source.get("embeddings", out.source.get("checkpoint", ""))
    _check_items(out.items, out.ids, where)
    if out.keys is not None:
        out.catalog_keys()  # unique, non-empty strings
        out.source["id_kind"] = "string"
    if "checkpoint" in out.source:
        out.source["checkpoint_sha256"] = sha256_file(out.source["checkpoint"])
    return out


def load_mol(checkpoint: str | None):
    if checkpoint is None:
        raise ValueError("a mol-hindexer needs --checkpoint (a run trained with similarity.type=mol)")

    sim = similarity_from_checkpoint(load_checkpoint(checkpoint))
    if not hasattr(sim, "mol"):
        raise CheckpointError(f"{checkpoint}: trained with a dot-product similarity; use a mips index or retrain with similarity.type=mol")
    return sim.mol


def build(spec: IndexSpec, inputs: ItemInputs, mol=None, rows: tuple[int, int] | None = None, progress: bool = True,
          train_queries: np.ndarray | None = None):
    """The index ``spec`` names over inputs.items[rows[0]:rows[1]] (all items by default).
    train_queries: (m, D) query states a learned stage 1 is distilled on (default: noisy items)."""

    index = _build(spec, inputs, mol, rows, progress, train_queries)
    index.keys = inputs.catalog_keys(rows)
    return index


def _build(spec: IndexSpec, inputs: ItemInputs, mol, rows: tuple[int, int] | None, progress: bool,
           train_queries: np.ndarray | None):
    start, end = rows or (0, len(inputs.items))
    if spec.type == "mol-hindexer":
        if mol is None:
            raise ValueError("a mol-hindexer needs the MoL weights (--checkpoint)")
        return MoLHIndexer.build(mol, inputs.items, inputs.ids, stage1=spec.stage1, stage1_dtype=spec.stage1_dtype,
                                 kprime=spec.kprime, cache_dtype=spec.cache_dtype, sample_size=spec.sample_size,
                                 seed=spec.seed, rows=rows, progress=progress, train_queries=train_queries,
                                 distill_steps=spec.distill_steps, stage1_select=spec.stage1_select)
    items, ids = np.asarray(inputs.items[start:end], dtype=np.float32), inputs.ids[start:end]
    if spec.factory == "Flat":
        return FlatMIPS(torch.from_numpy(np.ascontiguousarray(items)), ids)
    params = {k: v for k, v in (("nprobe", spec.nprobe), ("efSearch", spec.ef_search)) if v}
    return FaissMIPS.build(items, spec.factory, ids, params, seed=spec.seed)


def exact_reference(index, inputs: ItemInputs, rows: tuple[int, int] | None = None):
    """The exact searcher over the same items and similarity as ``index`` (the recall oracle)."""

    if isinstance(index, MoLHIndexer):
        return MoLSearcher(index.mol, index.cache, index.ids.numpy())
    if isinstance(index, FlatMIPS):
        return index
    start, end = rows or (0, len(inputs.items))
    items = np.ascontiguousarray(inputs.items[start:end], dtype=np.float32)
    with warnings.catch_warnings():  # a read-only memory map: FlatMIPS only reads it, so no copy is needed
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return FlatMIPS(torch.from_numpy(items), inputs.ids[start:end])


def proxy_queries(inputs: ItemInputs, count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Held-out evaluation queries when none are given: item embeddings plus noise, re-normalised
    (encoder states live in the item space for both similarities)."""
    if inputs.items.shape[1] != dim:
        raise ValueError(f"items have dim {inputs.items.shape[1]}, the index expects queries of dim {dim}: pass --eval-queries-file")
    return noisy_item_queries(inputs.items, count, seed)


def eval_summary(index, exact, queries: np.ndarray, ks: tuple[int, ...] = (10, 100)) -> dict[str, Any]:
    """Recall of the index against the exact searcher on held-out queries, and its batch latency."""
    kmax = max(ks)
    t = time.perf_counter()
    _, approx = index.search(queries, kmax)
    seconds = time.perf_counter() - t
    _, exact = exact.search(queries, kmax)
    out: dict[str, Any] = {"queries": int(len(queries)), "search_seconds": round(seconds, 4)}
    for k in ks:
        out[f"recall@{k}"] = round(recall_at(approx, exact, k), 4)
    out["top1_in_top%d" % kmax] = round(top1_in(approx, exact), 4)
    return out


def describe(manifest: dict[str, Any]) -> str:
    keep = {k: manifest.get(k) for k in ("name", "version", "kind", "count", "query_dim", "bytes_per_item", "params", "eval", "shard")}
    return json.dumps({k: v for k, v in keep.items() if v is not None}, indent=2)
