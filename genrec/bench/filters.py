"""Recall and latency under query-time filters: the h-indexer filtering inside its search vs post-filtering.

A filter lets through a random ``--fractions`` share of the catalog (1%, 10%, 50% by default). For each,
the h-indexer searches with ``allow`` (stage 1 scans only the allowed items' codes and keeps K' of them)
and, as the baseline a user would otherwise write, post-filters: an unfiltered search keeping K' whose
survivors are then filtered (the same stage-2 work, no over-fetch beyond K'). Recall@k is against the
exact MoL top-k over the allowed items; p50 latency at batch 1 and the ratio to the unfiltered search.
For dot product, faiss HNSW with its IDSelector is measured against exact MIPS over the same subset.

Corpus and model as ``genrec bench retrieval`` (a small trained MoL, items expanded with noise).

    genrec bench filters --items 100000 [--kprimes 1024 4096] [--fractions 0.01 0.1 0.5]
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.retrieval import expand_corpus, trained_mol
from genrec.bench.timing import latencies_ms
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FaissMIPS
from genrec.plots import save_axes_figure
from genrec.retrieval.metrics import recall_at
from genrec.retrieval.search import MoLSearcher

log = logging.getLogger("genrec.bench")


def parse_args(argv):
    ap = harness_parser("filters", __doc__, "filters")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    ap.add_argument("--kprimes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--stage1", default="pca16", help="h-indexer stage 1 (int8 codes)")
    ap.add_argument("--recall-queries", type=int, default=128)
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", help="a checkpoint trained with similarity.type=mol (default: train a small one)")
    ap.add_argument("--train-epochs", type=int, default=15)
    ap.add_argument("--work-dir", default="runs/bench-retrieval")
    ap.add_argument("--stem", default=None, help="default filters_<items/1000>k")
    return ap.parse_args(argv)


def post_filtered(index: MoLHIndexer, queries, k: int, kprime: int, allowed: np.ndarray) -> np.ndarray:
    """The baseline: an unfiltered search keeping K', then only the allowed survivors (ids (nq, k), -1 padded)."""
    _, wide = index.search(queries, kprime, kprime=kprime)
    keep = np.isin(wide, allowed)
    out = np.full((len(wide), k), -1, dtype=np.int64)
    for r in range(len(wide)):
        hits = wide[r][keep[r]][:k]
        out[r, : len(hits)] = hits
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mol, base_items, states, model_about = trained_mol(args.checkpoint, args.work_dir, epochs=args.train_epochs)
    corpus = expand_corpus(base_items, args.items, args.noise, rng)
    queries = states[rng.permutation(len(states))].astype(np.float32)
    rq, n, k = queries[: args.recall_queries], len(corpus), args.k
    items = torch.from_numpy(corpus)
    index = MoLHIndexer.build(mol, items, stage1=args.stage1, stage1_dtype="int8", kprime=max(args.kprimes))
    exact = MoLSearcher(mol, index.cache)
    hnsw = FaissMIPS.build(corpus, "HNSW32", search_params={"efSearch": args.ef_search})
    rows = []
    lat_q = queries[: args.latency_queries]
    for kp in args.kprimes:
        base_p50 = float(np.median(latencies_ms(lambda q: index.search(q, k, kprime=kp), lat_q, len(lat_q))))
        rows.append({"system": "mol-hindexer", "filter": "none", "fraction": 1.0, "kprime": kp,
                     "recall@k": recall_at(index.search(rq, k, kprime=kp)[1], exact.search(rq, k)[1], k),
                     "p50_ms_b1": round(base_p50, 3), "p50_vs_unfiltered": 1.0})
    for frac in args.fractions:
        allowed = np.sort(rng.choice(n, max(1, int(round(frac * n))), replace=False)).astype(np.int64)
        subset = MoLSearcher(mol, torch.from_numpy(corpus[allowed]), allowed)
        truth = subset.search(rq, k)[1]
        for kp in args.kprimes:
            unfiltered = next(r["p50_ms_b1"] for r in rows if r["filter"] == "none" and r["kprime"] == kp)
            inside = index.search(rq, k, kprime=kp, allow=allowed)[1]
            p50 = float(np.median(latencies_ms(lambda q: index.search(q, k, kprime=kp, allow=allowed), lat_q, len(lat_q))))
            post = post_filtered(index, rq, k, kp, allowed)
            p50_post = float(np.median(latencies_ms(lambda q: post_filtered(index, q, k, kp, allowed), lat_q, len(lat_q))))
            for system, ids, ms in (("mol-hindexer", inside, p50), ("mol-hindexer post-filter", post, p50_post)):
                rows.append({"system": system, "filter": "allow", "fraction": frac, "kprime": kp,
                             "recall@k": recall_at(ids, truth, k), "p50_ms_b1": round(ms, 3),
                             "p50_vs_unfiltered": round(ms / unfiltered, 3)})
        want = np.stack([allowed[np.argsort(-(q @ corpus[allowed].T), kind="stable")[:k]] for q in rq])
        got = hnsw.search(rq, k, allow=allowed)[1]
        ms = float(np.median(latencies_ms(lambda q: hnsw.search(q, k, allow=allowed), lat_q, len(lat_q))))
        rows.append({"system": f"faiss-hnsw32 IDSelector (vs exact MIPS), efSearch {args.ef_search}", "filter": "allow",
                     "fraction": frac, "kprime": "", "recall@k": recall_at(got, want, k), "p50_ms_b1": round(ms, 3),
                     "p50_vs_unfiltered": ""})
        log.info("fraction %.3f done", frac)
    stem = args.stem or f"filters_{n // 1000}k"
    meta = {**provenance(), "items": n, "k": k, "stage1": f"{args.stage1}:int8", "recall_queries": len(rq),
            "mol_model": model_about, "note": "recall vs the exact top-k over the allowed items; filters are random subsets"}
    print(write_table(rows, args.out_dir, stem, meta).read_text())
    plot(rows, f"{args.out_dir}/{stem}.png", n, k)
    return 0


def plot(rows, path, n, k) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for system in ("mol-hindexer", "mol-hindexer post-filter"):
        for kp in sorted({r["kprime"] for r in rows if r["system"] == system and r["filter"] == "allow"}):
            pts = sorted((r["fraction"], r["recall@k"]) for r in rows
                         if r["system"] == system and r["filter"] == "allow" and r["kprime"] == kp)
            ax.plot(*zip(*pts), marker="o", linestyle="-" if system == "mol-hindexer" else "--",
                    label=f"{'inside the search' if system == 'mol-hindexer' else 'post-filter'}, K'={kp}")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of items the filter lets through")
    ax.set_ylabel(f"recall@{k} vs exact MoL over the allowed items")
    ax.set_title(f"h-indexer under filters, {n:,} items")
    save_axes_figure(fig, ax, path)
