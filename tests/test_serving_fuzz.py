"""The gRPC surface under generated requests: random fields, sizes, values, names and metadata against one
live server. Every reply is either OK and equal to a brute-force answer over what is served, or one of the
status codes `serving/service.py` documents, with a short message; afterwards health and a valid query
still succeed."""

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from genrec.index.mips import FaissMIPS, FlatMIPS
from genrec.index.storage import check_name, save_index
from genrec.serving import genrec_pb2 as pb
from genrec.serving.client import GenrecClient
from genrec.serving.config import BatchingConfig, IndexEntry, LimitsConfig, ServeConfig
from genrec.serving.server import RetrievalServer

DIM, MAX_K, MAX_NQ = 8, 50, 16
C = grpc.StatusCode
SEARCH_CODES = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def vectors(n, seed):
    g = np.random.default_rng(seed)
    v = g.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Served:
    """What the server holds, as the test knows it: index name -> (exact?, item vectors, ids)."""

    def __init__(self, root):
        self.versions = {"items/v1": (True, vectors(300, 1), np.arange(300) + 1000),
                         "items/v2": (True, vectors(200, 2), np.arange(200) + 5000),
                         "hnsw/v1": (False, vectors(300, 1), np.arange(300))}
        save_index(FlatMIPS(torch.from_numpy(self.versions["items/v1"][1]), self.versions["items/v1"][2]), root, "items", "v1")
        save_index(FlatMIPS(torch.from_numpy(self.versions["items/v2"][1]), self.versions["items/v2"][2]), root, "items", "v2")
        save_index(FaissMIPS.build(self.versions["hnsw/v1"][1], "HNSW16"), root, "hnsw", "v1")
        self.root = root
        self.latest = {"items": "items/v2", "hnsw": "hnsw/v1"}  # an index root loads its newest version
        self.by_name = {"items": "items/v1", "hnsw": "hnsw/v1"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-indexes")
    served = Served(root)
    cfg = ServeConfig(port=0, indexes=(IndexEntry("items", str(root / "items" / "v1")), IndexEntry("hnsw", str(root / "hnsw" / "v1"))),
                      limits=LimitsConfig(max_k=MAX_K, max_nq=MAX_NQ, max_message_bytes=64 * 1024),
                      batching=BatchingConfig(max_delay_ms=1.0), admin_token="tok")
    srv = RetrievalServer(cfg).start()
    client = GenrecClient(f"127.0.0.1:{srv.port}", token="tok")
    yield srv, client, served
    client.close()
    srv.stop(grace=1)


names = st.one_of(st.sampled_from(["", "items", "hnsw", "nope", "items/../hnsw", "a" * 129]),
                  st.text(max_size=40), st.text(min_size=200, max_size=5000))
versions = st.one_of(st.sampled_from(["", "v1", "v2", "x"]), st.text(max_size=300))
big_u32 = st.integers(0, 2**32 - 1)
floats = st.one_of(st.floats(-2, 2, width=32), st.floats(width=32), st.sampled_from([0.0, 3e38, -3e38, 1e-45]))
metadata = st.lists(st.tuples(st.from_regex(r"\A[a-z][a-z0-9_.-]{0,15}\Z").filter(lambda k: not k.startswith("grpc")),
                              st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=64)), max_size=3)


