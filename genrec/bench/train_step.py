"""What one training step costs, per system, on ML-1M: HSTU(-large) with dot product vs Mixture of Logits,
per-position vs batch-shared negatives. Times forward + backward + AdamW on real training batches (the
first steps of an epoch, after one warm-up step) and projects an epoch from the number of batches.

    genrec bench train-step [--systems hstu-large+dot hstu-large+mol] [--steps 5] [--threads 2]

Writes <out-dir>/<stem>.{csv,md,json}; ``ratio_vs_large_dot`` is each system's step time over HSTU-large +
dot product's, measured in the same run. ``--dataset synthetic`` uses an ML-1M-shaped synthetic corpus where
the real one is absent.
"""

from __future__ import annotations

import logging
import resource
import time

import numpy as np
import torch

from genrec.bench.datasets import ROOT
from genrec.bench.epoch_speed import ML1M_SHAPE
from genrec.bench.report import harness_parser, provenance, write_table
from genrec.config import load_config
from genrec.data.batches import train_batches
from genrec.data.sequences import build_sequences, leave_one_out
from genrec.data.source import load_dataset
from genrec.data.synthetic import generate_synthetic
from genrec.encoders.model import SequentialEncoder
from genrec.retrieval.similarity import build_similarity
from genrec.trainer import keep_freed_cpu_memory
from genrec.training import batch_loss

SYSTEMS = {  # name -> (config, overrides); the first is what the others are compared with
    "hstu-large+dot": ("configs/ml1m_hstu_large.yaml", []),
    "hstu+dot": ("configs/ml1m_hstu.yaml", []),
    "hstu-large+mol": ("configs/ml1m_hstu_large_mol.yaml", []),
    "hstu-large+mol-shared": ("configs/ml1m_hstu_large_mol.yaml", ["loss.negatives=batch_shared"]),
    "hstu-large+mol-bf16": ("configs/ml1m_hstu_large_mol.yaml", ["similarity.train_precision=bfloat16"]),
    "hstu+mol-bf16": ("configs/ml1m_hstu_mol.yaml", []),
}
log = logging.getLogger("genrec.bench")


def time_steps(cfg, ds, steps: int) -> dict:
    """Mean seconds of ``steps`` training steps after one warm-up step, and the epoch's batch count."""
    torch.manual_seed(cfg.train.seed)
    split = leave_one_out(ds, cfg.train.validation)
    model = SequentialEncoder(cfg.model, ds.num_items, cfg.data.max_len)
    d = cfg.model.item_emb_dim
    similarity = build_similarity(cfg.similarity, d, d)
    params = list(model.parameters()) + (list(similarity.parameters()) if isinstance(similarity, torch.nn.Module) else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas)
    gen = torch.Generator().manual_seed(1)
    model.train()
    seconds = []
    batches = train_batches(ds, split, cfg.data.max_len, cfg.train.batch_size, np.random.default_rng(0))
    for i, batch in zip(range(steps + 1), batches):
        t0 = time.perf_counter()
        loss = batch_loss(model, batch, cfg, similarity, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # step 0 warms up allocators and caches
            seconds.append(time.perf_counter() - t0)
    n_batches = int(np.ceil(np.sum(split.train_end - ds.offsets[:-1] >= 2) / cfg.train.batch_size))
    return {"sec_per_step": float(np.mean(seconds)), "batches_per_epoch": n_batches}


def main(argv: list[str] | None = None) -> int:
    ap = harness_parser("train-step", __doc__, "training")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", choices=["ml1m", "synthetic"], default="ml1m")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every system")
    ap.add_argument("--stem", default="train_step_ml1m")
    ap.add_argument("--fresh-memory", action="store_true",
                    help="leave glibc returning freed memory to the OS (the allocator before keep_freed_cpu_memory)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    reuse = not args.fresh_memory and keep_freed_cpu_memory()
    meta = {**provenance(), "dataset": args.dataset, "threads": args.threads}
    rows = []
    ds = None
    for name in args.systems:
        path, extra = SYSTEMS[name]
        cfg = load_config(ROOT / path, [*extra, *args.set])
        if ds is None:
            ds = load_dataset(cfg.data) if args.dataset == "ml1m" else build_sequences(generate_synthetic(ML1M_SHAPE))
        r = time_steps(cfg, ds, args.steps)
        rows.append({"system": name, "negatives": cfg.loss.negatives, "mol_precision": cfg.similarity.train_precision
                     if cfg.similarity.type == "mol" else "", "num_negatives": cfg.loss.num_negatives,
                     "batch_size": cfg.train.batch_size, "steps_timed": args.steps, "reused_memory": reuse,
                     "sec_per_step": round(r["sec_per_step"], 3),
                     "projected_epoch_min": round(r["sec_per_step"] * r["batches_per_epoch"] / 60, 1),
                     "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
        base = next((r for r in rows if r["system"] == "hstu-large+dot"), rows[0])
        rows[-1]["ratio_vs_large_dot"] = round(rows[-1]["sec_per_step"] / base["sec_per_step"], 2)
        log.info("%s", rows[-1])
        table = write_table(rows, args.out_dir, args.stem, meta)  # partial tables survive a time limit
    print(table.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
