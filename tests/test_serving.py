"""gRPC serving on loopback: results, status codes, batching, limits, deadlines, hot swap, shutdown.
Every loop here is bounded in count and time."""

import json
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genrec.index.mips import FaissMIPS, FlatMIPS
from genrec.index.storage import save_index
from genrec.serving import genrec_pb2 as pb
from genrec.serving.client import GenrecClient
from genrec.serving.config import BatchingConfig, IndexEntry, LimitsConfig, ServeConfig
from genrec.serving.registry import Served
from genrec.serving.server import RetrievalServer
from genrec.serving.service import SERVICE_NAME

DIM = 8
TEST_DEVICE = os.environ.get("GENREC_TEST_DEVICE", "cpu")  # where served indexes and models run (cuda: gpu_session.sh)


def unit(n, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, DIM, generator=g), dim=-1).numpy()


@pytest.fixture
def index_root(tmp_path):
    root = tmp_path / "indexes"
    save_index(FlatMIPS(torch.from_numpy(unit(300, 1)), np.arange(300) + 1000), root, "items", "v1")
    save_index(FlatMIPS(torch.from_numpy(unit(200, 2)), np.arange(200) + 5000), root, "items", "v2")
    save_index(FaissMIPS.build(unit(300, 1), "HNSW16"), root, "hnsw", "v1")
    return root


def start(cfg: ServeConfig) -> RetrievalServer:
    return RetrievalServer(cfg).start()


@pytest.fixture
def server(index_root):
    cfg = ServeConfig(port=0, indexes=(IndexEntry("items", str(index_root / "items" / "v1")),
                                       IndexEntry("hnsw", str(index_root / "hnsw"))),
                      limits=LimitsConfig(max_k=50, max_nq=16, max_message_bytes=64 * 1024),
                      batching=BatchingConfig(max_delay_ms=2.0), metrics_port=0, admin_token="s3cret")
    srv = start(cfg)
    yield srv
    srv.stop(grace=1)


def client_for(srv, token=None):
    return GenrecClient(f"127.0.0.1:{srv.port}", token=token)


class SlowIndex:
    """A real index whose searches take ``delay`` seconds: makes a server busy on demand."""

    def __init__(self, inner, delay):
        self.inner, self.delay, self.dim, self.ntotal = inner, delay, inner.dim, inner.ntotal

    def search_with_certificate(self, *a, **kw):
        time.sleep(self.delay)
        return self.inner.search_with_certificate(*a, **kw)

    def search(self, *a, **kw):
        r = self.search_with_certificate(*a, **kw)
        return r.scores, r.ids


def install_slow(srv, delay):
    inner = FlatMIPS(torch.from_numpy(unit(100, 3)))
    srv.registry._served["slow"] = Served("slow", "s1", "", SlowIndex(inner, delay), {"kind": "mips", "count": 100})
    return inner


def test_search_over_grpc_equals_the_in_process_api_and_is_deterministic(server, index_root):
    q = unit(5, 9)
    local = FlatMIPS(torch.from_numpy(unit(300, 1)), np.arange(300) + 1000)
    with client_for(server) as c:
        r = c.search_reply(q, 20, index="items", exclude=[[1000], [], [], [], []])
        again = c.search_reply(q, 20, index="items", exclude=[[1000], [], [], [], []])
        info = c.info("items")
    d, i = local.search(q, 20, exclude=[[1000], [], [], [], []])
    np.testing.assert_array_equal(r.ids, i)
    np.testing.assert_allclose(r.scores, d, rtol=1e-6)
    np.testing.assert_array_equal(again.ids, r.ids)
    assert r.version == "v1" and r.exact.all() and r.timing.total_ms > 0 and r.timing.batch_size >= 5
    assert (info.count, info.dim, info.version, info.kind, info.device) == (300, DIM, "v1", "mips", "cpu")
    assert sorted(info.indexes) == ["hnsw", "items"]


def test_k_beyond_the_corpus_pads_like_faiss(index_root):
    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(index_root / "items" / "v2")),)))
    try:
        with client_for(srv) as c:
            s, i = c.search(unit(2, 4), 250)
        assert i.shape == (2, 250) and np.all(i[:, 200:] == -1) and np.all(np.isneginf(s[:, 200:]))
    finally:
        srv.stop(grace=1)


def raw(q: np.ndarray) -> bytes:
    return np.ascontiguousarray(q, dtype="<f4").tobytes()


