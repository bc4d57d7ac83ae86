"""M-FALCON speed: scoring m candidates after a history of n, three ways, in one run.

  per-candidate  one pass over [history; c] per candidate (timed on --naive-sample candidates and
                 scaled to m: it is linear in m by construction)
  full pass      one pass over [history; all candidates] with the target-aware mask, no cache
  M-FALCON       prefill the history once (K/V per layer), then candidates in microbatches (sweep)
Reports seconds for all m candidates, candidates/s and the speed-up over per-candidate passes.

    genrec bench ranking [--history 2000] [--candidates 1024] [--microbatches 64 256 1024]
"""

from __future__ import annotations

import logging

import torch

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.bench.timing import best_seconds
from genrec.config import ModelConfig
from genrec.encoders.model import SequentialEncoder
from genrec.encoders.ranking import RankingModel

log = logging.getLogger("genrec.bench")


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("ranking", __doc__, "ranking")
    ap.add_argument("--history", type=int, default=2000)
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--naive-sample", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default="ranking_mfalcon")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)


    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(item_emb_dim=args.dim, num_blocks=args.blocks, num_heads=1, dqk=args.dim, dv=args.dim)
    model = RankingModel(SequentialEncoder(cfg, num_items=10_000, max_len=args.history + 1)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, 10_001, (args.history,), generator=g).to(device)
    ts = (torch.cumsum(torch.randint(0, 3600, (args.history,), generator=g), 0) + 10**9).to(device)
    cands = torch.randint(1, 10_001, (args.candidates,), generator=g).to(device)
    m, rows = args.candidates, []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        sample = cands[: args.naive_sample]
        naive = best_seconds(lambda: (model.score_per_candidate(hist, sample, ts), sync()), 1) * m / len(sample)
        rows.append({"method": "per-candidate passes", "microbatch": 1, "seconds": round(naive, 4),
                     "note": f"timed on {len(sample)} candidates, scaled x{m / len(sample):g}"})
        full = best_seconds(lambda: (model.score_full(hist, cands, ts), sync()), args.repeats)
        rows.append({"method": "one full pass (no cache)", "microbatch": m, "seconds": round(full, 4), "note": ""})
        for mb in args.microbatches:
            s = best_seconds(lambda: (model.score(hist, cands, ts, microbatch=mb), sync()), args.repeats)
            rows.append({"method": "M-FALCON (prefill + cached microbatches)", "microbatch": mb, "seconds": round(s, 4), "note": ""})
    for r in rows:
        r["candidates_per_s"] = round(m / r["seconds"], 1)
        r["speedup_vs_per_candidate"] = round(naive / r["seconds"], 1)
        log.info("%s", r)
    meta = {**provenance(), "history": args.history, "candidates": m, "model": f"HSTU {args.blocks}x1x{args.dim}",
            "threads": args.threads}
    md = write_table(rows, args.out_dir, args.stem, meta)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
