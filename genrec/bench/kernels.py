"""Retrieval kernels against what they replace, on the same data (GPU: Triton; CPU: the compiled CPU
scan and the references).

stage-1 scan: N items x d codes (int8 with per-dim scales, or bf16), threshold set so ~K' items pass per
  query, batch 1/32/128; and the running top-k scan at k = 1000. Reported: ms, achieved GB/s of code
  reads (N * d * bytes / time) and % of ``--peak-gbs``, vs torch matmul + topk(K') on the same codes
  (bf16 on GPU).
MoL stage 2: K' gathered candidates per query through the fused kernel vs the PyTorch reference.

    genrec bench kernels                                   # GPU: 10M and 100M items
    genrec bench kernels --items 1000000 --kprimes 1000    # CPU: the CPU scan kernel and the references

Writes <out-dir>/<stem>.{csv,md,json,png}.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.timing import best_seconds
from genrec.kernels.dispatch import mol_candidate_scores, stage1_threshold_scan, stage1_topk
from genrec.plots import save_figure
from genrec.retrieval.mol import ItemCache, MixtureOfLogits

log = logging.getLogger("kernels_bench")


def timed(fn, device, repeats: int) -> float:
    """Best-of-``repeats`` milliseconds after one warm-up call, the device synchronised inside the timing."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return best_seconds(lambda: (fn(), sync()), repeats) * 1e3


