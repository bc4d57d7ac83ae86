"""The package's layers import downward only (every import, including those inside functions).

    base (config, io, version)  <-  kernels  <-  encoders + retrieval  <-  checkpoint (model loading)
    <-  index  <-  serving  <-  app (data, training, evaluation, CLI, benchmarks)

A module may import its own layer and any layer below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"kernels": "genrec.kernels", "encoders": "genrec.encoders", "retrieval": "genrec.retrieval",
           "index": "genrec.index", "serving": "genrec.serving", "genrec": "genrec"}
LAYERS = [  # lowest first: (layer, module prefixes)
    ("base", ("genrec.config", "genrec.io")),
    ("kernels", ("genrec.kernels",)),
    ("models", ("genrec.encoders", "genrec.retrieval")),
    ("checkpoint", ("genrec.checkpoint",)),
    ("index", ("genrec.index",)),
    ("serving", ("genrec.serving",)),
    ("app", ("genrec",)),  # everything else in the package
]


def layer_of(module: str) -> int:
    if module == "genrec":
        return 0  # the package root holds only the version
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"no layer for {module}")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (its folders are mapped by
    pyproject's package-dir)."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported genrec module) for every import statement, at any depth."""
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            if base in ("genrec",) or base.endswith((".kernels", ".encoders", ".retrieval", ".index", ".serving")):
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "genrec" or name.startswith("genrec.")]


def test_every_module_has_a_layer():
    mods = modules()
    assert "genrec.kernels.dispatch" in mods and "genrec.serving.server" in mods and "genrec.cli" in mods
    for name in mods:
        layer_of(name)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_downward(module):
    path = modules()[module]
    own = layer_of(module)
    known = modules()
    upward = []
    for line, target in imports(path, module):
        if target not in known and target.rsplit(".", 1)[0] in known:
            target = target.rsplit(".", 1)[0]  # "from genrec.x import name": the module is genrec.x
        if target not in known:
            continue  # a name re-exported by a package, checked as its package
        if layer_of(target) > own:
            upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({LAYERS[layer_of(target)][0]} "
                          f"is above {LAYERS[own][0]})")
    assert not upward, "\n".join(upward)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from genrec.serving.server import serve\n    return serve\n")
    assert (2, "genrec.serving.server") in imports(src, "genrec.kernels.m")
