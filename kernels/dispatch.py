"""One dispatch point per hot op: ``reference`` (PyTorch, any device), ``triton`` (GPU) or ``cpu`` (a
compiled CPU kernel, numba).

Each op's full signature is spelled out here and its inputs are checked (shape, dtype, device) before
any backend runs, so a bad call fails with a message naming the argument instead of deep inside a
kernel. ``auto`` picks triton on CUDA for the ops listed in ``_TRITON_AUTO``, the CPU kernel on CPU for
those in ``CPU_OPS``, otherwise the reference. Kernel modules import triton or numba (compiling on first
call), so they load on first use only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Literal

import torch

from genrec.kernels.hstu_attention_reference import hstu_attention_reference
from genrec.kernels.mol_stage2_reference import mol_candidate_scores_reference
from genrec.kernels.mol_state import ItemCache, MoLGating, QueryState
from genrec.kernels.stage1_scan_reference import stage1_threshold_scan_reference, stage1_topk_reference

Backend = Literal["auto", "reference", "triton", "cpu"]
BACKENDS = ("auto", "reference", "triton", "cpu")
STAGE1_CODE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), which mishandles bf16 dots
    and casts: kernels then widen the same rounded values to fp32."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_op(op: str) -> Callable:
    if op == "hstu_attention":
        from genrec.kernels.hstu_attention_triton import hstu_attention_triton as fn
    elif op == "stage1_threshold_scan":
        from genrec.kernels.stage1_scan_triton import stage1_threshold_scan_triton as fn
    elif op == "stage1_topk":
        from genrec.kernels.stage1_scan_triton import stage1_topk_triton as fn
    else:
        from genrec.kernels.mol_stage2_triton import mol_candidate_scores_triton as fn
    return fn


TRITON_OPS = ("hstu_attention", "stage1_threshold_scan", "stage1_topk", "mol_candidate_scores")
# ops whose kernel ``auto`` picks on CUDA. MoL stage 2 is not among them: on an H200 its fp32 kernel
# ran 3-7x slower than the gather + cuBLAS reference (benchmarks/results/kernels/kernels_gpu_h200.md), so
# ``auto`` keeps the reference there until the kernel moves to tensor-core dots.
_TRITON_AUTO = {"stage1_threshold_scan", "stage1_topk", "hstu_attention"}
# ops with a compiled CPU kernel, which ``auto`` picks on CPU: the threshold scan reads int8 codes once
# and compares in registers: 0.79 ms vs 21.7 ms for the reference at batch 1 over 1M x 16 int8 codes,
# 5-6x at batch 32-128 (benchmarks/results/kernels/stage1_scan_cpu.md, 2 threads). MoL stage 2 has none:
# a fused numba version ran 2-3x slower than the reference's MKL matmuls (2026-12-06, not kept)
CPU_OPS = ("stage1_threshold_scan",)


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether numba (the CPU kernels' compiler, a dependency of the package) is importable: an environment
    that runs the code without installing it, such as the GPU image, falls back to the references."""
    return importlib.util.find_spec("numba") is not None


