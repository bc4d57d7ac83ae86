"""Exact flat MIPS search: the FlatMIPS path vs a plain query-major scan, side by side.

Both return the same exact top-k (score desc, then smaller id). Per batch size and thread count:
  flat_mips: ``FlatMIPS.search`` (items @ q.T item-major chunks, group-max pre-selection per chunk);
  query_major: q @ items.T chunks, each cut by a full ``torch.topk`` (on CPU, the code before 2026-11-26;
  on a GPU, the plain mm + topk path FlatMIPS could take there instead: few large chunks, few launches).
The two are timed alternately (median of --repeats calls each, results copied to the host), so drift hits
both alike; the ratio column is the figure to compare. ms_per_query shows how far batching amortises the scan.
Where nq x items is small enough for FlatMIPS' one-step path (``SMALL_SEARCH_SCORES``: one mm, one exact
selection), chunked_scan_ms times FlatMIPS' chunked scan on the same batch too, alternately, and
small_path_speedup is chunked / one-step.

    genrec bench flat-mips [--items 200000 ...] [--dim 64] [--batches 1 8 32 64] [--threads 1 2]
    genrec bench flat-mips --device cuda --items 10000000 --batches 1 8 32 128 --threads 1 \
        --stem flat_mips_gpu
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from genrec.bench.report import harness_parser, provenance, random_unit, write_table
import genrec.index.mips as mips
from genrec.index.mips import FlatMIPS, GPU_SCORE_BLOCK_FLOATS
from genrec.kernels.topk import chunked_topk
from genrec.plots import save_axes_figure


def query_major(items: torch.Tensor, q: torch.Tensor, k: int, block_floats: int = 1 << 20,
                max_chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, c) score chunks of ``block_floats`` into one buffer, each cut by torch.topk. The defaults are the
    previous CPU FlatMIPS scan; on a GPU the bench passes FlatMIPS' own block size and no chunk cap."""
    chunk = min(max_chunk, max(1024, block_floats // len(q)))
    buffer = torch.empty(len(q) * min(chunk, len(items)), device=items.device)

    def score(start: int, end: int) -> torch.Tensor:
        return torch.mm(q, items[start:end].T, out=buffer[: len(q) * (end - start)].view(len(q), end - start))

    return chunked_topk(score, len(items), len(q), k, chunk)


def median_ms(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return float(np.median(out))


def chunked_search(index: FlatMIPS, q: np.ndarray, k: int):
    """``index.search`` with the one-step small path switched off: the chunked scan whatever the size."""
    saved, mips.SMALL_SEARCH_SCORES = mips.SMALL_SEARCH_SCORES, 0
    try:
        return index.search(q, k)
    finally:
        mips.SMALL_SEARCH_SCORES = saved


def measure(args, num_items: int, device: torch.device) -> list[dict]:
    """Rows for one index size: every thread count x batch size."""
    rng = np.random.default_rng(0)
    items = torch.from_numpy(random_unit(rng, num_items, args.dim)).to(device)
    index = FlatMIPS(items.cpu()).to(device)
    block = dict(block_floats=GPU_SCORE_BLOCK_FLOATS, max_chunk=num_items) if device.type == "cuda" else {}

    def old_scan(qt: torch.Tensor) -> np.ndarray:
        return query_major(items, qt, args.k, **block)[1].cpu().numpy()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for nq in args.batches:
            q = random_unit(rng, nq, args.dim)
            qt = torch.from_numpy(q).to(device)
            new_ids = index.search(q, args.k)[1]
            small = nq * num_items <= mips.SMALL_SEARCH_SCORES
            if not np.array_equal(new_ids, old_scan(qt)) or (small and not np.array_equal(new_ids, chunked_search(index, q, args.k)[1])):
                raise SystemExit(f"{num_items} items, nq {nq}: the scans disagree")
            new, old, chunked = [], [], []
            for _ in range(3):  # alternate so all see the same drift of the box
                new.append(median_ms(lambda: index.search(q, args.k), args.repeats // 3 or 1))
                old.append(median_ms(lambda: old_scan(qt), args.repeats // 3 or 1))
                if small:
                    chunked.append(median_ms(lambda: chunked_search(index, q, args.k), args.repeats // 3 or 1))
            new_ms, old_ms = float(np.median(new)), float(np.median(old))
            row = {"items": num_items, "threads": threads, "nq": nq, "flat_mips_ms": round(new_ms, 2),
                   "query_major_ms": round(old_ms, 2), "speedup": round(old_ms / new_ms, 2),
                   "flat_mips_ms_per_query": round(new_ms / nq, 3), "query_major_ms_per_query": round(old_ms / nq, 3)}
            if small:
                row["chunked_scan_ms"] = round(float(np.median(chunked)), 2)
                row["small_path_speedup"] = round(row["chunked_scan_ms"] / new_ms, 2)
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("flat-mips", __doc__, "flat_mips")
    ap.add_argument("--items", type=int, nargs="+", default=[200_000], help="index sizes, one after another")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu", help="where both scans run: cpu, cuda")
    ap.add_argument("--stem", default="flat_mips_cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    rows = []
    for n in args.items:
        rows += measure(args, n, device)
    meta = {**provenance(), "items": args.items if len(args.items) > 1 else args.items[0], "dim": args.dim, "k": args.k, "repeats": args.repeats,
            "note": "same exact answers (checked); timed alternately in one process"}
    md = write_table(rows, args.out_dir, args.stem, meta)
    plot(rows, Path(args.out_dir) / f"{args.stem}.png", meta)
    print(md.read_text())
    return 0


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = sorted({r["items"] for r in rows})
    for n in sizes:
        for threads in sorted({r["threads"] for r in rows}):
            pts = [r for r in rows if r["threads"] == threads and r["items"] == n]
            label = f"{n:,} items, {threads} thread(s)" if len(sizes) > 1 else f"{threads} thread(s)"
            ax.plot([r["nq"] for r in pts], [r["flat_mips_ms_per_query"] for r in pts], marker="o",
                    label=f"FlatMIPS, {label}")
            ax.plot([r["nq"] for r in pts], [r["query_major_ms_per_query"] for r in pts], marker="x", linestyle="--",
                    label=f"query-major + topk, {label}")
    items = ", ".join(f"{n:,}" for n in sizes)
    ax.set(xlabel="queries per batch", ylabel="ms per query", xscale="log", yscale="log",
           title=f"exact flat MIPS, {items} x {meta['dim']}, k={meta['k']}, {meta['device']}")
    save_axes_figure(fig, ax, path, legend_size=8)


if __name__ == "__main__":
    raise SystemExit(main())
