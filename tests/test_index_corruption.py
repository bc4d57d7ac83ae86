"""Every kind of damage, to every index kind, refused by every consumer: the loader (size and full
verification), `genrec verify-index` (exit 2, never "ok") and a live server's LoadIndex (a documented
status code, the old version still serving). Damages either break the manifest's word (sizes, hashes)
or keep the manifest consistent (rehashed) so that only the loader's own checks can catch them."""

import hashlib
import json
import shutil

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.cli import main as cli
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FaissMIPS, FlatMIPS
from genrec.index.storage import IndexFormatError, load_index, save_index
from genrec.retrieval.mol import MixtureOfLogits
from genrec.serving.client import GenrecClient
from genrec.serving.config import IndexEntry, ServeConfig
from genrec.serving.server import RetrievalServer


def build_kinds(root):
    torch.manual_seed(0)
    items = F.normalize(torch.randn(300, 16), dim=-1)
    mol = MixtureOfLogits(16, 16, 4, 3, 8, 32, 16).eval()
    return {
        "mips": save_index(FlatMIPS(items, np.arange(300) + 10), root, "mips", "v1"),
        "mips-faiss": save_index(FaissMIPS.build(items.numpy(), "HNSW16", np.arange(300) + 10), root, "hnsw", "v1"),
        "mol-hindexer": save_index(MoLHIndexer.build(mol, items, stage1="pca6", stage1_dtype="int8", kprime=100,
                                                     cache_dtype="bfloat16"), root, "mol", "v1"),
    }


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path, m):
    (path / "manifest.json").write_text(json.dumps(m))


def rehash(path):
    """Make the manifest agree with the files as they now are (bytes, sha256, shape, dtype)."""
    m = manifest(path)
    for f in m["files"]:
        p = path / f["path"]
        if not p.is_file():
            continue
        f["bytes"], f["sha256"] = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
        if "shape" in f:
            a = np.load(p, allow_pickle=True)
            f["shape"], f["dtype"] = list(a.shape), a.dtype.str
    write_manifest(path, m)


def largest_array(path):
    return max((path / f["path"] for f in manifest(path)["files"] if "shape" in f), key=lambda p: p.stat().st_size)


def flip_byte(path):
    p = largest_array(path)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))


def truncate(path):
    p = largest_array(path)
    p.write_bytes(p.read_bytes()[:-64])


def edit_manifest(**change):
    return lambda path: write_manifest(path, {**manifest(path), **change})


def escape_version(path):
    """A file entry pointing into a sibling version, its own copy deleted."""
    sibling = path.parent / "v0"
    shutil.copytree(path, sibling)
    m = manifest(path)
    m["files"][0]["path"] = f"../v0/{m['files'][0]['path']}"
    (path / manifest(path)["files"][0]["path"]).unlink()
    write_manifest(path, m)


def non_finite(path):
    """A NaN where the search reads vectors: float32 items, bf16 bits (0x7FC0), or a faiss-stored vector."""
    kind = manifest(path)["kind"]
    if kind == "mips":
        a = np.load(path / "items.npy")
        a[7, 3] = np.nan
        np.save(path / "items.npy", a)
    elif kind == "mol-hindexer":
        a = np.load(path / "mol_components.npy")
        a.reshape(-1)[11] = np.int16(0x7FC0)
        np.save(path / "mol_components.npy", a)
    else:
        import faiss

        index = faiss.deserialize_index(np.fromfile(path / "faiss.index", dtype=np.uint8))
        x = index.reconstruct_n(0, index.ntotal)
        x[5, 2] = np.inf
        rebuilt = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        rebuilt.add(x)
        faiss.serialize_index(rebuilt).tofile(path / "faiss.index")
    rehash(path)


def duplicate_ids(path):
    ids = np.load(path / "ids.npy")
    ids[-1] = ids[0]
    np.save(path / "ids.npy", ids)
    rehash(path)


def fewer_ids(path):
    np.save(path / "ids.npy", np.load(path / "ids.npy")[:-3])
    rehash(path)


def pickled_ids(path):
    np.save(path / "ids.npy", np.array([str(i) for i in np.load(path / "ids.npy")], dtype=object), allow_pickle=True)
    rehash(path)


def damaged_blob(path):
    blob = next(path / f["path"] for f in manifest(path)["files"] if "shape" not in f)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    rehash(path)


