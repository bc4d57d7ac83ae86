"""Catalogs whose users and items have string ids (SKUs): kept without pickles from the prepared data to the
index and the gRPC answers."""

import csv
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.data.loaders import Interactions
from genrec.data.sequences import build_sequences, load_prepared, save_prepared
from genrec.index.attributes import read_attributes
from genrec.index.build import ItemInputs, build
from genrec.index.mips import FlatMIPS
from genrec.index.sharding import merge_shards
from genrec.index.spec import parse_spec
from genrec.index.storage import load_index, save_index
from genrec.retrieval.keys import CatalogKeys, KeyMap, decode_utf8, encode_utf8
from genrec.serving.client import GenrecClient
from genrec.serving.config import BrokerConfig, IndexEntry, ServeConfig
from genrec.serving.server import RetrievalServer

ids_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=12)


def test_ids_with_a_nul_character_are_refused():
    with pytest.raises(ValueError, match="NUL"):
        KeyMap(["a", "0\x00"])


@settings(max_examples=60, deadline=None)
@given(st.lists(ids_text, min_size=0, max_size=40, unique=True), st.lists(ids_text, max_size=10))
def test_string_ids_survive_utf8_and_offsets_and_look_up_like_a_dict(keys, probes):
    data, offsets = encode_utf8(keys)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and len(offsets) == len(keys) + 1
    assert decode_utf8(data, offsets).tolist() == keys
    if not keys:
        return
    table = KeyMap(keys)
    want = {k: i for i, k in enumerate(keys)}
    asked = keys[::3] + probes
    assert table.rows(asked).tolist() == [want.get(p, -1) for p in asked]
    assert table.rows([1, 2]).tolist() == [-1, -1]  # the other kind of id is unknown, never a row
    rows = np.array([[0, -1], [len(keys) - 1, 0]])
    assert table.values(rows).tolist() == [[keys[0], ""], [keys[-1], keys[0]]]


def test_damaged_or_ambiguous_string_ids_are_refused():
    data, offsets = encode_utf8(["sku-1", "größe", "x"])
    with pytest.raises(ValueError, match="offsets"):
        decode_utf8(data[:-1], offsets)
    bad = data.copy()
    bad[5] = 0xFF  # not UTF-8
    with pytest.raises(ValueError, match="UTF-8"):
        decode_utf8(bad, offsets)
    with pytest.raises(ValueError, match="not unique"):
        KeyMap(["a", "b", "a"])
    with pytest.raises(ValueError, match="empty string"):
        KeyMap(["a", ""])
    with pytest.raises(ValueError, match="all integers or all strings"):
        KeyMap(np.array([1, "a"], dtype=object))


def test_a_prepared_dataset_keeps_string_ids_without_pickles(tmp_path):
    rng = np.random.default_rng(0)
    users = np.array([f"u_{u}" for u in rng.integers(0, 30, 600)], dtype=object)
    items = np.array([f"sku-{i:04d}" for i in rng.integers(0, 80, 600)], dtype=object)
    ds = build_sequences(Interactions(users, items, np.arange(600, dtype=np.int64), None, "mem"))
    save_prepared(ds, tmp_path / "prep")
    assert not (tmp_path / "prep" / "item_ids.npy").exists()  # strings go to item_ids_utf8 + item_ids_offsets
    back = load_prepared(tmp_path / "prep")  # every np.load there runs with allow_pickle=False
    assert back.item_ids.tolist() == ds.item_ids.tolist() and back.user_ids.tolist() == ds.user_ids.tolist()
    np.testing.assert_array_equal(back.items, ds.items)
    u = int(np.flatnonzero(ds.user_ids == users[0])[0])
    assert [ds.item_ids[i - 1] for i in ds.sequence(u)] == items[users == users[0]].tolist()  # file order = time


