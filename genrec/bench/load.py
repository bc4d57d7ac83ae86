"""Load generation for the serving benchmarks: client processes that import grpc and numpy only.

Clients share the machine with the server under test, so they must cost it as little as possible: they
run in spawned processes (no GIL shared with the server) that never import torch, every process waits
at one barrier until all are connected before its clock starts, and each process drives its callers as
asyncio tasks on one ``grpc.aio`` channel rather than as threads.

Both measurements also report CPU time over their timed window: the client processes' own, and this
(the calling) process's, which is the server's when the server under test runs in this process, as in
``genrec bench serving``. Per request, the two say what the transport and the handler cost in CPU, which
on a machine whose cores the clients and server share bounds both latency and throughput.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import socket
import time
from typing import NamedTuple

import grpc
import numpy as np

from genrec.serving import genrec_pb2 as pb
from genrec.serving import genrec_pb2_grpc as pb_grpc


def client_shares(clients: int, processes: int) -> list[int]:
    """Split ``clients`` closed-loop clients over at most ``processes`` processes, as evenly as possible."""
    procs = max(1, min(processes, clients))
    return [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]


def process_cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadRun(NamedTuple):
    """One closed-loop run: completed and failed calls, the clients' CPU seconds over their timed
    window, this process's CPU seconds over the same window (the server's, when it runs here), and that
    window's wall seconds as this process saw it (start barrier to the last client's report)."""

    done: int
    failed: int
    client_cpu_s: float
    process_cpu_s: float
    window_s: float


class LatencyRun(NamedTuple):
    """Sequential calls' round trips and server compute (ms, each (n,)), and CPU per call (ms): the
    client process's, and this process's over the same calls (the server's, when it runs here)."""

    total_ms: np.ndarray
    compute_ms: np.ndarray
    client_cpu_ms: float
    process_cpu_ms: float


def search_request(query: np.ndarray, k: int) -> pb.SearchRequest:
    """One query vector (dim,) float32 -> a SearchRequest for the default index."""
    return pb.SearchRequest(k=k, dim=query.shape[0], queries=np.ascontiguousarray(query, dtype="<f4").tobytes())


def closed_loop(port: int, queries: np.ndarray, k: int, concurrency: int, seconds: float,
                processes: int = 4) -> LoadRun:
    """``concurrency`` closed-loop callers (each sends its next Search when the last one returns) for
    ``seconds``, spread over ``processes`` client processes. This process joins the clients' start
    barrier, so its CPU reading starts with their clocks."""
    ctx = mp.get_context("spawn")
    shares = client_shares(concurrency, processes)
    barrier, results = ctx.Barrier(len(shares) + 1), ctx.Queue()
    procs = [ctx.Process(target=_closed_loop_process, args=(port, queries, k, c, seconds, i, barrier, results))
             for i, c in enumerate(shares)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    cpu0, t0 = process_cpu_s(), time.monotonic()
    parts = [results.get(timeout=seconds + 120) for _ in procs]
    cpu1, t1 = process_cpu_s(), time.monotonic()
    for p in procs:
        p.join()
    return LoadRun(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), cpu1 - cpu0, t1 - t0)


def _closed_loop_process(port: int, queries: np.ndarray, k: int, concurrency: int, seconds: float, first: int,
                         barrier, results) -> None:
    async def run() -> tuple[int, int, float]:
        done = failed = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            stub = pb_grpc.RetrievalStub(channel)
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            cpu0 = time.process_time()
            stop = time.monotonic() + seconds

            async def caller(w: int) -> None:
                nonlocal done, failed
                i = first * 1000 + w
                while time.monotonic() < stop:
                    try:
                        await stub.Search(search_request(queries[i % len(queries)], k), timeout=30)
                        done += 1
                    except grpc.RpcError:
                        failed += 1
                    i += concurrency

            await asyncio.gather(*(caller(w) for w in range(concurrency)))
            cpu = time.process_time() - cpu0
        return done, failed, cpu

    results.put(asyncio.run(run()))


def remote_latencies_ms(port: int, queries: np.ndarray, k: int, n: int, warmup: int = 5,
                        method: str = "search") -> LatencyRun:
    """n sequential calls from a separate client process (as a remote client sees them): batch-1 Search
    cycling through ``queries``, or (method="health") grpc.health.v1 Check, the cheapest round trip
    the server answers: the floor of the transport on this machine. The server's compute_ms of each
    reply is zero for health."""
    ctx = mp.get_context("spawn")
    results, go = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_latency_process, args=(port, queries, k, n, warmup, method, results, go))
    p.start()
    results.get(timeout=120)  # warmed up; the timed calls start once this process has read its CPU
    cpu0 = process_cpu_s()
    go.set()
    total, compute, client_cpu_s = results.get(timeout=600)
    cpu1 = process_cpu_s()
    p.join()
    return LatencyRun(total, compute, client_cpu_s / n * 1e3, (cpu1 - cpu0) / n * 1e3)


def _latency_process(port: int, queries: np.ndarray, k: int, n: int, warmup: int, method: str, results, go) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    if method == "health":
        call, make = health_pb2_grpc.HealthStub(channel).Check, lambda i: health_pb2.HealthCheckRequest()
    else:
        call, make = pb_grpc.RetrievalStub(channel).Search, lambda i: search_request(queries[i % len(queries)], k)
    for i in range(warmup):
        call(make(i), timeout=30)
    results.put("warm")
    go.wait(timeout=120)
    total, compute = [], []
    cpu0 = time.process_time()
    for i in range(warmup, warmup + n):
        request = make(i)
        t = time.perf_counter()
        reply = call(request, timeout=30)
        total.append((time.perf_counter() - t) * 1e3)
        compute.append(reply.timing.compute_ms if method == "search" else 0.0)
    cpu = time.process_time() - cpu0
    channel.close()
    results.put((np.array(total), np.array(compute), cpu))


def tcp_echo_wait_ms(wait_s: float, n: int, warmup: int = 10) -> np.ndarray:
    """Round trips of a raw loopback TCP echo whose server (a spawned process) sleeps ``wait_s`` before each
    reply, minus that wait: (n,) ms. What a blocking wait of that length costs on this machine by itself
    (waking an idle CPU or thread), with no gRPC or Python handler work."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    p = ctx.Process(target=_echo_server, args=(wait_s, ports), daemon=True)
    p.start()
    out = []
    with socket.create_connection(("127.0.0.1", ports.get(timeout=60)), timeout=30) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(warmup + n):
            t = time.perf_counter()
            c.sendall(b"q" * 64)
            got = 0
            while got < 64:
                got += len(c.recv(64 - got))
            out.append((time.perf_counter() - t - wait_s) * 1e3)
    p.join(timeout=10)
    return np.array(out[warmup:])


def _echo_server(wait_s: float, ports) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        ports.put(s.getsockname()[1])
        conn, _ = s.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(64):
                time.sleep(wait_s)
                conn.sendall(data)
