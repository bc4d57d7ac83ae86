"""The thread pool the compiled CPU kernels (numba, ``nogil``) run their tasks on, sized by torch's thread
count. Python threads rather than numba's parallel layer: its OpenMP workers spin after each call and,
on a small machine, slowed the PyTorch ops that follow ~50x."""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numba
import torch

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_workers = 0  # the pool's size

# compiled kernels are cached next to their source; an install there may be read-only (a locked-down
# image): cache under the temp dir instead of failing to compile
_here = Path(__file__).resolve().parent
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(_here / "__pycache__" if (_here / "__pycache__").exists() else _here, os.W_OK):
    numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "genrec-numba-cache")


def _forget_pool() -> None:
    global _executor, _workers
    _executor, _workers = None, 0  # a forked child has none of the parent's pool threads: it makes its own


os.register_at_fork(after_in_child=_forget_pool)


def _pool(threads: int) -> ThreadPoolExecutor:
    global _executor, _workers
    with _lock:
        if _executor is None or _workers < threads:
            _executor, _workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="genrec-kernel"), threads
        return _executor


def run_tasks(fn: Callable, tasks: Sequence) -> None:
    """fn(task) for every task: inline when there is one task or one thread, else on the pool."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            fn(task)
    else:
        list(_pool(threads).map(fn, tasks))
