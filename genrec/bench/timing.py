"""Timers shared by the benchmark harnesses (host clocks; callers synchronise devices themselves)."""

from __future__ import annotations

import time

import numpy as np


def best_seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls of fn(), after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def latencies_ms(fn, queries: np.ndarray, n: int, warmup: int = 1) -> np.ndarray:
    """Milliseconds of n calls fn(one query row), cycling through ``queries``, after ``warmup`` calls."""
    for i in range(warmup):
        fn(queries[i % len(queries) : i % len(queries) + 1])
    out = []
    for i in range(n):
        row = queries[i % len(queries) : i % len(queries) + 1]
        t = time.perf_counter()
        fn(row)
        out.append((time.perf_counter() - t) * 1e3)
    return np.array(out)