def sku_catalog(n=240, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = F.normalize(torch.randn(n, dim, generator=g), dim=-1).numpy()
    return items, np.array([f"sku-{(i * 37) % 1000:04d}" for i in range(n)], dtype=object)


def test_string_keyed_indexes_save_shard_and_merge_with_their_ids(tmp_path):
    items, keys = sku_catalog()
    inputs = ItemInputs.of(items, keys, {"embeddings": "mem"})
    spec = parse_spec("mips")
    whole = build(spec, inputs, progress=False)
    (tmp_path / "meta.csv").write_text("id,category\n" + "".join(f"{k},{'shoes' if i % 3 == 0 else 'hats'}\n"
                                                              for i, k in enumerate(keys) if i < 200))
    whole.attributes = read_attributes(str(tmp_path / "meta.csv"), whole.external_ids())  # matched by string id
    path = save_index(whole, tmp_path, "all", "v1")
    loaded, manifest = load_index(path, "full")
    assert manifest["item_id_kind"] == "string" and loaded.keys is not None
    q = items[:4] + 0.01
    _, ids = loaded.search(q, 5)
    assert loaded.keys.keys_of(ids)[:, 0].tolist() == keys[:4].tolist()
    _, shoes = loaded.search(q, 5, where={"category": ["shoes"]})
    assert all(r % 3 == 0 and r < 200 for r in shoes.reshape(-1))  # ids are rows here: row i is keys[i]
    shards = []
    for s in range(3):
        rows = (s * len(items) // 3, (s + 1) * len(items) // 3)
        shard = build(spec, inputs, rows=rows, progress=False)
        extra = {"shard": {"id": s, "num_shards": 3, "start": rows[0], "end": rows[1], "total": len(items)}}
        shards.append(save_index(shard, tmp_path, "sh", f"v1.shard-{s}-of-3", extra))
    merged, _ = load_index(merge_shards(shards, tmp_path, "sh", "v1"))
    _, merged_ids = merged.search(q, 5)
    assert merged.keys.keys_of(merged_ids).tolist() == loaded.keys.keys_of(ids).tolist()


@pytest.fixture
def sku_servers(tmp_path):
    """One server over a string-keyed flat index and one over the same vectors with int64 ids 0..N-1."""
    items, keys = sku_catalog()
    t = torch.from_numpy(items)
    keyed = FlatMIPS(t, np.arange(len(keys)))
    keyed.keys = CatalogKeys(keys, np.arange(len(keys)))
    p_keys = save_index(keyed, tmp_path, "skus", "v1")
    p_ints = save_index(FlatMIPS(t, np.arange(len(keys))), tmp_path, "ints", "v1")
    servers = [RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(p)),))).start() for p in (p_keys, p_ints)]
    yield items, keys, servers
    for s in servers:
        s.stop(grace=0.5)


