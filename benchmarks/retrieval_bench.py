"""Recall and latency of MoL top-k methods against MIPS baselines, on one corpus, in one run.

Corpus: a small HSTU + MoL is trained on the built-in synthetic data (or --checkpoint is loaded); its
item embeddings are expanded to --items items (each a trained item plus Gaussian noise, re-normalised)
and its user states are the queries. A trained MoL matters: with untrained, near-uniform gates phi is
almost exactly TopKAvg's score, which would flatter that method.

Systems: exact MoL (chunked), TopKPerEmbedding / TopKAvg / Combined over budget sweeps; dot-product
MIPS with torch mm+topk and faiss Flat IP, IVF-Flat (nprobe sweep), HNSW (efSearch sweep).
Recall: MoL methods vs exact MoL top-k; MIPS systems vs exact MIPS (recall@k) and vs exact MoL (how well
dot-product retrieval stands in for the learned similarity). Latency at batch 1 (p50/p95/p99), QPS at
batch 32/128 (best of --repeats after warm-up), build seconds, bytes per item.

    python benchmarks/retrieval_bench.py --items 100000 [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, provenance, write_table  # noqa: E402

from genrec.checkpoint import load_checkpoint, model_from_checkpoint, similarity_from_checkpoint  # noqa: E402
from genrec.config import load_config  # noqa: E402
from genrec.data.batches import history_batch  # noqa: E402
from genrec.data.sequences import leave_one_out  # noqa: E402
from genrec.data.source import load_dataset  # noqa: E402
from genrec.retrieval.search import MoLSearcher  # noqa: E402
from genrec.training import train  # noqa: E402

log = logging.getLogger("bench")


def trained_mol(checkpoint: str | None, out_dir: str):
    if checkpoint is None:
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs/demo.yaml", [
            f"out_dir={out_dir}", "name=retrieval-bench-mol", "similarity.type=mol", "loss.negatives=batch_shared",
            "similarity.query_components=8", "similarity.item_components=4", "similarity.component_dim=32",
            "train.epochs=15"])
        checkpoint = train(cfg, progress=False).run_dir / "checkpoint_best.pt"
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state)
    sim = similarity_from_checkpoint(state)
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds)
    users = split.eval_users
    with torch.no_grad():
        b = history_batch(ds, users, ds.offsets[users + 1] - 1, model.max_len)
        states = model(b.items, b.offsets, b.max_len, b.timestamps, b.next_timestamps)[b.offsets[1:] - 1]
        items = model.item_embeddings()[1:]
    return sim.mol, items.numpy(), states.numpy()


def expand_corpus(items: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    base = items[rng.integers(0, len(items), n)]
    x = base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(items.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact)]))


def top1_in(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([e[0] in set(a) for a, e in zip(approx, exact)]))


def timed(fn, queries: np.ndarray, batch: int, repeats: int) -> float:
    """Best-of-repeats seconds for one call on a batch (after one warm-up)."""
    q = queries[:batch]
    fn(q)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(q)
        best = min(best, time.perf_counter() - t)
    return best


def latencies(fn, queries: np.ndarray, n: int) -> np.ndarray:
    fn(queries[:1])
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        out.append(time.perf_counter() - t)
    return np.array(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--recall-queries", type=int, default=128)
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint trained with similarity.type=mol")
    ap.add_argument("--out-dir", default="runs/bench-retrieval")
    ap.add_argument("--skip-exact-qps", action="store_true", help="exact MoL QPS at batch 128 is slow at 1M")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mol, base_items, states = trained_mol(args.checkpoint, args.out_dir)
    corpus = expand_corpus(base_items, args.items, args.noise, rng)
    queries = states[rng.permutation(len(states))]
    rq = queries[: args.recall_queries]
    d, k, n = corpus.shape[1], args.k, args.items
    rows: list[dict] = []

    t = time.perf_counter()
    searcher = MoLSearcher(mol, torch.from_numpy(corpus), chunk_size=16384)
    mol_build = time.perf_counter() - t
    mol_bytes = (searcher.cache.components[0].numel() + searcher.cache.gate.shape[1] + searcher.avg_items.shape[1]) * 4
    log.info("MoL cache built in %.1fs", mol_build)
    exact_mol = searcher.search(rq, k, method="exact")[1]
    mips_scores = rq @ corpus.T
    exact_mips = np.argsort(-mips_scores, axis=1, kind="stable")[:, :k]

    def record(system: str, params: str, fn, ids: np.ndarray, build: float, bytes_per_item: float, vs_mips: bool,
               skip_qps: bool = False) -> None:
        lat = latencies(fn, queries, args.latency_queries)
        row = {"system": system, "params": params, "items": n, "k": k,
               "recall@10_vs_mol": recall(ids, exact_mol, 10), "recall@100_vs_mol": recall(ids, exact_mol, k),
               "top1_in_top100_vs_mol": top1_in(ids, exact_mol),
               "recall@10_vs_mips": recall(ids, exact_mips, 10) if vs_mips else "",
               "recall@100_vs_mips": recall(ids, exact_mips, k) if vs_mips else "",
               "p50_ms_b1": round(float(np.percentile(lat, 50)), 3), "p95_ms_b1": round(float(np.percentile(lat, 95)), 3),
               "p99_ms_b1": round(float(np.percentile(lat, 99)), 3)}
        for b in (32, 128):
            row[f"qps_b{b}"] = "" if skip_qps else round(b / timed(fn, queries, b, args.repeats), 1)
        row.update({"build_s": round(build, 2), "bytes_per_item": round(bytes_per_item, 1)})
        rows.append(row)
        log.info("%s", row)

    record("mol-exact", "chunk=16384", lambda q: searcher.search(q, k, method="exact"), exact_mol, mol_build, mol_bytes,
           False, skip_qps=args.skip_exact_qps)
    for budget in (16, 64, 256):
        fn = lambda q, b=budget: searcher.search(q, k, method="topk_per_embedding", budget=b)  # noqa: E731
        record("mol-topk-per-embedding", f"budget={budget}", fn, fn(rq)[1], mol_build, mol_bytes, False)
    for budget in (256, 1024, 4096):
        fn = lambda q, b=budget: searcher.search(q, k, method="topk_avg", budget=b)  # noqa: E731
        record("mol-topk-avg", f"budget={budget}", fn, fn(rq)[1], mol_build, mol_bytes, False)
    for budget in (64, 256):
        fn = lambda q, b=budget: searcher.search(q, k, method="combined", budget=b, avg_budget=4 * b)  # noqa: E731
        record("mol-combined", f"budget={budget},avg={4 * budget}", fn, fn(rq)[1], mol_build, mol_bytes, False)

    items_t = torch.from_numpy(corpus)
    torch_mips = lambda q: torch.topk(torch.from_numpy(q) @ items_t.T, k, dim=1)  # noqa: E731
    record("mips-torch-mm-topk", "fp32", torch_mips, torch_mips(rq).indices.numpy(), 0.0, d * 4, True)

    def faiss_system(name: str, factory: str, param: str | None, values: list[int]) -> None:
        t = time.perf_counter()
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(corpus)
        index.add(corpus)
        build = time.perf_counter() - t
        size = len(faiss.serialize_index(index)) / n
        ps = faiss.ParameterSpace()
        for v in values:
            if param:
                ps.set_index_parameter(index, param, v)
            fn = lambda q: index.search(q, k)  # noqa: E731
            record(name, f"{param}={v}" if param else factory, fn, fn(rq)[1], build, size, True)

    nlist = int(4 * np.sqrt(n))
    faiss_system("faiss-flat-ip", "Flat", None, [0])
    faiss_system("faiss-ivf-flat", f"IVF{nlist},Flat", "nprobe", [1, 4, 16, 64])
    faiss_system("faiss-hnsw32", "HNSW32", "efSearch", [16, 64, 256])

    meta = {**provenance(), "threads": args.threads, "note": "recall_vs_mol: vs exact MoL top-k; recall_vs_mips: vs exact dot-product top-k"}
    stem = f"retrieval_{n // 1000}k"
    write_table(rows, stem, meta)
    plot(rows, RESULTS / f"{stem}.png", n)
    print((RESULTS / f"{stem}.md").read_text())


def plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [(r["recall@10_vs_mol"], r["qps_b32"]) for r in rows if r["system"] == system and r["qps_b32"] != ""]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=system)
    ax.set(xlabel="recall@10 vs exact MoL top-10", ylabel="QPS at batch 32 (log)", yscale="log",
           title=f"MoL retrieval vs MIPS, {n:,} items, CPU")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