BAD = [
    ("NaN", dict(index="items", k=5, dim=DIM, queries=raw(np.full((1, DIM), np.nan))), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("Inf", dict(index="items", k=5, dim=DIM, query_values=[np.inf] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ("wrong dim", dict(index="items", k=5, dim=4, queries=raw(np.ones((1, 4)))), grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
    ("dim unset", dict(index="items", k=5, queries=raw(np.ones((1, DIM)))), grpc.StatusCode.INVALID_ARGUMENT, "dim must be set"),
    ("ragged bytes", dict(index="items", k=5, dim=DIM, queries=b"\0" * 36), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 4*dim"),
    ("empty", dict(index="items", k=5, dim=DIM), grpc.StatusCode.INVALID_ARGUMENT, "empty query batch"),
    ("k=0", dict(index="items", k=0, dim=DIM, queries=raw(np.ones((1, DIM)))), grpc.StatusCode.INVALID_ARGUMENT, "k must be positive"),
    ("k>max", dict(index="items", k=51, dim=DIM, queries=raw(np.ones((1, DIM)))), grpc.StatusCode.INVALID_ARGUMENT, "max_k"),
    ("nq>max", dict(index="items", k=5, dim=DIM, queries=raw(np.ones((17, DIM)))), grpc.StatusCode.INVALID_ARGUMENT, "max_nq"),
    ("index", dict(index="nope", k=5, dim=DIM, queries=raw(np.ones((1, DIM)))), grpc.StatusCode.NOT_FOUND, "unknown index"),
    ("version", dict(index="items", version="v9", k=5, dim=DIM, queries=raw(np.ones((1, DIM)))), grpc.StatusCode.NOT_FOUND, "not served"),
    ("exact hnsw", dict(index="hnsw", k=5, dim=DIM, exact=True, queries=raw(np.ones((1, DIM)))),
     grpc.StatusCode.FAILED_PRECONDITION, "cannot search exactly"),
    ("too big", dict(index="items", k=5, dim=DIM, queries=raw(np.ones((3000, DIM)))), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


@pytest.mark.parametrize("name,fields,code,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_their_status_code_and_the_server_keeps_serving(server, name, fields, code, message):
    with client_for(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Search(pb.SearchRequest(**fields), timeout=10)
        assert err.value.code() == code and message in (err.value.details() or "")
        assert c.search(unit(1, 5), 3, index="items")[1].shape == (1, 3)  # still serving


def test_other_methods_answer_with_their_codes(server):
    with client_for(server) as c:
        cases = [(lambda: c.stub.Rank(pb.RankRequest(history=[1], candidates=[2])), grpc.StatusCode.UNIMPLEMENTED),  # no ranker
                 (lambda: c.search_by_user([1000], 5, index="items"), grpc.StatusCode.FAILED_PRECONDITION),
                 (lambda: c.info("nope"), grpc.StatusCode.NOT_FOUND)]
        for call, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code


def test_health_reflection_and_metrics_answer_generic_clients(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    channel.close()
    with client_for(server) as c:
        c.search(unit(2, 5), 3, index="items")
        c.search(unit(1, 5), 3, index="hnsw")
        c.search(unit(1, 5), 3)  # the default index: the first configured
        with pytest.raises(grpc.RpcError):
            c.search(unit(1, 5), 3, index="z" * 200)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'genrec_requests_total{code="OK",method="Search"}' in text
    per_index = lambda index, code: server.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_index_requests_total", {"index": index, "method": "Search", "code": code})
    assert per_index("items", "OK") == 2 and per_index("hnsw", "OK") == 1 and per_index("unknown", "NOT_FOUND") == 1
    assert "z" * 200 not in text  # client-sent names never become series
    assert 'genrec_index_items{device="cpu",index="items",version="v1"} 300.0' in text
    assert "genrec_latency_seconds_bucket" in text and "genrec_batch_queries_count" in text
    busy = server.metrics.registry.get_sample_value("genrec_batcher_busy_seconds_total")
    assert busy is not None and busy > 0 and "genrec_batcher_busy_seconds_total" in text


def test_admin_methods_are_closed_without_a_token_and_reflection_can_be_switched_off(index_root):
    entry = (IndexEntry("items", str(index_root / "items" / "v1")),)
    closed = start(ServeConfig(port=0, indexes=entry, reflection=False))
    opened = start(ServeConfig(port=0, indexes=entry, admin_open=True))
    try:
        with client_for(closed) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.load_index("items", str(index_root / "items" / "v2"))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin_token" in err.value.details()
            assert c.search(unit(1, 9), 5)[1].shape == (1, 5)  # the rest of the service is untouched
            refl = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            with pytest.raises(grpc.RpcError) as err:
                next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with client_for(opened) as c:
            assert c.load_index("items", str(index_root / "items" / "v2")).version == "v2"
    finally:
        closed.stop(grace=0.5)
        opened.stop(grace=0.5)


def test_admin_methods_need_the_token(server, index_root):
    with client_for(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.load_index("items", str(index_root / "items" / "v2"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client_for(server, token="wrong") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.load_index("items", str(index_root / "items" / "v2"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with client_for(server, token="s3cret") as c:
        assert c.load_index("items", str(index_root / "items" / "v2")).version == "v2"
    counted = lambda code: server.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_requests_total", {"method": "LoadIndex", "code": code})
    assert counted("UNAUTHENTICATED") == 1 and counted("PERMISSION_DENIED") == 1 and counted("OK") == 1


def test_a_load_that_finishes_after_its_caller_gave_up_is_not_swapped_in(index_root):
    from genrec.serving.registry import IndexRegistry, LoadAbandoned

    registry = IndexRegistry(warmup_queries=1)
    registry.load("items", index_root / "items" / "v1")
    with pytest.raises(LoadAbandoned):
        registry.load("items", index_root / "items" / "v2", still_wanted=lambda: False)
    assert registry.get("items").version == "v1"  # the old version keeps serving


def test_hot_swap_under_load_never_fails_and_answers_match_the_reported_version(server, index_root):
    q = unit(3, 11)
    exact = {v: FlatMIPS(torch.from_numpy(unit(n, seed)), np.arange(n) + base).search(q, 10)[1]
             for v, n, seed, base in (("v1", 300, 1, 1000), ("v2", 200, 2, 5000))}
    stop, failures, seen = threading.Event(), [], []

    def searcher():
        with client_for(server) as c:
            while not stop.is_set():
                try:
                    r = c.search_reply(q, 10, index="items", timeout=10)
                    seen.append(r.version)
                    if not np.array_equal(r.ids, exact[r.version]):
                        failures.append(f"wrong answer for {r.version}")
                except grpc.RpcError as e:
                    failures.append(e.code().name)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    with client_for(server, token="s3cret") as admin:
        for i in range(8):
            admin.load_index("items", str(index_root / "items" / ("v2" if i % 2 == 0 else "v1")))
            time.sleep(0.05)
        bad = index_root / "items" / "v3"
        save_index(FlatMIPS(torch.from_numpy(unit(50, 7))), index_root, "items", "v3")
        data = bytearray((bad / "items.npy").read_bytes())
        data[-3] ^= 0xFF
        (bad / "items.npy").write_bytes(bytes(data))
        with pytest.raises(grpc.RpcError) as err:
            admin.load_index("items", str(bad))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(grpc.RpcError) as err:
            admin.load_index("items", str(index_root / "items" / "v404"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert not failures and {"v1", "v2"} <= set(seen)
    with client_for(server) as c:
        assert c.info("items").version == "v1"  # the refused v3 never replaced it
    # the size gauge has one series per index, the active version's: v2's went when v1 came back
    gauge = lambda v: server.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_index_items", {"index": "items", "version": v, "device": "cpu"})
    assert gauge("v1") == 300 and gauge("v2") is None and gauge("v3") is None


def test_a_sighup_reload_moves_the_size_gauge_to_the_new_version(tmp_path):
    root = tmp_path / "idx"
    save_index(FlatMIPS(torch.from_numpy(unit(300, 1))), root, "items", "v1")
    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(root / "items"), "size"),)))
    gauge = lambda v: srv.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_index_items", {"index": "items", "version": v, "device": "cpu"})
    try:
        assert gauge("v1") == 300
        save_index(FlatMIPS(torch.from_numpy(unit(200, 2))), root, "items", "v2")
        srv.reload()  # what SIGHUP runs
        assert srv.registry.get("items").version == "v2"
        assert gauge("v2") == 200 and gauge("v1") is None
    finally:
        srv.stop(grace=1)


def test_overload_beyond_the_queue_is_refused_fast_and_nothing_hangs(index_root):
    srv = start(ServeConfig(port=0, indexes=(), batching=BatchingConfig(max_batch=1, max_delay_ms=0, queue_size=2),
                            limits=LimitsConfig(workers=16, max_concurrent_rpcs=64)))
    install_slow(srv, 0.2)
    try:
        def one(_):
            with client_for(srv) as c:
                try:
                    c.search(unit(1, 1), 3, index="slow", timeout=30)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

        t = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(one, range(12)))
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and time.monotonic() - t < 20
    finally:
        srv.stop(grace=1)


def test_rpcs_beyond_the_concurrency_limit_are_refused_counted_and_give_their_slots_back():
    """limits.max_concurrent_rpcs is enforced where the refusals can be counted; no slot leaks, not even
    for calls whose client gave up while they waited for a worker thread."""
    srv = start(ServeConfig(port=0, batching=BatchingConfig(max_batch=1, max_delay_ms=0, queue_size=64),
                            limits=LimitsConfig(workers=1, max_concurrent_rpcs=3)))
    install_slow(srv, 0.3)
    counted = lambda code: srv.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_requests_total", {"method": "Search", "code": code}) or 0

    def one(timeout):
        with client_for(srv) as c:
            try:
                c.search(unit(1, 1), 3, index="slow", timeout=timeout)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name, e.details()

    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, [30] * 8))
        refused = [a for a in answers if a != "OK"]
        assert refused and answers.count("OK") >= 3
        assert all(a[0] == "RESOURCE_EXHAUSTED" and "max_concurrent_rpcs" in a[1] for a in refused)
        assert counted("RESOURCE_EXHAUSTED") == len(refused) and counted("OK") == answers.count("OK")
        with ThreadPoolExecutor(3) as pool:  # queued behind one worker, given up on after 0.1 s
            assert all(a[0] == "DEADLINE_EXCEEDED" for a in pool.map(one, [0.1] * 3))
        deadline = time.monotonic() + 10
        while srv.concurrency.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.concurrency.in_flight == 0
        with client_for(srv) as c:
            assert len(c.search(unit(1, 1), 3, index="slow", timeout=10)[1][0]) == 3
            with pytest.raises(grpc.RpcError) as err:  # an unknown method is counted too
                c.channel.unary_unary(f"/{SERVICE_NAME}/Nope")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert srv.metrics.registry.get_sample_value("genrec_requests_total", {"method": "Nope", "code": "UNIMPLEMENTED"}) == 1
    finally:
        srv.stop(grace=1)


def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed():
    srv = start(ServeConfig(port=0, batching=BatchingConfig(max_batch=1, max_delay_ms=0)))
    install_slow(srv, 0.5)
    try:
        with client_for(srv) as busy, client_for(srv) as late:
            pool = ThreadPoolExecutor(1)
            first = pool.submit(busy.search, unit(2, 1), 3, index="slow", timeout=30)
            time.sleep(0.1)  # the batcher is now inside the first search
            with pytest.raises(grpc.RpcError) as err:
                late.search(unit(1, 2), 3, index="slow", timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            first.result(timeout=30)
            time.sleep(0.2)  # the batcher reaches (and drops) the expired request
            pool.shutdown()
        searched = srv.metrics.searched_queries._value.get()
        assert searched == 2  # only the busy request's two queries were computed
        assert srv.metrics.expired._value.get() == 1
    finally:
        srv.stop(grace=1)


def test_concurrent_requests_are_coalesced_into_one_search(index_root):
    """Eight clients, connected first, send at once while a slow search holds the one search slot: the
    requests that queue behind it are answered by one batched search, each with its own rows."""
    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(index_root / "items" / "v1")),),
                            batching=BatchingConfig(max_batch=64, max_delay_ms=50)))
    install_slow(srv, 0.3)
    local = FlatMIPS(torch.from_numpy(unit(100, 3)))
    clients = [client_for(srv) for _ in range(8)]
    try:
        for c in clients:
            c.info("items")  # connected before the clock starts
        queries = [unit(1, 100 + i) for i in range(8)]
        go = threading.Barrier(8)

        def one(args):
            c, q = args
            go.wait(timeout=30)
            return c.search_reply(q, 5, index="slow", timeout=30)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, zip(clients, queries)))
        assert max(r.timing.batch_size for r in replies) > 1
        for q, r in zip(queries, replies):
            np.testing.assert_array_equal(r.ids, local.search(q, 5)[1])
    finally:
        for c in clients:
            c.close()
        srv.stop(grace=1)


def test_an_idle_batcher_searches_a_lone_request_in_its_rpc_thread_and_queues_the_rest():
    """Idle (nothing queued, slot free): the request is searched at once by the RPC thread itself. While
    that search runs, later requests queue and a batcher worker serves them together as one batch."""
    srv = start(ServeConfig(port=0, batching=BatchingConfig(max_batch=64, max_delay_ms=50)))
    inner = install_slow(srv, 0.4)
    threads = []
    slow = srv.registry.get("slow").index
    original = slow.search_with_certificate

    def recording(q, *a, **kw):
        threads.append((threading.current_thread().name, len(q)))
        return original(q, *a, **kw)

    slow.search_with_certificate = recording
    try:
        with client_for(srv) as c, ThreadPoolExecutor(4) as pool:
            first = pool.submit(c.search_reply, unit(1, 20), 3, index="slow", timeout=30)
            time.sleep(0.15)  # the first search is running
            rest = [pool.submit(c.search_reply, unit(1, 21 + i), 3, index="slow", timeout=30) for i in range(3)]
            replies = [first.result(timeout=30)] + [f.result(timeout=30) for f in rest]
        assert threads[0][1] == 1 and not threads[0][0].startswith("genrec-batcher")
        assert threads[1] == ("genrec-batcher-0", 3)  # the three that queued: one batch, on the worker
        assert [r.timing.batch_size for r in replies] == [1, 3, 3, 3]
        for i, r in enumerate(replies):
            np.testing.assert_array_equal(r.ids.reshape(1, -1), inner.search(unit(1, 20 + i), 3)[1])
    finally:
        srv.stop(grace=1)


def test_batching_workers_search_side_by_side_and_all_stop_on_close():
    """workers: 2 gives two search slots, so two batches are searched at once: two 0.4 s searches
    (max_batch 1, so they cannot share a batch) both return in well under the 0.8 s one slot would need.
    Here both arrive while the batcher is idle, so both take the idle path in their RPC threads; what is
    tested is the slot count the workers set. stop() ends every worker thread."""
    srv = start(ServeConfig(port=0, batching=BatchingConfig(max_batch=1, max_delay_ms=0, workers=2)))
    inner = install_slow(srv, 0.4)
    try:
        with client_for(srv) as c, ThreadPoolExecutor(2) as pool:
            t = time.monotonic()
            futures = [pool.submit(c.search, unit(1, 10 + i), 3, index="slow", timeout=30) for i in range(2)]
            results = [f.result(timeout=30) for f in futures]
            elapsed = time.monotonic() - t
        assert elapsed < 0.75, f"two single-query batches took {elapsed:.2f} s with two workers"
        for i, (_, ids) in enumerate(results):
            np.testing.assert_array_equal(ids, inner.search(unit(1, 10 + i), 3)[1])
    finally:
        srv.stop(grace=1)
    assert not any(t.is_alive() for t in srv.service.batcher._threads)


def test_graceful_shutdown_finishes_in_flight_work_and_refuses_new(index_root):
    srv = start(ServeConfig(port=0))
    install_slow(srv, 0.6)
    port = srv.port
    with client_for(srv) as c:
        pool = ThreadPoolExecutor(2)
        in_flight = pool.submit(c.search, unit(1, 1), 3, index="slow", timeout=30)
        time.sleep(0.15)
        stopper = pool.submit(srv.stop, 5)
        time.sleep(0.1)
        status = srv.health._server_status.get("")  # flipped before the port closes
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with GenrecClient(f"127.0.0.1:{port}") as late:
            with pytest.raises(grpc.RpcError) as err:
                late.search(unit(1, 2), 3, index="slow", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert in_flight.result(timeout=30)[1].shape == (1, 3)
        stopper.result(timeout=30)
        pool.shutdown()


@pytest.mark.slow
def test_search_by_user_encodes_the_history_server_side(tmp_path, tiny_synthetic_cfg):
    from genrec.serving.user_encoder import UserEncoder
    from genrec.training import train

    cfg = tiny_synthetic_cfg
    cfg.out_dir, cfg.name, cfg.train.epochs = str(tmp_path / "runs"), "enc", 1
    ckpt = train(cfg, progress=False).run_dir / "checkpoint_best.pt"
    enc = UserEncoder(str(ckpt))
    items = enc.model.item_embeddings()[1:].detach()
    raw_ids = enc.items.ids
    save_index(FlatMIPS(items, raw_ids), tmp_path / "idx", "items", "v1")
    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(tmp_path / "idx" / "items"), device=TEST_DEVICE),),
                            encoder_checkpoint=str(ckpt), model_device=TEST_DEVICE))
    try:
        history = [int(raw_ids[3]), int(raw_ids[7]), 999999, int(raw_ids[11])]
        with client_for(srv) as c:
            r = c.search_by_user(history, 10)
            with pytest.raises(grpc.RpcError) as err:
                c.search_by_user([999998, 999999], 10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                c.search_by_user(history, 10, rerank=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rerank is off" in err.value.details()
            # many users in one call: row i equals that user's own SearchByUser
            other = [int(raw_ids[20]), int(raw_ids[2])]
            both = c.search_by_users([history, other], 10)
            alone = c.search_by_user(other, 10)
            np.testing.assert_array_equal(both.ids, np.concatenate([r.ids, alone.ids]))
            np.testing.assert_allclose(both.scores, np.concatenate([r.scores, alone.scores]), rtol=1e-5, atol=1e-6)
            assert both.unknown_ids_per_user == [[999999], []]
            for users, stamps in (([], None), ([other] * 2000, None), ([history, other], [[1, 2, 3, 4], []])):
                with pytest.raises(grpc.RpcError) as err:
                    c.search_by_users(users, 10, stamps)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:
                c.search_by_users([other, [999998]], 10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "user 1" in err.value.details()
            allowed = raw_ids[::3].tolist()
            filtered = c.search_by_user(history, 10, allow=allowed)
        # a broker over two halves encodes once and answers both calls like the one server (filters forwarded)
        from genrec.serving.config import BrokerConfig

        half = len(raw_ids) // 2
        parts = [save_index(FlatMIPS(items[a:b], raw_ids[a:b]), tmp_path / "idx", f"half{a}", "v1")
                 for a, b in ((0, half), (half, len(raw_ids)))]
        shards = [start(ServeConfig(port=0, indexes=(IndexEntry("items", str(p)),))) for p in parts]
        broker = start(ServeConfig(port=0, role="broker", encoder_checkpoint=str(ckpt), broker=BrokerConfig(
            shards=tuple(f"127.0.0.1:{x.port}" for x in shards), shard_timeout_s=5.0)))
        try:
            with client_for(broker) as b:
                np.testing.assert_array_equal(b.search_by_users([history, other], 10).ids, both.ids)
                assert b.search_by_users([history, other], 10).unknown_ids_per_user == [[999999], []]
                np.testing.assert_array_equal(b.search_by_user(history, 10, allow=allowed).ids, filtered.ids)
                with pytest.raises(grpc.RpcError) as err:
                    b.search_by_user(history, 10, rerank=30)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            for x in shards + [broker]:
                x.stop(grace=0.5)
        state = enc.encode([history]).states
        _, expected = FlatMIPS(items, raw_ids).search(state, 10, exclude=[[history[0], history[1], history[3]]])
        np.testing.assert_array_equal(r.ids, expected)
        assert r.unknown_ids == [999999] and not set(history) & set(r.ids[0].tolist())
    finally:
        srv.stop(grace=1)

    # the two-stage path: retrieve 30, rerank with the ranking stage, keep 10
    from genrec.checkpoint import save_checkpoint
    from genrec.encoders.ranking import RankingModel
    from genrec.serving.ranker import Ranker

    torch.manual_seed(0)
    model = RankingModel(enc.model, 2, cfg.ranking.head_hidden).eval()
    with torch.no_grad():
        model.item_bias.weight.normal_()  # so the ranker's order differs from retrieval's
    cfg.task = "ranking"
    rank_ckpt = save_checkpoint(tmp_path / "rank.pt", model.encoder, cfg, raw_ids, ranking_head=model.head.state_dict(),
                                ranking_item_bias=model.item_bias.state_dict(),
                                ranking_retrieval_weight=model.retrieval_weight.detach())
    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(tmp_path / "idx" / "items"), device=TEST_DEVICE),),
                            encoder_checkpoint=str(ckpt), ranking_checkpoint=str(rank_ckpt), model_device=TEST_DEVICE))
    try:
        with client_for(srv) as c:
            r = c.search_by_user(history, 10, rerank=30)
            both = c.search_by_users([history, other], 10, rerank=30)
            np.testing.assert_array_equal(both.ids, np.concatenate([r.ids, c.search_by_user(other, 10, rerank=30).ids]))
            for bad in (5, 10**6):
                with pytest.raises(grpc.RpcError) as err:
                    c.search_by_user(history, 10, rerank=bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, top30 = FlatMIPS(items, raw_ids).search(state, 30, exclude=[[history[0], history[1], history[3]]])
        scores, _, _ = Ranker(str(rank_ckpt)).rank(history, top30[0].tolist())
        order = sorted(range(30), key=lambda i: (-scores[i], top30[0][i]))[:10]
        np.testing.assert_array_equal(r.ids[0], top30[0][order])
        np.testing.assert_allclose(r.scores[0], scores[order], rtol=1e-5, atol=1e-6)
        assert set(r.ids[0].tolist()) != set(expected[0].tolist())  # reranking changed the result
    finally:
        srv.stop(grace=1)


def test_committed_grpc_code_matches_the_proto(tmp_path):
    from pathlib import Path

    from genrec.serving.codegen import GENERATED, HERE, generate

    generate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (Path(HERE) / name).read_bytes(), (
            f"{name} is stale: run python -m genrec.serving.codegen")


def test_tls_server_answers_a_tls_client_and_refuses_plaintext(tmp_path, index_root):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    from genrec.serving.config import TLSConfig

    srv = start(ServeConfig(port=0, host="localhost", tls=TLSConfig(cert=str(cert), key=str(key)),
                            indexes=(IndexEntry("items", str(index_root / "items" / "v1")),)))
    try:
        with GenrecClient(f"localhost:{srv.port}", root_cert=cert.read_bytes()) as c:
            assert c.search(unit(1, 3), 5, timeout=10)[1].shape == (1, 5)
        with GenrecClient(f"localhost:{srv.port}") as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.search(unit(1, 3), 5, timeout=3)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        srv.stop(grace=1)


@pytest.mark.parametrize("rating_input,anchored", [(False, False), (True, False), (False, True)])
def test_rank_over_grpc_equals_the_in_process_ranker(tmp_path, tiny_synthetic_cfg, rating_input, anchored):
    """Rank over gRPC = the in-process ranker, for a plain, a rating-aware and an anchored ranker (whose
    retrieval model travels in the checkpoint and scores the candidates on the server too)."""
    from genrec.checkpoint import ranking_state, save_checkpoint
    from genrec.config import to_dict
    from genrec.encoders.model import SequentialEncoder
    from genrec.encoders.ranking import RankingModel, RetrievalAnchor
    from genrec.retrieval.similarity import DotProductSimilarity

    cfg = tiny_synthetic_cfg
    cfg.task, cfg.ranking.rating_input = "ranking", rating_input
    torch.manual_seed(0)
    anchor = None
    if anchored:
        anchor = RetrievalAnchor(SequentialEncoder(cfg.model, 60, cfg.data.max_len), DotProductSimilarity(), 0.05,
                                 to_dict(cfg))
    model = RankingModel(SequentialEncoder(cfg.model, 60, cfg.data.max_len + 1), 2, cfg.ranking.head_hidden,
                         rating_input=rating_input, anchor=anchor).eval()
    with torch.no_grad():
        model.item_bias.weight.normal_()
        if rating_input:
            model.rating_emb.weight[1:].normal_()
    raw = np.arange(60) * 10 + 7  # raw ids of model items 1..60
    ckpt = save_checkpoint(tmp_path / "rank.pt", model.encoder, cfg, raw, **ranking_state(model))
    srv = start(ServeConfig(port=0, ranking_checkpoint=str(ckpt), rank_microbatch=4, model_device=TEST_DEVICE))
    try:
        hist_rows, cand_rows = [3, 9, 27, 41], [5, 12, 12, 60, 33, 2, 8, 19, 44]
        ts, stars = [1000, 2000, 2600, 9000], [5.0, 1.0, 3.5, 4.0]
        history = [int(raw[i - 1]) for i in hist_rows] + [99999]
        with client_for(srv) as c:
            r = c.rank(history, [int(raw[i - 1]) for i in cand_rows] + [88888],
                       timestamps=ts + [9500], request_time=10_000, timeout=10, ratings=stars + [2.0])
            unrated = c.rank(history, [int(raw[i - 1]) for i in cand_rows], timestamps=ts + [9500], request_time=10_000,
                             timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                c.rank([99999], [7], timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            for bad in ([4.0], [1.0, float("nan"), 2.0, 3.0, 4.0]):
                with pytest.raises(grpc.RpcError) as err:
                    c.rank(history, [7], ratings=bad, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ratings" in err.value.details()
        with torch.no_grad():
            want = model.score(torch.tensor(hist_rows), torch.tensor(cand_rows), torch.tensor(ts), 10_000,
                               history_ratings=torch.tensor(stars))
        # the ratings reach a rating-aware ranker and only it
        assert np.allclose(unrated.scores, r.scores[:-1]) != rating_input
        np.testing.assert_allclose(np.asarray(r.scores[:-1]), want[:, 0].numpy(), rtol=1e-5, atol=1e-6)
        assert np.isneginf(r.scores[-1]) and list(r.unknown_ids) == [99999, 88888]
        assert r.scores[1] == r.scores[2]  # a duplicated candidate scores the same wherever it sits
    finally:
        srv.stop(grace=1)


@pytest.mark.slow
def test_soak_harness_short_run_finds_no_errors_leaks_or_wrong_answers(tmp_path):
    """A few seconds of the soak: mixed traffic while v1/v2 swap (damaged and tokenless loads offered in
    between); every valid answer checked against the exact top-k of the version it names; statuses
    outside the expected set, or a malformed request answered with another code than its own, fail it."""
    from genrec.bench import soak

    rc = soak.main(["--minutes", "0.12", "--items", "3000", "--dim", "8", "--clients", "3", "--processes", "1",
                    "--swap-seconds", "1", "--sample-seconds", "2", "--bad-every", "5", "--tight-every", "7",
                    "--out-dir", str(tmp_path), "--stem", "s"])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    verdict = rows[-1]
    assert rc == 0 and verdict["measure"] == "verdict"
    assert verdict["unexpected_status"] == 0 and verdict["wrong_answers"] == 0 and verdict["swaps"] >= 2
    assert verdict["client_ok"] > 20 and verdict["client_invalid_argument"] > 0 and verdict["client_not_found"] > 0
    assert verdict["malformed_wrong_status"] == 0  # each malformed kind got its own code
    assert verdict["damaged_refused"] >= 1 and verdict["tokenless_refused"] >= 1
    assert verdict["damaged_accepted"] == 0 and verdict["tokenless_accepted"] == 0
    assert any(r["measure"] == "sample" and r["rss_mib"] > 0 for r in rows) and (tmp_path / "s.png").stat().st_size


@pytest.mark.slow
def test_load_generator_processes_drive_a_server_and_report_its_compute(server):
    """The benchmark's client processes (asyncio closed loop, remote latency probe) complete real searches,
    and report CPU over their timed windows: the clients' own and this process's (the server runs here)."""
    from genrec.bench.load import client_shares, closed_loop, remote_latencies_ms

    assert client_shares(5, 2) == [3, 2] and client_shares(1, 4) == [1]
    q = unit(16, 9)
    run = closed_loop(server.port, q, 5, concurrency=3, seconds=0.5, processes=2)
    assert run.done > 0 and run.failed == 0
    assert 0 < run.client_cpu_s < 2 * 0.5 + 1 and run.process_cpu_s > 0  # the server answered every call here
    lat = remote_latencies_ms(server.port, q, 5, n=7)
    assert lat.total_ms.shape == lat.compute_ms.shape == (7,)
    assert (lat.compute_ms > 0).all() and (lat.compute_ms < lat.total_ms).all()
    assert lat.client_cpu_ms > 0 and lat.process_cpu_ms > 0
    floor = remote_latencies_ms(server.port, q, 5, n=3, method="health")
    assert (floor.total_ms > 0).all() and (floor.compute_ms == 0).all()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("mmap", [False, True])
def test_indexes_are_read_into_ram_unless_mmap_is_asked_for(index_root, mmap):
    from genrec.serving.registry import IndexRegistry

    served = IndexRegistry(warmup_queries=1).load("items", index_root / "items" / "v1", "size", mmap=mmap)
    mapped = str(index_root / "items" / "v1" / "items.npy") in open("/proc/self/maps").read()
    assert mapped == mmap
    assert served.index.search(unit(2, 4), 3)[1].shape == (2, 3)



@pytest.fixture
def flat_root(tmp_path):
    """Flat indexes only (no faiss: this fixture also serves the GPU image, which has none)."""
    root = tmp_path / "flat"
    save_index(FlatMIPS(torch.from_numpy(unit(300, 1)), np.arange(300) + 1000), root, "items", "v1")
    save_index(FlatMIPS(torch.from_numpy(unit(200, 2)), np.arange(200) + 5000), root, "items", "v2")
    return root


def test_an_index_entry_places_its_index_on_its_device_and_answers_as_on_the_host(flat_root):
    cfg = ServeConfig(port=0, indexes=(IndexEntry("items", str(flat_root / "items" / "v1"), device=TEST_DEVICE),),
                      batching=BatchingConfig(max_delay_ms=2.0))
    srv = start(cfg)
    try:
        assert srv.registry.get("items").index.device.type == torch.device(TEST_DEVICE).type
        q, exclude = unit(6, 11), [[1000, 1001], [], [], [1299], [], []]
        with client_for(srv) as c:
            r = c.search_reply(q, 15, exclude=exclude)
            one = c.search_reply(q[:1], 15)
            info = c.info("items")
            assert info.device.split(":")[0] == torch.device(TEST_DEVICE).type
        assert srv.metrics.registry.get_sample_value(
            "genrec_index_items", {"index": "items", "version": "v1", "device": info.device}) == 300
    finally:
        srv.stop(grace=1)
    local = FlatMIPS(torch.from_numpy(unit(300, 1)), np.arange(300) + 1000)
    for reply, (d, i) in ((r, local.search(q, 15, exclude=exclude)), (one, local.search(q[:1], 15))):
        np.testing.assert_array_equal(reply.ids, i)
        np.testing.assert_allclose(reply.scores, d, rtol=1e-5, atol=1e-6)


def test_a_device_the_machine_lacks_is_refused_by_name_and_the_old_version_keeps_serving(index_root, monkeypatch):
    from genrec.serving import registry as registry_module
    from genrec.serving.placement import PlacementError
    from genrec.serving.registry import IndexRegistry

    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    registry = IndexRegistry(warmup_queries=1)
    registry.load("items", index_root / "items" / "v1", "size")
    for device, words in ((missing, "cuda"), ("meta", "serves on cpu or cuda"), ("bogus", "not a device name")):
        with pytest.raises(PlacementError, match=words):
            registry.load("items", index_root / "items" / "v2", "size", device=device)
    assert registry.get("items").version == "v1"
    with pytest.raises(PlacementError, match="index 'items': device 'cuda"):
        RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(index_root / "items" / "v1"), device=missing),))).start()
    for models in ({"encoder_checkpoint": "never-read.pt"}, {"ranking_checkpoint": "never-read.pt"}):
        with pytest.raises(PlacementError, match=f"device '{missing}' asked for"):
            RetrievalServer(ServeConfig(port=0, model_device=missing, **models))
    # a CPU-only kind (faiss) named onto a GPU that exists: pretend this machine has one
    monkeypatch.setattr(registry_module, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(PlacementError, match="index 'hnsw': mips-faiss indexes search on the CPU only"):
        registry.load("hnsw", index_root / "hnsw", "size", device="cuda")
    assert registry.get("hnsw") is None


@pytest.mark.slow
def test_bench_serving_reports_cpu_per_call_and_a_median_ratio_over_repeats(tmp_path):
    """`genrec bench serving` end to end on a tiny index: every row kind, CPU per call beside the timings,
    and with --repeats one QPS pair per repeat plus their median ratio."""
    from genrec.bench import serving as bench

    rc = bench.main(["--items", "500", "--dim", "8", "--latency-queries", "5", "--concurrency", "2", "--seconds", "0.3",
                     "--repeats", "2", "--out-dir", str(tmp_path), "--stem", "s"])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rc == 0 and (tmp_path / "s.png").stat().st_size
    health = next(r for r in rows if r["system"] == "grpc health check (transport floor)")
    assert health["client_cpu_ms"] > 0 and health["server_cpu_ms"] > 0
    qps = [r for r in rows if r["measure"] == "throughput"]
    assert sorted((r["rep"], r["system"]) for r in qps) == [(0, "grpc batching=off"), (0, "grpc batching=on"),
                                                           (1, "grpc batching=off"), (1, "grpc batching=on")]
    assert all(r["qps"] > 0 and r["failed"] == 0 and r["server_cpu_ms"] > 0 and r["client_cpu_ms"] > 0 for r in qps)
    ratios = [r["qps"] for r in rows if r["measure"] == "throughput_ratio"]
    median = next(r for r in rows if r["measure"] == "throughput_ratio_median")
    assert len(ratios) == 2 and median["ratio_min"] <= median["qps"] <= median["ratio_max"]
    assert median["qps"] == pytest.approx(float(np.median(ratios)), abs=0.01)


def test_client_supplied_names_are_bounded_and_never_echoed_whole(server, index_root):
    """LoadIndex refuses names that are not one short safe path component (they would become metrics
    labels and log lines); a search naming a 10,000-character index gets NOT_FOUND with a short message."""
    with client_for(server, token="s3cret") as admin:
        for name in ["../../x", "x" * 20_000, "items\u202e", ".hidden"]:
            with pytest.raises(grpc.RpcError) as err:
                admin.load_index(name, str(index_root / "items" / "v2"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 300
        with pytest.raises(grpc.RpcError) as err:
            admin.search_reply(unit(1, 3), 5, index="y" * 10_000)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 300
        assert admin.search(unit(1, 3), 5)[1].shape == (1, 5)  # still serving


def test_queries_whose_scores_overflow_are_refused_not_answered_with_nan(server):
    """Finite but huge query values (3e38) overflow float32 scores: INVALID_ARGUMENT, not OK with NaN
    scores and arbitrary ids."""
    with client_for(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.search(np.full((1, unit(1, 0).shape[1]), 3e38, dtype=np.float32), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overflow" in err.value.details()
        assert np.isfinite(c.search(unit(1, 3), 5)[0]).all()


def test_a_second_server_on_a_busy_port_is_refused_not_silently_sharing_it(server, tmp_path, capsys):
    """grpc sets SO_REUSEPORT on Linux by default, so a second server used to bind the same port and take
    half of its connections; now it fails with the port named (CLI: message and exit 2)."""
    from genrec.cli import main
    from genrec.serving.server import PortUnavailableError

    with pytest.raises(PortUnavailableError, match=f"127.0.0.1:{server.port}"):
        RetrievalServer(ServeConfig(host="127.0.0.1", port=server.port))
    assert main(["serve", "--set", "host=127.0.0.1", "--set", f"port={server.port}"]) == 2
    assert f"could not bind 127.0.0.1:{server.port}" in capsys.readouterr().err
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:  # the first server is untouched
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_index_built_from_another_model_is_refused_unless_allowed(server, index_root, tmp_path, caplog):
    """Model and index stay paired: a version whose manifest names another encoder checkpoint (sha256)
    than the server's is refused at LoadIndex (FAILED_PRECONDITION, old version serving) and at startup;
    an index that names no model, or the same one, loads; allow_unpaired_indexes serves it with a warning.
    build-index from `genrec embed` output records the model from the embeddings' sidecar."""
    from genrec.index.build import read_items
    from genrec.serving.registry import IndexRegistry, ModelMismatchError

    ours, theirs = "a" * 64, "b" * 64
    items = torch.from_numpy(unit(50, 3))
    other = save_index(FlatMIPS(items, np.arange(50)), tmp_path, "items", "other", {"encoder_checkpoint_sha256": theirs})
    paired = save_index(FlatMIPS(items, np.arange(50)), tmp_path, "items", "paired", {"encoder_checkpoint_sha256": ours})
    server.registry.encoder_sha256 = ours
    with client_for(server, token="s3cret") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.load_index("items", str(other))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "bbbbbbbbbbbb" in err.value.details() and "aaaaaaaaaaaa" in err.value.details()
        assert c.info("items").version == "v1"
        assert c.load_index("items", str(paired)).version == "paired"
        assert c.load_index("items", str(index_root / "items" / "v2")).version == "v2"  # names no model

    with pytest.raises(ModelMismatchError, match="allow_unpaired_indexes"):
        IndexRegistry(warmup_queries=0, encoder_sha256=ours).load("items", other)
    assert IndexRegistry(warmup_queries=0).load("items", other).version == "other"  # no encoder: nothing to pair
    with caplog.at_level("WARNING"):
        assert IndexRegistry(warmup_queries=0, encoder_sha256=ours, allow_unpaired=True).load("items", other).version == "other"
    assert "serving it anyway" in caplog.text

    np.save(tmp_path / "emb.npy", unit(5, 4))
    (tmp_path / "emb.json").write_text(json.dumps({"embeddings": "emb.npy", "checkpoint_sha256": theirs}))
    assert read_items(str(tmp_path / "emb.npy")).source["checkpoint_sha256"] == theirs


def test_client_health_the_asyncio_client_and_the_access_log(index_root, caplog, capsys):
    """GenrecClient.health() speaks grpc.health.v1; AsyncGenrecClient answers as the blocking client; with
    access_log on, each request is one genrec.access line (method, code, peer); query --timestamps is
    checked against the history before any call."""
    import asyncio

    from genrec.cli import main
    from genrec.serving.client import AsyncGenrecClient

    srv = start(ServeConfig(port=0, indexes=(IndexEntry("items", str(index_root / "items" / "v1")),), access_log=True))
    q = unit(3, 8)
    try:
        with caplog.at_level("INFO", logger="genrec.access"), client_for(srv) as c:
            assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
            want_s, want_i = c.search(q, 7)
            with pytest.raises(grpc.RpcError):
                c.search(q, 7, index="nope")

            async def run():
                async with AsyncGenrecClient(f"127.0.0.1:{srv.port}") as ac:
                    return await ac.health(), await ac.search(q, 7), (await ac.info()).version

            health, (got_s, got_i), version = asyncio.run(run())
        assert health == "SERVING" and version == "v1"
        assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)
        lines = [r.getMessage() for r in caplog.records if r.name == "genrec.access"]
        assert sum(line.startswith("Search OK ") for line in lines) == 2
        assert any(line.startswith("Search NOT_FOUND ") and "peer=" in line for line in lines)
    finally:
        srv.stop(grace=1)
    assert main(["query", "--target", f"127.0.0.1:{srv.port}", "--history", "1,2,3", "--timestamps", "10,20"]) == 2
    assert "--timestamps has 2 values for 3 history ids" in capsys.readouterr().err


def test_search_filters_travel_over_grpc_to_every_kind(server):
    """allow_ids / deny_ids on a Search reach the index (flat: exact over the items let through; faiss: its
    IDSelector)."""
    q = unit(4, 11)
    allow = list(range(1000, 1300, 3))
    with client_for(server) as c:
        _, got = c.search(q, 10, index="items", allow=allow, deny=allow[:4])
        _, hnsw = c.search(q, 10, index="hnsw", allow=[x - 1000 for x in allow])  # that index's ids are 0..299
        assert np.isin(hnsw[hnsw >= 0], np.array(allow) - 1000).all()
        with pytest.raises(grpc.RpcError) as err:  # `where` reaches the index, which has no attributes
            c.search(q, 10, index="items", where={"category": ["shoes"]})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no item attributes" in err.value.details()
    items = torch.from_numpy(unit(300, 1))
    keep = np.isin(np.arange(300) + 1000, allow[4:])
    _, want = FlatMIPS(items[torch.from_numpy(keep)], (np.arange(300) + 1000)[keep]).search(q, 10)
    np.testing.assert_array_equal(got, want)
