"""Scatter-gather broker over loopback shard servers (bounded loops, short deadlines)."""

import time

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.index.mips import FlatMIPS
from genrec.index.storage import save_index
from genrec.serving.client import GenrecClient
from genrec.serving.config import BrokerConfig, IndexEntry, ServeConfig
from genrec.serving.server import RetrievalServer

N, DIM, SHARDS = 600, 8, 3


@pytest.fixture
def cluster(tmp_path):
    g = torch.Generator().manual_seed(0)
    items = F.normalize(torch.randn(N, DIM, generator=g), dim=-1)
    ids = np.arange(N) + 10_000
    whole = save_index(FlatMIPS(items, ids), tmp_path, "all", "v1")
    bounds = [(s * N // SHARDS, (s + 1) * N // SHARDS) for s in range(SHARDS)]
    servers = []
    for s, (a, b) in enumerate(bounds):
        path = save_index(FlatMIPS(items[a:b], ids[a:b]), tmp_path, f"shard{s}", "v1")
        save_index(FlatMIPS(items[a:b].flip(1), ids[a:b]), tmp_path, f"shard{s}", "v2")  # a different version
        servers.append(RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(path)),), admin_open=True)).start())
    single = RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(whole)),))).start()
    yield items, ids, bounds, servers, single, tmp_path
    for srv in servers + [single]:
        srv.stop(grace=0.5)


def broker_for(servers, policy="partial"):
    shards = tuple(f"127.0.0.1:{s.port}" for s in servers)
    return RetrievalServer(ServeConfig(port=0, role="broker", broker=BrokerConfig(
        shards=shards, policy=policy, shard_timeout_s=2.0, health_interval_s=0.1))).start()


def queries(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, DIM, generator=g), dim=-1).numpy()


def test_broker_merges_shards_into_the_single_server_answer(cluster):
    items, ids, bounds, servers, single, _ = cluster
    broker = broker_for(servers)
    try:
        q = queries()
        with GenrecClient(f"127.0.0.1:{broker.port}") as b, GenrecClient(f"127.0.0.1:{single.port}") as s:
            got = b.search_reply(q, 25, timeout=10, exclude=[[10_000], [], [], [], []])
            want = s.search_reply(q, 25, timeout=10, exclude=[[10_000], [], [], [], []])
            info = b.info()
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        assert got.exact.all() and not got.failed_shards
        assert info.count == N and info.kind == "broker" and info.version.count("@v1") == SHARDS
        assert info.device.count("@cpu") == SHARDS
    finally:
        broker.stop(grace=0.5)


