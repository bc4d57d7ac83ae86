"""One dispatch point per hot op: ``reference`` (PyTorch, any device) or ``triton`` (GPU).

``auto`` picks triton on CUDA once a kernel exists for the op, otherwise the reference.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from genrec.kernels.hstu_attention_reference import hstu_attention_reference
from genrec.kernels.mol_stage2_reference import mol_candidate_scores_reference
from genrec.kernels.stage1_scan_reference import stage1_threshold_scan_reference, stage1_topk_reference

Backend = Literal["auto", "reference", "triton"]


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), which mishandles bf16 dots
    and casts: kernels then widen the same rounded values to fp32."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _stage1_scan_triton(*args, **kwargs):
    from genrec.kernels.stage1_scan_triton import stage1_threshold_scan_triton  # imports triton lazily

    return stage1_threshold_scan_triton(*args, **kwargs)


def _stage1_topk_triton(*args, **kwargs):
    from genrec.kernels.stage1_scan_triton import stage1_topk_triton

    return stage1_topk_triton(*args, **kwargs)


def _hstu_attention_triton(*args, **kwargs):
    from genrec.kernels.hstu_attention_triton import hstu_attention_triton

    return hstu_attention_triton(*args, **kwargs)


def _mol_stage2_triton(*args, **kwargs):
    from genrec.kernels.mol_stage2_triton import mol_candidate_scores_triton

    return mol_candidate_scores_triton(*args, **kwargs)


_TRITON_OPS: dict[str, object] = {  # op -> kernel entry point
    "stage1_threshold_scan": _stage1_scan_triton,
    "stage1_topk": _stage1_topk_triton,
    "hstu_attention": _hstu_attention_triton,
    "mol_candidate_scores": _mol_stage2_triton,
}


# ops whose kernel ``auto`` picks on CUDA. MoL stage 2 is not among them: on an H200 its fp32 kernel
# ran 3-7x slower than the gather + cuBLAS reference (benchmarks/results/kernels_gpu.md), so ``auto``
# keeps the reference there until the kernel moves to tensor-core dots.
_TRITON_AUTO = {"stage1_threshold_scan", "stage1_topk", "hstu_attention"}


def resolve_backend(op: str, backend: Backend, device: torch.device) -> str:
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if op not in _TRITON_OPS:
            raise NotImplementedError(f"no Triton kernel for {op} yet; use backend='reference'")
        return "triton"
    return "triton" if device.type == "cuda" and op in _TRITON_AUTO else "reference"


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int,
                   *, backend: Backend = "auto", **kwargs) -> torch.Tensor:
    """Jagged HSTU attention (causal, target-aware, delta-q); see :func:`hstu_attention_reference` for
    shapes and semantics. Training with attention dropout stays on the reference under ``auto`` (the
    kernel does not fuse dropout)."""
    if backend == "auto" and kwargs.get("dropout", 0.0) > 0 and kwargs.get("training", False):
        backend = "reference"
    if resolve_backend("hstu_attention", backend, q.device) == "triton":
        return _TRITON_OPS["hstu_attention"](q, k, v, offsets, max_len, **kwargs)  # type: ignore[operator]
    return hstu_attention_reference(q, k, v, offsets, max_len, **kwargs)


def stage1_threshold_scan(qv: torch.Tensor, codes: torch.Tensor, thr: torch.Tensor, capacity: int | None = None,
                          id_offset: int = 0, *, backend: Backend = "auto"):
    """Every item scoring >= thr per query, in a compact buffer; see
    :func:`stage1_threshold_scan_reference` for shapes, dtypes and the overflow contract."""
    if resolve_backend("stage1_threshold_scan", backend, qv.device) == "triton":
        return _TRITON_OPS["stage1_threshold_scan"](qv, codes, thr, capacity, id_offset)  # type: ignore[operator]
    return stage1_threshold_scan_reference(qv, codes, thr, capacity, id_offset)


def stage1_topk(qv: torch.Tensor, codes: torch.Tensor, k: int, id_offset: int = 0, *, backend: Backend = "auto",
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The k (<= 1024 on the kernel) best items per query by stage-1 score, ties by smaller id; see
    :func:`stage1_topk_reference`."""
    if resolve_backend("stage1_topk", backend, qv.device) == "triton":
        return _TRITON_OPS["stage1_topk"](qv, codes, k, id_offset, **kwargs)  # type: ignore[operator]
    return stage1_topk_reference(qv, codes, k, id_offset)


def mol_candidate_scores(mol, q, cache, cand: torch.Tensor | None, *, backend: Backend = "auto") -> torch.Tensor:
    """Exact MoL of each query against its candidate rows (stage 2), or against every cached item when
    cand is None; see :func:`mol_candidate_scores_reference`. The kernel has no gating dropout: a module
    in training mode stays on the reference."""
    if backend == "auto" and mol.training:
        backend = "reference"
    if resolve_backend("mol_candidate_scores", backend, q.components.device) == "triton":
        return _TRITON_OPS["mol_candidate_scores"](mol, q, cache, cand)  # type: ignore[operator]
    return mol_candidate_scores_reference(mol, q, cache, cand)
