"""Stage-1 embeddings of the h-indexer: a cheap, low-precision MIPS proxy for MoL.

Base vectors (no training, RAILS' TopKAvg): item side mean_j g_j(x) (d_P), query side sum_i f_i(u)
(d_P). On top of that:
  method "avg"      keep the d_P dims;
  method "pca<d>"   project both sides onto the top-d right singular vectors of a sample of item vectors
                    (uncentred: inner products, not distances, are what must survive);
  method "learned<d>" maps of all flattened components, distilled from MoL scores (``distill.py``);
  dtype float32 | bfloat16 | int8. int8 stores round(x_d / s_d) with per-dimension scales
  s_d = max_n |x_nd| / 127; the query is multiplied by s once, so scoring is one matmul.

int8 error bound: |x_d - s_d * code_d| <= s_d / 2 (no clipping: s_d comes from the max), hence for any
query |<q, x> - <q * s, code>| <= sum_d |q_d| * s_d / 2  (``int8_error_bound``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from genrec.kernels.dispatch import Backend, resolve_backend, stage1_threshold_scan, stage1_topk
from genrec.retrieval.mol import QueryState, topk_avg_vectors

DTYPES = ("float32", "bfloat16", "int8")
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def parse_method(method: str) -> tuple[str, int | None]:
    """'avg' -> ('avg', None) (no projection); 'pca<d>' -> ('pca', d); 'learned<d>' -> ('learned', d)."""
    if method == "avg":
        return "avg", None
    m = re.fullmatch(r"(pca|learned)(\d+)", method)
    if not m or int(m.group(2)) <= 0:
        raise ValueError(f"unknown stage-1 method {method!r}; use 'avg', 'pca<d>' or 'learned<d>' (e.g. pca16)")
    return m.group(1), int(m.group(2))


def item_base_vectors(components: torch.Tensor) -> torch.Tensor:
    """(N, P_X, d_P) item components -> (N, d_P) float32 mean component (TopKAvg's item side)."""
    return topk_avg_vectors(components, query=False)


def query_base_vectors(q: QueryState) -> torch.Tensor:
    """(B, P_Q, d_P) query components -> (B, d_P) float32 sum (TopKAvg's query side)."""
    return topk_avg_vectors(q.components, query=True)


def pca_projection(sample: torch.Tensor, dim: int) -> torch.Tensor:
    """sample (m, d) float -> (d, dim) orthonormal columns spanning the top-``dim`` directions."""
    if dim > sample.shape[1]:
        raise ValueError(f"stage-1 pca{dim} exceeds the component dim {sample.shape[1]}")
    _, _, vh = torch.linalg.svd(sample.double(), full_matrices=False)
    return vh[:dim].T.float().contiguous()


def int8_encode(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (n, d) float, scales (d,) -> (n, d) int8 codes."""
    return torch.round(x / scales).clamp(-127, 127).to(torch.int8)


def int8_error_bound(query: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """query (B, d) in the projected space -> (B,) max |exact - int8| stage-1 score error."""
    return (query.abs() * scales).sum(-1) / 2


@dataclass
class Stage1Table:
    """Stage-1 codes for N items and how to map queries onto them.

    codes (N, d) float32 | bfloat16 | int8; projection (d_P, d) float32 or None; scales (d,) float32 or None.
    Learned tables: projection (P_X * d_P, d) maps flattened item components and query_projection
    (P_Q * d_P, d) flattened query components.
    """

    method: str
    dtype: str
    codes: torch.Tensor
    projection: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    query_projection: torch.Tensor | None = None
    _widened: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _transposed: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def bytes_per_item(self) -> int:
        """Stored bytes of one item's code."""
        return self.codes.shape[1] * BYTES[self.dtype]

    @property
    def resident_bytes_per_item(self) -> int:
        """Bytes one item's code holds in memory: the stored code, plus the copies CPU scans made (the
        CPU kernel's transposed codes, the PyTorch path's float32 codes)."""
        extra = 0 if self._widened is None else self.codes.shape[1] * 4
        if self._transposed is not None:
            extra += self._transposed.shape[0] * self._transposed.element_size()
        return self.bytes_per_item + extra

    def scan_codes(self, op: str, backend: Backend = "auto") -> torch.Tensor:
        """The (N, d) codes a scan reads, copied once on CPU into the layout its backend wants.

        The CPU kernel (``kernels/stage1_scan_cpu.py``) gets a view of a (d, N) transposed copy, int8 kept
        as int8 (bf16 widened to float32, which numba has). The PyTorch path gets a float32 copy: widening
        int8 / bf16 codes on every search cost ~3x the matmul itself. Triton kernels read the stored codes."""
        chosen = resolve_backend(op, backend, self.codes.device)
        if self.codes.device.type != "cpu" or chosen == "triton":
            return self.codes
        if chosen == "cpu":
            if self._transposed is None:
                from genrec.kernels.stage1_scan_cpu import kernel_layout  # imports numba: on first use only

                self._transposed = kernel_layout(self.codes).t()  # the (d, N) copy itself
            return self._transposed.t()
        if self.codes.dtype == torch.float32:
            return self.codes
        if self._widened is None:
            self._widened = self.codes.float()
        return self._widened

    def project(self, base: torch.Tensor) -> torch.Tensor:
        return base if self.projection is None else base @ self.projection

    def query_vectors(self, q: QueryState) -> torch.Tensor:
        """QueryState -> (B, d) float32 ready to multiply the stored codes (scales folded in)."""
        if self.query_projection is not None:
            v = q.components.float().flatten(1) @ self.query_projection
        else:
            v = self.project(query_base_vectors(q))
        return v * self.scales if self.scales is not None else v

    def scan_range(self, qv: torch.Tensor, start: int, end: int, thr: torch.Tensor, capacity: int | None = None,
                   backend: Backend = "auto"):
        """Items start..end-1 scoring >= thr per query: (scores, ids, counts), see threshold.ScanRange."""

        codes = self.scan_codes("stage1_threshold_scan", backend)[start:end]
        return stage1_threshold_scan(qv, codes, thr, capacity, id_offset=start, backend=backend)

    def topk(self, qv: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) query vectors -> the k best rows by stage-1 score: (B, k) float32, (B, k) int64 (ties by
        smaller row; -inf / -1 padded), one running top-k pass over the codes (``kernels.dispatch.stage1_topk``)."""

        return stage1_topk(qv, self.scan_codes("stage1_topk"), k)

    def take(self, rows: torch.Tensor) -> "Stage1Table":
        """The table of items ``rows`` only (codes gathered; projection and scales shared): stage 1 over a
        filtered subset of the corpus."""
        return Stage1Table(self.method, self.dtype, self.codes[rows.to(self.codes.device)], self.projection,
                           self.scales, self.query_projection)

    def to(self, device: torch.device | str) -> "Stage1Table":
        """A copy of the table with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Stage1Table(self.method, self.dtype, self.codes.to(device), mv(self.projection), mv(self.scales),
                           mv(self.query_projection))

    def sample_scorer(self, rows: torch.Tensor):
        """A scorer of a fixed row sample whose codes are gathered (and widened) once: qv -> (B, m)."""
        sample = self.codes[rows.to(self.codes.device)].float().T.contiguous()
        return lambda qv: qv @ sample


def fit_stage1(item_vectors, n: int, method: str, dtype: str, sample: torch.Tensor,
               chunk_size: int = 65536, learned: tuple[torch.Tensor, torch.Tensor] | None = None) -> Stage1Table:
    """Fit projection and scales on the whole corpus; returns a table with no codes yet (see ``encode``).

    item_vectors(rows (m,) int64) -> (m, d_P) float32 base vectors (flattened components (m, P_X * d_P)
    for a learned method), called chunk by chunk so the corpus is never held twice. sample: the rows the
    PCA is fitted on (deterministic, so every shard of one corpus fits the same projection). learned:
    the distilled (item map, query map) for a learned method. int8 scales need the per-dim max over all
    n items: one pass.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown stage-1 dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    kind, dim = parse_method(method)
    if kind == "learned":
        if learned is None:
            raise ValueError(f"stage-1 {method} needs distilled projections (index.distill.distill_projection)")
        projection, query_projection = learned
    else:
        projection, query_projection = (pca_projection(item_vectors(sample), dim) if dim else None), None
    table = Stage1Table(method, dtype, torch.empty(0, dim or 0), projection, None, query_projection)
    if dtype == "int8":
        peak = None
        for s in range(0, n, chunk_size):
            m = table.project(item_vectors(torch.arange(s, min(s + chunk_size, n)))).abs().amax(0)
            peak = m if peak is None else torch.maximum(peak, m)
        table.scales = (peak / 127).clamp(min=1e-12)
    return table


def encode(table: Stage1Table, item_vectors, start: int, end: int, chunk_size: int = 65536,
           progress=None) -> Stage1Table:
    """Codes for items start..end-1 under a fitted table's projection and scales."""
    parts = []
    for s in range(start, end, chunk_size):
        e = min(s + chunk_size, end)
        v = table.project(item_vectors(torch.arange(s, e)))
        parts.append(int8_encode(v, table.scales) if table.dtype == "int8" else v.to(getattr(torch, table.dtype)))
        if progress is not None:
            progress.update(e - s)
    dim = table.projection.shape[1] if table.projection is not None else None
    codes = torch.cat(parts) if parts else torch.empty(0, dim or 0)
    return Stage1Table(table.method, table.dtype, codes, table.projection, table.scales, table.query_projection)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """bf16 has no numpy dtype: store its bits as int16 (the manifest records the real dtype)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).cpu().contiguous().numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # read-only memory maps: we never write through them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
