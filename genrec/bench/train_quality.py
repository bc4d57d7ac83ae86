"""HSTU vs SASRec (and popularity) under one protocol on ML-100K and the built-in synthetic data.

Writes <out-dir>/train_quality.{csv,md,json,png}: test HR@10 / NDCG@10 / HR@200 (full corpus,
history excluded), best epoch, epochs run, seconds per epoch.

    genrec bench train-quality [--epochs 101] [--datasets ml100k synthetic] [--seeds 42 43 44]

Every run's per-user test ranks go to <ranks-dir>/<run name>.ranks.npz (default <out-dir>/ranks), so that
``genrec bench paired`` compares seeds trained in other sessions, user by user, after their runs are gone.

With several seeds, per-seed rows go to <stem>_seeds.{csv,md,json} and the main table holds the mean,
the sample standard deviation and the seed count per (dataset, system).

A hyper-parameter sweep selected on validation, the same for every system:

    genrec bench train-quality --datasets ml100k --grid model.dropout+model.input_dropout=0.2,0.5 \
        --grid train.lr=0.001,0.002 --seeds 42 43 44

runs every grid point at the first seed (rows with validation and test metrics in <stem>_grid.*), picks
per system the point with the best validation HR@10, runs that point at the remaining seeds, and tables
the chosen point's test metrics over all seeds. ``a+b=v1,v2`` sets both keys to each value.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
from genrec.bench.datasets import ML100K, ROOT, ensure_ml100k
from genrec.bench.paired import RANKS_SUFFIX, save_ranks, test_ranks
from genrec.bench.report import harness_parser, provenance, write_table

from genrec.config import load_config
from genrec.plots import save_figure
from genrec.training import train

CONFIGS = {  # dataset -> system -> (config, overrides); ml1m is the papers' set (genrec.data.published)
    "ml1m": {"hstu": ("configs/ml1m_hstu.yaml", []), "sasrec": ("configs/ml1m_sasrec.yaml", []),
             "hstu-large": ("configs/ml1m_hstu_large.yaml", []),
             "hstu-large+mol": ("configs/ml1m_hstu_large_mol.yaml", []),
             "hstu+mol": ("configs/ml1m_hstu_mol.yaml", [])},
    "ml100k": {"hstu": ("configs/ml100k_hstu.yaml", []), "sasrec": ("configs/ml100k_sasrec.yaml", [])},
    "synthetic": {"hstu": ("configs/demo.yaml", ["model.encoder=hstu"]),
                  "sasrec": ("configs/demo.yaml", ["model.encoder=sasrec"])},
}
# --mol: HSTU + dot vs HSTU + MoL at the same negative budget (batch-shared: per-position MoL negatives
# cost ~30x more on CPU). Small MoL (4 x 4 x 32) sized for CPU.
METRICS = ("hr@10", "ndcg@10", "hr@200", "mrr")
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
        err = lambda m: [vals[s].get(f"{m}_std") or 0.0 for s in systems]  # noqa: E731
        ax.bar([x - 0.2 for x in xs], [vals[s]["hr@10"] for s in systems], 0.4, yerr=err("hr@10"), label="HR@10")
        ax.bar([x + 0.2 for x in xs], [vals[s]["ndcg@10"] for s in systems], 0.4, yerr=err("ndcg@10"), label="NDCG@10")
        ax.set_xticks(list(xs), systems)
        ax.set_title(f"{ds} (test, full corpus)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("train-quality", __doc__, "quality")
    ap.add_argument("--epochs", type=int, default=None, help="cap epochs (default: the config's)")
    ap.add_argument("--datasets", nargs="+", default=["synthetic", "ml100k"], choices=list(CONFIGS))
    ap.add_argument("--work-dir", default="runs/bench", help="where the runs train (checkpoints for paired comparisons)")
    ap.add_argument("--mol", action="store_true", help="compare HSTU+dot vs HSTU+MoL (writes mol_quality.*)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed values (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (train.num_threads)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run, e.g. model.uvqk_init=xavier (repeatable)")
    ap.add_argument("--stem", default=None, help="results file stem (default train_quality / mol_quality)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY[+KEY]=V1,V2",
                    help="sweep axis (repeatable): every system runs every point at the first seed, "
                         "the best point on validation HR@10 goes on to the other seeds")
    ap.add_argument("--systems", nargs="+", default=None, help="only these systems (default: all of the dataset's)")
    ap.add_argument("--ranks-dir", default=None, help=f"where each run's <name>{RANKS_SUFFIX} goes (default <out-dir>/ranks)")
    args = ap.parse_args(argv)
    args.ranks_dir = Path(args.ranks_dir or Path(args.out_dir) / "ranks")
    if args.grid:
        return sweep(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stem = args.stem or ("mol_quality" if args.mol else "train_quality")
    seeds = args.seeds or [None]
    rows = []
    for ds in args.datasets:
        if ds == "ml100k":
            ensure_ml100k()
        systems = ({name: (CONFIGS[ds]["hstu"][0], extra) for name, extra in MOL_SYSTEMS.items()} if args.mol else
                   dict(CONFIGS[ds]))
        if args.systems:
            systems = {name: spec for name, spec in systems.items() if name in args.systems}
            if not systems:
                raise SystemExit(f"--systems {args.systems}: none of {ds}'s systems")
        for seed in seeds:
            popularity = None
            for encoder, (cfg_path, extra) in systems.items():
                row, popularity = run_one(args, ds, encoder, cfg_path, extra, seed)
                rows.append(row)
            rows.append({"dataset": ds, "system": "popularity", "seed": "", **{m: popularity[m] for m in METRICS},
                         "best_epoch": "", "epochs_run": "", "sec_per_epoch": ""})
        if len(seeds) > 1:
            write_table(rows, args.out_dir, f"{stem}_seeds", provenance())
            table = summarise(rows)
        else:
            table = rows
        write_table(table, args.out_dir, stem, provenance())
        plot(table, Path(args.out_dir) / f"{stem}.png")
    print((Path(args.out_dir) / f"{stem}.md").read_text())


def run_one(args, ds: str, encoder: str, cfg_path: str, extra: list[str], seed: int | None,
            point: list[str] = (), tag: str = "") -> tuple[dict, dict]:
    """Train one system once; returns its row (test metrics, validation HR@10, epochs) and the popularity baseline."""
    overrides = [f"out_dir={args.work_dir}", f"name={ds}-{encoder}{tag}" + (f"-s{seed}" if seed is not None else ""), *extra]
    if ds == "ml100k":
        overrides.append(f"data.path={ML100K}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    overrides += [*args.set, *point]
    cfg = load_config(ROOT / cfg_path, overrides)
    result = train(cfg, progress=False)
    seed, key, users, ranks, epoch = test_ranks(str(result.checkpoint), {})
    save_ranks(args.ranks_dir / f"{result.run_dir.name}{RANKS_SUFFIX}", seed, key, users, ranks, epoch, source=str(result.checkpoint))
    epochs_run = len((result.run_dir / "metrics.csv").read_text().strip().splitlines()) - 1
    row = {"dataset": ds, "system": encoder, "seed": cfg.train.seed, **{m: result.test[m] for m in METRICS},
           "val_hr@10": result.valid.get("hr@10", ""), "best_epoch": result.best_epoch, "epochs_run": epochs_run,
           "sec_per_epoch": round(result.seconds_per_epoch, 2)}
    return row, result.popularity_test


def grid_points(axes: list[str]) -> list[list[str]]:
    """["a+b=1,2", "c=3,4"] -> every combination as override lists (a and b take the same value)."""
    parsed = []
    for axis in axes:
        keys, _, values = axis.partition("=")
        if not values:
            raise SystemExit(f"--grid {axis!r}: expected KEY[+KEY]=V1,V2")
        parsed.append([[f"{k}={v}" for k in keys.split("+")] for v in values.split(",")])
    return [[o for part in combo for o in part] for combo in itertools.product(*parsed)]


def point_label(point: list[str]) -> str:
    return " ".join(point)


def sweep(args) -> None:
    """Grid at the first seed, selection on validation HR@10 per system, the chosen point at every seed."""
    stem = args.stem or "train_quality_sweep"
    seeds = args.seeds or [42]
    points = grid_points(args.grid)
    grid_rows, chosen_rows = [], []
    for ds in args.datasets:
        if ds == "ml100k":
            ensure_ml100k()
        for encoder, (cfg_path, extra) in CONFIGS[ds].items():
            if args.systems and encoder not in args.systems:
                continue
            if not load_config(ROOT / cfg_path, [*extra, *args.set]).train.validation:
                raise SystemExit("--grid picks each system's point on validation HR@10: it needs train.validation true")
            results = []
            for i, point in enumerate(points):
                row, _ = run_one(args, ds, encoder, cfg_path, extra, seeds[0], point, tag=f"-g{i}")
                row = {"point": point_label(point), **row}
                results.append((row, point, i))
                grid_rows.append(row)
                write_table(grid_rows, args.out_dir, f"{stem}_grid", provenance())
            best_row, best_point, i = max(results, key=lambda t: t[0]["val_hr@10"])
            logging.info("%s %s: chose %s (val HR@10 %.4f)", ds, encoder, point_label(best_point), best_row["val_hr@10"])
            chosen_rows.append(best_row)
            for seed in seeds[1:]:
                row, _ = run_one(args, ds, encoder, cfg_path, extra, seed, best_point, tag=f"-g{i}")
                chosen_rows.append({"point": point_label(best_point), **row})
                write_table(chosen_rows, args.out_dir, f"{stem}_seeds", provenance())
    table = summarise(chosen_rows)
    for row in table:
        row["point"] = next(r["point"] for r in chosen_rows if (r["dataset"], r["system"]) == (row["dataset"], row["system"]))
    write_table(chosen_rows, args.out_dir, f"{stem}_seeds", provenance())
    write_table(table, args.out_dir, stem, provenance())
    plot(table, Path(args.out_dir) / f"{stem}.png")
    print((Path(args.out_dir) / f"{stem}_grid.md").read_text())
    print((Path(args.out_dir) / f"{stem}.md").read_text())


def summarise(rows: list[dict]) -> list[dict]:
    """Per (dataset, system): mean and sample std of each metric over seeds, and the seed count."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["system"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["system"]) == key]
        if key[1] == "popularity":
            group = group[:1]  # deterministic: identical for every seed
        row = {"dataset": key[0], "system": key[1], "seeds": len(group)}
        for m in METRICS:
            vals = np.array([r[m] for r in group], dtype=float)
            row[m] = float(vals.mean())
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else ""
        out.append(row)
    return out


if __name__ == "__main__":
    main()