def device_codes(n: int, d: int, dtype: str, device, seed: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """(n, d) synthetic codes made on the device in pieces (a 100M x 64 fp32 intermediate would not fit):
    int8 = round(30 z) clipped to +-127, bf16 = z, z ~ N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.empty(n, d, dtype=torch.int8 if dtype == "int8" else torch.bfloat16, device=device)
    for s in range(0, n, chunk):
        x = torch.randn(min(chunk, n - s), d, generator=gen, device=device)
        codes[s : s + len(x)] = (x * 30).round().clamp(-127, 127).to(codes.dtype) if dtype == "int8" else x.to(codes.dtype)
    return codes


def copy_gbs(device, nbytes: int = 4 << 30, repeats: int = 5) -> float | None:
    """Device-to-device copy rate, bytes read + written per second / 1e9: the practical HBM ceiling."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), device, repeats)
    return nbytes / (ms / 1e3) / 1e9


SCAN_KNOBS = {"q": "block_q", "t": "tiles"}
MOL_KNOBS = {"c": "block_c", "w": "num_warps"}


def parse_config(text: str, letters: dict[str, str] = SCAN_KNOBS) -> dict:
    """Kernel knobs, ':'-separated: '256x4' (block_n x num_warps), a letter of ``letters`` + digits (scan:
    'q64' block_q, 't4' item tiles per program; MoL stage 2: 'c128' block_c, 'w8' num_warps), anything else
    the precision ('ieee', 'bf16x2', 'bf16x3'); e.g. '128x8:q64:t4', 'bf16x3:c128:w8'."""
    out: dict = {}
    for part in text.split(":"):
        if "x" in part and not part.startswith("bf16"):
            bn, nw = part.split("x")
            out.update(block_n=int(bn), num_warps=int(nw))
        elif part[:1] in letters and part[1:].isdigit():
            out[letters[part[0]]] = int(part[1:])
        elif part:
            out["precision"] = part
    return out


def scan_rows(n: int, d: int, dtype: str, batches, kprime: int, device, repeats: int, peak_gbs: float | None,
              backend: str, configs: list[str], topk_batches, topk_max_items: int, copy_rate: float | None,
              topk_kprime: int = 1000) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    chunk = 1 << 22
    codes = device_codes(n, d, dtype, device)
    if backend == "cpu":  # the layout Stage1Table keeps for the CPU kernel
        from genrec.kernels.stage1_scan_cpu import kernel_layout

        scan_codes = kernel_layout(codes)
    else:
        scan_codes = codes
    rows = []
    nbytes = scan_codes.numel() * scan_codes.element_size()
    for b in batches:
        q = torch.randn(b, d, generator=gen).to(device)
        sample = codes[torch.randint(0, n, (65536,), generator=gen).to(device)].float()
        thr = torch.quantile(q @ sample.T, 1 - kprime / n, dim=1).contiguous()  # ~K' hits per query
        cap = 2 * kprime
        mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        def mm_topk():
            out = None
            for s in range(0, n, chunk):  # chunked so nq x N never materialises at 100M
                v, i = torch.topk(q.to(mm_dtype) @ codes[s : s + chunk].to(mm_dtype).T, min(kprime, min(chunk, n - s)), dim=1)
                out = (v, i) if out is None else torch.topk(torch.cat([out[0], v], 1), kprime, dim=1)
            return out

        mm_ms = timed(mm_topk, device, repeats)
        timings = []
        for cfg in (configs if backend == "triton" else [backend]):
            kw = parse_config(cfg) if backend == "triton" and cfg != "default" else {}
            fn = (lambda kw=kw: stage1_threshold_scan(q, scan_codes, thr, cap, backend=backend, **kw)) if backend != "triton" else \
                (lambda kw=kw: _scan_triton(q, codes, thr, cap, **kw))
            ms = timed(fn, device, repeats)
            hits = fn()[2].float().mean().item()
            timings.append(("stage1 scan", cfg, ms, kprime, {"mean_hits": round(hits, 1)}))
        if b in topk_batches and n <= topk_max_items and backend != "cpu":  # no CPU top-k kernel: the reference row has it
            timings.append(("stage1 topk", "default", timed(lambda: stage1_topk(q, codes, topk_kprime, backend=backend), device, repeats),
                            topk_kprime, {}))
        best_scan = min(ms for name, _, ms, _, _ in timings if name == "stage1 scan")
        for name, cfg, ms, kp, extra in timings:
            gbs = nbytes / (ms / 1e3) / 1e9
            rows.append({"kernel": name, "backend": backend, "config": cfg, "items": n, "dim": d, "dtype": dtype, "batch": b,
                         "kprime": kp, **extra, "ms": round(ms, 3), "GB_per_s": round(gbs, 1),
                         "pct_peak_hbm": round(100 * gbs / peak_gbs, 1) if peak_gbs else "",
                         "pct_copy_bw": round(100 * gbs / copy_rate, 1) if copy_rate else "",
                         "best_config": name == "stage1 scan" and ms == best_scan,
                         "baseline": f"mm+topk({kprime})", "baseline_ms": round(mm_ms, 3), "speedup": round(mm_ms / ms, 2)})
            log.info("%s", rows[-1])
    return rows


def _scan_triton(q, codes, thr, cap, **kw):
    from genrec.kernels.stage1_scan_triton import stage1_threshold_scan_triton

    return stage1_threshold_scan_triton(q, codes, thr, cap, **kw)


def mol_rows(kprimes, batches, device, repeats: int, configs: list[str], n_items: int = 1_000_000,
             cache_dtype: torch.dtype = torch.float32, with_kernel: bool = False) -> list[dict]:
    """MoL stage 2 over K' gathered candidates: the reference, and on GPU the kernel per config."""
    from genrec.kernels.mol_stage2_triton import mol_candidate_scores_triton

    torch.manual_seed(0)
    mol = MixtureOfLogits(64, 64, 8, 4, 64, 256, 128).eval().to(device)
    with torch.no_grad():
        items = torch.nn.functional.normalize(torch.randn(n_items, 64, device=device), dim=-1)
        enc = mol.encode_items(items)
        cache = ItemCache(enc.components.to(cache_dtype).contiguous(), enc.gate.to(cache_dtype).contiguous())
    gating = mol.gating()
    rows = []
    variants = {"reference": None, **({f"triton {c}": parse_config(c, MOL_KNOBS) for c in configs} if with_kernel else {})}
    for kp in kprimes:
        for b in batches:
            with torch.no_grad():
                q = mol.encode_queries(torch.nn.functional.normalize(torch.randn(b, 64, device=device), dim=-1))
                cand = torch.randint(0, n_items, (b, kp), device=device).sort(dim=1).values
                times = {name: timed((lambda: mol_candidate_scores(gating, q, cache, cand, backend="reference")) if kw is None
                                     else (lambda kw=kw: mol_candidate_scores_triton(gating, q, cache, cand, **kw)),
                                     device, repeats)
                         for name, kw in variants.items()}
            for name, ms in times.items():
                rows.append({"kernel": "mol stage2", "backend": name.split()[0], "config": name.partition(" ")[2],
                             "items": n_items, "dim": 64, "dtype": str(cache_dtype).removeprefix("torch."),
                             "batch": b, "kprime": kp, "ms": round(ms, 3), "baseline": "reference",
                             "baseline_ms": round(times["reference"], 3), "speedup": round(times["reference"] / ms, 2)})
                log.info("%s", rows[-1])
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    rows = [r for r in rows if r.get("best_config", True) or r["kernel"] != "stage1 scan"]  # the best scan variant per point
    labels = [f"{r['kernel']} {r['backend']}\n{r['items'] // 10**6}M {r['dtype']} b{r['batch']} K'{r['kprime']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ms"] for r in rows], 0.4, label="kernel / reference")
    ax.bar([i + 0.2 for i in x], [r["baseline_ms"] for r in rows], 0.4, label="baseline")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("kernels", __doc__, "kernels")
    ap.add_argument("--items", type=int, nargs="+", default=None)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--kprimes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak HBM GB/s (H100 SXM 3350, H200 4800)")
    ap.add_argument("--scan-configs", nargs="+", default=["default"],
                    help="threshold-scan kernel variants on GPU: BLOCKNxWARPS[:precision], e.g. 128x4 256x8 512x8 256x4:ieee")
    ap.add_argument("--mol-configs", nargs="+", default=["ieee"],
                    help="MoL stage-2 kernel variants on GPU: precision[:c<block_c>][:w<warps>], e.g. ieee bf16x3 bf16x3:c128:w8")
    ap.add_argument("--mol-cache-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--topk-batches", type=int, nargs="*", default=[1, 32, 128], help="batches the top-k scan is timed at")
    ap.add_argument("--topk-max-items", type=int, default=10**9, help="skip the top-k scan above this many items")
    ap.add_argument("--topk-kprime", type=int, default=1000, help="K' of the running top-k scan (<= 1024)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[], choices=["scan", "mol"])
    ap.add_argument("--backend", choices=["auto", "reference", "triton", "cpu"], default="auto",
                    help="auto: triton on GPU; on CPU the CPU scan kernel and the reference side by side "
                         "(triton on CPU needs TRITON_INTERPRET=1: smoke runs only)")
    ap.add_argument("--stem", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    backends = [args.backend] if args.backend != "auto" else (["triton"] if gpu else ["cpu", "reference"])
    rows: list[dict] = []
    copy_rate = copy_gbs(device)
    if copy_rate:
        log.info("device-to-device copy: %.0f GB/s (read + write)", copy_rate)
    stem = args.stem or ("kernels_gpu" if gpu else "kernels_cpu")
    meta = {**provenance(), "copy_GB_per_s": round(copy_rate, 1) if copy_rate else None,
            "note": "CPU rows time the compiled CPU scan (backend cpu) and the PyTorch references (the Triton kernels "
                    "need a GPU); speedup = baseline_ms / ms; "
                    "GB_per_s = code bytes read / time; pct_copy_bw = vs a device-to-device copy (read + write) "
                    "measured in the run"}
    if "scan" not in args.skip:
        for n in args.items or ([10_000_000, 100_000_000] if gpu else [1_000_000]):
            for dtype in args.dtypes:
                for backend in backends:
                    rows += scan_rows(n, args.dim, dtype, args.batches, min(args.kprimes), device, args.repeats,
                                      args.peak_gbs, backend, args.scan_configs, args.topk_batches, args.topk_max_items,
                                      copy_rate, args.topk_kprime)
                write_table(rows, args.out_dir, stem, meta)  # partial tables survive a time limit
                if gpu:
                    torch.cuda.empty_cache()
    if "mol" not in args.skip:
        for cache_dtype in args.mol_cache_dtypes:
            rows += mol_rows(args.kprimes, [b for b in args.batches if b <= 32], device, args.repeats, args.mol_configs,
                             cache_dtype=getattr(torch, cache_dtype), with_kernel="triton" in backends)
            write_table(rows, args.out_dir, stem, meta)
    write_table(rows, args.out_dir, stem, meta)
    plot(rows, Path(args.out_dir) / f"{stem}.png")
    print((Path(args.out_dir) / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
