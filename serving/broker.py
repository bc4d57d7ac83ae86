"""Scatter-gather broker: one endpoint in front of shard servers that each hold a slice of an index.

A Search is forwarded unchanged to every shard at once (each call capped by the request's remaining
deadline and ``shard_timeout_s``); every shard answers its exact local top-k, and the broker merges them
on (score desc, id asc) into the global top-k, which equals one server's answer over the whole index.
A shard that fails or times out is named in ``failed_shards``: with policy ``partial`` the merged answer
of the others is returned, with ``fail`` the request fails UNAVAILABLE. The broker's health is SERVING
while enough shards are (all for ``fail``, one for ``partial``), checked every ``health_interval_s``.
SearchByUser encodes at the broker (when it has the encoder) and fans out a Search.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.kernels.topk import select_topk
from genrec.serving import genrec_pb2 as pb
from genrec.serving import genrec_pb2_grpc as pb_grpc
from genrec.serving.config import ServeConfig
from genrec.serving.service import ServiceError, encode_users, invalid, item_ids, run_rpc, set_ids
from genrec.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)


# Replicas behind one shard target: gRPC's own round_robin over the addresses the name resolves to, each
# subchannel health-checked on grpc.health.v1 (a replica reporting NOT_SERVING, e.g. draining, gets no
# new calls), and a Search that meets an UNAVAILABLE replica retried on another (Search is idempotent).
SHARD_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": "genrec.serving.v1.Retrieval"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.02s", "maxBackoff": "0.2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


def shard_channel(target: str, root_cert_path: str = "", server_name: str = "") -> grpc.Channel:
    """A channel to one shard (one or several replicas); TLS when ``root_cert_path`` names a CA bundle."""
    options = [("grpc.service_config", SHARD_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
    if not root_cert_path:
        return grpc.insecure_channel(target, options)
    with open(root_cert_path, "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options)


class BrokerService(pb_grpc.RetrievalServicer):
    def __init__(self, cfg: ServeConfig, metrics: ServerMetrics, encoder=None):
        if cfg.broker.policy not in ("partial", "fail"):
            raise ValueError(f"broker.policy must be partial or fail, got {cfg.broker.policy!r}")
        if not cfg.broker.shards:
            raise ValueError("a broker needs broker.shards (host:port of each shard server)")
        self.cfg, self.metrics, self.encoder = cfg, metrics, encoder
        self.closing = False
        self.batcher = None
        self.shards = list(cfg.broker.shards)
        self.channels = [shard_channel(t, cfg.broker.tls_root_cert, cfg.broker.tls_server_name) for t in self.shards]
        self.stubs = [pb_grpc.RetrievalStub(c) for c in self.channels]
        self.health_stubs = [health_pb2_grpc.HealthStub(c) for c in self.channels]
        self.pool = futures.ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)), thread_name_prefix="genrec-broker")

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        for c in self.channels:
            c.close()

    def shards_serving(self) -> list[bool]:
        out = []
        for stub in self.health_stubs:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                out.append(r.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                out.append(False)
        return out

    def healthy(self) -> bool:
        up = self.shards_serving()
        return all(up) if self.cfg.broker.policy == "fail" else any(up)

    # ---- fan-out ----
    def _fan_out(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        started = time.monotonic()
        remaining = context.time_remaining()
        timeout = self.cfg.broker.shard_timeout_s if remaining is None or remaining > 1e6 else min(remaining, self.cfg.broker.shard_timeout_s)
        calls = [self.pool.submit(stub.Search, request, timeout=timeout) for stub in self.stubs]
        replies, failed, first_error = [], [], None
        for target, call in zip(self.shards, calls):
            try:
                replies.append(call.result())
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise ServiceError(code, f"{target}: {e.details()}") from None  # the request's fault, not the shard's
                failed.append(target)
                first_error = first_error or e
        if failed and (self.cfg.broker.policy == "fail" or not replies):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"shard(s) {', '.join(failed)} failed: {first_error.code().name} {first_error.details()}")
        nq, k = replies[0].nq, request.k
        scores = torch.from_numpy(np.concatenate([np.asarray(r.scores, np.float32).reshape(nq, k) for r in replies], 1))
        ids = torch.from_numpy(np.concatenate([np.asarray(r.ids, np.int64).reshape(nq, k) for r in replies], 1))
        s, i = select_topk(scores, ids, k)
        resp = pb.SearchResponse(nq=nq, k=k, index=replies[0].index, request_id=request.request_id,
                                 version=",".join(f"{t}@{r.version}" for t, r in zip([t for t in self.shards if t not in failed], replies)))
        resp.ids.extend(i.reshape(-1).tolist())
        if any(len(r.ids_str) for r in replies):  # a string-id catalog: carry each id's string through the merge
            key_of = {-1: ""}
            for r in replies:
                key_of.update(zip(r.ids, r.ids_str))
            resp.ids_str.extend(key_of[x] for x in resp.ids)
        resp.scores.extend(s.reshape(-1).tolist())
        resp.exact.extend(np.logical_and.reduce([np.asarray(r.exact, bool) for r in replies]).tolist() if not failed
                          else [False] * nq)
        resp.bound.extend(np.maximum.reduce([np.asarray(r.bound, np.float32) for r in replies]).tolist())
        resp.failed_shards.extend(failed)
        resp.timing.compute_ms = max(r.timing.total_ms for r in replies)
        resp.timing.total_ms = (time.monotonic() - started) * 1e3
        resp.timing.batch_size = max(r.timing.batch_size for r in replies)
        return resp

    def _call(self, method: str, context, fn):
        return run_rpc(self.metrics, method, context, fn, self.closing, self.cfg.access_log)

    # ---- RPCs ----
    def Search(self, request, context):
        def run():
            if request.k <= 0 or request.k > self.cfg.limits.max_k:
                raise invalid(f"k must be in 1..{self.cfg.limits.max_k}, got {request.k}")
            return self._fan_out(request, context)

        return self._call("Search", context, run)

    def _encode_and_fan_out(self, request, users, context) -> tuple[pb.SearchResponse, list[np.ndarray]]:
        """SearchByUser(s) on the broker: the users' histories encoded here as one batch, one Search of nq =
        users fanned out with each user's exclusions and the request's filters -> (merged answer, per-user
        unknown ids)."""
        if self.encoder is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "no encoder_checkpoint configured on the broker")
        if request.rerank:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "rerank needs the ranking stage on one server; "
                                                                    "a broker has none")
        if not users:
            raise invalid("users is empty")
        if len(users) > self.cfg.limits.max_nq:
            raise invalid(f"{len(users)} users exceed max_nq {self.cfg.limits.max_nq}")
        strings = self.encoder.string_ids
        histories = [item_ids(u, "history", strings, "the broker's encoder") for u in users]
        enc = encode_users(self.encoder, users, histories, self.cfg.limits.max_history)
        q = np.ascontiguousarray(enc.states, dtype="<f4")
        search = pb.SearchRequest(index=request.index, version=request.version, k=request.k, dim=q.shape[1],
                                  queries=q.tobytes(), exact=request.exact, kprime=request.kprime,
                                  request_id=request.request_id, allow_ids=request.allow_ids,
                                  deny_ids=request.deny_ids, allow_ids_str=request.allow_ids_str,
                                  deny_ids_str=request.deny_ids_str, where=request.where)
        if not request.keep_history:
            for known in enc.known:
                if strings:
                    search.exclude_str.add().values.extend(known.tolist())
                else:
                    search.exclude.add().ids.extend(known.tolist())
        return self._fan_out(search, context), enc.unknown

    def SearchByUser(self, request, context):
        def run():
            resp, unknown = self._encode_and_fan_out(request, [request], context)
            set_ids(resp, "unknown_ids", unknown[0], self.encoder.string_ids)
            return resp

        return self._call("SearchByUser", context, run)

    def SearchByUsers(self, request, context):
        def run():
            resp, unknown = self._encode_and_fan_out(request, list(request.users), context)
            out = pb.SearchByUsersResponse(results=resp)
            for u in unknown:
                if self.encoder.string_ids:
                    out.unknown_ids_str.add().values.extend(u.tolist())
                else:
                    out.unknown_ids.add().ids.extend(u.tolist())
            return out

        return self._call("SearchByUsers", context, run)

    def Rank(self, request, context):
        return self._call("Rank", context, lambda: _refuse("Rank needs the ranking stage, not built yet"))

    def GetIndexInfo(self, request, context):
        def run():
            infos = [stub.GetIndexInfo(request, timeout=self.cfg.broker.shard_timeout_s) for stub in self.stubs]
            return pb.IndexInfo(index=infos[0].index, kind="broker", count=sum(i.count for i in infos), dim=infos[0].dim,
                                version=",".join(f"{t}@{i.version}" for t, i in zip(self.shards, infos)),
                                indexes=infos[0].indexes, device=",".join(f"{t}@{i.device}" for t, i in zip(self.shards, infos)))

        return self._call("GetIndexInfo", context, run)

    def LoadIndex(self, request, context):
        return self._call("LoadIndex", context, lambda: _refuse("load versions on each shard server; the broker holds no index"))


def _refuse(message: str):
    raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, message)


def watch_health(service: BrokerService, set_status, interval: float, stop: threading.Event) -> threading.Thread:
    """Keep the broker's own health in step with its shards'."""
    def loop() -> None:
        while not stop.is_set():
            ok = service.healthy()
            set_status(health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)
            stop.wait(interval)

    t = threading.Thread(target=loop, name="genrec-broker-health", daemon=True)
    t.start()
    return t
