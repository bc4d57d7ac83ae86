"""Adding and removing items without a rebuild: a version = a base version + a delta segment + tombstones.

``genrec update-index`` writes ``<root>/<name>/<vN+1>/`` of kind ``delta``: the vectors and ids of the items
added since the base (``delta_items.npy``, ``delta_ids.npy``; string ids as ``delta_keys_*``), the base ids
no longer served (``tombstones.npy``: removed, or replaced by a newer vector in the delta), and the base
pinned by path and manifest sha256. Like a growing segment in a vector database, the delta is searched
exactly (flat: inner products; h-indexer: every delta item through stage 2's exact MoL), the base with the
tombstones as a deny filter inside its search, and the two top-k lists are merged by (score desc, id asc):
for a flat base that equals a rebuild over the live items; for an h-indexer it is the rebuild's answer
whenever the base's K' covers what the rebuild's would (a rebuild also re-fits stage 1, which this does
not). Updates chain: each new version folds the previous delta in and keeps the one original base.
``genrec compact-index`` rebuilds the live items into an ordinary version with the base's spec.

Costs: tombstones put the base on its filtered path (the live rows gathered once per search call), and
the delta's exact scan grows with it; compact when either matters. Only flat (``mips``) and
``mol-hindexer`` bases: the kinds whose search applies a deny filter inside.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from genrec.index.attributes import ItemAttributes
from genrec.index.base import Index
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FlatMIPS
from genrec.index.storage import (MANIFEST, IndexFormatError, latest_version, load_index, read_manifest,
                                  read_version_files, write_version)
from genrec.io import sha256_file
from genrec.kernels.topk import select_topk
from genrec.retrieval.keys import CatalogKeys, KeyMap, as_ids, id_arrays, ids_from_arrays
from genrec.retrieval.search import SearchResult

log = logging.getLogger(__name__)
KIND = "delta"
BASE_KINDS = (FlatMIPS.kind, MoLHIndexer.kind)


class DeltaIndex:
    """base (a flat or h-indexer Index) + delta items (m, D) float32 under ``delta_ids`` (m,) int64 (their
    string ids ``delta_keys`` (m,) when the catalog has them) + ``tombstones`` (t,) int64 base ids hidden."""

    kind = KIND

    def __init__(self, base: Index, delta_items: np.ndarray, delta_ids: np.ndarray, tombstones: np.ndarray,
                 delta_keys: np.ndarray | None = None):
        if base.kind not in BASE_KINDS:
            raise ValueError(f"items can be added to or removed from {' and '.join(BASE_KINDS)} indexes, not {base.kind}")
        self.base = base
        self.delta_items = np.ascontiguousarray(delta_items, dtype=np.float32).reshape(-1, base_item_dim(base))
        self.delta_ids = np.asarray(delta_ids, dtype=np.int64)
        if len(np.unique(self.delta_ids)) != len(self.delta_ids) or len(self.delta_ids) != len(self.delta_items):
            raise ValueError(f"{len(self.delta_items)} delta items need as many distinct ids, got {len(self.delta_ids)}")
        self.tombstones = np.unique(np.asarray(tombstones, dtype=np.int64))
        if (base.keys is None) != (delta_keys is None):
            raise ValueError("the delta's items need string ids exactly when the base's have them")
        self.delta_keys = None if delta_keys is None else as_ids(delta_keys)
        hidden = np.union1d(self.tombstones, self.delta_ids)  # a re-added item's old vector is hidden too
        base_hidden = base.idmap.rows(hidden)
        self.hidden = base.ids.numpy()[base_hidden.numpy()]  # the base ids the base search must not return
        self.ntotal = base.ntotal - len(self.hidden) + len(self.delta_ids)
        self.dim = base.dim
        self.segment = self._segment() if len(self.delta_ids) else None
        self.keys = None
        if base.keys is not None:
            live = np.setdiff1d(base.keys.ids, self.hidden)
            self.keys = CatalogKeys(np.concatenate([base.keys.keys_of(live), self.delta_keys]),
                                    np.concatenate([live, self.delta_ids]))
        self.attributes = base.attributes

    def _segment(self) -> Index:
        """The delta as an index of the base's kind, searched exactly."""
        items = torch.from_numpy(self.delta_items.copy())
        if isinstance(self.base, FlatMIPS):
            seg = FlatMIPS(items, self.delta_ids)
        else:
            m = len(self.delta_ids)
            seg = MoLHIndexer.build(self.base.mol, items, self.delta_ids, stage1="avg", stage1_dtype="float32",
                                    kprime=m, sample_size=m)
        if self.base.attributes is not None:  # added items hold no attribute value (code -1) until compaction
            seg.attributes = ItemAttributes({c: np.full(len(self.delta_ids), -1, np.int32) for c in self.base.attributes.codes},
                                            self.base.attributes.vocab)
        return seg

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def bytes_per_item(self) -> float:
        return self.base.bytes_per_item

    def to(self, device) -> "DeltaIndex":
        self.base = self.base.to(device)
        if self.segment is not None:
            self.segment = self.segment.to(device)
        return self

    def external_ids(self) -> np.ndarray:
        """The live items' ids (strings for a string catalog), base rows first."""
        if self.keys is not None:
            return self.keys.keys.ids
        return np.concatenate([np.setdiff1d(self.base.ids.numpy(), self.hidden), self.delta_ids])

    def search_with_certificate(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                                allow: Sequence[int] | None = None, deny: Sequence[int] | None = None,
                                where=None, **params) -> SearchResult:
        base_deny = tuple(np.union1d(np.asarray(deny or (), np.int64), self.hidden).tolist()) if len(self.hidden) or deny else None
        parts = [self.base.search_with_certificate(queries, k, exclude=exclude, allow=allow, deny=base_deny, where=where,
                                                   **params)]
        if self.segment is not None:
            seg_params = {"kprime": len(self.delta_ids)} if isinstance(self.segment, MoLHIndexer) else {}
            parts.append(self.segment.search_with_certificate(queries, k, exclude=exclude, allow=allow, deny=deny,
                                                              where=where, **seg_params))
        scores = torch.from_numpy(np.concatenate([p.scores for p in parts], 1))
        ids = torch.from_numpy(np.concatenate([p.ids for p in parts], 1))
        s, i = select_topk(scores, ids, k)
        return SearchResult(s.numpy(), i.numpy(), np.logical_and.reduce([p.exact for p in parts]),
                            np.maximum.reduce([p.bound for p in parts]))

    def search(self, queries, k: int, exclude=None, **params) -> tuple[np.ndarray, np.ndarray]:
        r = self.search_with_certificate(queries, k, exclude=exclude, **params)
        return r.scores, r.ids

    def vectors_finite(self) -> bool:
        return bool(np.isfinite(self.delta_items).all())

    @classmethod
    def load(cls, path: Path, manifest: dict[str, Any], verify: str, mmap: bool) -> "DeltaIndex":
        base_dir = (path / manifest["base"]["path"]).resolve()
        if not (base_dir / MANIFEST).is_file():
            raise IndexFormatError(f"{path}: its base version {base_dir} is missing", "missing")
        if sha256_file(base_dir / MANIFEST) != manifest["base"]["manifest_sha256"]:
            raise IndexFormatError(f"{path}: its base {base_dir} was rebuilt or changed since this update")
        base, _ = load_index(base_dir, verify, mmap)
        arrays, _ = read_version_files(path, manifest, verify, mmap)
        try:
            keys = ids_from_arrays("delta_keys", arrays)
            index = cls(base, np.asarray(arrays["delta_items"]), np.asarray(arrays["delta_ids"]),
                        np.asarray(arrays["tombstones"]), keys)
        except (KeyError, ValueError) as e:
            raise IndexFormatError(f"{path}: inconsistent delta files ({type(e).__name__}: {e})") from None
        if index.ntotal != manifest["count"]:
            raise IndexFormatError(f"{path}: holds {index.ntotal} items, manifest says {manifest['count']}")
        return index


