"""Scatter-gather broker overhead and QPS vs shard count, at equal total items, on loopback.

For S in --shards: S shard servers each hold N/S items of one flat MIPS index, a broker fans out to
them; S = 0 stands for one server holding all N items, queried directly. Measured: p50/p99 latency at
batch 1 (one client) and closed-loop QPS at --concurrency clients. Every server shares this machine's
cores, so on a laptop-sized box more shards mean more processes on the same cores: this measures
overhead, not the scaling across hosts the broker exists for.

    genrec bench broker [--items 400000] [--shards 0 1 2 4]
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch

from genrec.bench.load import closed_loop
from genrec.bench.report import harness_parser, provenance, random_unit, write_table
from genrec.bench.timing import latencies_ms
from genrec.index.mips import FlatMIPS
from genrec.index.storage import save_index
from genrec.serving.client import GenrecClient
from genrec.serving.config import BrokerConfig, IndexEntry, LimitsConfig, ServeConfig
from genrec.serving.server import RetrievalServer

log = logging.getLogger("genrec.bench")


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("broker", __doc__, "serving")
    ap.add_argument("--items", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server")
    ap.add_argument("--stem", default="broker")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)


    rng = np.random.default_rng(0)
    items = random_unit(rng, args.items, args.dim)
    ids = np.arange(args.items, dtype=np.int64)
    queries = random_unit(rng, 512, args.dim)
    limits = LimitsConfig(max_concurrent_rpcs=1024, workers=args.concurrency + 8)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for s in args.shards:
            parts = [(0, args.items)] if s == 0 else [(i * args.items // s, (i + 1) * args.items // s) for i in range(s)]
            servers = []
            for j, (a, b) in enumerate(parts):
                path = save_index(FlatMIPS(torch.from_numpy(items[a:b]), ids[a:b]), tmp, f"s{s}-{j}", "v1")
                servers.append(RetrievalServer(ServeConfig(port=0, limits=limits,
                                                           indexes=(IndexEntry("items", str(path), "size"),))).start())
            front = servers[0] if s == 0 else RetrievalServer(ServeConfig(
                port=0, role="broker", limits=limits,
                broker=BrokerConfig(shards=tuple(f"127.0.0.1:{x.port}" for x in servers)))).start()
            try:
                with GenrecClient(f"127.0.0.1:{front.port}") as c:
                    lat = latencies_ms(lambda q: c.search(q, args.k, timeout=30), queries, args.latency_queries, warmup=5)
                    ids_now = c.search(queries[:64], args.k, timeout=30)[1]
                reference = ids_now if reference is None else reference
                done, failed, *_ = closed_loop(front.port, queries, args.k, args.concurrency, args.seconds)
                rows.append({"setup": "single server" if s == 0 else f"broker + {s} shard(s)", "shards": s,
                             "items_per_shard": args.items // max(s, 1),
                             "p50_ms_b1": round(float(np.percentile(lat, 50)), 3),
                             "p99_ms_b1": round(float(np.percentile(lat, 99)), 3),
                             f"qps_c{args.concurrency}": round(done / args.seconds, 1), "failed": failed,
                             "same_ids_as_first_setup": bool(np.array_equal(ids_now, reference))})
                log.info("%s", rows[-1])
            finally:
                for x in ([front] if front is not servers[0] else []) + servers:
                    x.stop(grace=0.5)
    base = rows[0]["p50_ms_b1"] if rows else 0.0
    for r in rows:
        r["p50_overhead_ms_vs_first"] = round(r["p50_ms_b1"] - base, 3)
    meta = {**provenance(), "items": args.items, "dim": args.dim, "k": args.k, "torch_threads_per_server": args.threads,
            "note": "all servers and clients on one machine (loopback); shards 0 = one server, no broker"}
    md = write_table(rows, args.out_dir, args.stem, meta)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
