"""Regenerate the committed gRPC code from ``genrec.proto`` (needs grpcio-tools, pinned in the test
extra so the output is byte-identical; a test checks the committed files are current).

    python -m genrec.serving.codegen          # rewrites serving/genrec_pb2.py and genrec_pb2_grpc.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("genrec_pb2.py", "genrec_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile genrec.proto as ``genrec/serving/genrec.proto`` so imports read ``genrec.serving``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "genrec" / "serving"
        pkg.mkdir(parents=True)
        shutil.copy(HERE / "genrec.proto", pkg / "genrec.proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          str(pkg / "genrec.proto")])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(pkg / name, out_dir / name)) for name in GENERATED]


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