def test_a_down_shard_gives_partial_results_or_a_clean_failure_without_hanging(cluster):
    items, ids, bounds, servers, _, _ = cluster
    partial, strict = broker_for(servers, "partial"), broker_for(servers, "fail")
    try:
        servers[1].stop(grace=0)
        q = queries()
        t = time.monotonic()
        with GenrecClient(f"127.0.0.1:{partial.port}") as c:
            r = c.search_reply(q, 10, timeout=10)
        keep = np.r_[np.arange(*bounds[0]), np.arange(*bounds[2])]
        _, want = FlatMIPS(items[keep], ids[keep]).search(q, 10)
        np.testing.assert_array_equal(r.ids, want)
        assert r.failed_shards == [f"127.0.0.1:{servers[1].port}"] and not r.exact.any()
        with GenrecClient(f"127.0.0.1:{strict.port}") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.search(q, 10, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and str(servers[1].port) in err.value.details()
        assert time.monotonic() - t < 8
        time.sleep(0.5)  # a health round
        ch = grpc.insecure_channel(f"127.0.0.1:{strict.port}")
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        ch.close()
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # 'fail' needs every shard
    finally:
        partial.stop(grace=0.5)
        strict.stop(grace=0.5)


def test_shards_hot_swap_independently_behind_the_broker(cluster):
    items, ids, bounds, servers, _, root = cluster
    broker = broker_for(servers)
    try:
        with GenrecClient(f"127.0.0.1:{servers[0].port}") as admin:
            admin.load_index("items", str(root / "shard0" / "v2"))
        with GenrecClient(f"127.0.0.1:{broker.port}") as c:
            r = c.search_reply(queries(), 10, timeout=10)
        assert r.version.split(",")[0].endswith("@v2") and r.version.count("@v1") == SHARDS - 1
        a, b = bounds[0]
        swapped = torch.cat([items[a:b].flip(1), items[b:]])
        _, want = FlatMIPS(swapped, ids[a:]).search(queries(), 10)
        np.testing.assert_array_equal(r.ids, want)
    finally:
        broker.stop(grace=0.5)


def test_replicas_behind_one_shard_target_share_the_load_and_cover_a_stopped_one(cluster):
    """Two replicas of one shard behind one target (``ipv4:a,b``, as a DNS name with two records would
    resolve): gRPC's round_robin spreads the calls over both; once one is stopped and its channel has
    noticed, no request fails and every answer is still the whole index's."""
    items, ids, bounds, servers, single, tmp_path = cluster
    path = tmp_path / "all" / "v1"
    replicas = [RetrievalServer(ServeConfig(port=0, indexes=(IndexEntry("items", str(path)),))).start() for _ in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    broker = RetrievalServer(ServeConfig(port=0, role="broker", broker=BrokerConfig(
        shards=(target,), shard_timeout_s=2.0, health_interval_s=0.1))).start()
    served = lambda r: r.metrics.registry.get_sample_value(  # noqa: E731
        "genrec_requests_total", {"method": "Search", "code": "OK"}) or 0
    try:
        q = queries()
        with GenrecClient(f"127.0.0.1:{single.port}") as s:
            want = s.search_reply(q, 10, timeout=10).ids
        with GenrecClient(f"127.0.0.1:{broker.port}") as b:
            for _ in range(20):
                np.testing.assert_array_equal(b.search_reply(q, 10, timeout=10).ids, want)
            assert served(replicas[0]) >= 5 and served(replicas[1]) >= 5  # both replicas took calls
            replicas[0].stop(grace=0.5)
            time.sleep(1.0)  # the channel sees the closed connection / NOT_SERVING health
            before = served(replicas[1])
            for _ in range(20):
                r = b.search_reply(q, 10, timeout=10)
                np.testing.assert_array_equal(r.ids, want)
                assert not r.failed_shards
            assert served(replicas[1]) - before == 20
    finally:
        broker.stop(grace=0.5)
        for r in replicas:
            r.stop(grace=0.5)


def test_the_broker_speaks_tls_to_its_shards(cluster, tmp_path):
    """broker.tls_root_cert: the broker's shard channels are TLS (a plaintext shard target fails, a TLS
    shard answers as the plaintext one did)."""
    import shutil
    import subprocess

    from genrec.serving.config import TLSConfig

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    items, ids, bounds, servers, single, root = cluster
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=shard.genrec", "-addext", "subjectAltName=DNS:shard.genrec"],
                   check=True, capture_output=True, timeout=60)
    shard = RetrievalServer(ServeConfig(port=0, tls=TLSConfig(cert=str(cert), key=str(key)),
                                        indexes=(IndexEntry("items", str(root / "all" / "v1")),))).start()
    broker = RetrievalServer(ServeConfig(port=0, role="broker", broker=BrokerConfig(
        shards=(f"127.0.0.1:{shard.port}",), tls_root_cert=str(cert), tls_server_name="shard.genrec",
        shard_timeout_s=2.0, health_interval_s=0.1))).start()
    plain = RetrievalServer(ServeConfig(port=0, role="broker", broker=BrokerConfig(
        shards=(f"127.0.0.1:{shard.port}",), policy="fail", shard_timeout_s=1.0, health_interval_s=0.1))).start()
    try:
        q = queries()
        with GenrecClient(f"127.0.0.1:{single.port}") as s, GenrecClient(f"127.0.0.1:{broker.port}") as b:
            np.testing.assert_array_equal(b.search_reply(q, 10, timeout=10).ids, s.search_reply(q, 10, timeout=10).ids)
        with GenrecClient(f"127.0.0.1:{plain.port}") as p:
            with pytest.raises(grpc.RpcError) as err:
                p.search_reply(q, 10, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for srv in (broker, plain, shard):
            srv.stop(grace=0.5)
