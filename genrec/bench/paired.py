"""Paired comparison of two systems' checkpoints on the same held-out users: is A better than B?

A table of means over seeds says little when the seeds disagree and ~1,000 test users make each mean noisy.
This script ranks every user's test target with each checkpoint (full corpus, history excluded: the protocol
of ``genrec eval``) and compares the two systems user by user:

- per seed pair: the mean difference A - B of each metric with a paired bootstrap 95% interval over users;
- all seeds: each user's metric averaged over that system's seeds, then the same paired bootstrap.

    genrec bench paired --stem ml100k_paired \\
        --a-name hstu --a runs/ml100k-hstu-s42/checkpoint_best.pt runs/ml100k-hstu-s43/checkpoint_best.pt \\
        --b-name sasrec --b runs/ml100k-sasrec-s42/checkpoint_best.pt runs/ml100k-sasrec-s43/checkpoint_best.pt

Checkpoints pair by position (they must have the same seed and data). Writes <stem>.{csv,md,json,png}.

Instead of a checkpoint, either side may name a ranks file (``<run>.ranks.npz``): the per-user test ranks
that ``genrec bench train-quality`` saves next to its tables, so that seeds trained in different sessions
(whose run folders are gone) still pair user by user.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from genrec.bench.report import harness_parser, provenance, write_table

from genrec.checkpoint import load_checkpoint, model_from_checkpoint, similarity_from_checkpoint
from genrec.data.sequences import leave_one_out
from genrec.data.source import load_dataset
from genrec.evaluation import model_target_ranks
from genrec.io import atomic_write
from genrec.plots import save_figure
from genrec.retrieval.metrics import paired_metric

METRICS = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr")


RANKS_SUFFIX = ".ranks.npz"


def save_ranks(path: str | Path, seed: int, data_key: str, users: np.ndarray, ranks: np.ndarray, epoch,
               source: str = "") -> Path:
    """Write one run's per-user test ranks: users int64 (U,), 0-based ranks int64 (U,), and what pairs them
    (seed, data key, epoch, the checkpoint they came from) as a JSON string (no pickles)."""
    if not str(path).endswith(RANKS_SUFFIX):
        raise ValueError(f"{path}: a ranks file name ends with {RANKS_SUFFIX}")
    meta = json.dumps({"seed": seed, "data": data_key, "epoch": epoch, "source": source})
    return atomic_write(path, lambda f: np.savez_compressed(
        f, users=np.asarray(users, dtype=np.int64), ranks=np.asarray(ranks, dtype=np.int64), meta=np.array(meta)))


def load_ranks(path: str | Path) -> tuple[int, str, np.ndarray, np.ndarray, int]:
    """(seed, data key, users, ranks, epoch) from a file written by :func:`save_ranks`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        users, ranks = z["users"], z["ranks"]
    if users.shape != ranks.shape or users.ndim != 1:
        raise ValueError(f"{path}: users {users.shape} and ranks {ranks.shape} must be equal 1-d arrays")
    return meta["seed"], meta["data"], users, ranks, meta["epoch"]


def data_key(cfg) -> str:
    """What decides which users are evaluated on which targets: the data and whether validation was split."""
    if cfg.data.dataset:
        data = cfg.data.dataset
    elif cfg.data.path:  # the file's name, not its folder: ranks files travel between machines
        data = f"{cfg.data.format}:{Path(cfg.data.path).name} kcore {cfg.data.kcore}"
    else:
        data = f"{cfg.data.format} {asdict(cfg.data.synthetic)}"
    return f"{data} (validation split: {cfg.train.validation})"


def test_ranks(path: str, datasets: dict) -> tuple[int, str, np.ndarray, np.ndarray, int]:
    """(seed, data key, users, 0-based test ranks, the epoch the weights are from) of one checkpoint
    or ranks file."""
    if str(path).endswith(RANKS_SUFFIX):
        return load_ranks(path)
    state = load_checkpoint(path)
    model, cfg = model_from_checkpoint(state)
    key = data_key(cfg)
    if key not in datasets:
        ds = load_dataset(cfg.data)
        datasets[key] = (ds, leave_one_out(ds, cfg.train.validation))
    ds, split = datasets[key]
    users, ranks = model_target_ranks(model, ds, split, "test", cfg.eval.batch_size, cfg.eval.exclude_history,
                                      similarity=similarity_from_checkpoint(state))
    return cfg.train.seed, key, users, ranks, state.get("epoch")


