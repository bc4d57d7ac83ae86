"""Dynamic batching: concurrent search requests are coalesced so one scan serves many queries.

Requests wait in a bounded queue (full -> ``QueueFull``, answered RESOURCE_EXHAUSTED at once). A
worker thread takes the first waiting request and everything queued behind it (up to ``max_batch``
queries); only if others were already waiting does it linger up to ``max_delay`` for more, so a lone
request at low load is served at once and batches grow by themselves while a search runs. With
``workers`` > 1, that many workers take batches from the one queue, so one collects while another
searches (for machines with cores to spare: on the 2-core CI box two single-threaded workers served
~10% fewer queries than one worker with two torch threads).
When the batcher is idle (nothing queued, a worker slot free, no worker waiting for one), a request is
searched at once in its own RPC thread, a batch of one, which saves the two thread hand-offs through a
worker; requests arriving meanwhile queue and form the next batch as usual. It groups
the batch by what must match for one call (index version, k, search parameters) and runs each group
as one search. A request whose deadline passed while it waited is
dropped before any compute (counted), its caller already gone with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Expired(Exception):
    pass


@dataclass
class Job:
    """One request's share of a batch: queries (nq, d) float32 against ``served`` (a registry entry)."""

    served: Any
    queries: np.ndarray
    k: int
    params: dict
    exclude: list | None = None
    deadline: float | None = None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return (id(self.served), self.k, tuple(sorted(self.params.items())))


@dataclass
class BatchResult:
    """One job's rows of a batch search, plus how it was served."""

    result: Any  # SearchResult restricted to the job's rows
    queue_s: float
    compute_s: float
    batch_queries: int


def run_group(jobs: list[Job]) -> None:
    """One search for jobs sharing a key; results are split back per job."""
    first = jobs[0]
    q = np.concatenate([j.queries for j in jobs]) if len(jobs) > 1 else first.queries
    excl = None
    if any(j.exclude for j in jobs):
        excl = [row for j in jobs for row in (j.exclude or [[] for _ in range(len(j.queries))])]
    start = time.monotonic()
    try:
        r = first.served.index.search_with_certificate(q, first.k, exclude=excl, **first.params)
    except Exception as e:  # noqa: BLE001 - every waiter must hear about it
        for j in jobs:
            j.future.set_exception(e)
        return
    compute = time.monotonic() - start
    row = 0
    for j in jobs:
        n = len(j.queries)
        part = type(r)(r.scores[row : row + n], r.ids[row : row + n], r.exact[row : row + n], r.bound[row : row + n])
        j.future.set_result(BatchResult(part, start - j.enqueued, compute, len(q)))
        row += n


class DynamicBatcher:
    def __init__(self, max_batch: int = 64, max_delay_s: float = 0.001, queue_size: int = 256,
                 on_batch: Callable[[int], None] | None = None, on_expired: Callable[[], None] | None = None,
                 on_busy: Callable[[float], None] | None = None, workers: int = 1):
        """on_batch(queries) per coalesced search; on_expired() per request dropped unserved;
        on_busy(seconds) per batch, the time a worker spent searching (summed over workers: their saturation)."""
        if workers < 1:
            raise ValueError(f"batching workers must be >= 1, got {workers}")
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch or (lambda n: None)
        self._on_expired = on_expired or (lambda: None)
        self._on_busy = on_busy or (lambda s: None)
        self._slots = threading.Condition()
        self._free, self._waiting = workers, 0  # search slots free; workers holding a batch, waiting for one
        self._threads = [threading.Thread(target=self._loop, name=f"genrec-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> Future:
        """Queue ``job`` (or, when idle, search it now in the caller's thread); returns its future."""
        with self._slots:
            idle = self._free > 0 and self._waiting == 0 and self._queue.empty()
            if idle:
                self._free -= 1
        if idle:
            try:
                self._run([job])
            finally:
                self._release()
            return job.future
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"request queue full ({self._queue.maxsize} waiting)") from None
        return job.future

    def close(self) -> None:
        for _ in self._threads:  # one stop marker per worker; each worker takes exactly one
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, nq = [first], len(first.queries)
        until = time.monotonic() + self.max_delay_s
        while nq < self.max_batch:
            remaining = until - time.monotonic()
            try:  # lingering only pays when requests are arriving: never wait on an empty queue alone
                job = (self._queue.get(timeout=remaining) if remaining > 0 and len(jobs) > 1
                       else self._queue.get_nowait())
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            nq += len(job.queries)
        return jobs, False

    def _acquire(self) -> None:
        with self._slots:
            self._waiting += 1
            while self._free == 0:
                self._slots.wait()
            self._waiting -= 1
            self._free -= 1

    def _release(self) -> None:
        with self._slots:
            self._free += 1
            self._slots.notify()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            self._acquire()  # collect only once a slot is free: whatever queued meanwhile joins the batch
            try:
                jobs, stop = self._collect(first)
                self._run(jobs)
            finally:
                self._release()

    def _run(self, jobs: list[Job]) -> None:
        """Drop the expired and cancelled jobs, then one search per group of jobs that can share one."""
        now = time.monotonic()
        live = []
        for j in jobs:
            if j.deadline is not None and now > j.deadline:
                self._on_expired()
                if j.future.set_running_or_notify_cancel():  # False: the caller already gave up
                    j.future.set_exception(Expired("deadline passed while queued"))
            elif j.future.set_running_or_notify_cancel():
                live.append(j)
        groups: dict[tuple, list[Job]] = {}
        for j in live:
            groups.setdefault(j.key, []).append(j)
        start = time.monotonic()
        for group in groups.values():
            self._on_batch(sum(len(j.queries) for j in group))
            run_group(group)
        if groups:
            self._on_busy(time.monotonic() - start)
