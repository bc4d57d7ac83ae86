"""The h-indexer at GPU scale (10M-100M items) against torch bf16 mm+topk MIPS on the same embeddings.

Corpus: the trained items of the retrieval harness's small HSTU + MoL checkpoint, expanded on the device
(item = normalise(trained item + N(0, noise^2 / D)), stored bf16: 100M x 50 is 10 GB). The checkpoint's
MoL, items and user states travel as one bundle (``--bundle``; made from the checkpoint when missing),
so a GPU machine needs no training or data files.

Systems (one run, same corpus and queries):
  mips-torch-bf16   q @ items.T in bf16 + topk (chunked so the score block stays <= 2 GB), on the raw
                    embeddings: the brute-force baseline the issue names;
  mol-hindexer      built on the device (bf16 MoL cache, int8 stage 1), per stage-1 variant x K'.
Recall: vs exact MoL top-k over the same bf16 cache (the fused full-corpus kernel, chunked), on
--recall-queries user states. Latency: batch 1 p50/p95 over --latency-queries, device synchronised,
host queries in and host ids out (as a server sees it); QPS at --qps-batches. Memory: the device bytes
each system keeps resident, and the peak extra while answering a batch.

    genrec bench retrieval-scale --items 10000000 100000000          # GPU
    genrec bench retrieval-scale --items 100000 --device cpu         # smoke run (references, slow)
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.retrieval import trained_mol
from genrec.bench.timing import best_seconds, latencies_ms
from genrec.index.hindexer import MoLHIndexer
from genrec.kernels.dispatch import mol_candidate_scores
from genrec.kernels.topk import chunked_topk
from genrec.plots import save_axes_figure
from genrec.retrieval.metrics import recall_at, top1_in
from genrec.retrieval.mol import MixtureOfLogits

log = logging.getLogger("genrec.bench")


def load_bundle(path: Path, checkpoint: str | None, work_dir: str, epochs: int = 15) -> dict:
    """{"mol": {"init_kwargs", "state_dict"}, "items": (N0, D) float32, "states": (U, D) float32}."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)

    mol, items, states, _ = trained_mol(checkpoint, work_dir, epochs=epochs)
    bundle = {"mol": {"init_kwargs": mol.init_kwargs, "state_dict": mol.state_dict()},
              "items": torch.from_numpy(items), "states": torch.from_numpy(states)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    return bundle


def expand_on_device(base: torch.Tensor, n: int, noise: float, device: torch.device, seed: int = 0,
                     chunk: int = 1 << 22, pad_to: int = 8) -> torch.Tensor:
    """(n, D') bf16 items on ``device``: a random base row plus N(0, noise^2 / D) per dim, re-normalised;
    D' = D rounded up to ``pad_to`` with zero columns (16-byte rows keep the bf16 matmul on its fast path;
    inner products are unchanged). The items proper are ``out[:, :D]``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = base.to(device)
    d = base.shape[1]
    out = torch.zeros(n, -(-d // pad_to) * pad_to, dtype=torch.bfloat16, device=device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = base[torch.randint(0, len(base), (e - s,), generator=gen, device=device)]
        x = x + noise * torch.randn(e - s, d, generator=gen, device=device) / d**0.5
        out[s:e, :d] = torch.nn.functional.normalize(x, dim=1)
    return out


def mips_topk(q: torch.Tensor, items: torch.Tensor, k: int, block_bytes: int = 2 << 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force bf16 inner-product top-k: q (B, D) -> (B, k) scores, rows; the (B, chunk) bf16 score
    block is at most ``block_bytes``."""
    q = q.to(items.dtype)
    chunk = max(k, min(len(items), block_bytes // (2 * len(q))))
    best_v = best_i = None
    for s in range(0, len(items), chunk):
        v, i = torch.topk(q @ items[s : s + chunk].T, min(k, min(chunk, len(items) - s)), dim=1)
        if best_v is None:
            best_v, best_i = v, i + s
        else:
            v, j = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
            best_i = torch.cat([best_i, i + s], 1).gather(1, j)
            best_v = v
    return best_v, best_i


def exact_mol_topk(mol, q, cache, k: int, chunk: int = 1 << 22) -> np.ndarray:
    """Exact MoL top-k rows (ties by smaller row) over the whole cache, chunk by chunk: (B, k) int64."""

    backend = "triton" if q.components.device.type == "cuda" else "reference"  # the kernel never holds (B, chunk, P)
    gating = mol.gating()

    def score(s: int, e: int) -> torch.Tensor:
        return mol_candidate_scores(gating, q, cache.slice(s, e), None, backend=backend)

    return chunked_topk(score, len(cache), len(q), k, chunk, device=q.components.device)[1].cpu().numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device: torch.device):
    """fn followed by a device synchronisation, so host timers see the device's work."""
    return lambda q: (fn(q), sync(device))[0]


def peak_extra_mib(fn, queries: np.ndarray, batch: int, device: torch.device) -> float | str:
    if device.type != "cuda":
        return ""
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(queries[:batch])
    sync(device)
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def profile_search(fn, queries: np.ndarray, device: torch.device, path: Path) -> None:
    """Where one batch-1 search spends its time: torch.profiler tables by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    fn(queries[:1])
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            fn(queries[i : i + 1])
        sync(device)
    ka = prof.key_averages()
    text = [ka.table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=25),
            ka.table(sort_by="cpu_time_total", row_limit=25)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("three batch-1 searches\n\n" + "\n\n".join(text))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness_parser("retrieval-scale", __doc__, "retrieval_scale")
    ap.add_argument("--items", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--kprimes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stage1", nargs="+", default=["avg:int8"], help="method:dtype stage-1 variants")
    ap.add_argument("--recall-queries", type=int, default=64)
    ap.add_argument("--latency-queries", type=int, default=30)
    ap.add_argument("--qps-batches", type=int, nargs="*", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler tables of one batch-1 h-indexer search per corpus (<stem>_profile_<items>.txt)")
    ap.add_argument("--search-paths", nargs="+", default=["static", "general"], choices=["static", "general"],
                    help="h-indexer search paths, side by side: the one-pass static-shape path (no host syncs; "
                         "the CUDA default) and the general chunked selection")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bundle", default="runs/bench-retrieval/mol_bundle.pt",
                    help="MoL + items + user states (made from --checkpoint, or the harness's default, when missing)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--work-dir", default="runs/bench-retrieval")
    ap.add_argument("--train-epochs", type=int, default=15, help="epochs of the default MoL when no bundle or checkpoint exists")
    ap.add_argument("--stem", default=None, help="default retrieval_scale_<device>")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    device = torch.device(args.device)
    bundle = load_bundle(Path(args.bundle), args.checkpoint, args.work_dir, args.train_epochs)
    mol = MixtureOfLogits(**bundle["mol"]["init_kwargs"])
    mol.load_state_dict(bundle["mol"]["state_dict"])
    mol = mol.eval().to(device)
    states = bundle["states"].numpy()
    queries = states[np.random.default_rng(0).permutation(len(states))].astype(np.float32)
    rq, train_q = queries[: args.recall_queries], queries[args.recall_queries :]
    k = args.k
    rows: list[dict] = []
    stem = args.stem or f"retrieval_scale_{device.type}"
    meta = {**provenance(), "corpus": f"{len(bundle['items'])} trained items expanded with noise {args.noise}, bf16",
            "note": "recall_vs_mol: vs exact MoL top-k over the same bf16 MoL cache; p50_vs_mips: system p50 / "
                    "torch bf16 mm+topk p50 at batch 1; resident_gb: device bytes the system keeps (MIPS: the bf16 "
                    "embeddings, rows padded to 16 bytes; h-indexer: MoL cache + stage-1 codes)"}
    for n in args.items:
        t = time.perf_counter()
        padded = expand_on_device(bundle["items"], n, args.noise, device)
        corpus = padded[:, : bundle["items"].shape[1]]  # what the h-indexer is built from
        sync(device)
        log.info("corpus %d x %d bf16 on %s in %.1fs", n, corpus.shape[1], device, time.perf_counter() - t)
        mips_bytes = padded.numel() * padded.element_size()

        def mips(q: np.ndarray) -> np.ndarray:
            qp = torch.zeros(len(q), padded.shape[1], device=device)
            qp[:, : q.shape[1]] = torch.from_numpy(q).to(device)
            return mips_topk(qp, padded, k)[1].cpu().numpy()

        exact_mips = mips(rq)
        system_rows = []

        def record(system: str, params: str, fn, ids: np.ndarray, exact_mol: np.ndarray, build_s: float,
                   resident_bytes: float) -> dict:
            lat = latencies_ms(synced(fn, device), queries, args.latency_queries, warmup=3)
            row = {"items": n, "system": system, "params": params, "k": k,
                   "recall@10_vs_mol": round(recall_at(ids, exact_mol, 10), 4),
                   "recall@100_vs_mol": round(recall_at(ids, exact_mol, k), 4),
                   "top1_in_top100_vs_mol": round(top1_in(ids, exact_mol), 4),
                   "recall@100_vs_mips": round(recall_at(ids, exact_mips, k), 4),
                   "p50_ms_b1": round(float(np.percentile(lat, 50)), 3),
                   "p95_ms_b1": round(float(np.percentile(lat, 95)), 3)}
            for b in args.qps_batches:
                row[f"qps_b{b}"] = round(b / best_seconds(lambda b=b: synced(fn, device)(queries[:b]), args.repeats), 1)
            row.update({"build_s": round(build_s, 1), "resident_gb": round(resident_bytes / 1e9, 2),
                        "bytes_per_item": round(resident_bytes / n, 1),
                        "peak_extra_mib_b1": peak_extra_mib(fn, queries, 1, device),
                        f"peak_extra_mib_b{max(args.qps_batches or [1])}": peak_extra_mib(fn, queries, max(args.qps_batches or [1]), device)})
            log.info("%s", row)
            system_rows.append(row)
            write_table(rows + system_rows, args.out_dir, stem, meta)  # partial tables survive a time limit
            return row

        exact_mol = None
        for variant in args.stage1:
            method, _, dtype = variant.partition(":")
            alloc0 = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            t = time.perf_counter()
            h = MoLHIndexer.build(mol, corpus, stage1=method, stage1_dtype=dtype or "int8", kprime=args.kprimes[0],
                                  cache_dtype="bfloat16", sample_size=max(16384, 32 * n // min(args.kprimes)),
                                  train_queries=train_q if len(train_q) >= 64 else None, progress=True)
            sync(device)
            build_s = time.perf_counter() - t
            resident = (torch.cuda.memory_allocated() - alloc0) if device.type == "cuda" else h.bytes_per_item * n
            log.info("h-indexer %s built in %.1fs, %.2f GB resident", variant, build_s, resident / 1e9)
            if exact_mol is None:
                t = time.perf_counter()
                with torch.no_grad():
                    exact_mol = exact_mol_topk(mol, mol.encode_queries(torch.from_numpy(rq).to(device)), h.cache, k)
                log.info("exact MoL top-%d of %d queries in %.1fs", k, len(rq), time.perf_counter() - t)
                record("mips-torch-bf16", "mm+topk", mips, exact_mips, exact_mol, 0.0, mips_bytes)
            for path in args.search_paths:
                h.static_search = "on" if path == "static" else "off"
                if args.profile and variant == args.stage1[0]:
                    profile_search(lambda q: h.search(q, k, kprime=args.kprimes[0]), queries, device,
                                   Path(args.out_dir) / f"{stem}_profile_{n}_{path}.txt")
                for kp in args.kprimes:
                    fn = lambda q, kp=kp: h.search(q, k, kprime=kp)[1]  # noqa: E731
                    row = record("mol-hindexer", f"stage1={variant},kprime={kp},path={path}", fn, fn(rq), exact_mol,
                                 build_s, resident)
                    row["retries"] = h.last_stats.retries
                    row["static_fallbacks"] = h.last_stats.static_fallbacks
            h = None  # free the index before the next variant is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mips_p50 = next(r["p50_ms_b1"] for r in system_rows if r["system"] == "mips-torch-bf16")
        for r in system_rows:
            r["p50_vs_mips"] = round(r["p50_ms_b1"] / mips_p50, 3)
        rows += system_rows
        corpus = padded = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = write_table(rows, args.out_dir, stem, meta)
    plot(rows, Path(args.out_dir) / f"{stem}.png")
    print(md.read_text())
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in dict.fromkeys(r["items"] for r in rows):
        for system in dict.fromkeys(r["system"] for r in rows if r["items"] == n):
            pts = sorted((r["recall@100_vs_mol"], r["p50_ms_b1"]) for r in rows if r["items"] == n and r["system"] == system)
            ax.plot(*zip(*pts), marker="o" if system != "mips-torch-bf16" else "s", label=f"{system}, {n / 1e6:g}M items")
    ax.set(xlabel="recall@100 vs exact MoL", ylabel="batch-1 p50 ms (log)", yscale="log",
           title=f"h-indexer vs bf16 MIPS, {provenance()['device']}")
    save_axes_figure(fig, ax, path, legend_size=8)


if __name__ == "__main__":
    raise SystemExit(main())
