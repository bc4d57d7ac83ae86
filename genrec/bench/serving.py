"""gRPC serving overhead and dynamic-batching throughput, side by side in one run.

One index (exact flat MIPS over --items random unit vectors, dim --dim) is served by two servers on
loopback, one with dynamic batching and one without. Measured:
  latency at batch 1: in-process ``index.search`` vs gRPC Search from a client process (batching off
  and on), p50/p99. overhead_p50_ms is the gRPC p50 minus the in-process p50; rpc_overhead_p50_ms the
  p50 over requests of (round trip - the server's own compute time of that request), which does not
  move with the search's run-to-run noise. grpc.health.v1 Check from the same client: the transport's
  floor on this machine. A raw TCP echo whose server sleeps the in-process p50 before replying (minus
  that sleep): what a wait as long as the search costs by itself (an idle CPU or thread waking up),
  which the health check, answered at once, does not pay. The servicer's Search called in-process with
  no transport: its rpc_overhead_p50_ms is what the handler itself adds to the search;
  throughput: closed-loop clients at concurrency 1/16/64 for --seconds each, QPS with batching on vs off;
  with batching, the mean batch (queries per search), batcher_busy, the fraction of the run the search
  workers spent searching (near 1 per worker: compute-bound; well below: starved by per-request costs),
  and server_ms_per_batch (busy time / batches) beside in_process_ms_per_batch, the same index searching
  a batch of that size in this process with the servers idle: what the load costs each search.
CPU per call (ms), beside the timings: client_cpu_ms, the client processes' CPU per completed call, and
server_cpu_ms, this process's (both servers and their threads live here) per call over the same window;
cpu_cores_busy, both together per second of a QPS run. With clients and servers on the same cores,
QPS can't exceed cores * 1000 / (client_cpu_ms + server_cpu_ms), and the health check's two figures are
what the transport alone costs per call, before any handler runs.
Clients (genrec.bench.load: separate processes, asyncio, no torch) and servers share the machine's
cores, as a sidecar deployment would.

    genrec bench serving [--items 200000 ...] [--dim 64] [--seconds 5] [--concurrency 1 16 64] [--repeats 1] [--device cuda]

Several --items sizes run one after another into one table (an items column); --concurrency with no value
measures batch-1 latency only.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genrec.bench.load import closed_loop, process_cpu_s, remote_latencies_ms, search_request, tcp_echo_wait_ms
from genrec.bench.report import harness_parser, provenance, random_unit, write_table
from genrec.bench.timing import best_seconds, latencies_ms
from genrec.index.mips import FlatMIPS
from genrec.index.storage import save_index
from genrec.plots import save_figure
from genrec.serving.config import BatchingConfig, IndexEntry, LimitsConfig, ServeConfig
from genrec.serving.server import RetrievalServer

log = logging.getLogger("genrec.bench")


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("serving", __doc__, "serving")
    ap.add_argument("--items", type=int, nargs="+", default=[200_000],
                    help="index sizes, each measured in turn (one table, an items column)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64],
                    help="closed-loop client counts for the QPS part; none: batch-1 latency only")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="QPS runs per concurrency (on and off back to back, order alternating); > 1 adds a median ratio row")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both servers)")
    ap.add_argument("--batch-workers", type=int, default=1, help="batching workers (threads taking batches)")
    ap.add_argument("--device", default="cpu", help="where the index searches (both servers and in-process): cpu, cuda")
    ap.add_argument("--stem", default="serving")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for n in args.items:
        rows += measure(args, n)
    meta = {**provenance(), "threads": args.threads, "items": args.items if len(args.items) > 1 else args.items[0],
            "dim": args.dim, "k": args.k, "index": "flat MIPS (exact)", "max_batch": args.max_batch,
            "max_delay_ms": args.max_delay_ms, "batch_workers": args.batch_workers, "seconds": args.seconds,
            "repeats": args.repeats, "index_device": args.device,
            "note": "clients and servers on the same machine; loopback gRPC"}
    md = write_table(rows, args.out_dir, args.stem, meta)
    plot(rows, Path(args.out_dir) / f"{args.stem}.png", meta)
    print(md.read_text())
    return 0


def measure(args, num_items: int) -> list[dict]:
    """The batch-1 latency rows and (for each --concurrency) the QPS rows of one index size."""

    rng = np.random.default_rng(0)
    items = random_unit(rng, num_items, args.dim)
    queries = random_unit(rng, 1024, args.dim)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_index(FlatMIPS(torch.from_numpy(items)), tmp, "bench", "v1")
        index = FlatMIPS(torch.from_numpy(items)).to(args.device)
        limits = LimitsConfig(max_concurrent_rpcs=1024, workers=max(args.concurrency, default=1) + 8)
        servers = {}
        for batching in (False, True):
            cfg = ServeConfig(port=0, indexes=(IndexEntry("bench", str(path), "size", device=args.device),), limits=limits,
                              batching=BatchingConfig(enabled=batching, max_batch=args.max_batch,
                                                      max_delay_ms=args.max_delay_ms, queue_size=4096,
                                                      workers=args.batch_workers))
            servers[batching] = RetrievalServer(cfg).start()
        try:
            lat = {"in-process": latencies_ms(lambda q: index.search(q, args.k), queries, args.latency_queries, warmup=5)}
            server_compute, cpu = {}, {}  # cpu: (client, server) CPU ms per call
            for batching, srv in servers.items():
                name = f"grpc batching={'on' if batching else 'off'}"
                run = remote_latencies_ms(srv.port, queries, args.k, args.latency_queries)
                lat[name], server_compute[name] = run.total_ms, run.compute_ms
                cpu[name] = (run.client_cpu_ms, run.process_cpu_ms)
            name = "grpc health check (transport floor)"
            run = remote_latencies_ms(servers[False].port, queries, args.k, args.latency_queries, method="health")
            lat[name], cpu[name] = run.total_ms, (run.client_cpu_ms, run.process_cpu_ms)
            base = float(np.percentile(lat["in-process"], 50))
            lat["tcp echo after a wait of the search's p50, minus the wait (machine floor)"] = tcp_echo_wait_ms(
                base / 1e3, args.latency_queries)
            name = "Search handler, no gRPC (servicer called in-process)"
            lat[name], server_compute[name], handler_cpu = servicer_latencies_ms(servers[False], queries, args.k,
                                                                                 args.latency_queries)
            cpu[name] = (None, handler_cpu)  # no client: the calls are made in this process
            for name, v in lat.items():
                p50 = float(np.percentile(v, 50))
                row = {"items": num_items, "measure": "latency_b1", "system": name, "concurrency": 1,
                       "p50_ms": round(p50, 3), "p99_ms": round(float(np.percentile(v, 99)), 3)}
                if name in server_compute:  # vs in-process; and per request, minus the server's own compute
                    row["overhead_p50_ms"] = round(p50 - base, 3)
                    row["server_compute_p50_ms"] = round(float(np.percentile(server_compute[name], 50)), 3)
                    row["rpc_overhead_p50_ms"] = round(float(np.percentile(v - server_compute[name], 50)), 3)
                if name in cpu:
                    client_ms, server_ms = cpu[name]
                    if client_ms is not None:
                        row["client_cpu_ms"] = round(client_ms, 3)
                    row["server_cpu_ms"] = round(server_ms, 3)
                rows.append(row)
                log.info("%d items, %s: p50 %.3f ms", num_items, name, p50)
            ratios: dict[int, list[float]] = {}
            for rep in range(args.repeats):  # each repeat runs on and off back to back, the order alternating
                tag = {"items": num_items, **({"rep": rep} if args.repeats > 1 else {})}
                for conc in args.concurrency:
                    qps = {}
                    for batching in ((False, True) if rep % 2 == 0 else (True, False)):
                        row = throughput_row(args, servers[batching], batching, index, queries, conc)
                        qps[batching] = row["qps"]
                        rows.append({**tag, **row})
                    ratios.setdefault(conc, []).append(qps[True] / max(qps[False], 1e-9))
                    rows.append({**tag, "measure": "throughput_ratio", "system": "batching on / off", "concurrency": conc,
                                 "qps": round(ratios[conc][-1], 2)})
            if args.repeats > 1:
                for conc, r in ratios.items():
                    rows.append({"items": num_items, "measure": "throughput_ratio_median",
                                 "system": f"batching on / off, median of {len(r)}", "concurrency": conc,
                                 "qps": round(float(np.median(r)), 2), "ratio_min": round(min(r), 2),
                                 "ratio_max": round(max(r), 2)})
        finally:
            for srv in servers.values():
                srv.stop(grace=1)
    return rows


def throughput_row(args, srv, batching: bool, index, queries: np.ndarray, conc: int) -> dict:
    """One closed-loop QPS run against ``srv``: QPS, CPU per query (clients', this process's) and, with
    batching, how full the batches were, how busy the search workers, and a batch's time in the loaded
    server vs the same search alone in this process."""
    before = batcher_counters(srv)
    run = closed_loop(srv.port, queries, args.k, conc, args.seconds)
    row = {"measure": "throughput", "system": f"grpc batching={'on' if batching else 'off'}", "concurrency": conc,
           "qps": round(run.done / args.seconds, 1), "failed": run.failed,
           "client_cpu_ms": round(run.client_cpu_s / max(run.done, 1) * 1e3, 3),
           "server_cpu_ms": round(run.process_cpu_s / max(run.done, 1) * 1e3, 3),
           "cpu_cores_busy": round((run.client_cpu_s + run.process_cpu_s) / run.window_s, 2)}
    if batching:
        (b0, n0, t0), (b1, n1, t1) = before, batcher_counters(srv)
        row["mean_batch"] = round((b1 - b0) / max(n1 - n0, 1), 1)
        row["batcher_busy"] = round((t1 - t0) / args.seconds, 2)
        row["server_ms_per_batch"] = round((t1 - t0) / max(n1 - n0, 1) * 1e3, 1)
        nq = max(1, round(row["mean_batch"]))
        row["in_process_ms_per_batch"] = round(float(np.median(
            [best_seconds(lambda: index.search(queries[:nq], args.k), 1) for _ in range(5)])) * 1e3, 1)
    log.info("%d items, concurrency %d batching %s: %.1f QPS (%d failed)", index.ntotal, conc, batching,
             row["qps"], run.failed)
    return row


class _LocalContext:
    """The little of a grpc.ServicerContext that a Search without a deadline uses."""

    def time_remaining(self):
        return None

    def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


def servicer_latencies_ms(srv, queries: np.ndarray, k: int, n: int, warmup: int = 5) -> tuple[np.ndarray, np.ndarray, float]:
    """n batch-1 Search calls straight into ``srv``'s servicer (request objects built beforehand, no
    transport): (call ms, the search's own compute_ms, each (n,); this process's CPU ms per call). Their
    difference is what the handler itself adds: validation, the batcher's bookkeeping, metrics, the reply."""
    requests = [search_request(queries[i % len(queries)], k) for i in range(warmup + n)]
    total, compute = [], []
    for i, request in enumerate(requests):
        if i == warmup:
            cpu0 = process_cpu_s()
        t = time.perf_counter()
        reply = srv.service.Search(request, _LocalContext())
        total.append((time.perf_counter() - t) * 1e3)
        compute.append(reply.timing.compute_ms)
    return np.array(total[warmup:]), np.array(compute[warmup:]), (process_cpu_s() - cpu0) / n * 1e3