def base_item_dim(base: Index) -> int:
    """The dimension of the item vectors a base indexes (the MoL's item side for an h-indexer)."""
    return base.mol.init_kwargs["item_dim"] if isinstance(base, MoLHIndexer) else base.dim


def _base_of(path: Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """A version -> (its original base directory, the base manifest, the delta manifest or None)."""
    manifest = read_manifest(path)
    if manifest["kind"] == KIND:
        base = (path / manifest["base"]["path"]).resolve()
        return base, read_manifest(base), manifest
    return path.resolve(), manifest, None


def update_index(root: str | Path, name: str, add_items: np.ndarray | None = None, add_ids=None,
                 remove_ids=None, from_version: str | None = None, version: str | None = None) -> tuple[Path, dict[str, int]]:
    """A new version of ``name``: the one ``from_version`` names (default: the latest) with ``add_items``
    (m, D) float32 under ``add_ids`` (m,) (int64, or string ids for a string catalog; an id already served
    gets the new vector) and without ``remove_ids``. Returns (its directory, counts of what changed)."""
    from genrec.index.storage import next_version

    root = Path(root)
    src = root / name / from_version if from_version else latest_version(root, name)
    current, _ = load_index(src, "size")
    base_dir, base_manifest, _ = _base_of(src)
    base = current.base if isinstance(current, DeltaIndex) else current
    if base.kind not in BASE_KINDS:
        raise ValueError(f"index {name!r} is {base.kind}: items can be added to or removed from "
                         f"{' and '.join(BASE_KINDS)} indexes only")
    strings = base.keys is not None
    old = current if isinstance(current, DeltaIndex) else DeltaIndex(base, np.zeros((0, base_item_dim(base))), [], [],
                                                                     np.zeros(0, object) if strings else None)
    items = dict(zip(old.delta_ids.tolist(), old.delta_items))
    keys = dict(zip(old.delta_ids.tolist(), old.delta_keys)) if strings else {}
    tombstones = set(old.tombstones.tolist())
    stats = {"added": 0, "replaced": 0, "removed": 0, "unknown_removals": 0}
    if remove_ids is not None and len(remove_ids):
        for i in _int_ids(old, remove_ids, create=False).tolist():
            in_base = i >= 0 and int(base.idmap.lookup([i])[0]) >= 0 and i not in tombstones
            if i not in items and not in_base:
                stats["unknown_removals"] += 1  # unknown, or removed before: removing is idempotent
                continue
            stats["removed"] += 1
            items.pop(i, None)
            keys.pop(i, None)
            if in_base:
                tombstones.add(i)
    if add_items is not None and len(add_items):
        add_items = np.asarray(add_items, dtype=np.float32)
        if add_items.ndim != 2 or add_items.shape[1] != base_item_dim(base):
            raise ValueError(f"added items must be (m, {base_item_dim(base)}) float32, got shape {add_items.shape}")
        if not np.isfinite(add_items).all():
            raise ValueError("added item vectors hold NaN or Inf")
        raw = as_ids(add_ids, "added ids")
        if len(raw) != len(add_items) or len(np.unique(raw)) != len(raw):
            raise ValueError(f"{len(add_items)} added items need {len(add_items)} distinct ids, got {len(raw)}")
        new_ids = _int_ids(old, raw, create=True, taken=set(items) | tombstones)
        for i, key, vec in zip(new_ids.tolist(), raw, add_items):
            live = i in items or (int(base.idmap.lookup([i])[0]) >= 0 and i not in tombstones)
            stats["replaced" if live else "added"] += 1
            items[i] = vec
            if strings:
                keys[i] = key
            tombstones.discard(i)  # a removed item that comes back lives in the delta
    ids = np.array(sorted(items), dtype=np.int64)
    delta = DeltaIndex(base, np.stack([items[i] for i in ids]) if len(ids) else np.zeros((0, base_item_dim(base))),
                       ids, sorted(tombstones), np.array([keys[i] for i in ids], dtype=object) if strings else None)
    arrays = {"delta_items": delta.delta_items, "delta_ids": delta.delta_ids, "tombstones": delta.tombstones}
    if strings:
        arrays.update(id_arrays("delta_keys", delta.delta_keys))
    version = version or next_version(root, name)
    final = root / name / version
    rel = Path("..") / base_dir.name if base_dir.parent == final.parent.resolve() else base_dir
    carried = {k: base_manifest[k] for k in ("spec", "source", "encoder_checkpoint_sha256", "attributes", "item_id_kind")
               if k in base_manifest}
    path = write_version(final, arrays, {}, {
        "name": name, "version": version, "kind": KIND, "count": delta.ntotal, "query_dim": delta.dim,
        "bytes_per_item": delta.bytes_per_item, "base_kind": base.kind,
        "base": {"path": str(rel), "manifest_sha256": sha256_file(base_dir / MANIFEST), "version": base_dir.name},
        "delta": {"items": len(ids), "tombstones": len(delta.tombstones), **stats}, **carried})
    return path, stats


def _int_ids(index: DeltaIndex, raw, create: bool, taken: set[int] = frozenset()) -> np.ndarray:
    """Item ids as the user gives them -> the index's int64 ids. A string catalog's unknown strings are -1,
    or with ``create`` fresh int64 ids above every id in use; a base item removed earlier keeps its id."""
    raw = as_ids(raw, "item ids")
    strings = index.base.keys is not None
    if (raw.dtype == object) != strings:
        raise ValueError(f"this index has {'string' if strings else 'int64'} item ids; these are not")
    if not strings:
        return raw.copy()
    known = index.keys.ids_of(raw)
    known = np.where(known >= 0, known, index.base.keys.ids_of(raw))
    if create:
        top = max([int(index.base.ids.max()) if index.base.ntotal else -1, *taken, *known.tolist()])
        fresh = np.flatnonzero(known < 0)
        known[fresh] = top + 1 + np.arange(len(fresh))
    return known


def compact_index(root: str | Path, name: str, from_version: str | None = None, version: str | None = None,
                  inputs=None, progress: bool = False) -> Path:
    """Rebuild the live items of a delta version into an ordinary version with the base's spec. A flat
    base holds its vectors; an h-indexer needs the items' embeddings (``inputs``: ItemInputs, default the
    source its base was built from), since it keeps only the MoL's item-side cache."""
    from genrec.index.build import ItemInputs, build, read_items
    from genrec.index.spec import from_mapping
    from genrec.index.storage import next_version, save_index

    root = Path(root)
    src = root / name / from_version if from_version else latest_version(root, name)
    current, manifest = load_index(src, "full")
    if not isinstance(current, DeltaIndex):
        raise ValueError(f"{src}: not an updated version (kind {manifest['kind']}): nothing to compact")
    base = current.base
    live = np.flatnonzero(~np.isin(base.ids.numpy(), current.hidden))
    if isinstance(base, FlatMIPS):
        base_items = base.items.numpy()[live]
    else:
        inputs = inputs or read_items(**{k: v for k, v in manifest.get("source", {}).items() if k in ("embeddings", "checkpoint")})
        wanted = base.ids.numpy()[live]
        if base.keys is not None:  # a string catalog: find the base's items in the inputs by string id
            wanted = inputs.catalog_keys().ids_of(base.keys.keys_of(wanted))
        pos = KeyMap(inputs.ids).rows(wanted)
        if (pos < 0).any():
            raise ValueError("the embeddings given for compaction lack some of the base's items")
        base_items = np.asarray(inputs.items[pos], dtype=np.float32)
    ids = np.concatenate([base.ids.numpy()[live], current.delta_ids])
    keys = None if base.keys is None else np.concatenate([base.keys.keys_of(base.ids.numpy()[live]), current.delta_keys])
    merged = ItemInputs(np.concatenate([base_items, current.delta_items]), ids, manifest.get("source", {}), keys)
    spec = from_mapping(manifest["spec"])
    index = build(spec, merged, getattr(base, "mol", None), progress=progress)
    if base.attributes is not None:
        index.attributes = ItemAttributes(
            {c: np.concatenate([codes[live], np.full(len(current.delta_ids), -1, np.int32)])
             for c, codes in base.attributes.codes.items()}, base.attributes.vocab)
    extra = {k: manifest[k] for k in ("spec", "source", "encoder_checkpoint_sha256") if k in manifest}
    extra["compacted_from"] = src.name
    return save_index(index, root, name, version or next_version(root, name), extra)
