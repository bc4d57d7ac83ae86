"""The gRPC server: Retrieval + grpc.health.v1 + reflection, limits, TLS, admin token, shutdown.

Lifecycle: the port opens with health NOT_SERVING; indexes are verified, loaded and warmed; health
turns SERVING. On stop, health turns NOT_SERVING first, new RPCs get UNAVAILABLE, in-flight ones get
``grace_seconds`` to finish, then the batcher and the metrics endpoint close.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import weakref
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genrec.io import sha256_file
from genrec.serving import genrec_pb2_grpc as pb_grpc
from genrec.serving.broker import BrokerService, watch_health
from genrec.serving.config import ServeConfig
from genrec.serving.metrics import ServerMetrics
from genrec.serving.ranker import Ranker
from genrec.serving.registry import IndexRegistry
from genrec.serving.service import RetrievalService, SERVICE_NAME
from genrec.serving.user_encoder import UserEncoder

log = logging.getLogger(__name__)
ADMIN_METHODS = {f"/{SERVICE_NAME}/LoadIndex"}


class PortUnavailableError(OSError):
    """The configured host:port cannot be bound (typically: another process listens on it)."""


class AdminTokenInterceptor(grpc.ServerInterceptor):
    """Admin methods need ``authorization: Bearer <token>`` metadata. Without a configured token they are
    closed (PERMISSION_DENIED) unless ``open`` (``admin_open: true``) lets every client use them."""

    def __init__(self, token: str, open: bool = False, metrics: ServerMetrics | None = None):
        self.token, self.open, self.metrics = token, open, metrics

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in ADMIN_METHODS or (self.open and not self.token):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if self.token and hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            return continuation(handler_call_details)
        if not self.token:
            code, message = grpc.StatusCode.PERMISSION_DENIED, "admin methods are closed: set admin_token (or admin_open: true)"
        elif not got:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "admin method: send 'authorization: Bearer <token>'"
        else:
            code, message = grpc.StatusCode.PERMISSION_DENIED, "admin token rejected"

        if self.metrics is not None:  # refused before any handler ran: count it here
            self.metrics.requests.labels(handler_call_details.method.rsplit("/", 1)[-1], code.name).inc()

        def deny(request, context):
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(deny)


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """At most ``limit`` RPCs in flight; the next ones get RESOURCE_EXHAUSTED at once. Done here, not with
    grpc's ``maximum_concurrent_rpcs``, so that those refusals (and calls to unknown methods) are counted
    in the metrics: grpc refuses them before any handler or counter runs.

    A call holds its slot from the moment it is routed until its handler returns (or its stream ends); a
    call that grpc drops before its handler runs (the client cancelled while it waited for a thread)
    gives the slot back when grpc lets go of the handler."""

    def __init__(self, limit: int, metrics: ServerMetrics | None = None):
        self.limit, self.metrics = limit, metrics
        self.in_flight = 0
        self._lock = threading.Lock()

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method.rsplit("/", 1)[-1], code.name).inc()

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:  # grpc answers UNIMPLEMENTED
            self._count(method, grpc.StatusCode.UNIMPLEMENTED)
            return None
        with self._lock:
            admitted = self.in_flight < self.limit
            self.in_flight += admitted
        if not admitted:
            self._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            message = f"more than {self.limit} RPCs in flight (limits.max_concurrent_rpcs): retry with backoff"

            def refuse(request, context):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

            return grpc.unary_unary_rpc_method_handler(refuse)
        return _holding_slot(handler, self._release)


class _Slot:
    """A call's claim on a concurrency slot; it lives as long as the call's handler."""

    __slots__ = ("__weakref__",)


def _holding_slot(handler: grpc.RpcMethodHandler, release) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour calling ``release`` once when it finishes, or when the handler is freed."""
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    behavior = getattr(handler, kind)
    slot = _Slot()
    done = weakref.finalize(slot, release)  # call-once: on completion, or when grpc frees the handler
    if handler.response_streaming:
        def run(request, context, slot=slot):
            try:
                yield from behavior(request, context)
            finally:
                done()
    else:
        def run(request, context, slot=slot):
            try:
                return behavior(request, context)
            finally:
                done()
    return handler._replace(**{kind: run})


class RetrievalServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.metrics = ServerMetrics()
        encoder = None
        if cfg.encoder_checkpoint:
            encoder = UserEncoder(cfg.encoder_checkpoint, cfg.model_device)
        self.registry = IndexRegistry(cfg.warmup_queries, on_swap=self.metrics.index_active,
                                      encoder_sha256=sha256_file(cfg.encoder_checkpoint) if encoder else None,
                                      allow_unpaired=cfg.allow_unpaired_indexes)
        ranker = None
        if cfg.ranking_checkpoint:
            ranker = Ranker(cfg.ranking_checkpoint, cfg.model_device)
        if cfg.role == "broker":
            self.service = BrokerService(cfg, self.metrics, encoder)
        elif cfg.role == "server":
            self.service = RetrievalService(cfg, self.registry, self.metrics, encoder, ranker)
        else:
            raise ValueError(f"role must be server or broker, got {cfg.role!r}")
        lim = cfg.limits
        options = [("grpc.so_reuseport", 0),  # grpc's default on Linux lets a second server share the port
                   ("grpc.max_send_message_length", lim.max_message_bytes),
                   ("grpc.max_receive_message_length", lim.max_message_bytes)]
        self.concurrency = ConcurrencyLimitInterceptor(lim.max_concurrent_rpcs, self.metrics)
        interceptors = [self.concurrency, AdminTokenInterceptor(cfg.admin_token, cfg.admin_open, self.metrics)]
        if cfg.admin_open and not cfg.admin_token:
            log.warning("admin_open: any client can call LoadIndex; set admin_token for anything but a trusted network")
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=lim.workers, thread_name_prefix="genrec-rpc"),
                                  options=options, interceptors=interceptors)
        pb_grpc.add_RetrievalServicer_to_server(self.service, self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls.cert or cfg.tls.key:
                with open(cfg.tls.key, "rb") as k, open(cfg.tls.cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
            self.port = 0
        if self.port == 0:
            self.server.stop(None)
            raise PortUnavailableError(f"could not bind {address}: the port is in use (another server?) "
                                       "or the host is not an address of this machine")
        self.metrics_port = None
        self._stopped = threading.Event()
        self._watch_stop = threading.Event()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> "RetrievalServer":
        """Open the port (NOT_SERVING), load + warm every configured index, then report SERVING."""
        self.server.start()
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.cfg.metrics_port, self.cfg.host)
        if self.cfg.role == "broker":  # health follows the shards'

            watch_health(self.service, self._set_health, self.cfg.broker.health_interval_s, self._watch_stop)
            log.info("broker over %s on %s:%d", ", ".join(self.cfg.broker.shards), self.cfg.host, self.port)
            return self
        for entry in self.cfg.indexes:
            self.registry.load(entry.name, entry.path, entry.verify, entry.mmap, entry.device)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d%s", ", ".join(self.registry.names()) or "no index", self.cfg.host, self.port,
                 f" (metrics on :{self.metrics_port})" if self.metrics_port else "")
        return self

    def reload(self) -> None:
        """Load the latest version of every configured index (SIGHUP); failures keep the old one."""
        for entry in self.cfg.indexes:
            try:
                self.registry.load(entry.name, entry.path, entry.verify, entry.mmap, entry.device)
            except Exception as e:  # noqa: BLE001
                log.warning("reload of %s refused, old version keeps serving: %s", entry.name, e)

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._watch_stop.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.closing = True
        self.server.stop(self.cfg.grace_seconds if grace is None else grace).wait()
        if self.service.batcher is not None:
            self.service.batcher.close()
        if hasattr(self.service, "close"):
            self.service.close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(cfg: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads the configured indexes."""
    server = RetrievalServer(cfg).start()
    print(f"genrec: serving on {cfg.host}:{server.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.stop).start())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=server.reload).start())
    server.wait()