def batcher_counters(srv) -> tuple[float, float, float]:
    """(queries batched, batches, seconds spent searching) so far, from the server's own metrics."""
    value = srv.metrics.registry.get_sample_value
    return (value("genrec_batch_queries_sum") or 0.0, value("genrec_batch_queries_count") or 0.0,
            value("genrec_batcher_busy_seconds_total") or 0.0)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """QPS vs clients per index size and batching; with several sizes, also batch-1 p50 vs index size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["items"] for r in rows})
    qps_rows = [r for r in rows if r["measure"] == "throughput"]
    panels = (["qps"] if qps_rows else []) + (["latency"] if len(sizes) > 1 or not qps_rows else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "qps":
            for n in sizes:
                for system in ("grpc batching=off", "grpc batching=on"):
                    runs: dict[int, list[float]] = {}  # concurrency -> QPS of each repeat
                    for r in qps_rows:
                        if r["system"] == system and r["items"] == n:
                            runs.setdefault(r["concurrency"], []).append(r["qps"])
                    pts = [(c, float(np.median(v))) for c, v in sorted(runs.items())]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{n:,} items, {system}")
            ax.set(xlabel="concurrent clients", ylabel="QPS (median of repeats)", xscale="log", yscale="log",
                   title="closed-loop QPS")
        else:
            for system in dict.fromkeys(r["system"] for r in rows if r["measure"] == "latency_b1"):
                pts = [(r["items"], r["p50_ms"]) for r in rows if r["measure"] == "latency_b1" and r["system"] == system]
                ax.plot(*zip(*pts), marker="o", label=system)
            ax.set(xlabel="index items", ylabel="batch-1 p50 (ms)", xscale="log", yscale="log", title="batch-1 latency")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"gRPC Search, flat MIPS x {meta['dim']}, {meta['device']}")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
