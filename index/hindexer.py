"""The h-indexer: a quantized stage-1 scan keeps K' candidates per query, exact MoL ranks them.

Stage 1 (``stage1.py`` codes) touches every item with d bytes-ish of work and keeps K' rows either by
the threshold selection (``threshold.py``, any K') or, for K' <= 1024 on a GPU, by one running top-k
pass of the fused kernel (``stage1_select``);
stage 2 gathers the K' candidates' cached MoL components and gating partials (rows sorted ascending so
the gather walks memory in order) and runs the exact MoL, then the top-k. With K' >= N the answer is
the exact MoL top-k and is flagged exact; otherwise stage 1 is a heuristic (no bound: the mean-component
score does not bound max_ij l_ij), so ``bound`` is +inf.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from genrec.index.base import Index, IndexState
from genrec.index.distill import fit_learned_stage1
from genrec.index.graphed import GraphCache
from genrec.index.stage1 import Stage1Table, encode, fit_stage1, from_numpy, item_base_vectors, parse_method, to_numpy
from genrec.index.threshold import SelectionStats, sample_rows, static_threshold_topk, threshold_topk
from genrec.kernels.dispatch import Backend, mol_candidate_scores, resolve_backend
from genrec.kernels.topk import ascending_rows
from genrec.retrieval.ids import rows_of
from genrec.retrieval.mol import ItemCache, MixtureOfLogits
from genrec.retrieval.search import SearchResult, rescore_candidates, validate_queries

log = logging.getLogger(__name__)

STAGE1_SELECT = ("auto", "threshold", "topk")
STATIC_SEARCH = ("auto", "on", "off")
THRESHOLD_SLACK = 1.5  # the sample rank of the threshold estimate, in K' * m / N: a little below the K'-th score
MIN_SAMPLE_RANK = 32  # ... and never above rank 32 of the sample (a larger sample for a small K' over many items)
STATIC_CAPACITY_FACTOR = 4.0  # the static path's hit buffer per query, in K'; overflow sends a query to the general path
TOPK_SCAN_MAX = 1024  # the running top-k kernel keeps K' in registers
FUSED_SCAN_CHUNK = 1 << 27  # items per fused-scan call (Triton or CPU kernel; its fixed hit buffer is per call)
CPU_SCAN_SCORES = 1 << 20  # stage-1 scores per CPU chunk (queries x items): few queries scan long chunks
FUSED_FINAL_CHUNK = 1 << 22  # ... in the rare keep-everything pass, whose buffer holds a whole chunk
CPU_RESCORE_ROWS = 4096  # (query, candidate) pairs per stage-2 call on CPU: 4,096 x 128 gating units fit L2
GPU_RESCORE_CHUNK = 1 << 17  # candidates per stage-2 call on a GPU: K' <= 131072 is one call (no merge)


def _as_tensor(a) -> torch.Tensor:
    """A float32 tensor (on its own device) of an array or tensor slice (bf16 corpora are widened)."""
    return a.float() if isinstance(a, torch.Tensor) else from_numpy(np.asarray(a), "float32").float()


def item_cache(mol: MixtureOfLogits, items, start: int, end: int, dtype: torch.dtype, chunk_size: int = 65536,
               progress: bool = False) -> ItemCache:
    """MoL item-side cache of items[start:end] (a tensor on any device, or a memory-mapped array), chunked
    into arrays allocated once (no concatenation: at 100M items the cache alone is tens of GB)."""
    comps = gates = None
    bar = tqdm(total=end - start, desc="MoL item cache", unit="item", unit_scale=True, disable=not progress)
    with torch.no_grad():
        for s in range(start, end, chunk_size):
            e = min(s + chunk_size, end)
            c = mol.encode_items(_as_tensor(items[s:e]))
            if comps is None:
                comps = torch.empty((end - start, *c.components.shape[1:]), dtype=dtype, device=c.components.device)
                gates = torch.empty((end - start, c.gate.shape[1]), dtype=dtype, device=c.gate.device)
            comps[s - start : e - start] = c.components
            gates[s - start : e - start] = c.gate
            bar.update(e - s)
    bar.close()
    if comps is None:  # no items: shapes from an empty batch
        c = mol.encode_items(torch.zeros(0, mol.init_kwargs["item_dim"], device=next(mol.parameters()).device))
        comps, gates = c.components.to(dtype), c.gate.to(dtype)
    return ItemCache(comps, gates)


def stage1_inputs_from_items(mol: MixtureOfLogits, items, flat: bool):
    """rows -> the stage-1 input vectors of those raw item embeddings (for global fitting): the
    TopKAvg base (m, d_P), or with ``flat`` the flattened components (m, P_X * d_P)."""
    def fn(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = _as_tensor(items[rows.numpy()] if not isinstance(items, torch.Tensor) else items[rows.to(items.device)])
            comps = F.normalize(mol.item_proj(x).view(len(rows), mol.px, mol.dp), dim=-1, eps=1e-6)
            return comps.flatten(1) if flat else item_base_vectors(comps)
    return fn


class MoLHIndexer(Index):
    """Two-stage MoL index over N items. Query dim = the MoL's query_dim (encoder state size)."""

    kind = "mol-hindexer"

    def __init__(self, mol: MixtureOfLogits, cache: ItemCache, stage1: Stage1Table, ids=None, kprime: int = 10000,
                 sample_size: int = 16384, chunk_size: int = 65536, rescore_chunk: int = 2048,
                 stage1_fit: dict | None = None, stage1_select: str = "auto"):
        super().__init__(ids, len(cache))
        if stage1_select not in STAGE1_SELECT:
            raise ValueError(f"unknown stage1_select {stage1_select!r}; use one of {', '.join(STAGE1_SELECT)}")
        if len(stage1) != len(cache):
            raise ValueError(f"stage-1 table has {len(stage1)} items, MoL cache {len(cache)}")
        self.mol, self.cache, self.stage1 = mol.eval(), cache, stage1
        self.gating = self.mol.gating()
        self.kprime, self.sample_size, self.chunk_size, self.rescore_chunk = kprime, sample_size, chunk_size, rescore_chunk
        self._score_sample = stage1.sample_scorer(sample_rows(len(cache), sample_size))
        self._larger_samples: dict[int, object] = {}  # sample size -> scorer, for K' the default sample cannot place
        self.last_stats = SelectionStats()
        self.stage1_fit = stage1_fit or {}  # the distillation report of a learned stage 1
        self.stage1_select = stage1_select
        # run-time choices, not stored with the index: the one-pass static-shape search ("auto": on CUDA,
        # where host syncs and launches dominate; "on" forces it, e.g. to test it on CPU) and which
        # implementation its kernels dispatch to (kernels.dispatch backends)
        self.static_search: str = "auto"
        self.kernel_backend: Backend = "auto"
        self.cuda_graphs = True  # on CUDA the static path replays a captured graph per (batch bucket, k, K')
        self.graphs = GraphCache()

    def uses_topk_scan(self, kprime: int) -> bool:
        """Whether stage 1 keeps K' with one running top-k pass instead of the threshold selection.

        ``auto`` takes the threshold selection everywhere: on CPU it beats the reference top-k scan at
        equal recall (benchmarks/results/retrieval/stage1_select_200k_cpu.md), and on an H200 the top-k kernel
        (a 2,048-wide sort in registers per tile) did not finish one warm-up call over 10M items in
        ~35 s, where the threshold scan takes ~0.5 ms (gpu_h200_2026-11-26.md). ``topk`` forces it
        (K' <= 1,024)."""
        return self.stage1_select == "topk"

    @property
    def dim(self) -> int:
        return self.mol.init_kwargs["query_dim"]

    @property
    def device(self) -> torch.device:
        return self.cache.components.device

    def to(self, device: torch.device | str) -> "MoLHIndexer":
        """Moves the MoL, its item cache and the stage-1 table to ``device``; searches then run there (on
        CUDA through the fused kernels: one scan launch per ``FUSED_SCAN_CHUNK`` items into a fixed hit
        buffer, stage 2 in ``GPU_RESCORE_CHUNK`` candidates per launch). Results come back on the CPU."""
        self.mol = self.mol.to(device)
        self.gating = self.gating.to(device)
        self.cache = ItemCache(self.cache.components.to(device), self.cache.gate.to(device))
        self.stage1 = self.stage1.to(device)
        self.graphs.clear()
        self._score_sample = self.stage1.sample_scorer(sample_rows(len(self.cache), self.sample_size))
        self._larger_samples.clear()
        return self

    @property
    def bytes_per_item(self) -> float:
        c = self.cache
        return (self.stage1.bytes_per_item + c.components[0].numel() * c.components.element_size()
                + c.gate.shape[1] * c.gate.element_size() + 8)

    @classmethod
    def build(cls, mol: MixtureOfLogits, items, ids=None, stage1: str = "avg", stage1_dtype: str = "int8",
              kprime: int = 10000, cache_dtype: str = "float32", sample_size: int = 16384, seed: int = 0,
              rows: tuple[int, int] | None = None, progress: bool = False, train_queries: np.ndarray | None = None,
              distill_steps: int = 300, stage1_select: str = "auto") -> "MoLHIndexer":
        """items (N, D_x) float32 (tensor or memmap); ids (N,) int64 or None (0..N-1).

        rows=(start, end) builds a shard over items[start:end] whose stage-1 projection and scales are
        fitted on the whole corpus, so every shard of one corpus scores stage 1 identically.
        A learned stage 1 is distilled on the sample rows and ``train_queries`` ((m, D_q) float32 query
        states; default: noisy copies of sampled items), deterministically in ``seed``.
        """
        mol = mol.eval()
        n = len(items)
        start, end = rows or (0, n)
        t = time.perf_counter()
        cache = item_cache(mol, items, start, end, getattr(torch, cache_dtype), progress=progress)
        sample = sample_rows(n, sample_size, seed)
        kind, dim = parse_method(stage1)
        learned, fit = None, None
        if kind == "learned":
            device = items.device if isinstance(items, torch.Tensor) else torch.device("cpu")
            if device.type == "cpu":
                learned, fit = fit_learned_stage1(mol, items, sample, dim, train_queries, distill_steps, seed)
            else:  # the distillation is small host work: on the sample rows, with a host copy of the MoL
                host = items[sample.to(device)].float().cpu()  # (proxy queries, if any, come from these rows)
                learned, fit = fit_learned_stage1(copy.deepcopy(mol).cpu(), host, torch.arange(len(host)), dim,
                                                  train_queries, distill_steps, seed)
                learned = tuple(t.to(device) for t in learned)
        vectors = stage1_inputs_from_items(mol, items, flat=learned is not None)
        table = fit_stage1(vectors, n, stage1, stage1_dtype, sample, learned=learned)
        bar = tqdm(total=end - start, desc="stage-1 codes", unit="item", unit_scale=True, disable=not progress)
        table = encode(table, lambda r: vectors(r + start), 0, end - start, progress=bar)
        bar.close()
        log.info("h-indexer built over %d items in %.1fs (%.0f items/s)", end - start, time.perf_counter() - t,
                 (end - start) / max(time.perf_counter() - t, 1e-9))
        shard_ids = (np.arange(n) if ids is None else np.asarray(ids))[start:end]
        return cls(mol, cache, table, shard_ids, kprime=kprime, sample_size=sample_size, stage1_fit=fit,
                   stage1_select=stage1_select)

    @torch.no_grad()
    def search_with_certificate(self, queries, k: int, exclude: Sequence[Sequence[int]] | None = None,
                                kprime: int | None = None, allow: Sequence[int] | None = None,
                                deny: Sequence[int] | None = None, where: Mapping[str, Sequence[str]] | None = None
                                ) -> SearchResult:
        """allow / deny: a filter over external ids for the whole batch; stage 1 then scans only the items
        it lets through (their codes gathered once per call) and keeps K' of them, so a selective filter
        costs less than an unfiltered search, never an over-fetch. Exact when K' covers every allowed item."""
        u = validate_queries(queries, self.dim, k).to(self.device)
        kp = min(kprime or self.kprime, self.ntotal)
        if kp <= 0:
            raise ValueError(f"kprime must be positive, got {kprime}")
        excl = self.idmap.exclude_rows(exclude, len(u))
        subset = self.filter_rows(allow, deny, where)
        self.last_stats = SelectionStats()
        if subset is None and self._takes_static_path(excl is None, k, kp):
            scores, rows = self._search_static(u, k, kp)
        else:
            scores, rows = self._search_general(u, k, kp, excl, subset)
        exact = kp >= (self.ntotal if subset is None else len(subset))
        return self._result(scores, rows, np.full(len(u), exact), np.full(len(u), float("-inf") if exact else float("inf")))

    def _threshold_candidates(self, qv: torch.Tensor, kp: int, table: Stage1Table, scan, score_sample, n: int) -> torch.Tensor:
        """Stage-1 top-K' rows (B, K') of ``table`` (n items) by the chunked threshold selection."""
        # a kernel (Triton, or the CPU one) holds no (queries x chunk) score matrix: it scans long chunks
        # into a fixed hit buffer per query, and a query that overflows it is rescanned
        fused = resolve_backend("stage1_threshold_scan", self.kernel_backend, qv.device) != "reference"
        gpu = qv.device.type == "cuda"
        return threshold_topk(qv, scan, score_sample, n, kp, slack=THRESHOLD_SLACK,
                              chunk_size=max(self.chunk_size, FUSED_SCAN_CHUNK if fused else CPU_SCAN_SCORES // len(qv)),
                              chunk_capacity=4 * kp if fused else None, max_retries=4 if fused else 2,
                              stats=self.last_stats,  # the keep-everything pass buffers whole chunks: bounded on CPU
                              final_chunk_size=FUSED_FINAL_CHUNK if gpu else max(self.chunk_size, CPU_SCAN_SCORES // len(qv)),
                              order_ties=False)[1]

    def _filtered_candidates(self, qv: torch.Tensor, kp: int, subset: torch.Tensor) -> torch.Tensor:
        """Stage 1 over the filtered rows only: all of them when K' covers them, else the threshold
        selection over their gathered codes; -> (B, <= K') full-corpus rows, -1 padded."""
        b, n = qv.shape[0], len(subset)
        if n <= kp:
            return subset.expand(b, -1) if n else torch.full((b, 1), -1, dtype=torch.int64, device=qv.device)
        table = self.stage1.take(subset)
        scan = lambda x, s, e, thr, cap: table.scan_range(x, s, e, thr, cap, backend=self.kernel_backend)  # noqa: E731
        pos = self._threshold_candidates(qv, kp, table, scan, table.sample_scorer(sample_rows(n, self.sample_size)), n)
        return rows_of(subset, pos)

    def _takes_static_path(self, no_exclusions: bool, k: int, kp: int) -> bool:
        if self.static_search not in STATIC_SEARCH:
            raise ValueError(f"unknown static_search {self.static_search!r}; use one of {', '.join(STATIC_SEARCH)}")
        wanted = self.static_search == "on" or (self.static_search == "auto" and self.device.type == "cuda")
        return wanted and no_exclusions and k <= kp < self.ntotal and not self.uses_topk_scan(kp)

    def _sample_scorer(self, kp: int):
        """The stage-1 scorer of a sample large enough that the threshold's rank in it, ceil(slack * K' * m / N),
        is at least ``MIN_SAMPLE_RANK``: at 10M items and K' 1,024 the default 16,384 rows put the cut at
        rank 3, an estimate so noisy that many queries rescanned the corpus (p95 5.7x p50). Sizes round up
        to a power of two (few scorers, each a float32 copy of its rows' codes, made once)."""
        n = self.ntotal
        need = math.ceil(MIN_SAMPLE_RANK * n / (THRESHOLD_SLACK * kp))
        if need <= self.sample_size or self.sample_size >= n:
            return self._score_sample
        size = min(n, 1 << (need - 1).bit_length())
        if size not in self._larger_samples:
            self._larger_samples[size] = self.stage1.sample_scorer(sample_rows(n, size))
        return self._larger_samples[size]

    def _scan_range(self, qv: torch.Tensor, start: int, end: int, thr: torch.Tensor, capacity: int | None):
        return self.stage1.scan_range(qv, start, end, thr, capacity, backend=self.kernel_backend)

    def _search_static(self, u: torch.Tensor, k: int, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static path: on CUDA one graph replay (small batches), elsewhere eager; the only host read is
        the result. Queries whose hit buffer overflowed or underflowed (``ok`` False, rare) are redone on
        the general path and counted in ``last_stats``."""
        scorer = self._sample_scorer(kp)  # made before any graph capture
        fn = lambda x: self._static_device_search(x, k, kp, scorer)  # noqa: E731
        out = self.graphs.run(fn, u, k, kp) if self.cuda_graphs and u.is_cuda else None
        scores, rows, ok = out if out is not None else fn(u)
        scores, rows, ok = scores.cpu(), rows.cpu(), ok.cpu().numpy()
        if not ok.all():
            redo = np.flatnonzero(~ok)
            self.last_stats.static_fallbacks += len(redo)
            scores[redo], rows[redo] = self._search_general(u[torch.from_numpy(redo).to(u.device)], k, kp, None)
        return scores, rows

    def _static_device_search(self, u: torch.Tensor, k: int, kp: int, scorer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, D) on the index's device -> scores (B, k) float32, rows (B, k) int64, ok (B,) bool, all on
        the device, shapes fixed by (B, k, K'), no host reads: stage 1 into a fixed hit buffer, exact MoL
        on its K' best, top-k by a stable sort."""
        q = self.mol.encode_queries(u)
        cand, ok = static_threshold_topk(self.stage1.query_vectors(q), self._scan_range, scorer,
                                         self.ntotal, kp, slack=THRESHOLD_SLACK, capacity_factor=STATIC_CAPACITY_FACTOR)
        s = mol_candidate_scores(self.gating, q, self.cache, cand, backend=self.kernel_backend)
        # cand ascends, so a stable sort orders ties by smaller row, as the general path's select_topk does
        scores, order = torch.sort(s, dim=1, descending=True, stable=True)
        scores, rows = scores[:, :k], cand.gather(1, order[:, :k])
        return scores, torch.where(torch.isneginf(scores), -1, rows), ok

    def _search_general(self, u: torch.Tensor, k: int, kp: int, excl,
                        subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Any K', exclusions, filters, retries: chunked threshold selection (or the top-k scan), then stage 2.
        subset: ascending rows a filter lets through (None: all)."""
        dev = self.device
        if excl is not None:
            excl = [e.to(dev) for e in excl]
        q = self.mol.encode_queries(u)
        qv = self.stage1.query_vectors(q)
        if subset is not None:
            cand = self._filtered_candidates(qv, kp, subset.to(dev))
        elif self.uses_topk_scan(kp):
            _, cand = self.stage1.topk(qv, kp)
        else:
            cand = self._threshold_candidates(qv, kp, self.stage1, self._scan_range, self._sample_scorer(kp), self.ntotal)
        cand = ascending_rows(cand)  # an in-order gather; rows are distinct (each item is scanned once)
        gpu = dev.type == "cuda"
        # on CPU a call's (rows x gating hidden) intermediates must stay in cache: ~CPU_RESCORE_ROWS rows a call
        chunk = max(self.rescore_chunk, GPU_RESCORE_CHUNK) if gpu else max(64, min(self.rescore_chunk, CPU_RESCORE_ROWS // len(q)))
        scores, rows = rescore_candidates(self.gating, q, self.cache, cand, k, excl, chunk)
        return scores.cpu(), rows.cpu()

    # ---- persistence ----
    def state(self) -> IndexState:
        buf = io.BytesIO()
        torch.save({"init_kwargs": self.mol.init_kwargs, "state_dict": self.mol.state_dict()}, buf)
        arrays = {"ids": self.ids.numpy(), "stage1_codes": to_numpy(self.stage1.codes),
                  "mol_components": to_numpy(self.cache.components), "mol_gate": to_numpy(self.cache.gate)}
        if self.stage1.projection is not None:
            arrays["stage1_projection"] = self.stage1.projection.numpy()
        if self.stage1.scales is not None:
            arrays["stage1_scales"] = self.stage1.scales.numpy()
        if self.stage1.query_projection is not None:
            arrays["stage1_query_projection"] = self.stage1.query_projection.numpy()
        params: dict[str, Any] = {
            "stage1": self.stage1.method, "stage1_dtype": self.stage1.dtype, "kprime": self.kprime,
            "sample_size": self.sample_size, "chunk_size": self.chunk_size, "stage1_select": self.stage1_select,
            "cache_dtype": str(self.cache.components.dtype).removeprefix("torch."),
            "mol": {k: v for k, v in self.mol.init_kwargs.items()},
        }
        if self.stage1_fit:
            params["stage1_fit"] = self.stage1_fit
        return IndexState(self.kind, params, arrays, {"mol.pt": buf.getvalue()})

    @classmethod
    def bfloat16_arrays(cls, params: dict) -> set[str]:
        return ({"mol_components", "mol_gate"} if params.get("cache_dtype") == "bfloat16" else set()) | (
            {"stage1_codes"} if params.get("stage1_dtype") == "bfloat16" else set())

    @classmethod
    def from_state(cls, st: IndexState) -> "MoLHIndexer":
        blob = torch.load(io.BytesIO(st.blobs["mol.pt"]), map_location="cpu", weights_only=True)
        mol = MixtureOfLogits(**blob["init_kwargs"])
        mol.load_state_dict(blob["state_dict"])
        p, a = st.params, st.arrays
        table = Stage1Table(p["stage1"], p["stage1_dtype"], from_numpy(a["stage1_codes"], p["stage1_dtype"]),
                            from_numpy(a["stage1_projection"], "float32") if "stage1_projection" in a else None,
                            from_numpy(a["stage1_scales"], "float32") if "stage1_scales" in a else None,
                            from_numpy(a["stage1_query_projection"], "float32") if "stage1_query_projection" in a else None)
        cache = ItemCache(from_numpy(a["mol_components"], p["cache_dtype"]), from_numpy(a["mol_gate"], p["cache_dtype"]))
        return cls(mol, cache, table, a["ids"], kprime=p["kprime"], sample_size=p["sample_size"], chunk_size=p["chunk_size"],
                   stage1_fit=p.get("stage1_fit"), stage1_select=p.get("stage1_select", "auto"))
