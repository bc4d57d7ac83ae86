"""Indexes on disk: ``<root>/<name>/<version>/`` with .npy arrays (memory-mapped on load), blobs, and
``manifest.json`` written last.

The build happens in a hidden temp directory beside the final one; files are fsynced, the manifest
is written, and the directory is renamed into place in one step. A directory without a manifest (a
killed build) is never loaded. Loading checks the format version and, per ``verify``:
  size  every file exists with the recorded byte count, and every .npy header matches the recorded
        dtype and shape (catches truncation and swapped files cheaply);
  full  size checks plus the sha256 of every file (catches a flipped byte);
  none  trust the manifest (fast start for a file set verified before).
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from genrec import __version__
from genrec.index.attributes import ItemAttributes, split_attribute_arrays
from genrec.index.base import Index, IndexState
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FaissMIPS, FlatMIPS
from genrec.io import atomic_directory, recover_directory, sha256_file
from genrec.retrieval.keys import CATALOG_KEYS, CatalogKeys, ids_from_arrays

FORMAT_VERSION = 1
log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
VERIFY_MODES = ("full", "size", "none")


class IndexFormatError(ValueError):
    """An index directory that must not be served. ``reason``: "missing" (no such directory, or no
    manifest: an incomplete build), "newer" (format from a newer genrec) or "corrupt" (anything that
    disagrees with the manifest)."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


