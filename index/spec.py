"""Index specifications: one typed dataclass, from a factory-like string or a YAML mapping.

    mol-hindexer                                  defaults below
    mol-hindexer:stage1=pca16,stage1_dtype=int8,kprime=20000
    mips:factory=Flat                             exact torch scan
    mips:factory=IVF1024,Flat,nprobe=16           faiss (a comma part without '=' continues the value)
    mips:factory=HNSW32,ef_search=128
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from genrec.index.hindexer import STAGE1_SELECT
from genrec.index.stage1 import DTYPES, parse_method

TYPES = ("mol-hindexer", "mips")


@dataclass
class IndexSpec:
    type: str = "mol-hindexer"
    # mol-hindexer: stage 1 (avg | pca<d> | learned<d>; float32 | bfloat16 | int8), K' kept for stage 2,
    # sample size for the threshold estimate and the PCA / distillation fit, dtype of the cached MoL item
    # components, optimiser steps of a learned stage 1's distillation
    stage1: str = "avg"
    stage1_dtype: str = "int8"
    kprime: int = 10000
    sample_size: int = 16384
    cache_dtype: str = "float32"
    distill_steps: int = 300
    # how stage 1 keeps K': auto (running top-k kernel for K' <= 1024 on a GPU, else threshold) | threshold | topk
    stage1_select: str = "auto"
    # mips: faiss index_factory string ("Flat" = exact torch scan) and its search parameters
    factory: str = "Flat"
    nprobe: int = 0
    ef_search: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown index type {self.type!r}; use one of {', '.join(TYPES)}")
        if self.kprime <= 0 or self.sample_size <= 0 or self.distill_steps <= 0:
            raise ValueError("kprime, sample_size and distill_steps must be positive")
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"cache_dtype {self.cache_dtype!r}: use float32 or bfloat16")
        if self.type == "mol-hindexer":
            parse_method(self.stage1)
            if self.stage1_select not in STAGE1_SELECT:
                raise ValueError(f"stage1_select {self.stage1_select!r}: use one of {', '.join(STAGE1_SELECT)}")
            if self.stage1_dtype not in DTYPES:
                raise ValueError(f"stage1_dtype {self.stage1_dtype!r}: use one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.type == "mips":
            extra = "".join(f",{k}={v}" for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search)) if v)
            return f"mips:factory={self.factory}{extra}"
        return (f"mol-hindexer:stage1={self.stage1},stage1_dtype={self.stage1_dtype},kprime={self.kprime},"
                f"cache_dtype={self.cache_dtype},stage1_select={self.stage1_select}")


def from_mapping(d: dict[str, Any]) -> IndexSpec:
    fields = {f.name: f for f in dataclasses.fields(IndexSpec)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown index spec key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    out = {}
    for k, v in d.items():
        default = getattr(IndexSpec, k)
        try:
            out[k] = type(default)(v) if not isinstance(v, type(default)) else v
        except (TypeError, ValueError):
            raise ValueError(f"index spec {k}={v!r}: expected {type(default).__name__}") from None
    return IndexSpec(**out)


def parse_spec(text: str) -> IndexSpec:
    """'type[:key=value,...]' -> IndexSpec (see the module docstring)."""
    kind, _, rest = text.strip().partition(":")
    d: dict[str, Any] = {"type": kind}
    last = None
    for part in filter(None, rest.split(",")):
        if "=" in part:
            last, _, value = part.partition("=")
            d[last.strip()] = value.strip()
        elif last is not None:
            d[last] += "," + part.strip()
        else:
            raise ValueError(f"index spec {text!r}: expected key=value, got {part!r}")
    return from_mapping(d)


def load_spec(path: str | Path) -> IndexSpec:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an index spec must be a YAML mapping")
    return from_mapping(data)
