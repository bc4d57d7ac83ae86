"""Adding and removing items without a rebuild: base + delta + tombstones searches like a rebuild."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.index.build import ItemInputs, build
from genrec.index.delta import DeltaIndex, compact_index, update_index
from genrec.index.hindexer import MoLHIndexer
from genrec.index.mips import FlatMIPS
from genrec.index.spec import parse_spec
from genrec.index.storage import IndexFormatError, load_index, save_index
from genrec.retrieval.mol import MixtureOfLogits
from genrec.retrieval.search import MoLSearcher
from genrec.serving.client import GenrecClient
from genrec.serving.config import IndexEntry, ServeConfig
from genrec.serving.server import RetrievalServer

DIM = 8


def vectors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, DIM, generator=g), dim=-1).numpy()


def live_after(base_items, base_ids, changes):
    """The catalog a rebuild would index: {id: vector} after applying (op, ids, vectors) in order."""
    live = dict(zip(base_ids.tolist(), base_items))
    for op, ids, vecs in changes:
        for j, i in enumerate(ids):
            if op == "add":
                live[i] = vecs[j]
            else:
                live.pop(i, None)
    ids = np.array(sorted(live), dtype=np.int64)
    return np.stack([live[i] for i in ids]), ids


def assert_same_answers(index, rebuilt, q, k, **params):
    a, b = index.search_with_certificate(q, k, **params), rebuilt.search_with_certificate(q, k, **params)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_a_flat_index_updated_twice_answers_like_a_rebuild_and_compacts_to_one(tmp_path):
    base_items, base_ids = vectors(300, 0), np.arange(300, dtype=np.int64) * 3 + 7
    save_index(FlatMIPS(torch.from_numpy(base_items), base_ids), tmp_path, "items", "v1",
               {"spec": parse_spec("mips").to_dict()})
    new, changed = vectors(25, 1), vectors(5, 2)
    changes = [("add", list(range(5000, 5025)), new), ("add", base_ids[:5].tolist(), changed),
               ("remove", base_ids[10:25].tolist(), None)]
    path, stats = update_index(tmp_path, "items", np.concatenate([new, changed]), list(range(5000, 5025)) + base_ids[:5].tolist(),
                               base_ids[10:25].tolist() + [123456])
    assert stats == {"added": 25, "replaced": 5, "removed": 15, "unknown_removals": 1}
    # a second update on top: remove an added item and a changed one, bring a removed item back
    back = vectors(1, 3)
    path2, _ = update_index(tmp_path, "items", back, [int(base_ids[12])], [5003, int(base_ids[1])])
    changes += [("remove", [5003, int(base_ids[1])], None), ("add", [int(base_ids[12])], back)]
    items, ids = live_after(base_items, base_ids, changes)
    rebuilt = FlatMIPS(torch.from_numpy(items), ids)
    index, manifest = load_index(path2, "full")
    assert isinstance(index, DeltaIndex) and manifest["base"]["version"] == "v1" and index.ntotal == len(ids) == 300 + 25 - 15 - 1
    q = vectors(6, 4)
    assert_same_answers(index, rebuilt, q, 20)
    assert_same_answers(index, rebuilt, q, 20, exclude=[[5000, 5001]] * 6, deny=[int(base_ids[40]), 5010])
    assert_same_answers(index, rebuilt, q, 20, allow=ids[::4].tolist())
    assert_same_answers(index, rebuilt, q, 400)  # k beyond the corpus: -1 / -inf padding like a rebuild
    assert_same_answers(load_index(path, "full")[0], FlatMIPS(torch.from_numpy(live_after(base_items, base_ids, changes[:3])[0]),
                                                               live_after(base_items, base_ids, changes[:3])[1]), q, 20)
    compacted, cm = load_index(compact_index(tmp_path, "items"), "full")
    assert cm["kind"] == "mips" and cm["compacted_from"] == "v3" and compacted.ntotal == len(ids)
    assert_same_answers(compacted, rebuilt, q, 20)


def test_an_updated_h_indexer_finds_what_an_exact_search_of_the_live_items_finds(tmp_path):
    torch.manual_seed(0)
    mol = MixtureOfLogits(DIM, DIM, 2, 2, 8, 16, 16).eval()
    base_items, base_ids = torch.randn(400, DIM), np.arange(400, dtype=np.int64)
    base = MoLHIndexer.build(mol, base_items, base_ids, stage1="avg", stage1_dtype="int8", kprime=400)
    save_index(base, tmp_path, "mol", "v1", {"spec": {"type": "mol-hindexer", "stage1": "avg", "kprime": 400}})
    added = torch.randn(30, DIM)
    update_index(tmp_path, "mol", added.numpy(), list(range(1000, 1030)), list(range(50, 90)))
    index, manifest = load_index(tmp_path / "mol" / "v2", "full")
    assert manifest["base_kind"] == "mol-hindexer"
    items, ids = live_after(base_items.numpy(), base_ids, [("add", list(range(1000, 1030)), added.numpy()),
                                                            ("remove", list(range(50, 90)), None)])
    exact = MoLSearcher(mol, torch.from_numpy(items), ids)
    q = torch.randn(5, DIM)
    got, want = index.search_with_certificate(q, 15, kprime=400), exact.search_with_certificate(q, 15)
    np.testing.assert_array_equal(got.ids, want.ids)
    assert got.exact.all() and not set(got.ids.reshape(-1)) & set(range(50, 90))
    inputs = ItemInputs(base_items.numpy(), base_ids, {})
    compacted, _ = load_index(compact_index(tmp_path, "mol", inputs=inputs), "full")
    np.testing.assert_array_equal(compacted.search_with_certificate(q, 15, kprime=len(ids)).ids, want.ids)


def test_a_string_catalog_takes_new_skus_and_a_removal_hot_swapped_by_load_index(tmp_path):
    base_items = vectors(120, 5)
    skus = np.array([f"sku-{i:03d}" for i in range(120)], dtype=object)
    base = build(parse_spec("mips"), ItemInputs.of(base_items, skus, {"embeddings": "mem"}), progress=False)
    v1 = save_index(base, tmp_path, "shop", "v1", {"spec": parse_spec("mips").to_dict()})
    new = base_items[:2] * -1  # two new SKUs pointing the other way
    v2, stats = update_index(tmp_path, "shop", new, ["sku-new-a", "sku-new-b"], ["sku-000", "sku-nope"])
    assert stats["added"] == 2 and stats["removed"] == 1 and stats["unknown_removals"] == 1
    with pytest.raises(ValueError, match="string item ids"):
        update_index(tmp_path, "shop", None, None, [5])
    srv = RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("shop", str(v1)),), admin_open=True)).start()
    try:
        with GenrecClient(f"127.0.0.1:{srv.port}") as c:
            before = c.search_reply(base_items[:1], 3, timeout=10)
            c.load_index("shop", str(v2), timeout=30)
            after = c.search_reply(base_items[:1], 3, timeout=10)
            flipped = c.search_reply(-base_items[:2], 1, timeout=10)
            denied = c.search_reply(-base_items[:1], 1, deny=["sku-new-a"], timeout=10)
            exact = c.search_reply(base_items[:1], 3, exact=True, timeout=10)
        assert before.keys[0, 0] == "sku-000" and "sku-000" not in after.keys[0]
        assert flipped.keys[:, 0].tolist() == ["sku-new-a", "sku-new-b"] and denied.keys[0, 0] != "sku-new-a"
        assert exact.keys.tolist() == after.keys.tolist()
    finally:
        srv.stop(grace=0.5)


def test_a_delta_whose_base_changed_is_refused(tmp_path):
    save_index(FlatMIPS(torch.from_numpy(vectors(50, 0)), np.arange(50)), tmp_path, "items", "v1")
    v2, _ = update_index(tmp_path, "items", vectors(2, 1), [100, 101], [3])
    save_index(FlatMIPS(torch.from_numpy(vectors(50, 9)), np.arange(50)), tmp_path, "items", "v1", overwrite=True)
    with pytest.raises(IndexFormatError, match="rebuilt or changed"):
        load_index(v2)
    faiss_base = tmp_path / "hnsw"
    from genrec.index.mips import FaissMIPS

    save_index(FaissMIPS.build(vectors(50, 0), "HNSW16"), faiss_base, "h", "v1")
    with pytest.raises(ValueError, match="added to or removed from"):
        update_index(faiss_base, "h", None, None, [1])


@pytest.mark.slow
def test_update_and_compact_from_the_cli(tmp_path):
    items = vectors(80, 0)
    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "items.ids.npy", np.arange(80) + 500)
    np.save(tmp_path / "new.npy", vectors(3, 1))
    np.save(tmp_path / "new.ids.npy", np.array([900, 901, 502]))

    def genrec(*args):
        return subprocess.run([sys.executable, "-m", "genrec", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert genrec("build-index", "--name", "c", "--spec", "mips", "--embeddings", "items.npy", "--no-progress").returncode == 0
    r = genrec("update-index", "--name", "c", "--add", "new.npy", "--remove", "510,511")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["added"], out["replaced"], out["removed"], out["count"]) == (2, 1, 2, 80)
    r = genrec("update-index", "--name", "c")
    assert r.returncode == 2 and "--add" in r.stderr
    r = genrec("compact-index", "--name", "c")
    assert r.returncode == 0 and "indexes/c/v3" in r.stdout, r.stderr
    r = genrec("search", "--name", "c", "--k", "80", "--random", "1")
    ids = set(json.loads(r.stdout)["ids"])
    assert {900, 901, 502} <= ids and not {510, 511} & ids
