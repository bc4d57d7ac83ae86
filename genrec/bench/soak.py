"""Soak: one server under mixed traffic for --minutes while index versions hot-swap; leaks and errors.

Traffic (closed-loop clients in separate processes): valid Search requests, every ``--bad-every``-th
one malformed in turn (k = 0, a NaN query, a query whose scores overflow, a wrong dim, a 10,000-character
index name; each must get its own status code), every ``--tight-every``-th with a 1 ms deadline (OK or
DEADLINE_EXCEEDED). A swapper loads versions v1 / v2 (different items) alternately every
--swap-seconds through LoadIndex; every third load it first offers a damaged version (a NaN item, a
flipped byte, a file outside the version) and a load without the admin token, which must be refused
while the old version keeps serving. Clients check every valid answer against the exact top-k of the
version the reply names. Every --sample-seconds: the server process's RSS, OS threads, open fds and its
per-status request counters.

Verdict rows: statuses outside {OK, INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED}
and malformed requests answered with another code than their own (must be 0), wrong answers (must be 0),
swaps done, damaged loads accepted (must be 0), RSS growth over the second half of the run (MiB/min).
Writes <stem>.{csv,md,json,png}.

    genrec bench soak [--minutes 10] [--items 50000] [--clients 8]
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from genrec.bench.load import client_shares
from genrec.bench.report import harness_parser, provenance, random_unit, write_table
from genrec.index.mips import FlatMIPS
from genrec.index.storage import save_index
from genrec.plots import save_figure
from genrec.serving.client import GenrecClient
from genrec.serving.config import BatchingConfig, IndexEntry, LimitsConfig, ServeConfig
from genrec.serving.server import RetrievalServer

SOAK_TOKEN = "soak-admin"  # the swapper's LoadIndex token (admin methods are closed without one)
log = logging.getLogger("genrec.bench")
EXPECTED = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
# malformed Search requests, taken in turn: (name, fields over a valid request, the status it must get)
MALFORMED = (("k=0", {"k": 0}, "INVALID_ARGUMENT"), ("NaN query", {"nan": True}, "INVALID_ARGUMENT"),
             ("overflowing scores", {"fill": 3e38}, "INVALID_ARGUMENT"), ("wrong dim", {"dim": 3}, "INVALID_ARGUMENT"),
             ("10,000-character name", {"index": "x" * 10_000}, "NOT_FOUND"))


def malformed_request(q: np.ndarray, k: int, which: int):
    """The ``which``-th malformed Search request (cycling over MALFORMED) and the status it must get."""
    from genrec.serving import genrec_pb2 as pb

    _, change, code = MALFORMED[which % len(MALFORMED)]
    if "fill" in change:
        q = np.full_like(q, change["fill"])
    if change.get("nan"):
        q = q.copy()
        q[0, 0] = np.nan
    dim = change.get("dim", q.shape[1])
    return pb.SearchRequest(index=change.get("index", "soak"), k=change.get("k", k), dim=dim,
                            queries=np.ascontiguousarray(q[:, :dim], dtype="<f4").tobytes()), code


def damaged_versions(tmp: str, n: int, dim: int) -> list[Path]:
    """Versions of the soak index that a server must refuse: a NaN item, a flipped byte, a file outside."""
    import json
    import shutil

    items = version_items("v1", n, dim)
    items[n // 2, 0] = np.nan
    nan = save_index(FlatMIPS(torch.from_numpy(items)), tmp, "damaged", "nan")
    good = save_index(FlatMIPS(torch.from_numpy(version_items("v1", n, dim))), tmp, "damaged", "good")
    flipped = Path(shutil.copytree(good, Path(tmp) / "damaged" / "flipped"))
    data = bytearray((flipped / "items.npy").read_bytes())
    data[-3] ^= 0xFF
    (flipped / "items.npy").write_bytes(bytes(data))
    outside = Path(shutil.copytree(good, Path(tmp) / "damaged" / "outside"))
    manifest = json.loads((outside / "manifest.json").read_text())
    for f in manifest["files"]:
        f["path"] = f"../good/{f['path']}"
    (outside / "manifest.json").write_text(json.dumps(manifest))
    return [nan, flipped, outside]


def version_items(version: str, n: int, dim: int) -> np.ndarray:
    """The items of soak version v1 / v2 (deterministic, so client processes can rebuild the exact answers)."""
    return random_unit(np.random.default_rng(int(version[1:])), n, dim)


def process_stats() -> dict:
    """RSS (MiB), OS threads and open file descriptors of this process (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
            "fds": len(os.listdir("/proc/self/fd"))}