def test_string_ids_filter_exclude_and_come_back_over_grpc_like_int_ids(sku_servers):
    """Every item-id field has a string twin: exclusions, allow and deny lists in strings give the answer
    the same request in int64 ids gives on the int catalog; the wrong kind is INVALID_ARGUMENT."""
    items, keys, (keyed, ints) = sku_servers
    q = items[:3] + 0.05
    row_of = {k: i for i, k in enumerate(keys)}
    allow, deny, excl = list(keys[:120]), list(keys[::7]), [list(keys[:2]), [], list(keys[2:3])]
    with GenrecClient(f"127.0.0.1:{keyed.port}") as a, GenrecClient(f"127.0.0.1:{ints.port}") as b:
        got = a.search_reply(q, 10, allow=allow, deny=deny, exclude=excl, timeout=10)
        want = b.search_reply(q, 10, allow=[row_of[k] for k in allow], deny=[row_of[k] for k in deny],
                              exclude=[[row_of[k] for k in r] for r in excl], timeout=10)
        D, I = a.search(q, 3, timeout=10)
        for bad, message in ((dict(allow=[1, 2]), "allow_ids_str"), (dict(exclude=[[1], [], []]), "exclude_str")):
            with pytest.raises(grpc.RpcError) as err:
                a.search_reply(q, 3, timeout=10, **bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            b.search_reply(q, 3, allow=["sku-0001"], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "int64 item ids" in err.value.details()
    np.testing.assert_array_equal(got.ids, want.ids)
    assert got.keys.tolist() == [[keys[i] for i in row] for row in want.ids]
    assert set(got.keys.reshape(-1)) <= set(allow) - set(deny) and not {keys[0], keys[1]} & set(got.keys[0])
    assert I.dtype == object and I[:, 0].tolist() == keys[:3].tolist() and D.shape == (3, 3)


def test_a_broker_carries_string_ids_through_its_merge(sku_servers, tmp_path):
    items, keys, (keyed, _) = sku_servers
    inputs = ItemInputs.of(items, keys, {"embeddings": "mem"})
    shard_servers = []
    for s in range(2):
        rows = (s * len(items) // 2, (s + 1) * len(items) // 2)
        path = save_index(build(parse_spec("mips"), inputs, rows=rows, progress=False), tmp_path, f"part{s}", "v1")
        shard_servers.append(RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(path)),))).start())
    broker = RetrievalServer(ServeConfig(port=0, role="broker", broker=BrokerConfig(
        shards=tuple(f"127.0.0.1:{s.port}" for s in shard_servers), shard_timeout_s=5.0))).start()
    try:
        q = items[5:9] + 0.05
        with GenrecClient(f"127.0.0.1:{broker.port}") as b, GenrecClient(f"127.0.0.1:{keyed.port}") as one:
            got = b.search_reply(q, 12, exclude=[[keys[5]], [], [], []], deny=[keys[100]], timeout=10)
            want = one.search_reply(q, 12, exclude=[[keys[5]], [], [], []], deny=[keys[100]], timeout=10)
        assert got.keys.tolist() == want.keys.tolist()
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    finally:
        broker.stop(grace=0.5)
        for s in shard_servers:
            s.stop(grace=0.5)


