"""``genrec`` command line: data prepare, train, eval, embed, build-index, update-index, compact-index,
verify-index, merge-index, search, serve, query, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from genrec.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, similarity_from_checkpoint
from genrec.config import (ConfigError, DataConfig, SyntheticConfig, apply_overrides, check_config, from_dict, load_config,
                           load_dataclass)
from genrec.data.loaders import DataFormatError
from genrec.data.published import PUBLISHED, ensure_dataset
from genrec.data.sequences import leave_one_out, save_prepared
from genrec.data.source import load_dataset
from genrec.embedding_export import export_item_embeddings
from genrec.evaluation import evaluate_popularity, format_metrics_table, model_target_ranks, per_user_rank_rows
from genrec.index.attributes import read_attributes
from genrec.index.build import build, describe, eval_summary, exact_reference, load_mol, proxy_queries, read_items
from genrec.index.sharding import merge_shards, shard_range, shard_version
from genrec.index.spec import from_mapping, load_spec, parse_spec
from genrec.index.storage import latest_version, load_index, read_manifest, save_index
from genrec.io import atomic_write_csv
from genrec.ranking_training import evaluate_ranking_checkpoint, format_paired, train_ranking
from genrec.retrieval.metrics import metrics_from_ranks
from genrec.trainer import select_device
from genrec.training import train

# genrec.serving loads lazily: it needs grpc, which `genrec bench kernels` on a bare GPU image may lack.
log = logging.getLogger("genrec")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = DataConfig(format=args.format, path=args.input, user_col=args.user_col, item_col=args.item_col,
                     time_col=args.time_col or None, rating_col=args.rating_col, delimiter=args.delimiter,
                     kcore=args.kcore, kcore_passes=args.kcore_passes, synthetic=SyntheticConfig(seed=args.seed))
    ds = load_dataset(check_config(cfg, "data"))
    save_prepared(ds, args.out, meta={"source_format": args.format, "source": args.input, "kcore": args.kcore},
                  overwrite=args.overwrite)
    print(json.dumps({"out": args.out, **ds.describe()}, indent=2))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    path = ensure_dataset(args.name, args.data_dir)
    print(json.dumps({"dataset": args.name, "path": str(path), "format": PUBLISHED[args.name].format}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.task == "ranking":
        return _train_ranking(cfg, args)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if result is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    ks = tuple(cfg.eval.ks)
    chosen = f"best epoch {result.best_epoch}" if cfg.train.validation else f"final weights, epoch {result.best_epoch}"
    print(f"\nTest metrics (full corpus, history excluded; {chosen}):")
    print(format_metrics_table({cfg.model.encoder: result.test, "popularity": result.popularity_test}, ks))
    print(f"\nrun dir:    {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _train_ranking(cfg, args: argparse.Namespace) -> int:
    r = train_ranking(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"\nRanking (best epoch {r.best_epoch}): test AUC {r.test['auc']:.4f}, logloss {r.test['logloss']:.4f} "
          f"(valid AUC {r.valid['auc']:.4f})")
    if r.two_stage:
        ks = tuple(k for k in cfg.eval.ks if k <= cfg.ranking.rerank_k)
        print(f"\nTwo-stage (retrieve top {cfg.ranking.rerank_k}, rerank), test:")
        print(format_metrics_table(r.two_stage, ks))
    print(f"\nrun dir:    {r.run_dir}")
    print(f"checkpoint: {r.run_dir / 'checkpoint_best.pt'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    cfg = from_dict(apply_overrides(state["config"], args.overrides))
    if cfg.task == "ranking":
        return _eval_ranking(state, cfg, args)
    device = select_device(cfg.train.device)
    model, _ = model_from_checkpoint(state, device)
    ds = load_dataset(cfg.data)
    if ds.num_items != model.num_items:
        raise ValueError(f"dataset has {ds.num_items} items but the checkpoint was trained on {model.num_items}")
    split = leave_one_out(ds, cfg.train.validation)
    ks = tuple(cfg.eval.ks)
    similarity = similarity_from_checkpoint(state, device)
    users, ranks = model_target_ranks(model, ds, split, args.stage, cfg.eval.batch_size, cfg.eval.exclude_history,
                                      similarity=similarity)
    if args.ranks_out:
        atomic_write_csv(args.ranks_out, per_user_rank_rows(ds, args.stage, users, ranks))
    rows = {cfg.model.encoder: metrics_from_ranks(torch.from_numpy(ranks), ks),
            "popularity": evaluate_popularity(ds, split, args.stage, ks, exclude_history=cfg.eval.exclude_history)}
    print(json.dumps(rows, indent=2) if args.json else format_metrics_table(rows, ks))
    return 0


def _eval_ranking(state: dict, cfg, args: argparse.Namespace) -> int:
    """A ranking checkpoint: AUC / logloss, and retrieval alone vs retrieval + ranking on the same users at each
    rerank depth, paired (95% bootstrap CI over users)."""
    if args.ranks_out:
        raise ValueError("--ranks-out is for retrieval checkpoints (a ranking run keeps two_stage_test_ranks.npz)")
    bad = [d for d in args.depths if d < 1]
    if bad:
        raise ValueError(f"--depths must be positive, got {bad}")
    depths = tuple(args.depths) or (cfg.ranking.rerank_k,)
    ranking, ranks = evaluate_ranking_checkpoint(state, cfg, args.stage, depths)
    ks = tuple(k for k in cfg.eval.ks if k <= max(depths))
    metrics, paired = ranks.metrics(ks), ranks.paired()
    if args.json:
        print(json.dumps({"ranking": ranking, "two_stage": metrics, "paired": paired}, indent=2))
        return 0
    print(f"Ranking ({args.stage}): AUC {ranking['auc']:.4f}, logloss {ranking['logloss']:.4f}")
    print(f"\nTwo-stage ({args.stage}, {len(ranks.users)} users; depths {', '.join(map(str, sorted(set(depths))))}):")
    print(format_metrics_table(metrics, ks))
    print("\nTwo-stage minus retrieval, paired over users:")
    print(format_paired(paired))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    meta = export_item_embeddings(args.checkpoint, args.out)
    print(json.dumps(meta, indent=2))
    return 0


def _index_path(args: argparse.Namespace):
    if args.path:
        return Path(args.path)
    if not args.name:
        raise ValueError("give an index directory or --name (with --root)")
    return Path(args.root) / args.name / args.version if args.version else latest_version(args.root, args.name)


def cmd_build_index(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec_file) if args.spec_file else parse_spec(args.spec)
    if args.overrides:
        spec = from_mapping({**spec.to_dict(), **dict(o.split("=", 1) for o in args.overrides)})
    sharded = args.num_shards is not None or args.shard_id is not None
    if sharded and (args.num_shards is None or args.shard_id is None or not args.version):
        raise ValueError("sharded builds need --shard-id, --num-shards and --version (shared by all shards)")
    inputs = read_items(args.embeddings, args.ids, args.checkpoint)
    mol = load_mol(args.checkpoint) if spec.type == "mol-hindexer" else None
    rows = shard_range(len(inputs.items), args.shard_id, args.num_shards) if sharded else None
    log.info("building %s over %d items%s", spec.describe(), (rows[1] - rows[0]) if rows else len(inputs.items),
             f" (shard {args.shard_id} of {args.num_shards})" if sharded else "")
    train_queries = np.load(args.train_queries_file, allow_pickle=False) if args.train_queries_file else None
    index = build(spec, inputs, mol, rows, progress=not args.no_progress, train_queries=train_queries)
    if args.metadata:
        index.attributes = read_attributes(args.metadata, index.external_ids())
    extra = {"spec": spec.to_dict(), "source": inputs.source,
             "encoder_checkpoint_sha256": inputs.source.get("checkpoint_sha256")}
    if args.eval_queries > 0 or args.eval_queries_file:
        queries = (np.load(args.eval_queries_file, allow_pickle=False) if args.eval_queries_file
                   else proxy_queries(inputs, args.eval_queries, index.dim, spec.seed))
        extra["eval"] = {**eval_summary(index, exact_reference(index, inputs, rows), queries), "queries_from": args.eval_queries_file or "item embeddings + noise"}
    version = args.version
    if sharded:
        extra["shard"] = {"id": args.shard_id, "num_shards": args.num_shards, "start": rows[0], "end": rows[1],
                          "total": len(inputs.items)}
        version = shard_version(args.version, args.shard_id, args.num_shards)
    path = save_index(index, args.root, args.name, version, extra, overwrite=args.overwrite)
    print(describe(read_manifest(path)))
    print(f"index: {path}")
    return 0


def read_id_list(value: str) -> np.ndarray:
    """``--remove``: a .npy of ids, a text file of one id per line, or a comma-separated list."""
    from genrec.retrieval.keys import as_ids

    path = Path(value)
    if path.suffix == ".npy" and path.is_file():
        return as_ids(np.load(path, allow_pickle=False), str(path))
    text = path.read_text().split() if path.is_file() else [x for x in value.split(",") if x.strip()]
    return as_ids(parse_item_ids(",".join(text)), value)


def cmd_update_index(args: argparse.Namespace) -> int:
    from genrec.index.delta import update_index

    if not args.add and not args.remove:
        raise ValueError("give --add (item vectors) and/or --remove (item ids)")
    items = ids = None
    if args.add:
        inputs = read_items(args.add, args.ids)
        items, ids = inputs.items, inputs.keys if inputs.keys is not None else inputs.ids
    path, stats = update_index(args.root, args.name, items, ids, read_id_list(args.remove) if args.remove else None,
                               args.from_version, args.version)
    print(json.dumps({"index": str(path), **stats, "count": read_manifest(path)["count"]}))
    return 0


def cmd_compact_index(args: argparse.Namespace) -> int:
    from genrec.index.delta import compact_index

    inputs = read_items(args.embeddings, args.ids, args.checkpoint) if args.embeddings or args.checkpoint else None
    path = compact_index(args.root, args.name, args.from_version, args.version, inputs, progress=not args.no_progress)
    print(describe(read_manifest(path)))
    print(f"index: {path}")
    return 0


def cmd_verify_index(args: argparse.Namespace) -> int:
    path = _index_path(args)
    _, manifest = load_index(path, args.mode)  # the loader's own checks, so "ok" means "loadable" (shards too)
    print(f"ok: {path} ({manifest['kind']}, {manifest['count']} items, {len(manifest['files'])} files, verify={args.mode})")
    return 0


def cmd_merge_index(args: argparse.Namespace) -> int:
    path = merge_shards(args.shards, args.root, args.name, args.version)
    print(describe(read_manifest(path)))
    print(f"index: {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    index, manifest = load_index(_index_path(args), args.verify)
    if args.queries:
        queries = np.load(args.queries, allow_pickle=False)
    else:
        rng = np.random.default_rng(args.seed)
        queries = rng.standard_normal((args.random, index.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    params = {"kprime": args.kprime} if args.kprime else {}
    r = index.search_with_certificate(queries, args.k, **params)
    for i in range(len(r.ids)):
        keep = r.ids[i] >= 0
        ids = r.ids[i][keep]
        print(json.dumps({"query": i, "ids": (index.keys.keys_of(ids) if index.keys is not None else ids).tolist(),
                          "scores": [round(float(x), 6) for x in r.scores[i][keep]], "exact": bool(r.exact[i])}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from genrec.serving.config import ServeConfig
    from genrec.serving.server import PortUnavailableError, serve

    overrides = list(args.overrides)
    if args.role:
        overrides.append(f"role={args.role}")
    if args.shards:
        overrides.append(f"broker.shards=[{', '.join(repr(t) for t in args.shards.split(','))}]")
    cfg = load_dataclass(ServeConfig, args.config, overrides)
    try:
        serve(cfg)
    except PortUnavailableError as e:
        print(f"genrec: error: {e}", file=sys.stderr)
        return 2
    return 0


def parse_item_ids(text: str, strings: bool = False) -> list[int] | list[str]:
    """``--history 12,7,99`` -> ints; ``sku-12,sku-7`` (or ``--string-ids``: ids that look numeric) -> strings."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not strings:
        try:
            return [int(x) for x in values]
        except ValueError:
            pass
    return values


