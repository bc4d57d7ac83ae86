"""Jagged HSTU attention, forward + backward: the Triton kernel vs the padded PyTorch reference vs torch
SDPA (causal softmax attention; flash on GPU) over the same batch, padded as SDPA needs it.

Row lengths are skewed like real histories: length = max_len * u^3 (u uniform), at least 1, one row at
max_len, rows added until the batch holds ``--tokens`` tokens. Time is the best of ``--repeats`` fwd+bwd
steps after a warm-up; peak memory is the CUDA high-water mark above the inputs (GPU only).
Writes <out-dir>/<stem>.{csv,md,json,png}.

    genrec bench attention                        # GPU: max_len 1k-8k, bf16
    genrec bench attention --lengths 128 256 512  # CPU: reference vs SDPA only, fp32

On CPU the Triton column is skipped: the interpreter checks correctness (tests), not speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.timing import best_seconds
from genrec.kernels.hstu_attention_reference import hstu_attention_reference
from genrec.kernels.jagged import complete_cumsum, jagged_to_padded
from genrec.plots import save_figure


def skewed_lengths(max_len: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    lengths = [max_len]
    while sum(lengths) < tokens:
        u = torch.rand((), generator=gen).item()
        lengths.append(max(1, int(max_len * u**3)))
    return torch.tensor(lengths, dtype=torch.int64)


def make_batch(max_len: int, tokens: int, heads: int, dim: int, dtype, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = skewed_lengths(max_len, tokens, gen)
    offsets = complete_cumsum(lengths)
    total = int(offsets[-1])
    rnd = lambda: (torch.randn(total, heads, dim, generator=gen) * 0.5).to(device, dtype).requires_grad_()  # noqa: E731
    ts = torch.cumsum(torch.randint(1, 3600, (total,), generator=gen), 0)
    return {"q": rnd(), "k": rnd(), "v": rnd(), "offsets": offsets.to(device), "max_len": max_len,
            "pos_table": (torch.randn(2 * max_len - 1, generator=gen) * 0.02).to(device).requires_grad_(),
            "time_table": (torch.randn(129, generator=gen) * 0.02).to(device).requires_grad_(),
            "ts": ts.to(device), "next_ts": (ts + 60).to(device), "lengths": lengths}


def step_fn(system: str, b: dict):
    """A closure running one fwd+bwd of ``system`` on batch b."""
    dim = b["q"].shape[-1]
    kw = dict(alpha=dim**-0.5, scale=1.0 / b["max_len"], pos_table=b["pos_table"], time_table=b["time_table"],
              timestamps=b["ts"], next_timestamps=b["next_ts"])
    if system == "hstu reference (padded)":
        fn = lambda: hstu_attention_reference(b["q"], b["k"], b["v"], b["offsets"], b["max_len"], **kw)  # noqa: E731
    elif system.startswith("hstu triton (jagged)"):
        from genrec.kernels.hstu_attention_triton import hstu_attention_triton

        if system.endswith("frozen bias"):  # no bias-table gradients: isolates their atomic adds
            kw.update(pos_table=b["pos_table"].detach(), time_table=b["time_table"].detach())
        if system.endswith("]"):  # "... [BMxBN]": block sizes other than the kernel's defaults
            bm, bn = system[system.rindex("[") + 1 : -1].split("x")
            kw.update(block_m=int(bm), block_n=int(bn))
        fn = lambda: hstu_attention_triton(b["q"], b["k"], b["v"], b["offsets"], b["max_len"], **kw)  # noqa: E731
    elif system == "sdpa causal (padded)":
        def fn():
            pad = [jagged_to_padded(b[x], b["offsets"], b["max_len"]).transpose(1, 2) for x in "qkv"]
            return F.scaled_dot_product_attention(*pad, is_causal=True)
    else:
        raise ValueError(system)

    def step():
        out = fn()
        out.float().sum().backward()
        for x in ("q", "k", "v", "pos_table", "time_table"):
            b[x].grad = None
    return step


def measure(step, device, repeats: int) -> tuple[float, float | None]:
    """(best ms, peak MiB above the resident inputs or None on CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return best_seconds(lambda: (step(), sync()), repeats) * 1e3, peak


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fwd_bwd_ms", "fwd+bwd ms")] + ([("peak_mib", "peak MiB")] if any(r["peak_mib"] != "" for r in rows) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = [(r["max_len"], r[key]) for r in rows if r["system"] == system and r[key] != ""]
            ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("max_len (skewed lengths)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("attention", __doc__, "attention")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 65536 GPU, 4096 CPU)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--triton-blocks", nargs="*", default=[], help="extra kernel block sizes BMxBN to time, e.g. 128x64 64x32")
    ap.add_argument("--stem", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    lengths = args.lengths or ([1024, 2048, 4096, 8192] if gpu else [128, 256, 512])
    tokens = args.tokens or (65536 if gpu else 4096)
    dtype = torch.bfloat16 if gpu else torch.float32
    systems = ["hstu reference (padded)", "sdpa causal (padded)"] + (
        ["hstu triton (jagged)", "hstu triton (jagged), frozen bias"] + [f"hstu triton (jagged) [{b}]" for b in args.triton_blocks]
        if gpu else [])
    rows = []
    stem = args.stem or ("attention_gpu" if gpu else "attention_cpu")
    meta = {**provenance(), "note": "fwd+bwd, skewed lengths (max_len * u^3), relative position + time bias on"}
    for max_len in lengths:
        batch = make_batch(max_len, tokens, args.heads, args.dim, dtype, device)
        for system in systems:
            try:
                ms, peak = measure(step_fn(system, batch), device, args.repeats)
            except torch.OutOfMemoryError:
                ms, peak = float("nan"), float("nan")
                torch.cuda.empty_cache()
            rows.append({"system": system, "max_len": max_len, "rows": len(batch["lengths"]),
                         "tokens": int(batch["lengths"].sum()), "heads": args.heads, "dim": args.dim,
                         "dtype": str(dtype).removeprefix("torch."), "fwd_bwd_ms": round(ms, 3),
                         "peak_mib": round(peak, 1) if peak is not None else ""})
            logging.info("%s", rows[-1])
        ref = {r["system"]: r for r in rows if r["max_len"] == max_len}
        for r in rows:
            if r["max_len"] == max_len:
                r["speedup_vs_sdpa"] = round(ref["sdpa causal (padded)"]["fwd_bwd_ms"] / r["fwd_bwd_ms"], 3)
                r["mem_vs_reference"] = (round(r["peak_mib"] / ref["hstu reference (padded)"]["peak_mib"], 3)
                                         if gpu and ref["hstu reference (padded)"]["peak_mib"] else "")
        write_table(rows, args.out_dir, stem, meta)  # partial tables survive a time limit
    write_table(rows, args.out_dir, stem, meta)
    plot(rows, Path(args.out_dir) / f"{stem}.png")
    print((Path(args.out_dir) / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
