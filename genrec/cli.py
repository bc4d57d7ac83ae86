"""``genrec`` command line: data prepare, train, eval, embed."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from genrec.checkpoint import CheckpointError
from genrec.config import ConfigError

log = logging.getLogger("genrec")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from genrec.config import DataConfig, SyntheticConfig
    from genrec.data.sequences import save_prepared
    from genrec.data.source import load_dataset

    cfg = DataConfig(format=args.format, path=args.input, user_col=args.user_col, item_col=args.item_col,
                     time_col=args.time_col or None, rating_col=args.rating_col, delimiter=args.delimiter,
                     kcore=args.kcore, kcore_passes=args.kcore_passes, synthetic=SyntheticConfig(seed=args.seed))
    ds = load_dataset(cfg)
    save_prepared(ds, args.out, meta={"source_format": args.format, "source": args.input, "kcore": args.kcore},
                  overwrite=args.overwrite)
    print(json.dumps({"out": args.out, **ds.describe()}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from genrec.config import load_config
    from genrec.evaluation import format_metrics_table
    from genrec.training import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    ks = tuple(cfg.eval.ks)
    print(f"\nTest metrics (full corpus, history excluded; best epoch {result.best_epoch}):")
    print(format_metrics_table({cfg.model.encoder: result.test, "popularity": result.popularity_test}, ks))
    print(f"\nrun dir:    {result.run_dir}")
    print(f"checkpoint: {result.run_dir / 'checkpoint_best.pt'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from genrec.checkpoint import load_checkpoint, model_from_checkpoint, similarity_from_checkpoint
    from genrec.config import apply_overrides, from_dict
    from genrec.data.sequences import leave_one_out
    from genrec.data.source import load_dataset
    from genrec.evaluation import evaluate_model, evaluate_popularity, format_metrics_table
    from genrec.training import select_device

    state = load_checkpoint(args.checkpoint)
    cfg = from_dict(apply_overrides(state["config"], args.overrides))
    device = select_device(cfg.train.device)
    model, _ = model_from_checkpoint(state, device)
    ds = load_dataset(cfg.data)
    if ds.num_items != model.num_items:
        raise ValueError(f"dataset has {ds.num_items} items but the checkpoint was trained on {model.num_items}")
    split = leave_one_out(ds)
    ks = tuple(cfg.eval.ks)
    similarity = similarity_from_checkpoint(state, device)
    rows = {cfg.model.encoder: evaluate_model(model, ds, split, args.stage, ks, cfg.eval.batch_size, cfg.eval.exclude_history,
                                              similarity=similarity),
            "popularity": evaluate_popularity(ds, split, args.stage, ks, exclude_history=cfg.eval.exclude_history)}
    print(json.dumps(rows, indent=2) if args.json else format_metrics_table(rows, ks))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from genrec.embedding_export import export_item_embeddings

    meta = export_item_embeddings(args.checkpoint, args.out)
    print(json.dumps(meta, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrec", description="Generative-recommender retrieval engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="raw interactions -> chronological per-user sequences + id map")
    prep.add_argument("--format", required=True,
                      help="ml-1m | ml-20m | ml-100k | recbole | csv | parquet | sasrec | synthetic")
    prep.add_argument("--input", help="raw file or directory (not needed for synthetic)")
    prep.add_argument("--out", required=True, help="output directory (written atomically)")
    prep.add_argument("--kcore", type=int, default=0, help="keep users/items with >= K events (0 = off)")
    prep.add_argument("--kcore-passes", type=int, default=0, help="0 = until stable, 1 = one pass")
    prep.add_argument("--user-col", default="user_id")
    prep.add_argument("--item-col", default="item_id")
    prep.add_argument("--time-col", default="timestamp", help="empty string for no timestamps")
    prep.add_argument("--rating-col", default=None)
    prep.add_argument("--delimiter", default=",")
    prep.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    prep.add_argument("--overwrite", action="store_true")
    prep.set_defaults(func=cmd_data_prepare)

    tr = sub.add_parser("train", help="train an encoder (HSTU or SASRec) and evaluate it")
    tr.add_argument("--config", required=True)
    tr.add_argument("--resume", help="checkpoint_last.pt of an interrupted run")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_overrides(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="full-corpus evaluation of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--stage", choices=["valid", "test"], default="test")
    ev.add_argument("--json", action="store_true")
    _add_overrides(ev)
    ev.set_defaults(func=cmd_eval)

    em = sub.add_parser("embed", help="export item embeddings + ids for index builds")
    em.add_argument("--checkpoint", required=True)
    em.add_argument("--out", required=True, help="items.npy (ids go to items.ids.npy, metadata to items.json)")
    em.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from genrec.data.loaders import DataFormatError

    try:
        return args.func(args)
    except (ConfigError, DataFormatError, CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"genrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