def cmd_query(args: argparse.Namespace) -> int:
    import grpc
    from genrec.serving.client import GenrecClient

    with GenrecClient(args.target) as client:
        try:
            if args.history:
                history = parse_item_ids(args.history, args.string_ids)
                stamps = [int(x) for x in args.timestamps.split(",") if x.strip()] if args.timestamps else None
                if stamps is not None and len(stamps) != len(history):
                    print(f"genrec: error: --timestamps has {len(stamps)} values for {len(history)} history ids",
                          file=sys.stderr)
                    return 2
                replies = [client.search_by_user(history, args.k, stamps, index=args.index, timeout=args.timeout,
                                                 exact=args.exact, kprime=args.kprime, rerank=args.rerank)]
            else:
                queries = np.load(args.queries, allow_pickle=False)
                replies = [client.search_reply(queries, args.k, index=args.index, exact=args.exact, kprime=args.kprime,
                                               timeout=args.timeout)]
        except grpc.RpcError as e:
            print(f"genrec: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    for r in replies:
        for i in range(len(r.ids)):
            keep = r.ids[i] >= 0
            row = {"query": i, "ids": r.item_ids[i][keep].tolist(), "scores": [round(float(x), 6) for x in r.scores[i][keep]],
                   "exact": bool(r.exact[i]), "index": r.index, "version": r.version,
                   "total_ms": round(r.timing.total_ms, 3)}
            if r.unknown_ids:
                row["unknown_ids"] = r.unknown_ids
            print(json.dumps(row) if args.json else
                  f"query {i} ({r.index}@{r.version}, {r.timing.total_ms:.2f} ms): " +
                  ", ".join(f"{a}:{b:.4f}" for a, b in zip(row["ids"], row["scores"])) +
                  (f"  [unknown ids skipped: {', '.join(map(str, r.unknown_ids))}]" if r.unknown_ids else ""))
    return 0


BENCH_HARNESSES = {  # genrec bench <name> -> module of genrec.bench with main(argv)
    "retrieval": "retrieval", "retrieval-scale": "retrieval_scale", "flat-mips": "flat_mips", "kernels": "kernels",
    "attention": "attention", "serving": "serving", "broker": "broker", "soak": "soak", "ranking": "ranking",
    "ranking-quality": "ranking_quality", "two-stage": "two_stage", "train-quality": "train_quality", "paired": "paired",
    "epoch-speed": "epoch_speed", "train-step": "train_step", "filters": "filters",
}


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"genrec.bench.{BENCH_HARNESSES[args.harness]}")
    return module.main(args.bench_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrec", description="Generative-recommender retrieval engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="a published benchmark set (found in $GENREC_DATA_DIR or ../shared/data, "
                            "checked, decompressed into data/)")
    fetch.add_argument("name", choices=sorted(PUBLISHED))
    fetch.add_argument("--data-dir", default="data")
    fetch.set_defaults(func=cmd_data_fetch)
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
    ev.add_argument("--ranks-out", metavar="CSV", help="also write each user's target rank (user, target, rank; 1 = first), "
                                                        "e.g. for paired comparisons of two models")
    ev.add_argument("--depths", type=int, nargs="+", default=[],
                    help="a ranking checkpoint: rerank depths to report (default: its rerank_k)")
    _add_overrides(ev)
    ev.set_defaults(func=cmd_eval)

    em = sub.add_parser("embed", help="export item embeddings + ids for index builds")
    em.add_argument("--checkpoint", required=True)
    em.add_argument("--out", required=True, help="items.npy (ids go to items.ids.npy, metadata to items.json)")
    em.set_defaults(func=cmd_embed)

    bi = sub.add_parser("build-index", help="build an index from item embeddings or a checkpoint (atomic, with manifest)")
    bi.add_argument("--name", required=True)
    bi.add_argument("--root", default="indexes", help="indexes live in <root>/<name>/<version>/")
    bi.add_argument("--version", help="default: the next vN")
    spec = bi.add_mutually_exclusive_group()
    spec.add_argument("--spec", default="mol-hindexer",
                      help="e.g. 'mol-hindexer:stage1=pca16,stage1_dtype=int8,kprime=20000' or 'mips:factory=HNSW32'")
    spec.add_argument("--spec-file", help="the same as a YAML mapping")
    bi.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one spec field (repeatable)")
    bi.add_argument("--embeddings", help="items.npy from `genrec embed` (ids from items.ids.npy) or a .parquet (id, embedding)")
    bi.add_argument("--ids", help="int64 ids .npy (default: beside the embeddings, else 0..N-1)")
    bi.add_argument("--checkpoint", help="trained checkpoint: item embeddings if --embeddings is absent; MoL weights")
    bi.add_argument("--shard-id", type=int)
    bi.add_argument("--num-shards", type=int)
    bi.add_argument("--eval-queries", type=int, default=64, help="held-out queries for the manifest's recall summary (0 = skip)")
    bi.add_argument("--eval-queries-file", help="(nq, D) float32 .npy of real query states for that summary")
    bi.add_argument("--train-queries-file", help="(m, D) float32 .npy of query states a learned stage 1 is distilled on "
                                                 "(default: noisy copies of sampled items)")
    bi.add_argument("--metadata", help="item attributes for query-time `where` filters: a .parquet or .csv with an "
                                       "`id` column and categorical columns (category, brand, in_stock, ...)")
    bi.add_argument("--overwrite", action="store_true")
    bi.add_argument("--no-progress", action="store_true")
    bi.set_defaults(func=cmd_build_index)

    up = sub.add_parser("update-index", help="add and remove items without a rebuild: a new version = the base "
                        "+ a delta segment + tombstones (flat and mol-hindexer indexes)")
    up.add_argument("--name", required=True)
    up.add_argument("--root", default="indexes")
    up.add_argument("--from-version", help="the version to update (default: the latest)")
    up.add_argument("--version", help="the new version (default: the next vN)")
    up.add_argument("--add", metavar="ITEMS", help="vectors of new or changed items: items.npy from `genrec embed` "
                                                  "(ids beside it) or a .parquet (id, embedding)")
    up.add_argument("--ids", help="ids .npy for --add (default: beside it)")
    up.add_argument("--remove", metavar="IDS", help="item ids to stop serving: a comma list, a text file (one per "
                                                   "line) or a .npy")
    up.set_defaults(func=cmd_update_index)

    co = sub.add_parser("compact-index", help="rebuild an updated version's live items into an ordinary version")
    co.add_argument("--name", required=True)
    co.add_argument("--root", default="indexes")
    co.add_argument("--from-version", help="default: the latest")
    co.add_argument("--version", help="default: the next vN")
    co.add_argument("--embeddings", help="mol-hindexer: the items' embeddings (default: the base build's source)")
    co.add_argument("--ids")
    co.add_argument("--checkpoint")
    co.add_argument("--no-progress", action="store_true")
    co.set_defaults(func=cmd_compact_index)

    def index_location(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", nargs="?", help="index directory (or use --name [--version] [--root])")
        p.add_argument("--name")
        p.add_argument("--version", help="default: the latest complete version")
        p.add_argument("--root", default="indexes")

    vi = sub.add_parser("verify-index", help="check an index directory against its manifest")
    index_location(vi)
    vi.add_argument("--mode", choices=["full", "size"], default="full", help="full: sha256 of every file; size: sizes + headers")
    vi.set_defaults(func=cmd_verify_index)

    mi = sub.add_parser("merge-index", help="combine shard builds into one logical index")
    mi.add_argument("shards", nargs="+", help="shard directories (<name>/<version>.shard-i-of-n)")
    mi.add_argument("--name", required=True)
    mi.add_argument("--version", required=True)
    mi.add_argument("--root", default="indexes")
    mi.set_defaults(func=cmd_merge_index)

    se = sub.add_parser("search", help="ad-hoc top-k queries against an index (JSON lines)")
    index_location(se)
    se.add_argument("--k", type=int, default=10)
    src = se.add_mutually_exclusive_group()
    src.add_argument("--queries", help="(nq, D) float32 .npy of query states")
    src.add_argument("--random", type=int, default=1, help="N random unit queries (smoke test)")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--kprime", type=int, default=0, help="h-indexer K' for this search (0 = the index's)")
    se.add_argument("--verify", choices=["full", "size", "none"], default="size")
    se.set_defaults(func=cmd_search)

    sv = sub.add_parser("serve", help="serve indexes over gRPC (health, reflection, metrics, hot swap)")
    sv.add_argument("--config", help="serve.yaml (fields of genrec/serving/config.py::ServeConfig)")
    sv.add_argument("--role", choices=["server", "broker"], help="broker: fan out to --shards (default: server)")
    sv.add_argument("--shards", help="broker: comma-separated host:port of the shard servers")
    _add_overrides(sv)
    sv.set_defaults(func=cmd_serve)

    qu = sub.add_parser("query", help="gRPC client: top-k for query vectors or a user history")
    qu.add_argument("--target", default="127.0.0.1:50051")
    qu.add_argument("--index", default="")
    qu.add_argument("--k", type=int, default=10)
    src = qu.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", help="(nq, D) float32 .npy")
    src.add_argument("--history", help="comma-separated raw item ids, oldest first (server-side encoding)")
    qu.add_argument("--timestamps", help="with --history: comma-separated unix seconds, one per history id")
    qu.add_argument("--string-ids", action="store_true",
                    help="send --history as string ids even when they look like numbers (e.g. 00123)")
    qu.add_argument("--exact", action="store_true")
    qu.add_argument("--kprime", type=int, default=0)
    qu.add_argument("--rerank", type=int, default=0,
                    help="with --history: retrieve this many, rescore them with the server's ranking stage, keep k")
    qu.add_argument("--timeout", type=float, default=30.0)
    qu.add_argument("--json", action="store_true")
    qu.set_defaults(func=cmd_query)

    be = sub.add_parser("bench", help="benchmarks (CSV/Markdown/JSON/PNG under runs/bench/<topic> unless --out-dir): "
                        "`genrec bench <harness> --help`")
    be.add_argument("harness", choices=list(BENCH_HARNESSES))
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the harness")
    be.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it narrates every SIMD variant it tries

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
