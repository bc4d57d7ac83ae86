"""Recall and latency of MoL top-k methods and the h-indexer against MIPS baselines, in one run.

Corpus: a trained HSTU + MoL checkpoint (``--checkpoint``; by default a small one is trained once on
the built-in synthetic data and reused). Its item embeddings are expanded to ``--items`` items (a
trained item plus Gaussian noise, re-normalised: the MoL-shaped synthetic corpus), or ``--embeddings``
gives the items. Queries are the checkpoint's user states (eval users), or ``--queries``.
A trained MoL matters: untrained, near-uniform gates make phi almost exactly TopKAvg's score, which
would flatter that method.

Systems: exact MoL (chunked); TopKPerEmbedding / TopKAvg / Combined over budget sweeps; the h-indexer
over stage-1 variants x K'; dot-product MIPS with torch mm+topk and faiss Flat IP, IVF-Flat (nprobe
sweep), HNSW (efSearch sweep). Recall: MoL systems vs exact MoL top-k; MIPS systems vs exact MIPS and
vs exact MoL. Latency at batch 1 (p50/p95/p99 over --latency-queries), QPS at batch 32/128 (best of
--repeats after one warm-up call), build seconds, bytes per item, and ratios: speed-up over exact MoL
(p50 at batch 1 and QPS at batch 32) and p50 latency over faiss Flat IP.

    genrec bench retrieval --items 100000 [--threads 2] [--systems mol-exact mol-hindexer faiss-flat]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from genrec.bench.datasets import ROOT
from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.timing import best_seconds, latencies_ms
from genrec.checkpoint import load_checkpoint, model_from_checkpoint, similarity_from_checkpoint
from genrec.config import dump_config, load_config
from genrec.data.batches import history_batch
from genrec.data.sequences import leave_one_out
from genrec.data.source import load_dataset
from genrec.encoders.history import last_states
from genrec.io import sha256_file
from genrec.index.hindexer import MoLHIndexer, TOPK_SCAN_MAX
from genrec.index.mips import FaissMIPS
from genrec.plots import save_axes_figure
from genrec.retrieval.metrics import recall_at, top1_in
from genrec.retrieval.search import MoLSearcher
from genrec.training import train

log = logging.getLogger("genrec.bench")

SYSTEMS = ("mol-exact", "mol-topk-per-embedding", "mol-topk-avg", "mol-combined", "mol-hindexer",
           "mips-torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
BENCH_MOL = ["similarity.type=mol", "loss.negatives=batch_shared", "similarity.query_components=8",
             "similarity.item_components=4", "similarity.component_dim=32"]


def completed_run(run_dir: Path, cfg) -> Path | None:
    """The tested checkpoint of a run in ``run_dir`` that finished (results.json written) with exactly
    ``cfg``, else None: an interrupted run or one with another config must not stand in for it."""
    results, config = run_dir / "results.json", run_dir / "config.yaml"
    if not (results.is_file() and config.is_file()) or config.read_text() != dump_config(cfg):
        return None
    checkpoint = run_dir / json.loads(results.read_text())["checkpoint"]
    return checkpoint if checkpoint.is_file() else None


class TrainedMoL(NamedTuple):
    """A MoL model with its item embeddings (N, D) float32, user states (U, D) float32, and where it came
    from (``model``: checkpoint path, sha256, epoch and validation metrics), stored with every figure so
    that a changed model is told apart from a changed search."""
    mol: object
    items: np.ndarray
    states: np.ndarray
    model: dict


def trained_mol(checkpoint: str | None, out_dir: str, retrain: bool = False, epochs: int = 15) -> TrainedMoL:
    """The MoL model of a checkpoint; without one, of the harness's own small MoL model, reused only from
    a completed run of the same config."""
    source = "given"
    if checkpoint is None:
        cfg = load_config(ROOT / "configs/demo.yaml",
                          [f"out_dir={out_dir}", "name=retrieval-bench-mol", *BENCH_MOL, f"train.epochs={epochs}"])
        run_dir = Path(out_dir) / cfg.name
        checkpoint = None if retrain else completed_run(run_dir, cfg)
        if checkpoint is None:
            if run_dir.exists():  # the harness's own folder: an interrupted or different run starts over
                shutil.rmtree(run_dir)
            checkpoint, source = train(cfg, progress=False).checkpoint, "trained"
            log.info("MoL model: trained %s", checkpoint)
        else:
            source = "reused"
            log.info("MoL model: reused %s (a completed run of the same config)", checkpoint)
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state)
    sim = similarity_from_checkpoint(state)
    if not hasattr(sim, "mol"):
        raise ValueError(f"{checkpoint}: not trained with similarity.type=mol")
    ds = load_dataset(cfg.data)
    users = leave_one_out(ds).eval_users
    with torch.no_grad():
        b = history_batch(ds, users, ds.offsets[users + 1] - 1, model.max_len)
        states = last_states(model, b.packed())
        items = model.item_embeddings()[1:]
    about = {"checkpoint": str(checkpoint), "source": source, "sha256": sha256_file(checkpoint)[:16],
             "epoch": state.get("epoch"), "best_score": state.get("best_score"),
             "genrec_version": state.get("genrec_version")}
    return TrainedMoL(sim.mol, items.numpy(), states.numpy(), about)


def expand_corpus(items: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n items, each a random trained item plus N(0, noise^2 / D) per dim, re-normalised."""
    out = np.empty((n, items.shape[1]), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        e = min(s + (1 << 18), n)
        x = items[rng.integers(0, len(items), e - s)]
        x = x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(items.shape[1])
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness_parser("retrieval", __doc__, "retrieval")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--recall-queries", type=int, default=128)
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--qps-batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--corpus", choices=["noisy", "gaussian"], default="noisy",
                    help="noisy: trained items plus --noise (clustered); gaussian: drawn from a Gaussian with the "
                         "trained items' mean and full covariance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--checkpoint", help="a checkpoint trained with similarity.type=mol (default: train a small one)")
    ap.add_argument("--embeddings", help="(N, D) float32 .npy items instead of the expanded checkpoint items")
    ap.add_argument("--queries", help="(nq, D) float32 .npy query states instead of the checkpoint's users")
    ap.add_argument("--retrain", action="store_true", help="retrain the default MoL even if cached")
    ap.add_argument("--train-epochs", type=int, default=15, help="epochs of the default MoL when it is trained here")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64], help="TopKPerEmbedding budgets")
    ap.add_argument("--avg-budgets", type=int, nargs="+", default=[1024, 4096, 16384], help="TopKAvg budgets")
    ap.add_argument("--stage1", nargs="+", default=["avg:float32", "avg:int8", "pca16:int8", "pca8:int8", "learned16:int8"],
                    help="h-indexer stage-1 variants method:dtype (a learned stage 1 is distilled on the query "
                         "states not used for recall)")
    ap.add_argument("--kprimes", type=int, nargs="+", default=[1024, 4096, 16384], help="h-indexer K' sweep")
    ap.add_argument("--cache-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="h-indexer MoL item-cache dtypes (bfloat16 halves the cache and stage 2's gather)")
    ap.add_argument("--stage1-select", nargs="+", default=["auto"], choices=["auto", "threshold", "topk"],
                    help="how stage 1 keeps K' (topk rows only for K' <= 1024, the kernel's limit)")
    ap.add_argument("--nprobes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ef-searches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--skip-qps", nargs="*", default=[],
                    help="SYSTEM or SYSTEM:BATCH whose batch QPS is not measured (exact MoL at 1M, batch 128: minutes)")
    ap.add_argument("--work-dir", default="runs/bench-retrieval")
    ap.add_argument("--stem", default=None, help="default retrieval_<items/1000>k")
    return ap.parse_args(argv)


def gaussian_corpus(items: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n items drawn from a Gaussian with the trained items' mean and full covariance, re-normalised: the
    same second-order shape as the trained catalogue without its clusters (no item is a noisy copy of a
    trained one, so stage 1 gets no help from near-duplicates)."""
    x = np.asarray(items, dtype=np.float64)
    d = x.shape[1]
    chol = np.linalg.cholesky(np.cov(x, rowvar=False) + 1e-6 * np.eye(d))
    mean = x.mean(0)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        e = min(s + (1 << 18), n)
        y = mean + rng.standard_normal((e - s, d)) @ chol.T
        out[s:e] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    import faiss


    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mol, base_items, states, model_about = trained_mol(args.checkpoint, args.work_dir, args.retrain, args.train_epochs)
    stage1_fits: dict[str, dict] = {}
    corpus = (np.load(args.embeddings, mmap_mode="r") if args.embeddings
              else gaussian_corpus(base_items, args.items, rng) if args.corpus == "gaussian"
              else expand_corpus(base_items, args.items, args.noise, rng))
    queries = (np.load(args.queries) if args.queries else states[rng.permutation(len(states))]).astype(np.float32)
    rq = queries[: args.recall_queries]
    d, k, n = corpus.shape[1], args.k, len(corpus)
    log.info("corpus %d x %d, %d recall queries, systems %s", n, d, len(rq), " ".join(args.systems))
    rows: list[dict] = []

    t = time.perf_counter()
    searcher = MoLSearcher(mol, torch.from_numpy(np.ascontiguousarray(corpus)), chunk_size=16384)
    mol_build = time.perf_counter() - t
    mol_bytes = (searcher.cache.components[0].numel() + searcher.cache.gate.shape[1] + searcher.avg_items.shape[1]) * 4
    t = time.perf_counter()
    exact_mol = searcher.search(rq, k, method="exact")[1]
    log.info("MoL cache %.1fs; exact MoL top-%d for %d queries %.1fs", mol_build, k, len(rq), time.perf_counter() - t)
    exact_mips = np.stack([np.argsort(-(q @ corpus.T), kind="stable")[:k] for q in rq]) if any(
        s.startswith(("mips", "faiss")) for s in args.systems) else None

    def record(system: str, params: str, fn, ids: np.ndarray, build: float, bytes_per_item: float,
               vs_mips: bool = False) -> None:
        lat = latencies_ms(fn, queries, args.latency_queries)
        row = {"system": system, "params": params, "items": n, "k": k,
               "recall@10_vs_mol": recall_at(ids, exact_mol, 10), "recall@100_vs_mol": recall_at(ids, exact_mol, k),
               "top1_in_top100_vs_mol": top1_in(ids, exact_mol),
               "recall@10_vs_mips": recall_at(ids, exact_mips, 10) if vs_mips else "",
               "recall@100_vs_mips": recall_at(ids, exact_mips, k) if vs_mips else "",
               "p50_ms_b1": round(float(np.percentile(lat, 50)), 3), "p95_ms_b1": round(float(np.percentile(lat, 95)), 3),
               "p99_ms_b1": round(float(np.percentile(lat, 99)), 3)}
        for b in args.qps_batches:
            skip = system in args.skip_qps or f"{system}:{b}" in args.skip_qps
            row[f"qps_b{b}"] = "" if skip else round(b / best_seconds(lambda: fn(queries[:b]), args.repeats), 1)
        row.update({"build_s": round(build, 2), "bytes_per_item": round(bytes_per_item, 1)})
        rows.append(row)
        log.info("%s %s: recall@10 %.4f, p50 %.2f ms", system, params, row["recall@10_vs_mol"], row["p50_ms_b1"])

    if "mol-exact" in args.systems:
        record("mol-exact", "chunk=16384", lambda q: searcher.search(q, k, method="exact"), exact_mol, mol_build, mol_bytes)
    if "mol-topk-per-embedding" in args.systems:
        for budget in args.budgets:
            fn = lambda q, b=budget: searcher.search(q, k, method="topk_per_embedding", budget=b)  # noqa: E731
            record("mol-topk-per-embedding", f"budget={budget}", fn, fn(rq)[1], mol_build, mol_bytes)
    if "mol-topk-avg" in args.systems:
        for budget in args.avg_budgets:
            fn = lambda q, b=budget: searcher.search(q, k, method="topk_avg", budget=b)  # noqa: E731
            record("mol-topk-avg", f"budget={budget}", fn, fn(rq)[1], mol_build, mol_bytes)
    if "mol-combined" in args.systems:
        for budget in args.budgets:
            fn = lambda q, b=budget: searcher.search(q, k, method="combined", budget=b, avg_budget=args.avg_budgets[0])  # noqa: E731
            record("mol-combined", f"budget={budget},avg={args.avg_budgets[0]}", fn, fn(rq)[1], mol_build, mol_bytes)
    if "mol-hindexer" in args.systems:
        for variant, cache_dtype in itertools.product(args.stage1, args.cache_dtypes):
            method, _, dtype = variant.partition(":")
            t = time.perf_counter()
            train_q = queries[len(rq):] if len(queries) - len(rq) >= 64 else None  # disjoint from the recall queries
            h = MoLHIndexer.build(mol, corpus, stage1=method, stage1_dtype=dtype or "int8", kprime=args.kprimes[0],
                                  train_queries=train_q, cache_dtype=cache_dtype)
            if h.stage1_fit:
                log.info("stage-1 %s fitted on %s queries (%d): %s", method, h.stage1_fit["query_source"],
                         h.stage1_fit["queries"], h.stage1_fit)
                stage1_fits[variant] = h.stage1_fit
            build = time.perf_counter() - t
            for select, kp in itertools.product(args.stage1_select, args.kprimes):
                if select == "topk" and kp > TOPK_SCAN_MAX:
                    continue
                h.stage1_select = select
                fn = lambda q, kp=kp: h.search(q, k, kprime=kp)  # noqa: E731
                label = (f"stage1={method},{dtype},kprime={kp}" + (f",select={select}" if select != "auto" else "")
                         + (f",cache={cache_dtype}" if cache_dtype != "float32" else ""))
                record("mol-hindexer", label, fn, fn(rq)[1], build, h.bytes_per_item)
            del h
    items_t = torch.from_numpy(np.ascontiguousarray(corpus))
    if "mips-torch" in args.systems:
        fn = lambda q: torch.topk(torch.from_numpy(q) @ items_t.T, k, dim=1).indices.numpy()  # noqa: E731
        record("mips-torch-mm-topk", "fp32", fn, fn(rq), 0.0, d * 4, vs_mips=True)

    def faiss_system(name: str, factory: str, param: str | None, values: list[int]) -> None:
        t = time.perf_counter()
        index = FaissMIPS.build(corpus, factory, seed=0)  # as `genrec build-index` builds it
        build = time.perf_counter() - t
        for v in values:
            params = {param: v} if param else {}
            fn = lambda q: index.search(q, k, **params)  # noqa: E731
            record(name, f"{param}={v}" if param else factory, fn, fn(rq)[1], build, index.bytes_per_item, vs_mips=True)

    nlist = int(4 * np.sqrt(n))
    if "faiss-flat" in args.systems:
        faiss_system("faiss-flat-ip", "Flat", None, [0])
    if "faiss-ivf" in args.systems:
        faiss_system("faiss-ivf-flat", f"IVF{nlist},Flat", "nprobe", args.nprobes)
    if "faiss-hnsw" in args.systems:
        faiss_system("faiss-hnsw32", "HNSW32", "efSearch", args.ef_searches)

    add_ratios(rows, args.qps_batches[0] if args.qps_batches else None)
    meta = {**provenance(), "threads": args.threads, "mol_model": model_about, "stage1_fits": stage1_fits,
            "queries": "user states of the checkpoint's eval users" if not args.queries else args.queries,
            "corpus": args.embeddings or (f"Gaussian fitted to {len(base_items)} trained items (full covariance)"
                                          if args.corpus == "gaussian" else
                                          f"{len(base_items)} trained items expanded with noise {args.noise}"),
            "note": "recall_vs_mol: vs exact MoL top-k (|∩|/k, ties by id); recall_vs_mips: vs exact dot-product top-k; "
                    "speedup_*: exact MoL time / system time; p50_vs_faiss_flat: system p50 / faiss Flat IP p50"}
    stem = args.stem or f"retrieval_{n // 1000}k"
    md = write_table(rows, args.out_dir, stem, meta)
    plot(rows, Path(args.out_dir) / f"{stem}.png", n, args.qps_batches[0] if args.qps_batches else None)
    print(md.read_text())
    return 0


def add_ratios(rows: list[dict], qps_batch: int | None) -> None:
    exact = next((r for r in rows if r["system"] == "mol-exact"), None)
    flat = next((r for r in rows if r["system"] == "faiss-flat-ip"), None)
    for r in rows:
        r["speedup_b1_vs_mol_exact"] = round(exact["p50_ms_b1"] / r["p50_ms_b1"], 2) if exact else ""
        if exact and qps_batch and exact.get(f"qps_b{qps_batch}") not in ("", None) and r.get(f"qps_b{qps_batch}") not in ("", None):
            r[f"speedup_b{qps_batch}_vs_mol_exact"] = round(r[f"qps_b{qps_batch}"] / exact[f"qps_b{qps_batch}"], 2)
        r["p50_vs_faiss_flat"] = round(r["p50_ms_b1"] / flat["p50_ms_b1"], 2) if flat else ""


def plot(rows: list[dict], path: Path, n: int, qps_batch: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    key = f"qps_b{qps_batch}" if qps_batch else None
    for system in dict.fromkeys(r["system"] for r in rows):
        groups: dict[str, list] = {}
        for r in rows:
            if r["system"] != system:
                continue
            label = system if system != "mol-hindexer" else f"hindexer {r['params'].split(',kprime')[0].removeprefix('stage1=')}"
            y = r[key] if key and r.get(key) not in ("", None) else 1000.0 / r["p50_ms_b1"]
            groups.setdefault(label, []).append((r["recall@10_vs_mol"], y))
        for label, pts in groups.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=label)
    ylabel = (f"QPS at batch {qps_batch} (log; 1000 / p50 at batch 1 where not measured)" if key
              else "1000 / p50 latency at batch 1 (log)")
    ax.set(xlabel="recall@10 vs exact MoL top-10", ylabel=ylabel, yscale="log",
           title=f"MoL retrieval vs MIPS, {n:,} items, {provenance()['device']}")
    save_axes_figure(fig, ax, path, legend_size=7)


if __name__ == "__main__":
    raise SystemExit(main())
