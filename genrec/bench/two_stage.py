"""Two-stage vs retrieval alone, paired over users: does the ranking stage pay for itself?

Reads ranking runs (``genrec train`` with ``task: ranking``), each of which saved its per-user test ranks
(``two_stage_test_ranks.npz``: retrieval alone, and reranked at every depth it evaluated). Runs whose names
differ only in a trailing ``-s<seed>`` form one arm. For every run and depth: both arms' HR@10 / NDCG@10 /
MRR, the paired difference two-stage - retrieval with a bootstrap 95% CI over users, and the ratio; for
every arm with several seeds, the same over each user's metric averaged across its seeds. The PNG plots
HR@10 and NDCG@10 against the rerank depth, retrieval alone and each arm.

    genrec bench two-stage runs/rank-ml1m/* --stem ranking_two_stage_ml1m --out-dir benchmarks/results/ranking
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from genrec.bench.report import harness_parser, provenance, write_table
from genrec.plots import save_figure
from genrec.ranking_training import TWO_STAGE_RANKS_FILE, TwoStageRanks
from genrec.retrieval.metrics import paired_metric

METRICS = ("hr@10", "ndcg@10", "mrr")


def load_run(run: Path) -> dict:
    """A ranking run's arm name, seed, best epoch and its ``TwoStageRanks``."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    res = json.loads((run / "results.json").read_text())
    ranks = TwoStageRanks.load(run / TWO_STAGE_RANKS_FILE)
    return {"run": run.name, "arm": re.sub(r"-s\d+$", "", run.name), "seed": cfg["train"]["seed"],
            "best_epoch": res.get("best_epoch", ""), "users": ranks.users, "retrieval": ranks.retrieval,
            "reranked": ranks.reranked}


def paired_row(label: dict, retrieval: list[np.ndarray], reranked: list[np.ndarray], resamples: int) -> dict:
    """One row: per metric, both arms' means over users (each user's value averaged over the given seeds),
    two-stage - retrieval with its paired 95% CI, and the ratio."""
    row = dict(label)
    for m in METRICS:
        stats = paired_metric(reranked, retrieval, m, resamples)
        row.update({f"retrieval_{m}": stats["b"], f"two_stage_{m}": stats["a"], f"delta_{m}": stats["delta"],
                    f"ci95_lo_{m}": stats["lo"], f"ci95_hi_{m}": stats["hi"], f"ratio_{m}": stats["ratio"]})
    return row


def table(runs: list[dict], resamples: int) -> list[dict]:
    rows = []
    for r in runs:
        for d in sorted(r["reranked"]):
            rows.append(paired_row({"arm": r["arm"], "seeds": str(r["seed"]), "best_epoch": r["best_epoch"], "depth": d,
                                    "users": len(r["users"])}, [r["retrieval"]], [r["reranked"][d]], resamples))
    for arm in dict.fromkeys(r["arm"] for r in runs):
        group = [r for r in runs if r["arm"] == arm]
        if len(group) < 2:
            continue
        if any(not np.array_equal(g["users"], group[0]["users"]) for g in group):
            raise ValueError(f"arm {arm}: its runs were evaluated on different users; they cannot be pooled")
        for d in sorted(set.intersection(*(set(g["reranked"]) for g in group))):
            rows.append(paired_row({"arm": arm, "seeds": " ".join(str(g["seed"]) for g in group), "best_epoch": "",
                                    "depth": d, "users": len(group[0]["users"])},
                                   [g["retrieval"] for g in group], [g["reranked"][d] for g in group], resamples))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    pooled = {}  # one line per arm: its pooled rows where it has several seeds, else its single run's
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        pooled[arm] = [r for r in mine if " " in r["seeds"]] or mine
    for ax, m in zip(axes, ("hr@10", "ndcg@10")):
        for arm, sel in pooled.items():
            sel = sorted(sel, key=lambda r: r["depth"])
            depths = [r["depth"] for r in sel]
            vals = np.array([r[f"two_stage_{m}"] for r in sel])
            err = np.array([[r[f"delta_{m}"] - r[f"ci95_lo_{m}"] for r in sel], [r[f"ci95_hi_{m}"] - r[f"delta_{m}"] for r in sel]])
            ax.errorbar(depths, vals, yerr=err, fmt="o-", capsize=3, label=f"{arm} (seeds {sel[0]['seeds']})")
        base = next(iter(pooled.values()))[0][f"retrieval_{m}"]
        ax.axhline(base, color="grey", ls="--", lw=1, label="retrieval alone")
        ax.set_xscale("log")
        ticks = sorted({r["depth"] for sel in pooled.values() for r in sel})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("rerank depth (retrieved candidates)")
        ax.set_ylabel(f"test {m.upper()}")
        ax.set_title(f"two-stage {m.upper()} (bars: paired 95% CI of the gain)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("two-stage", __doc__, "ranking")
    ap.add_argument("runs", nargs="+", help="ranking run directories")
    ap.add_argument("--stem", required=True)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--note", default="", help="how the runs were trained (kept with the figures)")
    args = ap.parse_args(argv)
    runs = [load_run(Path(r)) for r in args.runs]
    rows = table(runs, args.resamples)
    meta = {**provenance(), "runs": [str(r) for r in args.runs], **({"note": args.note} if args.note else {})}
    md = write_table(rows, args.out_dir, args.stem, meta)
    plot(rows, Path(args.out_dir) / f"{args.stem}.png")
    print(md.read_text())


if __name__ == "__main__":
    main()
