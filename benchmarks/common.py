"""Shared helpers for benchmark scripts: provenance, result writing, the ML-100K fixture."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from genrec.io import atomic_write_csv, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / ".data"
ML100K = DATA / "ml-100k" / "ml-100k.inter"


def provenance() -> dict:
    """Device, date and command line, stored beside every committed figure."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "python": platform.python_version(), "torch": torch.__version__}


def ensure_ml100k() -> Path:
    """ML-100K as shipped inside the recbole 1.2.1 wheel (MovieLens terms forbid committing it)."""
    if ML100K.is_file():
        return ML100K
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, "recbole==1.2.1"], check=True)
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read("recbole/dataset_example/ml-100k/ml-100k.inter")
    ML100K.parent.mkdir(parents=True, exist_ok=True)
    ML100K.write_bytes(data)
    return ML100K


def write_table(rows: list[dict], stem: str, meta: dict) -> None:
    """rows -> results/<stem>.csv, .md and .json (with provenance)."""
    atomic_write_csv(RESULTS / f"{stem}.csv", rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"<!-- {json.dumps(meta)} -->", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    md += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md) + "\n")
    atomic_write_json(RESULTS / f"{stem}.json", {"meta": meta, "rows": rows})