def compare(label: str, ranks_a: list[np.ndarray], ranks_b: list[np.ndarray], resamples: int,
            epochs: tuple = ("", "")) -> list[dict]:
    """Rows for one comparison: per metric, A and B means (over users, and over the given seeds) and A - B."""
    rows = []
    for m in METRICS:
        stats = paired_metric(ranks_a, ranks_b, m, resamples)
        rows.append({"seeds": label, "a_epoch": epochs[0], "b_epoch": epochs[1], "metric": m, "a": stats["a"], "b": stats["b"],
                     "a_minus_b": stats["delta"],
                     "ci95_lo": stats["lo"], "ci95_hi": stats["hi"], "p": stats["p"], "users": len(ranks_a[0])})
    return rows


def plot(rows: list[dict], names: tuple[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, m in zip(axes, ("hr@10", "ndcg@10")):
        sel = [r for r in rows if r["metric"] == m]
        xs = range(len(sel))
        d = np.array([r["a_minus_b"] for r in sel])
        err = np.array([[r["a_minus_b"] - r["ci95_lo"] for r in sel], [r["ci95_hi"] - r["a_minus_b"] for r in sel]])
        ax.errorbar(list(xs), d, yerr=err, fmt="o", capsize=4)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(list(xs), [r["seeds"] for r in sel], rotation=30, ha="right")
        ax.set_ylabel(f"{names[0]} - {names[1]}")
        ax.set_title(f"test {m.upper()}: paired difference, 95% bootstrap CI")
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int | None:
    ap = harness_parser("paired", __doc__, "quality")
    ap.add_argument("--a", nargs="+", required=True, help=f"system A's checkpoints (or {RANKS_SUFFIX} files), one per seed")
    ap.add_argument("--b", nargs="+", required=True, help="system B's, in the same seed order")
    ap.add_argument("--a-name", default="A")
    ap.add_argument("--b-name", default="B")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples over users")
    ap.add_argument("--stem", default="paired_compare")
    ap.add_argument("--note", default="", help="how the checkpoints were trained, for the table's provenance")
    ap.add_argument("--save-ranks", metavar="DIR", default=None,
                    help=f"also write each checkpoint's ranks to DIR/<run folder>{RANKS_SUFFIX}, to pair later without it")
    args = ap.parse_args(argv)
    if len(args.a) != len(args.b):
        raise SystemExit(f"--a has {len(args.a)} checkpoints but --b has {len(args.b)}: they pair by position")
    datasets: dict = {}
    runs_a = [test_ranks(p, datasets) for p in args.a]
    runs_b = [test_ranks(p, datasets) for p in args.b]
    if args.save_ranks:
        for path, run in zip([*args.a, *args.b], [*runs_a, *runs_b]):
            if not path.endswith(RANKS_SUFFIX):
                save_ranks(Path(args.save_ranks) / f"{Path(path).parent.name}{RANKS_SUFFIX}", *run, source=path)
    for (sa, da, ua, *_), (sb, db, ub, *_), pa, pb in zip(runs_a, runs_b, args.a, args.b):
        if (sa, da) != (sb, db) or not np.array_equal(ua, ub):
            raise SystemExit(f"{pa} (seed {sa}, {da}) and {pb} (seed {sb}, {db}) do not pair: same seed and data needed")
    rows = []
    for (seed, _, _, ra, ea), (_, _, _, rb, eb) in zip(runs_a, runs_b):
        rows += compare(str(seed), [ra], [rb], args.resamples, (ea, eb))
    if len(runs_a) > 1:
        rows += compare(f"all {len(runs_a)}", [r[3] for r in runs_a], [r[3] for r in runs_b], args.resamples)
    meta = {**provenance(), "note": args.note, "a": args.a_name, "b": args.b_name, "a_checkpoints": args.a, "b_checkpoints": args.b}
    write_table([{"a_system": args.a_name, "b_system": args.b_name, **r} for r in rows], args.out_dir, args.stem, meta)
    plot(rows, (args.a_name, args.b_name), Path(args.out_dir) / f"{args.stem}.png")
    print((Path(args.out_dir) / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
