"""HSTU vs SASRec (and popularity) under one protocol on ML-100K and the built-in synthetic data.

Writes benchmarks/results/train_quality.{csv,md,json,png}: test HR@10 / NDCG@10 / HR@200 (full corpus,
history excluded), best epoch, epochs run, seconds per epoch.

    python benchmarks/train_quality.py [--epochs 101] [--datasets ml100k synthetic]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, ensure_ml100k, provenance, write_table  # noqa: E402

from genrec.config import load_config  # noqa: E402
from genrec.training import train  # noqa: E402

CONFIGS = {
    "ml100k": {"hstu": "configs/ml100k_hstu.yaml", "sasrec": "configs/ml100k_sasrec.yaml"},
    "synthetic": {"hstu": "configs/demo.yaml", "sasrec": "configs/demo.yaml"},
}
# --mol: HSTU + dot vs HSTU + MoL at the same negative budget (batch-shared: per-position MoL negatives
# cost ~30x more on CPU). Small MoL (4 x 4 x 32) sized for CPU.
MOL_SYSTEMS = {
    "hstu+dot": ["model.encoder=hstu", "similarity.type=dot", "loss.negatives=batch_shared"],
    "hstu+mol": ["model.encoder=hstu", "similarity.type=mol", "loss.negatives=batch_shared",
                 "similarity.query_components=4", "similarity.item_components=4", "similarity.component_dim=32"],
}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        vals = {r["system"]: r for r in rows if r["dataset"] == ds}
        xs = range(len(systems))
        ax.bar([x - 0.2 for x in xs], [vals[s]["hr@10"] for s in systems], 0.4, label="HR@10")
        ax.bar([x + 0.2 for x in xs], [vals[s]["ndcg@10"] for s in systems], 0.4, label="NDCG@10")
        ax.set_xticks(list(xs), systems)
        ax.set_title(f"{ds} (test, full corpus)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="cap epochs (default: the config's)")
    ap.add_argument("--datasets", nargs="+", default=["synthetic", "ml100k"], choices=list(CONFIGS))
    ap.add_argument("--out-dir", default="runs/bench")
    ap.add_argument("--mol", action="store_true", help="compare HSTU+dot vs HSTU+MoL (writes mol_quality.*)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for ds in args.datasets:
        if ds == "ml100k":
            ensure_ml100k()
        popularity = None
        systems = ({name: (CONFIGS[ds]["hstu"], extra) for name, extra in MOL_SYSTEMS.items()} if args.mol else
                   {enc: (path, [f"model.encoder={enc}"]) for enc, path in CONFIGS[ds].items()})
        for encoder, (cfg_path, extra) in systems.items():
            overrides = [f"out_dir={args.out_dir}", f"name={ds}-{encoder}", *extra]
            if ds == "ml100k":
                overrides.append(f"data.path={ROOT / 'benchmarks/.data/ml-100k/ml-100k.inter'}")
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            cfg = load_config(ROOT / cfg_path, overrides)
            result = train(cfg, progress=False)
            epochs_run = len((result.run_dir / "metrics.csv").read_text().strip().splitlines()) - 1
            rows.append({"dataset": ds, "system": encoder, "hr@10": result.test["hr@10"], "ndcg@10": result.test["ndcg@10"],
                         "hr@200": result.test["hr@200"], "mrr": result.test["mrr"], "best_epoch": result.best_epoch,
                         "epochs_run": epochs_run, "sec_per_epoch": round(result.seconds_per_epoch, 2)})
            popularity = result.popularity_test
        rows.append({"dataset": ds, "system": "popularity", "hr@10": popularity["hr@10"], "ndcg@10": popularity["ndcg@10"],
                     "hr@200": popularity["hr@200"], "mrr": popularity["mrr"], "best_epoch": "", "epochs_run": "", "sec_per_epoch": ""})
        stem = "mol_quality" if args.mol else "train_quality"
        write_table(rows, stem, provenance())
        plot(rows, RESULTS / f"{stem}.png")
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