def resolve_backend(op: str, backend: Backend, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if op not in TRITON_OPS:
            raise NotImplementedError(f"no Triton kernel for {op} yet; use backend='reference'")
        return "triton"
    if backend == "cpu":
        if op not in CPU_OPS:
            raise NotImplementedError(f"no CPU kernel for {op}; use backend='reference'")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, got {device}")
        if not cpu_kernels_available():
            raise ImportError("backend='cpu' needs numba (pip install numba, or install genrec with its dependencies)")
        return "cpu"
    if device.type == "cuda":
        return "triton" if op in _TRITON_AUTO else "reference"
    return "cpu" if device.type == "cpu" and op in CPU_OPS and cpu_kernels_available() else "reference"


# ---- argument checks ----
def _check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {message}")


def _check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    _check(len(set(devices.values())) <= 1, op, "tensors on different devices: "
           + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def _check_offsets(op: str, name: str, offsets: torch.Tensor, rows: int) -> None:
    _check(offsets.dim() == 1 and offsets.numel() >= 1, op, f"{name} must be 1-D (B+1,), got shape {tuple(offsets.shape)}")
    _check(not torch.is_floating_point(offsets), op, f"{name} must be an integer tensor, got {offsets.dtype}")
    if offsets.device.type == "cpu":  # reading a GPU value would sync the stream: checked on CPU only
        _check(int(offsets[-1]) == rows, op, f"{name}[-1] = {int(offsets[-1])} but the values hold {rows} rows")


# ---- ops ----
def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int, *,
                   alpha: float, scale: float, pos_table: torch.Tensor | None = None,
                   time_table: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
                   next_timestamps: torch.Tensor | None = None, time_divisor: float = 0.301,
                   dropout: float = 0.0, training: bool = False, rab_cache: dict | None = None,
                   q_offsets: torch.Tensor | None = None, max_q_len: int | None = None,
                   num_targets: torch.Tensor | None = None, backend: Backend = "auto",
                   tuning: dict[str, int] | None = None) -> torch.Tensor:
    """Jagged HSTU attention (causal, target-aware, delta-q): q (Lq, H, dqk), k (L, H, dqk), v (L, H, dv)
    on offsets (B+1,) int64 -> (Lq, H, dv); see :func:`hstu_attention_reference` for the semantics of
    each argument. tuning: the kernel's tile sizes (block_m, block_n), unused by the reference.
    Training with attention dropout stays on the reference under ``auto`` (the kernel
    does not fuse dropout)."""
    op = "hstu_attention"
    _check(k.dim() == 3 and v.dim() == 3 and q.dim() == 3, op,
           f"q, k, v must be (rows, heads, dim), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check(k.shape[:2] == v.shape[:2], op, f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on rows or heads")
    _check(q.shape[1:] == k.shape[1:], op, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on heads or dim")
    _check(q.dtype == k.dtype == v.dtype, op, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_offsets(op, "offsets", offsets, k.shape[0])
    _check(q_offsets is not None or q.shape[0] == k.shape[0], op,
           f"q has {q.shape[0]} rows and k {k.shape[0]}: pass q_offsets for delta-q")
    if q_offsets is not None:
        _check_offsets(op, "q_offsets", q_offsets, q.shape[0])
    _check(time_table is None or (timestamps is not None and next_timestamps is not None), op,
           "time_table needs timestamps and next_timestamps")
    _check_same_device(op, q=q, k=k, v=v, offsets=offsets, pos_table=pos_table, time_table=time_table)
    kwargs = dict(alpha=alpha, scale=scale, pos_table=pos_table, time_table=time_table, timestamps=timestamps,
                  next_timestamps=next_timestamps, time_divisor=time_divisor, dropout=dropout, training=training,
                  rab_cache=rab_cache, q_offsets=q_offsets, max_q_len=max_q_len, num_targets=num_targets)
    if backend == "auto" and dropout > 0 and training:
        backend = "reference"
    if resolve_backend(op, backend, q.device) == "triton":
        return _triton_op(op)(q, k, v, offsets, max_len, **kwargs, **(tuning or {}))
    return hstu_attention_reference(q, k, v, offsets, max_len, **kwargs)


def _check_stage1(op: str, qv: torch.Tensor, codes: torch.Tensor) -> None:
    _check(qv.dim() == 2 and codes.dim() == 2, op,
           f"qv (B, d) and codes (n, d) must be 2-D, got {tuple(qv.shape)} and {tuple(codes.shape)}")
    _check(qv.shape[1] == codes.shape[1], op, f"qv dim {qv.shape[1]} does not match codes dim {codes.shape[1]}")
    _check(qv.dtype == torch.float32, op, f"qv must be float32 (int8 scales folded in), got {qv.dtype}")
    _check(codes.dtype in STAGE1_CODE_DTYPES, op, f"codes must be float32, bfloat16 or int8, got {codes.dtype}")


def stage1_threshold_scan(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                          id_offset: int = 0, *, backend: Backend = "auto"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every item scoring >= thr per query, in a compact buffer: qv (B, d) float32, codes (n, d),
    thr (B,) float32 -> (scores (B, W) float32, ids (B, W) int64, counts (B,) int64); see
    :func:`stage1_threshold_scan_reference` for the overflow contract."""
    op = "stage1_threshold_scan"
    _check_stage1(op, qv, codes)
    _check(thr.shape == (qv.shape[0],), op, f"thr must be (B,) = ({qv.shape[0]},), got {tuple(thr.shape)}")
    _check(capacity is None or capacity >= 0, op, f"capacity must be >= 0 or None, got {capacity}")
    _check_same_device(op, qv=qv, codes=codes, thr=thr)
    chosen = resolve_backend(op, backend, qv.device)
    if chosen == "cpu" and codes.dtype == torch.bfloat16:  # numba has no bf16: the kernel reads a float32 copy
        _check(backend != "cpu", op, "the CPU kernel reads int8 or float32 codes; widen bf16 codes first")
        chosen = "reference"
    if chosen == "triton":
        return _triton_op(op)(qv, codes, thr, capacity, id_offset)
    if chosen == "cpu":
        from genrec.kernels.stage1_scan_cpu import stage1_threshold_scan_cpu

        return stage1_threshold_scan_cpu(qv, codes, thr, capacity, id_offset)
    return stage1_threshold_scan_reference(qv, codes, thr, capacity, id_offset)


def stage1_topk(qv: torch.Tensor, codes: torch.Tensor, k: int, id_offset: int = 0, *, backend: Backend = "auto",
                splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k (<= 1024 on the kernel) best items per query by stage-1 score, ties by smaller id:
    (B, k) float32 scores and int64 ids, -inf / -1 padded; see :func:`stage1_topk_reference`.
    splits: how many corpus ranges the kernel scans in parallel (its default fills the GPU)."""
    op = "stage1_topk"
    _check_stage1(op, qv, codes)
    _check(k > 0, op, f"k must be positive, got {k}")
    _check_same_device(op, qv=qv, codes=codes)
    if resolve_backend(op, backend, qv.device) == "triton":
        return _triton_op(op)(qv, codes, k, id_offset, splits=splits)
    return stage1_topk_reference(qv, codes, k, id_offset)


def mol_candidate_scores(gating: MoLGating, q: QueryState, cache: ItemCache, cand: torch.Tensor | None, *,
                         backend: Backend = "auto") -> torch.Tensor:
    """Exact eval-time MoL of each query against its candidate rows (stage 2): q components (B, P_Q, d_P),
    cache components (N, P_X, d_P), cand (B, C) int64 rows (-1 = none) -> (B, C) float32, or against every
    cached item when cand is None -> (B, N); see :func:`mol_candidate_scores_reference`."""
    op = "mol_candidate_scores"
    pq, px = q.components.shape[1], cache.components.shape[1]
    _check(q.components.dim() == 3 and cache.components.dim() == 3, op, "components must be 3-D (rows, P, d_P)")
    _check(q.components.shape[2] == cache.components.shape[2], op,
           f"component dims differ: query {q.components.shape[2]}, items {cache.components.shape[2]}")
    _check(pq * px == gating.num_logits, op, f"P_Q x P_X = {pq} x {px} does not match the gating's {gating.num_logits} logits")
    _check(q.gate.shape == (len(q), gating.num_logits) and cache.gate.shape == (len(cache), gating.num_logits), op,
           f"gates must be (rows, {gating.num_logits}), got query {tuple(q.gate.shape)}, items {tuple(cache.gate.shape)}")
    if cand is not None:
        _check(cand.dim() == 2 and cand.shape[0] == len(q), op, f"cand must be (B={len(q)}, C), got {tuple(cand.shape)}")
        _check(cand.dtype in (torch.int64, torch.int32), op, f"cand must be int64 rows, got {cand.dtype}")
    _check_same_device(op, query=q.components, items=cache.components, cand=cand, gating=gating.w1)
    if resolve_backend(op, backend, q.components.device) == "triton":
        return _triton_op(op)(gating, q, cache, cand)
    return mol_candidate_scores_reference(gating, q, cache, cand)
