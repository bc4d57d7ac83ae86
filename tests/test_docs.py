"""The documents cite files that exist: every ``folder/file.py`` (or .md, .yaml, .proto, .sh) path named in
README.md, ARCHITECTURE.md, docs/ and benchmarks/README.md is a file of the checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "ARCHITECTURE.md", "benchmarks/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./<{*-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|yaml|proto|sh))\b")


def cited_paths(text: str) -> set[str]:
    return {m.group(1) for m in PATH.finditer(text)}


def test_the_path_pattern_finds_what_a_reader_would_follow():
    text = "see `index/spec.py::IndexSpec`, kernels/dispatch.py and (benchmarks/results/quality/x.md); not a.py"
    assert cited_paths(text) == {"index/spec.py", "kernels/dispatch.py", "benchmarks/results/quality/x.md"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_path_exists(doc):
    text = (ROOT / doc).read_text()
    base = ROOT / Path(doc).parent
    missing = sorted(p for p in cited_paths(text)
                     if not (ROOT / p).is_file() and not (base / p).is_file() and not (ROOT / "benchmarks/results" / p).is_file())
    assert not missing, f"{doc} cites files that do not exist: {missing}"
    assert len(text.splitlines()) <= 250 or doc != "README.md", "README.md is for users: keep it to ~250 lines"
