"""The serving half of ``make demo``: start ``genrec serve`` on a built index, query it over gRPC,
compare with exact MIPS in-process, shut it down cleanly.

    python -m genrec.demo --index runs/demo/indexes/demo --checkpoint runs/demo/checkpoint_best.pt
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from genrec.checkpoint import load_checkpoint, model_from_checkpoint
from genrec.data.source import load_dataset
from genrec.index.mips import FlatMIPS
from genrec.serving.client import GenrecClient
from genrec.serving.user_encoder import UserEncoder


def wait_for_port(proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """Read the server's stdout until it says where it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"genrec serve exited with code {proc.returncode}")
            continue
        print(f"  [server] {line.rstrip()}")
        if "serving on" in line:
            return int(line.rsplit(":", 1)[1])
    raise TimeoutError("genrec serve did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (graceful drain), kill after 30 s; echo what it printed last; its exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    for line in proc.stdout:
        print(f"  [server] {line.rstrip()}")
    print(f"server shut down (exit code {code})")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="index directory (<root>/<name> or a version dir)")
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint for SearchByUser")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)


    run_dir = Path(args.checkpoint).parent
    cfg_path = run_dir / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"port": 0, "indexes": [{"name": "demo", "path": str(args.index)}],
                                        "encoder_checkpoint": str(args.checkpoint), "metrics_port": -1}))
    proc = subprocess.Popen([sys.executable, "-m", "genrec", "serve", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        port = wait_for_port(proc)
        _, cfg = model_from_checkpoint(load_checkpoint(args.checkpoint))
        ds = load_dataset(cfg.data)
        raw_ids = np.asarray(load_checkpoint(args.checkpoint)["item_ids"])
        users = np.arange(min(args.users, ds.num_users))
        histories = [raw_ids[ds.items[ds.offsets[u] : ds.offsets[u + 1]] - 1].tolist() for u in users]
        times = ([ds.timestamps[ds.offsets[u] : ds.offsets[u + 1]].tolist() for u in users]
                 if ds.timestamps is not None else None)
        encoder = UserEncoder(args.checkpoint)
        exact = FlatMIPS(encoder.model.item_embeddings()[1:].detach(), raw_ids)
        got, lat = [], []
        with GenrecClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            print(f"\nserver: index {info.index}@{info.version} ({info.kind}, {info.count} items, dim {info.dim})")
            for i, h in enumerate(histories):
                t = time.perf_counter()
                r = client.search_by_user(h, args.k, timestamps=times[i] if times else None, timeout=10)
                lat.append((time.perf_counter() - t) * 1e3)
                got.append(r.ids[0])
        states = encoder.encode(histories, times, [None] * len(histories) if times else None).states
        _, want = exact.search(states, args.k, exclude=histories)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(got, want)])
        print(f"user 0 history (last 5): {histories[0][-5:]} -> top-{args.k} over gRPC: {got[0].tolist()}")
        print(f"SearchByUser over gRPC for {len(users)} users: recall@{args.k} vs exact MIPS {recall:.4f}, "
              f"latency p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms (client-measured)")
    finally:
        code = stop_server(proc)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
