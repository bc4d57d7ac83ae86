"""Seconds per training epoch on an ML-1M-sized corpus (6,040 users, 3,706 items, ~1M events,
max_len 200), HSTU 2x1x50 vs SASRec, per-position vs batch-shared negatives.

Synthetic data with ML-1M's shape stands in for ML-1M (which may not be redistributed).
Writes <out-dir>/epoch_speed.{csv,md,json}.

    genrec bench epoch-speed [--threads 2]
"""

from __future__ import annotations

import logging

import torch
from genrec.bench.report import harness_parser, provenance, write_table

from genrec.config import RunConfig, SyntheticConfig
from genrec.data.sequences import build_sequences
from genrec.data.synthetic import generate_synthetic
from genrec.training import train

ML1M_SHAPE = SyntheticConfig(num_users=6040, num_items=3706, num_clusters=40, mean_length=165, min_length=20,
                             max_length=1800, seed=1)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("epoch-speed", __doc__, "training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="runs/bench-speed", help="where the timed runs train")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    ds = build_sequences(generate_synthetic(ML1M_SHAPE))
    shape = ds.describe()
    logging.info("corpus: %s", shape)
    rows = []
    for encoder, negatives in [("hstu", "per_position"), ("hstu", "batch_shared"), ("sasrec", "per_position")]:
        cfg = RunConfig(name=f"speed-{encoder}-{negatives}", out_dir=args.work_dir)
        cfg.model.encoder = encoder
        cfg.loss.negatives = negatives
        cfg.train.epochs = 1
        cfg.train.num_threads = args.threads
        result = train(cfg, dataset=ds, progress=False)
        rows.append({"encoder": encoder, "negatives": negatives, "users": shape["users"], "items": shape["items"],
                     "interactions": shape["interactions"], "max_len": cfg.data.max_len, "threads": args.threads,
                     "sec_per_epoch": round(result.seconds_per_epoch, 2)})
        logging.info("%s", rows[-1])
    print(write_table(rows, args.out_dir, "epoch_speed", provenance()).read_text())


if __name__ == "__main__":
    main()
