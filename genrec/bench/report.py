"""Benchmark results as people compare them: CSV + Markdown + JSON with provenance, and plots."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from genrec.io import atomic_write_csv, atomic_write_json, atomic_write_text


def provenance() -> dict:
    """Device, date and command line, stored beside every committed figure."""
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "python": platform.python_version(), "torch": torch.__version__}


def write_table(rows: list[dict], out_dir: str | Path, stem: str, meta: dict) -> Path:
    """rows -> <out_dir>/<stem>.csv, .md and .json (with provenance); returns the .md path."""
    out_dir = Path(out_dir)
    atomic_write_csv(out_dir / f"{stem}.csv", rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"<!-- {json.dumps(meta)} -->", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    md += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    atomic_write_text(out_dir / f"{stem}.md", "\n".join(md) + "\n")
    atomic_write_json(out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
    return out_dir / f"{stem}.md"


def random_unit(rng, n: int, d: int):
    """(n, d) float32 rows drawn uniformly on the unit sphere (synthetic items / queries)."""
    x = rng.standard_normal((n, d)).astype("float32")
    return x / ((x * x).sum(1, keepdims=True) ** 0.5)


def harness_parser(name: str, doc: str | None, topic: str) -> argparse.ArgumentParser:
    """The argparse of ``genrec bench <name>``: its docstring as help, and ``--out-dir`` for the tables and
    plots (default runs/bench/<topic>; committed figures live in benchmarks/results/<topic>/)."""
    ap = argparse.ArgumentParser(prog=f"genrec bench {name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=f"runs/bench/{topic}",
                    help=f"where tables and plots go (default runs/bench/{topic}; commit under benchmarks/results/{topic}/)")
    return ap