def _client(port: int, n: int, dim: int, k: int, threads: int, seconds: float, bad_every: int, tight_every: int,
            seed: int) -> dict:
    """One client process: ``threads`` closed-loop workers; returns counts by status and wrong answers."""
    import grpc


    torch.set_num_threads(1)
    exact = {v: FlatMIPS(torch.from_numpy(version_items(v, n, dim))) for v in ("v1", "v2")}
    queries = random_unit(np.random.default_rng(100 + seed), 256, dim)
    counts: dict[str, int] = {}
    wrong, wrong_status = [0], [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(w: int) -> None:
        i = w
        with GenrecClient(f"127.0.0.1:{port}") as c:
            while time.monotonic() < stop:
                q = queries[i % len(queries) : i % len(queries) + 1]
                bad, tight = i % bad_every == 0, i % tight_every == 1
                try:
                    if bad:
                        req, must = malformed_request(q, k, i // bad_every)
                        c.stub.Search(req, timeout=30)
                        code = "OK"
                    else:
                        r = c.search_reply(q, k, index="soak", timeout=0.001 if tight else 30)
                        code = "OK"
                        truth = exact.get(r.version)
                        if truth is None or not np.array_equal(r.ids, truth.search(q, k)[1]):
                            with lock:
                                wrong[0] += 1
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    counts[code] = counts.get(code, 0) + 1
                    wrong_status[0] += bad and code != must
                i += threads

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"counts": counts, "wrong": wrong[0], "wrong_status": wrong_status[0]}


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("soak", __doc__, "serving")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8, help="client threads in total")
    ap.add_argument("--processes", type=int, default=2, help="client processes")
    ap.add_argument("--swap-seconds", type=float, default=5.0)
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--bad-every", type=int, default=20)
    ap.add_argument("--tight-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--stem", default="soak")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    import multiprocessing as mp


    seconds = args.minutes * 60
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: save_index(FlatMIPS(torch.from_numpy(version_items(v, args.items, args.dim))), tmp, "soak", v)
                 for v in ("v1", "v2")}
        cfg = ServeConfig(port=0, indexes=(IndexEntry("soak", str(paths["v1"]), "size"),), admin_token=SOAK_TOKEN,
                          limits=LimitsConfig(max_concurrent_rpcs=256, workers=args.clients + 8),
                          batching=BatchingConfig(enabled=True, max_batch=32, max_delay_ms=1.0, queue_size=512))
        srv = RetrievalServer(cfg).start()
        swaps, swap_errors, halt = [0], [0], threading.Event()
        damaged = damaged_versions(tmp, min(args.items, 2000), args.dim)
        refusals = {"damaged_refused": 0, "damaged_accepted": 0, "tokenless_refused": 0, "tokenless_accepted": 0}

        def offer_damaged(admin: GenrecClient, outsider: GenrecClient) -> None:
            """A damaged version and a tokenless load: both must be refused, the served version unchanged."""
            import grpc

            path = damaged[(swaps[0] // 3) % len(damaged)]
            for client, what in ((admin, "damaged"), (outsider, "tokenless")):
                try:
                    client.load_index("soak", str(path if what == "damaged" else paths["v1"]), verify="full", timeout=60)
                    refusals[f"{what}_accepted"] += 1
                except grpc.RpcError:
                    refusals[f"{what}_refused"] += 1

        def swapper() -> None:
            with GenrecClient(f"127.0.0.1:{srv.port}", token=SOAK_TOKEN) as admin, \
                    GenrecClient(f"127.0.0.1:{srv.port}") as outsider:
                while not halt.wait(args.swap_seconds):
                    if swaps[0] % 3 == 2:
                        offer_damaged(admin, outsider)
                    try:
                        admin.load_index("soak", str(paths["v2" if swaps[0] % 2 == 0 else "v1"]), verify="size", timeout=60)
                        swaps[0] += 1
                    except Exception:  # noqa: BLE001 - counted and reported: a soak must not stop on one failure
                        swap_errors[0] += 1

        def counter(code: str) -> int:
            return int(srv.metrics.registry.get_sample_value("genrec_requests_total", {"method": "Search", "code": code}) or 0)

        shares = client_shares(args.clients, args.processes)
        procs = len(shares)
        try:
            with mp.get_context("spawn").Pool(procs) as pool:
                jobs = [pool.apply_async(_client, (srv.port, args.items, args.dim, args.k, c, seconds, args.bad_every,
                                                   args.tight_every, i)) for i, c in enumerate(shares)]
                swap_thread = threading.Thread(target=swapper, daemon=True)
                swap_thread.start()
                t0 = time.monotonic()
                while not all(j.ready() for j in jobs):
                    time.sleep(min(args.sample_seconds, max(0.1, seconds / 20)))
                    rows.append({"measure": "sample", "t_s": round(time.monotonic() - t0, 1), **process_stats(),
                                 "swaps": swaps[0], **{code.lower(): counter(code) for code in EXPECTED}})
                    log.info("%s", rows[-1])
                results = [j.get() for j in jobs]
                halt.set()
                swap_thread.join(timeout=60)
        finally:
            srv.stop(grace=1)
    counts: dict[str, int] = {}
    for r in results:
        for code, c in r["counts"].items():
            counts[code] = counts.get(code, 0) + c
    samples = [r for r in rows if r["measure"] == "sample"]
    half = [r for r in samples if r["t_s"] >= samples[-1]["t_s"] / 2] if samples else []
    growth = (float(np.polyfit([r["t_s"] / 60 for r in half], [r["rss_mib"] for r in half], 1)[0])
              if len(half) >= 2 else float("nan"))
    unexpected = sum(c for code, c in counts.items() if code not in EXPECTED)
    verdict = {"measure": "verdict", "requests": sum(counts.values()), **{f"client_{k.lower()}": v for k, v in sorted(counts.items())},
               "unexpected_status": unexpected, "malformed_wrong_status": sum(r["wrong_status"] for r in results),
               "wrong_answers": sum(r["wrong"] for r in results), "swaps": swaps[0], "swap_errors": swap_errors[0],
               **refusals, "rss_growth_mib_per_min_2nd_half": round(growth, 3)}
    rows.append(verdict)
    log.info("verdict: %s", verdict)
    meta = {**provenance(), "minutes": args.minutes, "items": args.items, "dim": args.dim, "clients": args.clients,
            "processes": procs, "swap_seconds": args.swap_seconds, "note": "server in this process, clients in others"}
    md = write_table(rows, args.out_dir, args.stem, meta)
    plot(samples, Path(args.out_dir) / f"{args.stem}.png")
    print(md.read_text())
    failed = (unexpected or verdict["wrong_answers"] or verdict["malformed_wrong_status"] or swap_errors[0]
              or refusals["damaged_accepted"] or refusals["tokenless_accepted"])
    return 1 if failed else 0


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    t = [r["t_s"] / 60 for r in samples]
    a.plot(t, [r["rss_mib"] for r in samples], marker=".", label="RSS MiB")
    a.plot(t, [r["threads"] for r in samples], marker=".", label="OS threads")
    a.plot(t, [r["fds"] for r in samples], marker=".", label="open fds")
    a.set(xlabel="minutes", title="server process")
    a.legend()
    a.grid(alpha=0.3)
    for code in EXPECTED:
        b.plot(t, [r[code.lower()] for r in samples], marker=".", label=code)
    b.set(xlabel="minutes", ylabel="requests (cumulative)", title="Search by status", yscale="symlog")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
