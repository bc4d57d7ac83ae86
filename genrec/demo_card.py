"""The serving half of ``make demo-card`` (the whole card): start ``genrec serve`` with the encoder, the ranker and two indexes over
the same items (a MoL h-indexer and flat MIPS over the item embeddings), ask it for users' top-k over gRPC
and print what the card promises:

- recall@k of the h-indexer against exact MoL (the same index searched with ``exact``),
- SearchByUser latency of the h-indexer against flat MIPS (client-measured, the same server),
- HR@k of retrieval alone against retrieval + ranking (``rerank``) on each user's held-out last item.

Then shut the server down cleanly.

    python -m genrec.demo_card --index runs/demo-mol/indexes/demo --mips-index runs/demo-mol/indexes/demo-mips \
        --checkpoint runs/demo-mol/checkpoint_best.pt --ranker runs/demo-mol-ranking/checkpoint_best.pt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.data.source import load_dataset
from genrec.demo import stop_server, wait_for_port
from genrec.serving.client import GenrecClient


def held_out_users(checkpoint: str, count: int):
    """The first ``count`` users of the checkpoint's data: raw-id histories without their last event, its
    timestamps (or None), and the held-out last item of each."""
    state = load_checkpoint(checkpoint)
    _, cfg = model_from_checkpoint(state)
    ds = load_dataset(cfg.data)
    raw_ids = np.asarray(state["item_ids"])
    histories, times, targets = [], [], []
    for u in range(min(count, ds.num_users)):
        lo, hi = int(ds.offsets[u]), int(ds.offsets[u + 1])
        histories.append(raw_ids[ds.items[lo : hi - 1] - 1].tolist())
        targets.append(int(raw_ids[ds.items[hi - 1] - 1]))
        if ds.timestamps is not None:
            times.append(ds.timestamps[lo : hi - 1].tolist())
    return histories, (times or None), targets


def timed(call):
    t = time.perf_counter()
    reply = call()
    return reply, (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="the mol-hindexer index directory (<root>/<name>)")
    ap.add_argument("--mips-index", required=True, help="flat MIPS over the same items' embeddings")
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint for SearchByUser")
    ap.add_argument("--ranker", required=True, help="ranking checkpoint for SearchByUser's rerank")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100)
    args = ap.parse_args(argv)

    cfg_path = Path(args.checkpoint).parent / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"port": 0, "metrics_port": -1, "encoder_checkpoint": str(args.checkpoint),
                                        "ranking_checkpoint": str(args.ranker),
                                        "indexes": [{"name": "mol", "path": str(args.index)},
                                                    {"name": "mips", "path": str(args.mips_index)}]}))
    proc = subprocess.Popen([sys.executable, "-m", "genrec", "serve", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        port = wait_for_port(proc)
        histories, times, targets = held_out_users(args.checkpoint, args.users)
        k = args.k
        recall, hits, hits_ranked, lat_mol, lat_mips, lat_ranked = [], [], [], [], [], []
        with GenrecClient(f"127.0.0.1:{port}") as client:
            for name in ("mol", "mips"):
                info = client.info(index=name)
                print(f"server: index {info.index}@{info.version} ({info.kind}, {info.count} items, dim {info.dim})")
            for i, h in enumerate(histories):
                ts = times[i] if times else None
                got, ms = timed(lambda: client.search_by_user(h, k, timestamps=ts, index="mol", timeout=10))
                lat_mol.append(ms)
                exact = client.search_by_user(h, k, timestamps=ts, index="mol", exact=True, timeout=10)
                lat_mips.append(timed(lambda: client.search_by_user(h, k, timestamps=ts, index="mips", timeout=10))[1])
                ranked, ms = timed(lambda: client.search_by_user(h, k, timestamps=ts, index="mol", rerank=args.rerank,
                                                                 timeout=10))
                lat_ranked.append(ms)
                if i == 0:
                    print(f"user 0 history (last 5): {h[-5:]} -> top-{k}: {got.ids[0].tolist()}, "
                          f"reranked: {ranked.ids[0].tolist()}")
                recall.append(len(set(got.ids[0].tolist()) & set(exact.ids[0].tolist())) / k)
                hits.append(targets[i] in got.ids[0])
                hits_ranked.append(targets[i] in ranked.ids[0])
        p50 = lambda xs: float(np.percentile(xs, 50))  # noqa: E731
        se = np.sqrt(np.mean(hits) * (1 - np.mean(hits)) / len(histories))
        report = [f"{len(histories)} users over gRPC (SearchByUser; latencies client-measured, p50):",
                  f"  h-indexer recall@{k} vs exact MoL: {np.mean(recall):.4f}",
                  f"  latency: MoL h-indexer {p50(lat_mol):.2f} ms, flat MIPS over the same items {p50(lat_mips):.2f} ms "
                  f"({p50(lat_mol) / p50(lat_mips):.2f}x), with rerank {args.rerank} {p50(lat_ranked):.2f} ms",
                  f"  held-out last item HR@{k}: retrieval {np.mean(hits):.4f}, retrieval + ranking (M-FALCON over "
                  f"{args.rerank}) {np.mean(hits_ranked):.4f} ({len(histories)} users: a standard error of ~{se:.3f})"]
        print("\n" + "\n".join(report))
    finally:
        code = stop_server(proc)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
