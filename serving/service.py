"""The Retrieval servicer: request validation, status codes, batching, hot swap, metrics.

Status codes (the conventions gRPC users expect):
  INVALID_ARGUMENT    NaN/Inf, dim unset or wrong, byte length not nq*dim*4, empty batch, k <= 0,
                      k > max_k, nq > max_nq, history too long, exclude rows != nq
  NOT_FOUND           unknown index or version; no history id known to the encoder; no index at a path
  RESOURCE_EXHAUSTED  request queue full, more than limits.max_concurrent_rpcs in flight (server.py), oversize message (grpc)
  DEADLINE_EXCEEDED   deadline passed (a queued request is dropped before any compute)
  FAILED_PRECONDITION exact search on an approximate-only index; SearchByUser without an encoder;
                      index format newer than this server; LoadIndex onto a device this machine lacks;
                      LoadIndex of an index built from another model checkpoint than the encoder's
  DATA_LOSS           LoadIndex found a checksum / size mismatch (the old version keeps serving)
  UNAVAILABLE         the server is shutting down
  UNIMPLEMENTED       Rank when no ranking_checkpoint is configured
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
from typing import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np

from genrec.index.base import FilterUnsupported
from genrec.index.storage import IndexFormatError, check_name, shown
from genrec.retrieval.keys import plain_id
from genrec.retrieval.search import SearchResult
from genrec.serving import genrec_pb2 as pb
from genrec.serving import genrec_pb2_grpc as pb_grpc
from genrec.serving.batching import DynamicBatcher, Expired, Job, QueueFull, run_group
from genrec.serving.config import IndexEntry, ServeConfig
from genrec.serving.metrics import ServerMetrics
from genrec.serving.placement import PlacementError
from genrec.serving.registry import IndexRegistry, LoadAbandoned, ModelMismatchError, Served

log = logging.getLogger(__name__)
MAX_DETAILS_CHARS = 512
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name
MAX_PATH_CHARS = 4096  # a LoadIndex path longer than this is refused, not echoed


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode_queries(request: pb.SearchRequest, index_dim: int, max_nq: int) -> np.ndarray:
    """request.queries bytes (or query_values) -> (nq, dim) float32, with every check of the matrix."""
    dim = request.dim
    if dim == 0:
        raise invalid("dim must be set (the query vector length)")
    if dim != index_dim:
        raise invalid(f"query dim {dim} does not match the index dim {index_dim}")
    if request.queries and request.query_values:
        raise invalid("give queries as bytes or as query_values, not both")
    if request.queries:
        if len(request.queries) % (4 * dim):
            raise invalid(f"queries: {len(request.queries)} bytes is not a multiple of 4*dim = {4 * dim}")
        q = np.frombuffer(request.queries, dtype="<f4").reshape(-1, dim).copy()  # writable, as torch wants
    else:
        if len(request.query_values) % dim:
            raise invalid(f"query_values: {len(request.query_values)} values is not a multiple of dim = {dim}")
        q = np.asarray(request.query_values, dtype=np.float32).reshape(-1, dim)
    if len(q) == 0:
        raise invalid("empty query batch (nq = 0)")
    if len(q) > max_nq:
        raise invalid(f"nq {len(q)} exceeds max_nq {max_nq}")
    if not np.isfinite(q).all():
        raise invalid(f"queries contain NaN or Inf (first at row {int(np.nonzero(~np.isfinite(q).all(1))[0][0])})")
    return q


def load_error(e: Exception) -> ServiceError:
    if isinstance(e, (PlacementError, ModelMismatchError)):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, IndexFormatError):
        code = {"missing": grpc.StatusCode.NOT_FOUND, "newer": grpc.StatusCode.FAILED_PRECONDITION}.get(
            e.reason, grpc.StatusCode.DATA_LOSS)
        return ServiceError(code, str(e))
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return ServiceError(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"path too long for this file system: {e.strerror}")
    if isinstance(e, PermissionError):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"the server may not read that path: {e.strerror}")
    return ServiceError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


access_log = logging.getLogger("genrec.access")


def run_rpc(metrics: ServerMetrics, method: str, context, fn, closing: bool, access: bool = False,
            index_label: Callable[[], str | None] | None = None):
    """Run one RPC body: map its exceptions to status codes (the table above) and count it (also per
    index when ``index_label`` names one); ``access`` writes one line per request to the
    ``genrec.access`` logger (method, code, ms, peer)."""
    start = time.monotonic()
    code, message = grpc.StatusCode.OK, ""
    try:
        if closing:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        return fn()
    except ServiceError as e:
        code, message = e.code, str(e)
    except QueueFull as e:
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    except (Expired, FutureTimeout):
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the search ran"
    except FilterUnsupported as e:  # a filter this index kind cannot apply
        code, message = grpc.StatusCode.FAILED_PRECONDITION, str(e)
    except ValueError as e:  # the searchers' own input checks
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
    except Exception as e:  # noqa: BLE001
        log.exception("%s failed", method)
        code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
    finally:
        elapsed = time.monotonic() - start
        metrics.requests.labels(method, code.name).inc()
        metrics.latency.labels(method, "total").observe(elapsed)
        index = index_label() if index_label is not None else None
        if index is not None:
            metrics.index_requests.labels(index, method, code.name).inc()
        if access:
            access_log.info("%s %s %.3fms peer=%s", method, code.name, elapsed * 1e3, context.peer())
    context.abort(code, brief(message))


def brief(message: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """An error message cut to ``limit`` characters, keeping its head and tail: messages can quote
    client-sent paths and values, and status details travel in a size-limited header."""
    return message if len(message) <= limit else f"{message[:limit // 2]} ... {message[-limit // 2:]}"


def item_ids(request, field: str, string_ids: bool, catalog: str) -> list:
    """A request's item-id field: ``field`` (int64) or its twin ``field_str``, whichever matches the kind of
    ids ``catalog`` (words for the error) has; the other kind, or both at once, is INVALID_ARGUMENT."""
    ints, strs = getattr(request, field), getattr(request, field + "_str")
    if len(ints) and len(strs):
        raise invalid(f"give {field} or {field}_str, not both")
    if len(ints) and string_ids:
        raise invalid(f"{catalog} has string item ids: send {field}_str, not {field}")
    if len(strs) and not string_ids:
        raise invalid(f"{catalog} has int64 item ids: send {field}, not {field}_str")
    return list(strs) if string_ids else list(ints)


def catalog_keys(served: Served):
    """The served index's string ids (CatalogKeys), or None for an int64 catalog."""
    return getattr(served.index, "keys", None)