def package_versions() -> dict[str, str]:
    import torch

    versions = {"genrec": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    try:
        import faiss

        versions["faiss"] = faiss.__version__
    except ImportError:
        pass
    return versions


def next_version(root: Path, name: str) -> str:
    """'v1', 'v2', ...: one above the highest existing complete version."""
    nums = [int(m.group(1)) for p in (root / name).glob("v*") if (m := re.fullmatch(r"v(\d+)", p.name))]
    return f"v{max(nums, default=0) + 1}"


def latest_version(root: str | Path, name: str) -> Path:
    """The highest vN directory of ``name`` that has a manifest."""
    for parked in (Path(root) / name).glob(".v*.old"):  # versions a killed --overwrite build parked aside
        recover_directory(parked.with_name(parked.name[1:-4]))
    cands = [(int(m.group(1)), p) for p in (Path(root) / name).glob("v*")
             if (m := re.fullmatch(r"v(\d+)", p.name)) and (p / MANIFEST).is_file()]
    if not cands:
        raise IndexFormatError(f"no complete version of index {name!r} under {root}", "missing")
    return max(cands)[1]


def _npy_header(path: Path) -> tuple[str, tuple[int, ...]]:
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    return dtype.str, tuple(shape)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # index names and versions: one safe path component


def shown(value: str, limit: int = 64) -> str:
    """``value`` for an error message: quoted, and cut to ``limit`` characters (names come from clients)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_name(what: str, value: str) -> str:
    """Raise ValueError unless ``value`` is 1-128 letters, digits, '.', '_' or '-' (not starting with . _ -)."""
    if not NAME.fullmatch(value):
        raise ValueError(f"{what} {shown(value)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def save_index(index: Index, root: str | Path, name: str, version: str | None = None,
               extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``index`` to <root>/<name>/<version> atomically; returns the final directory.

    extra: more manifest fields (encoder checkpoint hash, eval summary, shard info, build config).
    """
    check_name("index name", name)
    root = Path(root)
    version = version or next_version(root, name)
    check_name("index version", version)
    st = index.state()
    if index.attributes is not None:
        st.arrays.update(index.attributes.arrays())
        extra = {**(extra or {}), "attributes": index.attributes.vocab}
    if index.keys is not None:
        st.arrays.update(index.keys.arrays())
        extra = {**(extra or {}), "item_id_kind": "string"}
    return write_version(root / name / version, st.arrays, st.blobs, {
        "name": name, "version": version, "kind": st.kind, "count": index.ntotal, "query_dim": index.dim,
        "bytes_per_item": index.bytes_per_item, "params": st.params, **(extra or {})}, overwrite)


def write_version(final: Path, arrays: dict[str, np.ndarray], blobs: dict[str, bytes], fields: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """Write one version directory atomically: each array as ``<key>.npy``, each blob as a file, and
    ``manifest.json`` last (``fields`` + format, date, packages and every file's size and sha256)."""
    with atomic_directory(final, overwrite=overwrite) as tmp:
        files = []
        for key, arr in arrays.items():
            path = tmp / f"{key}.npy"
            np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
            files.append({"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                          "dtype": np.asarray(arr).dtype.str, "shape": list(np.shape(arr))})
        for key, blob in blobs.items():
            path = tmp / key
            path.write_bytes(blob)
            files.append({"path": path.name, "bytes": len(blob), "sha256": sha256_file(path)})
        manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "packages": package_versions(), **fields, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last
    return final


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir() and recover_directory(path):  # a replacement killed between its renames
        log.warning("%s: restored the version a killed --overwrite build had parked aside", path)
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index directory", "missing")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise IndexFormatError(f"{path}: no {MANIFEST} (an incomplete or interrupted build); refusing to load", "missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{mpath}: unreadable manifest ({e})") from None
    for key in ("format_version", "kind", "files", "count"):
        if key not in manifest:
            raise IndexFormatError(f"{mpath}: manifest lacks {key!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexFormatError(f"{path}: index format {manifest['format_version']} is newer than this genrec "
                               f"supports ({FORMAT_VERSION}); upgrade genrec", "newer")
    return manifest


def verify_index(path: str | Path, mode: str = "full") -> dict[str, Any]:
    """Check an index directory against its manifest; returns the manifest or raises IndexFormatError."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r}: use one of {', '.join(VERIFY_MODES)}")
    path = Path(path)
    manifest = read_manifest(path)
    if mode == "none":
        return manifest
    for f in manifest["files"]:
        name = str(f["path"])
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name:  # files live in this directory
            raise IndexFormatError(f"{path}: manifest lists {name[:200]!r}, a path outside the version directory")
        p = path / name
        if not p.is_file():
            raise IndexFormatError(f"{p}: missing (listed in the manifest)")
        size = p.stat().st_size
        if size != f["bytes"]:
            raise IndexFormatError(f"{p}: {size} bytes, manifest says {f['bytes']} (truncated or replaced)")
        if "shape" in f:
            try:
                dtype, shape = _npy_header(p)
            except Exception as e:  # noqa: BLE001 - any header damage is the same refusal
                raise IndexFormatError(f"{p}: unreadable .npy header ({e})") from None
            if dtype != f["dtype"] or list(shape) != f["shape"]:
                raise IndexFormatError(f"{p}: holds {dtype}{list(shape)}, manifest says {f['dtype']}{f['shape']}")
        if mode == "full" and sha256_file(p) != f["sha256"]:
            raise IndexFormatError(f"{p}: sha256 mismatch (corrupted)")
    return manifest


BF16_EXPONENT = 0x7F80  # all exponent bits set: Inf or NaN


def all_finite(arr: np.ndarray, block: int = 1 << 22, bfloat16: bool = False) -> bool:
    """Whether a float array (memory-mapped or not) holds only finite values, read in blocks of
    ``block`` elements so a mapped array is never copied whole. ``bfloat16``: ``arr`` is int16 holding bf16
    bits. Other non-float arrays are trivially finite."""
    flat = arr.reshape(-1)
    if bfloat16:
        return not any((flat[s : s + block] & BF16_EXPONENT == BF16_EXPONENT).any() for s in range(0, flat.size, block))
    if not np.issubdtype(arr.dtype, np.floating):
        return True
    return all(np.isfinite(flat[s : s + block]).all() for s in range(0, flat.size, block))


def index_classes() -> dict[str, type]:
    return {c.kind: c for c in (MoLHIndexer, FlatMIPS, FaissMIPS)}


def read_version_files(path: Path, manifest: dict[str, Any], verify: str, mmap: bool,
                       bf16_arrays: set[str] = frozenset()) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """A verified version's arrays (memory-mapped unless ``mmap`` is off; checked finite unless verify is
    none) and blobs."""
    arrays, blobs = {}, {}
    for f in manifest["files"]:
        p = path / f["path"]
        if "shape" in f:
            try:
                arrays[p.stem] = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                raise IndexFormatError(f"{p}: unreadable array ({e})") from None
            bf16 = p.stem in bf16_arrays and arrays[p.stem].dtype == np.int16
            if verify != "none" and not all_finite(arrays[p.stem], bfloat16=bf16):
                raise IndexFormatError(f"{p}: holds NaN or infinite values (such an item would outrank every other)")
        else:
            blobs[p.name] = p.read_bytes()
    return arrays, blobs


def load_index(path: str | Path, verify: str = "size", mmap: bool = True) -> tuple[Index, dict[str, Any]]:
    """Load a verified index directory (arrays memory-mapped). Returns (index, manifest)."""
    path = Path(path)
    manifest = verify_index(path, verify)
    if manifest["kind"] == "sharded":
        from genrec.index.sharding import ShardedIndex  # sharding builds on this module: import it here

        return ShardedIndex.load(path, manifest, verify, mmap), manifest
    if manifest["kind"] == "delta":
        from genrec.index.delta import DeltaIndex  # so does the delta kind

        return DeltaIndex.load(path, manifest, verify, mmap), manifest
    classes = index_classes()
    if manifest["kind"] not in classes:
        raise IndexFormatError(f"{path}: unknown index kind {manifest['kind']!r}")
    bf16_arrays = classes[manifest["kind"]].bfloat16_arrays(manifest["params"] if isinstance(manifest.get("params"), dict) else {})
    arrays, blobs = read_version_files(path, manifest, verify, mmap, bf16_arrays)
    arrays, attribute_arrays = split_attribute_arrays(arrays)
    try:
        keys = ids_from_arrays(CATALOG_KEYS, arrays)  # popped: the index kinds never see them
    except ValueError as e:
        raise IndexFormatError(f"{path}: item keys unreadable ({e})") from None
    st = IndexState(manifest["kind"], manifest["params"], arrays, blobs)
    try:
        index = classes[manifest["kind"]].from_state(st)
        if manifest.get("attributes"):
            index.attributes = ItemAttributes.from_arrays(attribute_arrays, manifest["attributes"], index.ntotal)
        if keys is not None:
            index.keys = CatalogKeys(keys, index.ids.numpy())
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise IndexFormatError(f"{path}: inconsistent index files ({type(e).__name__}: {e})") from None
    if index.ntotal != manifest["count"]:
        raise IndexFormatError(f"{path}: holds {index.ntotal} items, manifest says {manifest['count']}")
    if verify != "none" and not index.vectors_finite():
        raise IndexFormatError(f"{path}: its vectors hold NaN or infinite values (such an item would outrank every other)")
    return index, manifest
