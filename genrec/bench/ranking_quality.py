"""Tabulate ranking runs (``genrec train`` with ``task: ranking``): AUC / logloss and the two-stage
HR@k / NDCG@k of retrieval alone vs retrieval + ranking, one row per (run, system).

    genrec bench ranking-quality RUN_DIR [RUN_DIR ...] --stem ranking_two_stage_synthetic
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from genrec.bench.report import harness_parser, provenance, write_table


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("ranking-quality", __doc__, "ranking")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--stem", required=True)
    ap.add_argument("--note", default="", help="how the runs were trained (kept with the figures)")
    args = ap.parse_args(argv)
    rows = []
    for run in map(Path, args.runs):
        res = json.loads((run / "results.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        rk = cfg.get("ranking", {})
        for system, m in res.get("two_stage_test", {}).items():
            rows.append({"run": run.name, "hard_negatives": rk.get("hard_negatives", 0), "loss": rk.get("loss", "bce"),
                         "select_on": rk.get("select_on", "auc"), "lr": cfg.get("train", {}).get("lr", ""),
                         "encoder_lr": rk.get("encoder_lr", ""), "rating_input": rk.get("rating_input", False),
                         "cuts_per_user": rk.get("cuts_per_user", 1),
                         "best_epoch": res.get("best_epoch", ""), "system": system, "test_auc": res["test"]["auc"],
                         "test_logloss": res["test"]["logloss"], "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"],
                         "hr@50": m.get("hr@50", ""), "mrr": m["mrr"]})
    print(write_table(rows, args.out_dir, args.stem, {**provenance(), "runs": [str(r) for r in args.runs],
                                       **({"note": args.note} if args.note else {})}).read_text())


if __name__ == "__main__":
    main()