def set_ids(message, field: str, ids, string_ids: bool) -> None:
    """Fill ``field`` (int64) or ``field_str`` of a response with ids of that kind."""
    getattr(message, field + "_str" if string_ids else field).extend(plain_id(x) for x in ids)


def encode_users(encoder, users, histories: list[list], max_history: int):
    """Histories (item ids of the encoder's kind) with their messages (SearchByUserRequest or UserHistory:
    timestamps, query_time) -> EncodedUsers, one batch; timestamps for every user or for none; a user with
    no known id -> NOT_FOUND."""
    times = [history_times(h, u, max_history) for h, u in zip(histories, users)]
    timed = times[0] is not None
    if any((t is not None) != timed for t in times):
        raise invalid("give timestamps for every user or for none")
    try:
        return encoder.encode(histories, times if timed else None,
                              [u.query_time or None for u in users] if timed else None)
    except KeyError as e:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None


def history_times(history: list, request, max_history: int) -> list[int] | None:
    """Check a request's history (+ optional per-item timestamps); returns the timestamps or None."""
    if not history:
        raise invalid("history is empty")
    if len(history) > max_history:
        raise invalid(f"history of {len(history)} items exceeds max_history {max_history}")
    ts = list(request.timestamps) or None
    if ts is not None and len(ts) != len(history):
        raise invalid(f"{len(ts)} timestamps for {len(history)} history items")
    return ts