def mostly(good, bad):
    """Draw from ``good`` nine times in ten: half the requests must get past validation to test the answers."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


@st.composite
def search_requests(draw):
    nq = draw(mostly(st.integers(1, MAX_NQ), st.integers(0, 20)))
    dim = draw(mostly(st.just(DIM), st.one_of(st.integers(0, 12), big_u32)))
    width = dim if dim <= 12 else DIM
    how = draw(mostly(st.sampled_from(["bytes", "values"]), st.just("raw")))
    req = pb.SearchRequest(index=draw(mostly(st.sampled_from(["", "items", "hnsw"]), names)),
                           version=draw(mostly(st.just(""), versions)), k=draw(mostly(st.integers(1, 60), big_u32)),
                           dim=dim, exact=draw(st.booleans()), kprime=draw(mostly(st.just(0), big_u32)),
                           request_id=draw(st.text(max_size=50)))
    values = draw(mostly(st.lists(st.floats(-2, 2, width=32), min_size=nq * width, max_size=nq * width),
                         st.lists(floats, min_size=nq * width, max_size=nq * width)))
    if how == "bytes":
        req.queries = np.asarray(values, dtype="<f4").tobytes()
    elif how == "values":
        req.query_values.extend(values)
    else:
        req.queries = draw(st.binary(max_size=600))
    item_ids = st.one_of(st.integers(995, 1010), st.integers(-2**63, 2**63 - 1))
    rows = mostly(st.one_of(st.just([]), st.lists(st.lists(item_ids, max_size=5), min_size=nq, max_size=nq)),
                  st.lists(st.lists(item_ids, max_size=5), max_size=nq + 1))
    for row in draw(rows):
        req.exclude.add().ids.extend(row)
    filter_ids = st.lists(st.one_of(st.integers(995, 1310), st.integers(5000, 5200), st.integers(0, 300)), max_size=60)
    if draw(st.booleans()):  # the request's filter: allow / deny lists applied inside the search
        req.allow_ids.extend(draw(filter_ids))
        req.deny_ids.extend(draw(filter_ids))
    wrong = draw(mostly(st.just(None), st.sampled_from(["allow_ids_str", "deny_ids_str", "exclude_str", "where"])))
    if wrong == "where":  # these indexes hold no attributes
        req.where["category"].values.append("shoes")
    elif wrong == "exclude_str":  # string twins against int64 catalogs
        req.exclude_str.add().values.append("sku-1")
    elif wrong:
        getattr(req, wrong).append("sku-1")
    return req


def expect_brute_force(req: pb.SearchRequest, resp: pb.SearchResponse, served: Served) -> None:
    """An OK Search reply equals brute force over the version that answered (set-wise on ties; HNSW may
    miss items, but every id it returns must carry its true score)."""
    path = served.by_name[resp.index]
    assert path.split("/")[1] == resp.version
    exact, items, ids = served.versions[path]
    q = (np.frombuffer(req.queries, dtype="<f4") if req.queries else np.asarray(req.query_values, np.float32)).reshape(-1, DIM)
    assert (resp.nq, resp.k) == (len(q), req.k) and np.isfinite(q).all()
    got_ids = np.asarray(resp.ids).reshape(resp.nq, resp.k)
    got = np.asarray(resp.scores, np.float32).reshape(resp.nq, resp.k)
    truth = q.astype(np.float64) @ items.T.astype(np.float64)
    assert not (len(req.allow_ids_str) or len(req.deny_ids_str) or len(req.exclude_str) or len(req.where))
    passing = set(req.allow_ids) if len(req.allow_ids) else set(ids.tolist())
    passing -= set(req.deny_ids)
    for r in range(len(q)):
        banned = (set(req.exclude[r].ids) if len(req.exclude) else set()) | (set(ids.tolist()) - passing)
        allowed = np.array([i not in banned for i in ids])
        real = got_ids[r] != -1
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any() and np.all(np.isneginf(got[r][n:]))  # -1 / -inf pad the end
        rows = np.clip(np.searchsorted(ids, got_ids[r][real]), 0, len(ids) - 1)
        assert np.all(ids[rows] == got_ids[r][real]) and len(set(got_ids[r][real])) == real.sum()
        assert not banned & set(got_ids[r][real].tolist())
        np.testing.assert_allclose(got[r][real], truth[r, rows], rtol=1e-4, atol=1e-4 * (1 + np.abs(q[r]).sum()))
        assert np.all(np.diff(got[r][real]) <= 1e-5 * (1 + np.abs(q[r]).sum()))
        if exact:
            best = np.sort(truth[r][allowed])[::-1][: req.k]
            assert real.sum() == len(best)
            np.testing.assert_allclose(got[r][real], best, rtol=1e-4, atol=1e-4 * (1 + np.abs(q[r]).sum()))


def expect_documented(err: grpc.RpcError, codes: set) -> None:
    assert err.code() in codes, (err.code(), err.details())
    assert err.details() and len(err.details()) < 1000  # echoed values are truncated


@FUZZ
@given(req=search_requests(), md=metadata)
def test_generated_searches_answer_right_or_with_a_documented_code(live, req, md):
    _, client, served = live
    try:
        resp = client.stub.Search(req, timeout=10, metadata=md or None)
    except grpc.RpcError as err:
        event(err.code().name)
        expect_documented(err, SEARCH_CODES)
        return
    event("OK")
    expect_brute_force(req, resp, served)


@FUZZ
@given(name=mostly(st.sampled_from(["items", "hnsw", "other", "v.2_x-y"]), names),
       path=mostly(st.sampled_from(["items/v1", "items/v2", "hnsw/v1", "items", "hnsw"]),
                   st.one_of(st.sampled_from(["", "/", ".", "items/v1/items.npy"]), st.text(max_size=60),
                             st.text(min_size=4000, max_size=6000))),
       verify=mostly(st.sampled_from(["", "full", "size"]), st.text(max_size=20)),
       token=mostly(st.just("tok"), st.sampled_from(["", "bad", "tok "])))
def test_generated_admin_and_info_calls_answer_right_or_with_a_documented_code(live, name, path, verify, token):
    _, client, served = live
    version_dir = served.latest.get(path, path)
    known = version_dir in served.versions
    full = str(served.root / path) if known else path
    md = [("authorization", f"Bearer {token}")] if token else None
    try:
        info = client.stub.LoadIndex(pb.LoadIndexRequest(index=name, path=full, verify=verify), timeout=30, metadata=md)
    except grpc.RpcError as err:
        event(f"LoadIndex {err.code().name}")
        expect_documented(err, {C.INVALID_ARGUMENT, C.NOT_FOUND, C.DATA_LOSS, C.FAILED_PRECONDITION,
                                C.PERMISSION_DENIED, C.UNAUTHENTICATED})
    else:
        event("LoadIndex OK")
        assert token == "tok" and known and check_name("index", name) == name and verify in ("", "full", "size")
        assert info.index == name and info.version == version_dir.split("/")[1]
        assert info.count == len(served.versions[version_dir][1])
        served.by_name[name] = version_dir
    try:
        info = client.stub.GetIndexInfo(pb.IndexInfoRequest(index=name), timeout=10)
    except grpc.RpcError as err:
        expect_documented(err, {C.INVALID_ARGUMENT, C.NOT_FOUND})
        assert name and name not in served.by_name
    else:
        path = served.by_name[info.index]  # the version dir bound to that name
        assert (info.version, info.count) == (path.split("/")[1], len(served.versions[path][1]))
        assert not name or info.index == name


def test_after_the_fuzzing_health_and_a_valid_query_still_succeed(live):
    srv, client, served = live
    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    q = vectors(3, 9)
    req = pb.SearchRequest(index="items", k=10, dim=DIM, queries=q.astype("<f4").tobytes())
    expect_brute_force(req, client.stub.Search(req, timeout=10), served)
    assert srv.concurrency.in_flight == 0