def test_rank_takes_and_reports_string_ids_like_int_ids(tmp_path, tiny_synthetic_cfg):
    from genrec.checkpoint import ranking_state, save_checkpoint
    from genrec.encoders.model import SequentialEncoder
    from genrec.encoders.ranking import RankingModel

    cfg = tiny_synthetic_cfg
    cfg.task = "ranking"
    torch.manual_seed(0)
    model = RankingModel(SequentialEncoder(cfg.model, 50, cfg.data.max_len + 1), 2, cfg.ranking.head_hidden).eval()
    skus = np.array([f"sku-{i}" for i in range(50)], dtype=object)
    servers = []
    for name, raw in (("ints", np.arange(50) + 100), ("skus", skus)):
        ckpt = save_checkpoint(tmp_path / f"{name}.pt", model.encoder, cfg, raw, **ranking_state(model))
        servers.append(RetrievalServer(ServeConfig(port=0, ranking_checkpoint=str(ckpt))).start())
    try:
        hist, cands = [3, 9, 27], [5, 12, 40, 0]
        with GenrecClient(f"127.0.0.1:{servers[0].port}") as a, GenrecClient(f"127.0.0.1:{servers[1].port}") as b:
            want = a.rank([100 + i for i in hist] + [999], [100 + i for i in cands] + [888], timeout=10)
            got = b.rank([skus[i] for i in hist] + ["nope"], [skus[i] for i in cands] + ["gone"], timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                b.rank([3, 9], [5], timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "history_str" in err.value.details()
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        assert list(got.unknown_ids_str) == ["nope", "gone"] and list(want.unknown_ids) == [999, 888]
    finally:
        for s in servers:
            s.stop(grace=0.5)


def genrec(*args, cwd):
    return subprocess.run([sys.executable, "-m", "genrec", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_shop_csv(path, users=150, items=90, seed=0):
    """A shop's export: string users and SKUs, ISO timestamps, ratings; returns each user's events in order."""
    rng = np.random.default_rng(seed)
    events = {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["customer", "sku", "ts", "stars"])
        for u in range(users):
            start = rng.integers(0, items)
            seq = [(start + int(s)) % items for s in np.cumsum(rng.integers(1, 4, size=rng.integers(6, 14)))]
            events[f"u_{u}"] = [f"sku-{i:04d}" for i in seq]
            for t, i in enumerate(seq):
                w.writerow([f"u_{u}", f"sku-{i:04d}", f"2026-01-{1 + t:02d}T10:00:00Z", int(rng.integers(1, 6))])
    return events


@pytest.mark.slow
def test_a_string_id_catalog_end_to_end_prepare_train_eval_embed_index_serve_query(tmp_path, serve_processes):
    events = write_shop_csv(tmp_path / "shop.csv")
    r = genrec("data", "prepare", "--format", "csv", "--input", "shop.csv", "--out", "prep", "--user-col", "customer",
               "--item-col", "sku", "--time-col", "ts", "--rating-col", "stars", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "cfg.yaml").write_text(
        "name: shop\nout_dir: runs\ndata: {format: prepared, path: prep, max_len: 20}\n"
        "model: {item_emb_dim: 8, dqk: 8, dv: 8}\nsimilarity: {type: mol, query_components: 2, "
        "item_components: 2, component_dim: 8, query_hidden: 16, gating_hidden: 16}\nloss: {num_negatives: 16}\ntrain: {epochs: 1}\neval: {ks: [1, 10]}\n")
    r = genrec("train", "--config", "cfg.yaml", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "runs" / "shop" / "checkpoint_best.pt"
    r = genrec("eval", "--checkpoint", str(ckpt), "--ranks-out", "ranks.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "ranks.csv") as f:
        ranks = list(csv.DictReader(f))
    assert {row["user"] for row in ranks} == set(events) and all(row["target"] == events[row["user"]][-1] for row in ranks)
    r = genrec("embed", "--checkpoint", str(ckpt), "--out", "emb/items.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id_kind"] == "string" and not (tmp_path / "emb" / "items.ids.npy").exists()
    for name, source in (("flat", ["--spec", "mips", "--embeddings", "emb/items.npy"]),
                         ("hidx", ["--spec", "mol-hindexer:stage1=pca8,kprime=64", "--checkpoint", str(ckpt)])):
        r = genrec("build-index", "--name", name, *source, "--eval-queries", "0", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = genrec("search", "--name", "hidx", "--k", "5", "--random", "2", cwd=tmp_path)
    assert r.returncode == 0 and all(x.startswith("sku-") for line in r.stdout.splitlines() for x in json.loads(line)["ids"])
    (tmp_path / "serve.yaml").write_text(
        f"port: 0\nencoder_checkpoint: {ckpt}\nindexes: [{{name: flat, path: {tmp_path / 'indexes' / 'flat'}}}, "
        f"{{name: hidx, path: {tmp_path / 'indexes' / 'hidx'}}}]\n")
    port = serve_processes.start(tmp_path)
    history = events["u_3"][:-1]
    for index in ("flat", "hidx"):
        r = genrec("query", "--target", f"127.0.0.1:{port}", "--index", index, "--history",
                   ",".join(history + ["sku-none"]), "--k", "5", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)
        assert len(row["ids"]) == 5 and all(x.startswith("sku-") for x in row["ids"]) and not set(row["ids"]) & set(history)
        assert row["unknown_ids"] == ["sku-none"]
    np.save(tmp_path / "q.npy", np.load(tmp_path / "emb" / "items.npy")[:2])
    r = genrec("query", "--target", f"127.0.0.1:{port}", "--index", "flat", "--queries", "q.npy", "--k", "1", "--json",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = sorted({i for seq in events.values() for i in seq})[:2]  # item table rows: ids sorted
    assert [json.loads(x)["ids"] for x in r.stdout.splitlines()] == [[first[0]], [first[1]]]
    with GenrecClient(f"127.0.0.1:{port}") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.search_by_user([1, 2, 3], 5, index="flat", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "history_str" in err.value.details()
        many = c.search_by_users([history, events["u_4"]], 4, index="flat", allow=first + history[:1], timeout=10)
    assert set(many.keys.reshape(-1)) - {""} <= set(first + history[:1])
    assert serve_processes.stop() == [0]