class RetrievalService(pb_grpc.RetrievalServicer):
    def __init__(self, cfg: ServeConfig, registry: IndexRegistry, metrics: ServerMetrics, encoder=None, ranker=None):
        self.cfg, self.registry, self.metrics, self.encoder, self.ranker = cfg, registry, metrics, encoder, ranker
        self.closing = False
        b = cfg.batching
        self.batcher = (DynamicBatcher(b.max_batch, b.max_delay_ms / 1000, b.queue_size,
                                       on_batch=metrics.batch_size.observe, on_expired=metrics.expired.inc,
                                       on_busy=metrics.batcher_busy.inc, workers=b.workers)
                        if b.enabled else None)

    # ---- plumbing ----
    def _call(self, method: str, context, fn, request=None):
        label = None if request is None else (lambda: self._index_label(request.index))
        return run_rpc(self.metrics, method, context, fn, self.closing, self.cfg.access_log, label)

    def _index_label(self, name: str) -> str:
        """A request's index as a metrics label: a served or configured name, else "unknown" (client-sent
        names must not become series)."""
        name = self._index_name(name)
        known = set(self.registry.names()) | {e.name for e in self.cfg.indexes}
        return name if name in known else "unknown"

    def _index_name(self, name: str) -> str:
        """A request's index name, "" meaning the server's default (default_index, else the first entry)."""
        return name or self.cfg.default_index or (self.cfg.indexes[0].name if self.cfg.indexes else "")

    def _served(self, name: str, version: str) -> Served:
        name = self._index_name(name)
        served = self.registry.get(name)
        if served is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"unknown index {shown(name)} (serving: {', '.join(self.registry.names()) or 'none'})")
        if version and version != served.version:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"index {shown(name)} version {shown(version)} is not served (active: {served.version})")
        return served

    def _params(self, served: Served, request) -> dict:
        """A request's search params: its K' (or exact) and its filter."""
        return {**self._kprime_params(served, request.exact, request.kprime), **self._filter(served, request)}

    def _kprime_params(self, served: Served, exact: bool, kprime: int) -> dict:
        kind = served.manifest.get("kind")
        inner = served.manifest.get("shard_kind") or served.manifest.get("base_kind")  # sharded / updated versions
        hindexer = kind == "mol-hindexer" or (kind in ("sharded", "delta") and inner == "mol-hindexer")
        if exact:
            if hindexer:
                return {"kprime": served.index.ntotal}
            if kind in ("mips-faiss",) or inner == "mips-faiss":
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"index {served.name!r} ({kind}) cannot search exactly")
        if kprime:
            if not hindexer:
                raise invalid(f"kprime applies to mol-hindexer indexes, not {kind}")
            return {"kprime": int(kprime)}
        return {}

    @staticmethod
    def _index_ids(served: Served, ids: list) -> list[int]:
        """Item ids of the index's kind -> its int64 ids (string ids it does not hold are dropped)."""
        keys = catalog_keys(served)
        if keys is None:
            return ids
        found = keys.ids_of(ids)
        return found[found >= 0].tolist()

    def _index_item_ids(self, served: Served, request, field: str) -> list[int]:
        """A request's item-id filter field (either twin) -> the index's int64 ids."""
        return self._index_ids(served, item_ids(request, field, catalog_keys(served) is not None, f"index {served.name!r}"))

    def _filter(self, served: Served, request) -> dict:
        """A request's allow / deny filter as search params (tuples: batch keys must hash)."""
        out = {}
        allow, deny = self._index_item_ids(served, request, "allow_ids"), self._index_item_ids(served, request, "deny_ids")
        if len(request.allow_ids) or len(request.allow_ids_str):
            out["allow"] = tuple(allow)
        if deny:
            out["deny"] = tuple(deny)
        if len(request.where):
            out["where"] = tuple(sorted((name, tuple(v.values)) for name, v in request.where.items()))
        return out

    def _check_k(self, k: int) -> int:
        if k <= 0:
            raise invalid(f"k must be positive, got {k}")
        if k > self.cfg.limits.max_k:
            raise invalid(f"k {k} exceeds max_k {self.cfg.limits.max_k}")
        return k

    def _search(self, served: Served, q: np.ndarray, k: int, params: dict, exclude, context, method: str):
        remaining = context.time_remaining()
        if remaining is not None and remaining > 1e6:  # grpc reports "no deadline" as a huge number
            remaining = None
        if remaining is not None and remaining <= 0:
            raise Expired()
        job = Job(served, q, k, params, exclude,
                  deadline=None if remaining is None else time.monotonic() + remaining)
        if self.batcher is None:
            run_group([job])
        else:
            self.metrics.queue_depth.set(self.batcher.depth())
            self.batcher.submit(job)
        try:
            out = job.future.result(timeout=remaining)
        except FutureTimeout:
            job.future.cancel()  # still queued: the batcher will skip it
            raise
        self.metrics.searched_queries.inc(len(q))
        self.metrics.latency.labels(method, "queue").observe(out.queue_s)
        self.metrics.latency.labels(method, "compute").observe(out.compute_s)
        scores = np.asarray(out.result.scores)
        if np.isnan(scores).any() or np.isposinf(scores).any():  # finite queries whose scores overflowed
            raise invalid("query values too large: their scores overflow float32 (scale the queries down)")
        return out

    @staticmethod
    def _response(served: Served, out, k: int, request_id: str, started: float) -> pb.SearchResponse:
        r = out.result
        resp = pb.SearchResponse(nq=len(r.ids), k=k, index=served.name, version=served.version, request_id=request_id)
        resp.ids.extend(r.ids.reshape(-1).tolist())
        if catalog_keys(served) is not None:
            resp.ids_str.extend(catalog_keys(served).keys_of(r.ids).reshape(-1).tolist())
        resp.scores.extend(r.scores.reshape(-1).tolist())
        resp.exact.extend(r.exact.tolist())
        resp.bound.extend(r.bound.tolist())
        resp.timing.queue_ms = out.queue_s * 1e3
        resp.timing.compute_ms = out.compute_s * 1e3
        resp.timing.total_ms = (time.monotonic() - started) * 1e3
        resp.timing.batch_size = out.batch_queries
        return resp

    # ---- RPCs ----
    def Search(self, request, context):
        def run():
            started = time.monotonic()
            served = self._served(request.index, request.version)
            q = decode_queries(request, served.index.dim, self.cfg.limits.max_nq)
            k = self._check_k(request.k)
            params = self._params(served, request)
            exclude = self._exclusions(served, request, len(q))
            out = self._search(served, q, k, params, exclude, context, "Search")
            return self._response(served, out, k, request.request_id, started)

        return self._call("Search", context, run, request)

    def _exclusions(self, served: Served, request, nq: int) -> list[list[int]] | None:
        """A Search request's per-query exclusions (exclude, or exclude_str) -> the index's int64 ids."""
        strings = catalog_keys(served) is not None
        if len(request.exclude) and len(request.exclude_str):
            raise invalid("give exclude or exclude_str, not both")
        rows = [list(x.values) for x in request.exclude_str] if len(request.exclude_str) else [list(x.ids) for x in request.exclude]
        if not rows:
            return None
        if strings != bool(len(request.exclude_str)):
            twin = "exclude_str" if strings else "exclude"
            raise invalid(f"index {served.name!r} has {'string' if strings else 'int64'} item ids: send {twin}")
        if len(rows) != nq:
            raise invalid(f"exclude has {len(rows)} rows for {nq} queries")
        return [self._index_ids(served, r) for r in rows]

    def _histories(self, users) -> list[list]:
        return [item_ids(u, "history", self.encoder.string_ids, "the encoder") for u in users]

    def SearchByUser(self, request, context):
        def run():
            started = time.monotonic()
            served, k, depth = self._by_user_checks(request)
            history = self._histories([request])[0]
            enc = encode_users(self.encoder, [request], [history], self.cfg.limits.max_history)
            params = self._params(served, request)
            exclude = None if request.keep_history else [self._index_ids(served, enc.known[0].tolist())]
            out = self._search(served, enc.states, depth, params, exclude, context, "SearchByUser")
            if request.rerank:
                out.result = self._rerank(served, request, history, out.result, k)
            resp = self._response(served, out, k, request.request_id, started)
            set_ids(resp, "unknown_ids", enc.unknown[0], self.encoder.string_ids)
            return resp

        return self._call("SearchByUser", context, run, request)

    def SearchByUsers(self, request, context):
        def run():
            started = time.monotonic()
            served, k, depth = self._by_user_checks(request)
            users = list(request.users)
            if not users:
                raise invalid("users is empty")
            if len(users) > self.cfg.limits.max_nq:
                raise invalid(f"{len(users)} users exceed max_nq {self.cfg.limits.max_nq}")
            histories = self._histories(users)
            enc = encode_users(self.encoder, users, histories, self.cfg.limits.max_history)
            params = self._params(served, request)
            exclude = None if request.keep_history else [self._index_ids(served, known.tolist()) for known in enc.known]
            out = self._search(served, enc.states, depth, params, exclude, context, "SearchByUsers")
            if request.rerank:
                r = out.result
                rows = [self._rerank(served, u, histories[i], SearchResult(r.scores[i : i + 1], r.ids[i : i + 1], r.exact[i : i + 1],
                                                     r.bound[i : i + 1]), k) for i, u in enumerate(users)]
                out.result = SearchResult(*(np.concatenate([getattr(x, f) for x in rows])
                                            for f in ("scores", "ids", "exact", "bound")))
            resp = pb.SearchByUsersResponse(results=self._response(served, out, k, request.request_id, started))
            for unknown in enc.unknown:
                if self.encoder.string_ids:
                    resp.unknown_ids_str.add().values.extend(unknown.tolist())
                else:
                    resp.unknown_ids.add().ids.extend(unknown.tolist())
            return resp

        return self._call("SearchByUsers", context, run, request)

    def _by_user_checks(self, request) -> tuple[Served, int, int]:
        """SearchByUser(s): the encoder is on, the index takes its states; -> (served, k, retrieval depth)."""
        if self.encoder is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "no encoder_checkpoint configured: SearchByUser is off")
        served = self._served(request.index, request.version)
        if served.index.dim != self.encoder.dim:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"index {served.name!r} expects dim {served.index.dim}, the encoder makes {self.encoder.dim}")
        if (catalog_keys(served) is not None) != self.encoder.string_ids:
            kinds = lambda strings: "string" if strings else "int64"  # noqa: E731
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"index {served.name!r} has {kinds(catalog_keys(served) is not None)} item ids, the encoder's "
                               f"are {kinds(self.encoder.string_ids)}: they come from different catalogs")
        k = self._check_k(request.k)
        return served, k, self._check_rerank(request.rerank, k)

    def _check_rerank(self, rerank: int, k: int) -> int:
        """How deep SearchByUser retrieves: k, or ``rerank`` candidates for the ranking stage."""
        if not rerank:
            return k
        if self.ranker is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "no ranking_checkpoint configured: rerank is off")
        if rerank < k:
            raise invalid(f"rerank {rerank} must be at least k {k}")
        if rerank > self.cfg.max_candidates:
            raise invalid(f"rerank {rerank} exceeds max_candidates {self.cfg.max_candidates}")
        if self.ranker.string_ids != self.encoder.string_ids:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the ranker and the encoder were trained on catalogs with different kinds of item ids")
        return rerank

    def _rerank(self, served: Served, request, history: list, result: SearchResult, k: int) -> SearchResult:
        """One user's retrieved candidates -> the top k by the ranker's engagement logit (ties: smaller id;
        ids the ranker does not know score -inf); -1 / -inf padded like every search."""
        ids = result.ids[0][result.ids[0] >= 0]
        scores = np.full(len(ids), -np.inf, dtype=np.float32)
        if len(ids):
            ts = list(request.timestamps) or None
            candidates = catalog_keys(served).keys_of(ids).tolist() if catalog_keys(served) is not None else ids.tolist()
            try:
                scores, _, _ = self.ranker.rank(history, candidates, ts, request.query_time or None,
                                                self.cfg.rank_microbatch)
            except KeyError as e:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None
        order = np.lexsort((ids, -scores.astype(np.float64)))[:k]
        out_ids = np.full((1, k), -1, dtype=np.int64)
        out_scores = np.full((1, k), -np.inf, dtype=np.float32)
        out_ids[0, : len(order)], out_scores[0, : len(order)] = ids[order], scores[order]
        return SearchResult(out_scores, out_ids, np.zeros(1, dtype=bool), np.full(1, np.inf, dtype=np.float32))

    def Rank(self, request, context):
        def run():
            started = time.monotonic()
            if self.ranker is None:
                raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, "no ranking_checkpoint configured: Rank is off")
            history = item_ids(request, "history", self.ranker.string_ids, "the ranker")
            candidates = item_ids(request, "candidates", self.ranker.string_ids, "the ranker")
            if not candidates:
                raise invalid("Rank needs candidates")
            if len(candidates) > self.cfg.max_candidates:
                raise invalid(f"{len(candidates)} candidates exceed max_candidates {self.cfg.max_candidates}")
            ts = history_times(history, request, self.cfg.limits.max_history)
            history_ratings = list(request.ratings) or None
            if history_ratings is not None and len(history_ratings) != len(history):
                raise invalid(f"{len(history_ratings)} ratings for {len(history)} history items")
            if history_ratings is not None and not all(math.isfinite(r) for r in history_ratings):
                raise invalid("ratings must be finite numbers")
            try:
                scores, ratings, unknown = self.ranker.rank(history, candidates, ts,
                                                            request.request_time or None,
                                                            request.microbatch or self.cfg.rank_microbatch,
                                                            ratings=history_ratings)
            except KeyError as e:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None
            resp = pb.RankResponse(scores=scores.tolist(), ratings=ratings.tolist())
            set_ids(resp, "unknown_ids", unknown, self.ranker.string_ids)
            resp.timing.total_ms = resp.timing.compute_ms = (time.monotonic() - started) * 1e3
            return resp

        return self._call("Rank", context, run)

    def _info(self, served: Served) -> pb.IndexInfo:
        return pb.IndexInfo(index=served.name, version=served.version, kind=served.manifest.get("kind", ""),
                            count=served.index.ntotal, dim=served.index.dim, path=served.path,
                            manifest_json=json.dumps(served.manifest, sort_keys=True), indexes=self.registry.names(),
                            device=str(served.index.device))

    def GetIndexInfo(self, request, context):
        return self._call("GetIndexInfo", context, lambda: self._info(self._served(request.index, "")), request)

    def LoadIndex(self, request, context):
        def run():
            if not request.index or not request.path:
                raise invalid("LoadIndex needs index (a name) and path")
            try:  # before the name becomes a metrics label or a log line
                check_name("index name", request.index)
            except ValueError as e:
                raise invalid(str(e)) from None
            if len(request.path) > MAX_PATH_CHARS:
                raise invalid(f"path {shown(request.path)}: longer than {MAX_PATH_CHARS} characters")
            verify = request.verify or "full"
            if verify not in ("full", "size"):
                raise invalid(f"verify must be full or size, got {shown(verify)}")
            try:
                entry = next((e for e in self.cfg.indexes if e.name == request.index), IndexEntry())
                served = self.registry.load(request.index, request.path, verify, entry.mmap, entry.device,
                                            still_wanted=lambda: (context.time_remaining() or 1.0) > 0)
            except LoadAbandoned as e:  # the client's deadline passed while loading: say so, swap nothing
                self.metrics.index_swaps.labels(request.index, "abandoned").inc()
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
            except Exception as e:  # noqa: BLE001 - the old version keeps serving
                self.metrics.index_swaps.labels(request.index, "refused").inc()
                log.warning("LoadIndex %s from %s refused: %s", request.index, shown(request.path, 256), brief(str(e)))
                raise load_error(e) from None
            self.metrics.index_swaps.labels(request.index, "loaded").inc()
            return self._info(served)

        return self._call("LoadIndex", context, run, request)
