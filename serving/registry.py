"""The indexes a server holds, by name, each with one active version swapped atomically.

A search takes a reference to the active ``Served`` entry once and uses it to the end, so a swap never
disturbs requests already running: they finish on the version they started with and report it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from genrec.index.storage import MANIFEST, latest_version, load_index, read_manifest
from genrec.serving.placement import PlacementError, resolve_device

log = logging.getLogger(__name__)


class ModelMismatchError(ValueError):
    """An index was built from another model's checkpoint than the server's encoder: its item vectors and
    the encoder's queries live in different spaces, so every SearchByUser answer would be noise."""


class LoadAbandoned(RuntimeError):
    """A load finished after its caller stopped waiting (its deadline passed): nothing was swapped."""


@dataclass(frozen=True)
class Served:
    name: str
    version: str
    path: str
    index: Any
    manifest: dict


def resolve_path(path: str | Path) -> Path:
    """A version directory as given, or <root>/<name> -> its latest complete version."""
    p = Path(path)
    if (p / MANIFEST).is_file() or not p.is_dir():
        return p
    return latest_version(p.parent, p.name)


def warm_up(index, count: int, seed: int = 0) -> None:
    """A few searches so first real requests do not pay for lazy allocation and page faults."""
    if count <= 0:
        return
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((count, index.dim)).astype(np.float32)
    index.search(q / np.linalg.norm(q, axis=1, keepdims=True), 10)


class IndexRegistry:
    def __init__(self, warmup_queries: int = 4, on_swap: Callable[[Served | None, Served], None] | None = None,
                 encoder_sha256: str | None = None, allow_unpaired: bool = False):
        """on_swap(old, new) runs as each version becomes active, in swap order, with the version it replaced
        (None for an index's first); e.g. to update metrics. encoder_sha256: the server's encoder checkpoint;
        an index whose manifest names another one is refused (ModelMismatchError) unless allow_unpaired."""
        self.encoder_sha256, self.allow_unpaired = encoder_sha256, allow_unpaired
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}
        self.warmup_queries = warmup_queries
        self._on_swap = on_swap or (lambda old, new: None)

    def load(self, name: str, path: str | Path, verify: str = "full", mmap: bool = False, device: str = "cpu",
             still_wanted: Callable[[], bool] | None = None) -> Served:
        """Verify, load, place on ``device`` and warm a version, then swap it in. Any failure leaves the
        old one serving. ``still_wanted`` is asked just before the swap (e.g. whether the caller's deadline
        has not passed); False abandons the load (LoadAbandoned) and the old version keeps serving.

        mmap=False reads the arrays into RAM: a flat scan over them measured ~20% faster than over the
        same arrays memory-mapped (200K x 64 float32, batch 1, this project's CPU box). True maps them
        from disk, for indexes larger than the RAM to spare (on a GPU the arrays are copied there anyway)."""
        try:
            dev = resolve_device(device)  # before reading anything: a wrong device fails fast
        except PlacementError as e:
            raise PlacementError(f"index {name!r}: {e}") from None
        p = resolve_path(path)
        self.check_pairing(name, p.name, read_manifest(p))  # before the arrays are read: a wrong model fails fast
        index, manifest = load_index(p, verify=verify, mmap=mmap)
        if dev.type != "cpu":
            try:
                index = index.to(dev)
            except ValueError as e:
                raise PlacementError(f"index {name!r}: {e}") from None
        warm_up(index, self.warmup_queries)
        served = Served(name, p.name, str(p), index, manifest)  # the directory's version, not the manifest's word
        with self._lock:
            if still_wanted is not None and not still_wanted():
                raise LoadAbandoned(f"index {name!r}: version {p.name} loaded after its caller gave up; not swapped in")
            old = self._served.get(name)
            self._served[name] = served
            self._on_swap(old, served)
        log.info("index %r: serving version %s (%d items, on %s)%s", name, served.version, manifest["count"], dev,
                 f", replaced {old.version}" if old else "")
        return served

    def check_pairing(self, name: str, version: str, manifest: dict) -> None:
        """Refuse an index built from another checkpoint than the server's encoder. Indexes that do not
        name their model (built from bare vectors) and servers without an encoder are not checked."""
        built = manifest.get("encoder_checkpoint_sha256")
        if not (self.encoder_sha256 and isinstance(built, str)) or built == self.encoder_sha256:
            return
        message = (f"index {name!r} version {version} was built from the model checkpoint with sha256 {built[:12]}..., "
                   f"but this server's encoder_checkpoint has sha256 {self.encoder_sha256[:12]}...: its item vectors do "
                   "not match the encoder's queries; rebuild it from that checkpoint (or set allow_unpaired_indexes)")
        if not self.allow_unpaired:
            raise ModelMismatchError(message)
        log.warning("%s; serving it anyway (allow_unpaired_indexes)", message)

    def get(self, name: str) -> Served | None:
        with self._lock:
            return self._served.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._served)
