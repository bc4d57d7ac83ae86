"""Sharded indexes: build slices independently, merge their manifests, search scatter-gather.

``build-index --shard-id i --num-shards n`` writes ``<root>/<name>/<version>.shard-i-of-n`` over items
[i*N/n, (i+1)*N/n): a complete index of its own, whose stage-1 projection and scales are fitted on the
whole corpus, so all shards score stage 1 identically. ``merge-index`` checks that the shards tile the
corpus and share one stage-1 fit, then writes ``<root>/<name>/<version>/manifest.json`` of kind
``sharded`` that pins each shard's manifest by sha256. Search asks every shard for its exact local
top-k and merges on (score desc, id asc).

With exact per-shard search the merge equals a single build's answer. With the h-indexer each shard
keeps its own K' stage-1 candidates, so the union is a superset of the single build's candidates:
recall can only rise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from genrec.index.storage import FORMAT_VERSION, MANIFEST, IndexFormatError, load_index, package_versions, read_manifest
from genrec.io import atomic_directory, sha256_file
from genrec.retrieval.keys import CatalogKeys
from genrec.retrieval.search import SearchResult
from genrec.kernels.topk import select_topk

SHARED_STAGE1_FILES = ("stage1_projection.npy", "stage1_scales.npy", "stage1_query_projection.npy")


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    if num_shards <= 0 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} of {num_shards}: need 0 <= shard-id < num-shards")
    return shard_id * n // num_shards, (shard_id + 1) * n // num_shards


def shard_version(version: str, shard_id: int, num_shards: int) -> str:
    return f"{version}.shard-{shard_id}-of-{num_shards}"


def merge_shards(shard_dirs: Sequence[str | Path], root: str | Path, name: str, version: str) -> Path:
    """Validate shard manifests and write the logical index <root>/<name>/<version> (atomically)."""
    if not shard_dirs:
        raise ValueError("merge-index needs at least one shard directory")
    final = Path(root) / name / version
    entries = []
    for d in shard_dirs:
        d = Path(d)
        m = read_manifest(d)
        if "shard" not in m:
            raise IndexFormatError(f"{d}: not a shard (built without --shard-id/--num-shards)")
        entries.append((m["shard"]["id"], d, m))
    entries.sort(key=lambda e: e[0])
    first = entries[0][2]
    n_shards, total = first["shard"]["num_shards"], first["shard"]["total"]
    if [e[0] for e in entries] != list(range(n_shards)):
        raise IndexFormatError(f"shards {[e[0] for e in entries]} do not cover 0..{n_shards - 1}")
    expected_start = 0
    for sid, d, m in entries:
        s = m["shard"]
        if (s["num_shards"], s["total"], m["kind"]) != (n_shards, total, first["kind"]):
            raise IndexFormatError(f"{d}: shard of a different build (num_shards/total/kind differ)")
        if s["start"] != expected_start:
            raise IndexFormatError(f"{d}: starts at item {s['start']}, expected {expected_start} (gap or overlap)")
        expected_start = s["end"]
        for shared in SHARED_STAGE1_FILES:
            mine = {f["path"]: f["sha256"] for f in m["files"]}.get(shared)
            theirs = {f["path"]: f["sha256"] for f in first["files"]}.get(shared)
            if mine != theirs:
                raise IndexFormatError(f"{d}: {shared} differs from shard 0 (stage 1 fitted differently)")
    if expected_start != total:
        raise IndexFormatError(f"shards end at item {expected_start}, corpus has {total}")
    with atomic_directory(final) as tmp:
        manifest = {
            "format_version": FORMAT_VERSION, "kind": "sharded", "name": name, "version": version,
            "count": total, "query_dim": first["query_dim"], "shard_kind": first["kind"], "packages": package_versions(),
            "bytes_per_item": sum(m["bytes_per_item"] * m["count"] for _, _, m in entries) / max(total, 1),
            "files": [],
            "shards": [{"path": str(Path("..") / d.name) if d.parent.resolve() == final.parent.resolve() else str(d.resolve()),
                        "manifest_sha256": sha256_file(d / MANIFEST), "start": m["shard"]["start"], "count": m["count"]}
                       for _, d, m in entries],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return final


class ShardedIndex:
    """Scatter-gather over shard indexes: exact per-shard top-k merged by (score desc, id asc)."""

    kind = "sharded"

    def __init__(self, shards: list):
        self.shards = shards
        self.ntotal = sum(s.ntotal for s in shards)
        self.dim = shards[0].dim
        self.bytes_per_item = sum(s.bytes_per_item * s.ntotal for s in shards) / max(self.ntotal, 1)
        with_keys = [s.keys for s in shards if s.keys is not None]
        if with_keys and len(with_keys) != len(shards):
            raise ValueError("some shards have string item ids and some do not")
        self.keys = CatalogKeys.concat(with_keys) if with_keys else None

    @classmethod
    def load(cls, path: Path, manifest: dict[str, Any], verify: str, mmap: bool) -> "ShardedIndex":
        shards = []
        for entry in manifest["shards"]:
            d = (path / entry["path"]).resolve()
            if not (d / MANIFEST).is_file():
                raise IndexFormatError(f"{path}: shard {d} is missing")
            if sha256_file(d / MANIFEST) != entry["manifest_sha256"]:
                raise IndexFormatError(f"{path}: shard {d} was rebuilt or changed since the merge")
            shards.append(load_index(d, verify, mmap)[0])
        return cls(shards)

    @property
    def device(self) -> torch.device:
        return self.shards[0].device

    def to(self, device: torch.device | str) -> "ShardedIndex":
        """Moves every shard to ``device`` (each shard searches there; the merge runs on the host)."""
        self.shards = [s.to(device) for s in self.shards]
        return self

    def search_with_certificate(self, queries, k: int, exclude=None, **params) -> SearchResult:
        parts = [s.search_with_certificate(queries, k, exclude=exclude, **params) for s in self.shards]
        scores = torch.from_numpy(np.concatenate([p.scores for p in parts], 1))
        ids = torch.from_numpy(np.concatenate([p.ids for p in parts], 1))
        s, i = select_topk(scores, ids, k)
        exact = np.logical_and.reduce([p.exact for p in parts])
        bound = np.maximum.reduce([p.bound for p in parts])
        return SearchResult(s.numpy(), i.numpy(), exact, bound)

    def search(self, queries, k: int, exclude=None, **params) -> tuple[np.ndarray, np.ndarray]:
        r = self.search_with_certificate(queries, k, exclude=exclude, **params)
        return r.scores, r.ids

