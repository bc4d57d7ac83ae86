"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("genrec_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.index_requests = Counter("genrec_index_requests", "RPCs naming an index, by index (served names only; "
                                      "anything else counts as \"unknown\"), method and status code",
                                      ["index", "method", "code"], registry=r)
        self.latency = Histogram("genrec_latency_seconds", "RPC latency by stage (queue, compute, total)",
                                 ["method", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batcher_busy = Counter("genrec_batcher_busy_seconds", "seconds the batcher spent searching "
                                    "(its rate is the batcher's utilisation)", registry=r)
        self.batch_size = Histogram("genrec_batch_queries", "queries per coalesced search", buckets=BATCH_BUCKETS, registry=r)
        self.expired = Counter("genrec_expired_skipped", "requests dropped unserved because their deadline passed", registry=r)
        self.searched_queries = Counter("genrec_searched_queries", "queries actually computed", registry=r)
        self.queue_depth = Gauge("genrec_queue_depth", "requests waiting for the batcher", registry=r)
        self.index_items = Gauge("genrec_index_items", "items in the active version (one series per index)",
                                 ["index", "version", "device"], registry=r)
        self.index_swaps = Counter("genrec_index_loads", "index loads by outcome", ["index", "outcome"], registry=r)

    def index_active(self, old, new) -> None:
        """Report registry entry ``new`` (``Served``) as its index's active version, dropping the series of
        ``old``, the version it replaced (None for the first). The registry calls this under its lock."""
        labels = _index_labels(new)
        if old is not None and _index_labels(old) != labels:
            self.index_items.remove(*_index_labels(old))
        self.index_items.labels(*labels).set(new.index.ntotal)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics endpoint; returns the bound port (port 0 = any free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


def _index_labels(served) -> tuple[str, str, str]:
    """genrec_index_items labels of a registry entry: index name, version, device."""
    return served.name, served.version, str(served.index.device)