# name -> (damage, kinds it applies to, the verify modes that must refuse it)
ALL, SIZE_AND_FULL = ("mips", "mips-faiss", "mol-hindexer"), ("size", "full")
DAMAGES = {
    "flipped byte": (flip_byte, ALL, ("full",)),
    "truncated array": (truncate, ALL, SIZE_AND_FULL),
    "missing file": (lambda p: (p / manifest(p)["files"][-1]["path"]).unlink(), ALL, SIZE_AND_FULL),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), ALL, SIZE_AND_FULL),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{not json"), ALL, SIZE_AND_FULL),
    "newer format": (edit_manifest(format_version=99), ALL, SIZE_AND_FULL),
    "unknown kind": (edit_manifest(kind="mystery"), ALL, SIZE_AND_FULL),
    "empty file list": (edit_manifest(files=[]), ALL, SIZE_AND_FULL),
    "count mismatch": (lambda p: write_manifest(p, {**manifest(p), "count": manifest(p)["count"] + 1}), ALL, SIZE_AND_FULL),
    "path outside the version": (escape_version, ALL, SIZE_AND_FULL),
    "NaN or Inf vector (rehashed)": (non_finite, ALL, SIZE_AND_FULL),
    "duplicate ids (rehashed)": (duplicate_ids, ALL, SIZE_AND_FULL),
    "ids shape mismatch (rehashed)": (fewer_ids, ALL, SIZE_AND_FULL),
    "pickled ids (rehashed)": (pickled_ids, ALL, SIZE_AND_FULL),
    "damaged blob (rehashed)": (damaged_blob, ("mips-faiss", "mol-hindexer"), SIZE_AND_FULL),
}
CASES = [(kind, name) for name, (_, kinds, _) in DAMAGES.items() for kind in kinds]


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """Every (kind, damage) as its own damaged copy of the kind's good version."""
    root = tmp_path_factory.mktemp("corrupt")
    good = build_kinds(root / "good")
    out = {}
    for i, (kind, name) in enumerate(CASES):
        path = root / "bad" / f"case{i}" / "v1"
        shutil.copytree(good[kind], path)
        DAMAGES[name][0](path)
        out[kind, name] = path
    return good, out


def test_the_good_versions_load_and_the_matrix_covers_every_kind(corrupted):
    good, bad = corrupted
    for kind, path in good.items():
        assert load_index(path, verify="full")[1]["kind"] == kind
    assert len(bad) == len(CASES) >= 40


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}: {n}" for k, n in CASES])
def test_the_loader_and_verify_index_refuse_every_damage(corrupted, kind, name, capsys):
    path = corrupted[1][kind, name]
    for mode in DAMAGES[name][2]:
        with pytest.raises(IndexFormatError):
            load_index(path, verify=mode)
        assert cli(["verify-index", str(path), "--mode", mode]) == 2
        out = capsys.readouterr()
        assert "ok" not in out.out and out.err.strip()


def test_a_live_server_refuses_every_damaged_version_and_keeps_serving_the_old_one(corrupted):
    good, bad = corrupted
    names = {"mips": "m", "mips-faiss": "h", "mol-hindexer": "mol"}
    srv = RetrievalServer(ServeConfig(port=0, admin_token="t", indexes=tuple(
        IndexEntry(names[k], str(p)) for k, p in good.items()))).start()
    try:
        with GenrecClient(f"127.0.0.1:{srv.port}", token="t") as c:
            q = F.normalize(torch.randn(2, 16), dim=-1).numpy()
            before = {n: c.search(q, 5, index=n) for n in names.values()}
            codes = {}
            for (kind, name), path in bad.items():
                with pytest.raises(grpc.RpcError) as err:
                    c.load_index(names[kind], str(path), verify="full")
                codes[kind, name] = err.value.code()
                assert err.value.details() and len(err.value.details()) <= 600
            assert set(codes.values()) <= {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
                                           grpc.StatusCode.FAILED_PRECONDITION}, codes
            for n, (scores, ids) in before.items():
                again = c.search(q, 5, index=n)
                np.testing.assert_array_equal(again[1], ids)
                assert c.info(n).path == str(good[next(k for k, v in names.items() if v == n)])
    finally:
        srv.stop(grace=1)
