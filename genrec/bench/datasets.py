"""Benchmark data: the repository root the harnesses resolve configs against, and the ML-100K fixture."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/, benchmarks/)
DATA = ROOT / "benchmarks" / ".data"
ML100K = DATA / "ml-100k" / "ml-100k.inter"


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
