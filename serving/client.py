"""Python clients for the genrec Retrieval service, FAISS-shaped:

    with GenrecClient("localhost:50051") as c:
        D, I = c.search(queries, k=100)                  # (nq, k) float32 / int64, -inf / -1 padded
        r = c.search_by_user([12, 7, 99], k=10)          # the server encodes the history
        r = c.search_by_user(["sku-12", "sku-7"], k=10)  # a catalog with string ids: r.keys holds them
        c.health()                                       # "SERVING" (grpc.health.v1)

    async with AsyncGenrecClient("localhost:50051") as c:  # the same methods, awaitable (grpc.aio)
        D, I = await c.search(queries, k=100)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.serving import genrec_pb2 as pb
from genrec.serving import genrec_pb2_grpc as pb_grpc


Ids = Sequence[int] | Sequence[str]  # item ids: int64, or strings for a catalog trained on string ids


def id_fields(name: str, ids: Ids | None) -> dict:
    """Item ids -> the request field that carries their kind: ``{name: ints}`` or ``{name_str: strings}``."""
    ids = list(ids or [])
    if any(isinstance(x, (str, np.str_)) for x in ids):
        if not all(isinstance(x, (str, np.str_)) for x in ids):
            raise ValueError(f"{name}: mix of string and integer ids")
        return {f"{name}_str": [str(x) for x in ids]}
    return {name: [int(x) for x in ids]}


@dataclass
class Reply:
    scores: np.ndarray   # (nq, k) float32
    ids: np.ndarray      # (nq, k) int64 (a string-id catalog: internal ids; its string ids are in ``keys``)
    exact: np.ndarray    # (nq,) bool
    bound: np.ndarray    # (nq,) float32
    index: str
    version: str
    timing: pb.Timing
    unknown_ids: list[int] | list[str]
    failed_shards: list[str]  # broker only: shards that did not answer (the result is partial)
    unknown_ids_per_user: list[list[int]] | list[list[str]] = field(default_factory=list)  # search_by_users: row i's
    keys: np.ndarray | None = None  # (nq, k) str: the items' string ids ("" = padding), for string-id catalogs

    @property
    def item_ids(self) -> np.ndarray:
        """The items as the catalog names them: ``keys`` for string ids, else ``ids``."""
        return self.keys if self.keys is not None else self.ids


def to_reply(resp: pb.SearchResponse) -> Reply:
    shape = (resp.nq, resp.k)
    keys = np.asarray(list(resp.ids_str), dtype=object).reshape(shape) if len(resp.ids_str) else None
    return Reply(np.asarray(resp.scores, dtype=np.float32).reshape(shape), np.asarray(resp.ids, dtype=np.int64).reshape(shape),
                 np.asarray(resp.exact, dtype=bool), np.asarray(resp.bound, dtype=np.float32), resp.index, resp.version,
                 resp.timing, list(resp.unknown_ids_str or resp.unknown_ids), list(resp.failed_shards), keys=keys)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def where_message(where: dict[str, Sequence[str]] | None) -> dict[str, pb.Strings]:
    """{"category": ["shoes"]} -> the requests' ``where`` map (attribute column -> allowed values)."""
    return {name: pb.Strings(values=[str(v) for v in values]) for name, values in (where or {}).items()}


def search_request(queries, k: int, index: str = "", version: str = "", exact: bool = False, kprime: int = 0,
                   exclude: Sequence[Ids] | None = None, request_id: str = "",
                   allow: Ids | None = None, deny: Ids | None = None,
                   where: dict[str, Sequence[str]] | None = None) -> pb.SearchRequest:
    """(nq, dim) float queries -> a SearchRequest (row-major little-endian float32 bytes). allow / deny:
    item-id filters for the whole batch, applied inside the search. Ids of either kind (int or str)."""
    q = np.ascontiguousarray(queries, dtype="<f4")
    if q.ndim != 2:
        raise ValueError(f"queries must be 2-D (nq, dim), got shape {q.shape}")
    req = pb.SearchRequest(index=index, version=version, k=k, dim=q.shape[1], queries=q.tobytes(), exact=exact,
                           kprime=kprime, request_id=request_id, **id_fields("allow_ids", allow),
                           **id_fields("deny_ids", deny), where=where_message(where))
    rows = list(exclude or [])
    strings = "ids_str" in id_fields("ids", [x for row in rows for x in row])  # one kind for every row
    for row in rows:
        if strings:
            req.exclude_str.add().values.extend(str(x) for x in row)
        else:
            req.exclude.add().ids.extend(int(x) for x in row)
    return req


def search_by_user_request(history: Ids, k: int, timestamps: Sequence[int] | None = None, index: str = "",
                           keep_history: bool = False, allow: Ids | None = None,
                           deny: Ids | None = None, where: dict[str, Sequence[str]] | None = None,
                           **kwargs) -> pb.SearchByUserRequest:
    return pb.SearchByUserRequest(index=index, k=k, **id_fields("history", history), timestamps=list(timestamps or []),
                                  keep_history=keep_history, **id_fields("allow_ids", allow),
                                  **id_fields("deny_ids", deny), where=where_message(where), **kwargs)


def search_by_users_request(histories: Sequence[Ids], k: int, timestamps: Sequence[Sequence[int]] | None = None,
                            index: str = "", keep_history: bool = False, query_times: Sequence[int] | None = None,
                            allow: Ids | None = None, deny: Ids | None = None,
                            where: dict[str, Sequence[str]] | None = None, **kwargs) -> pb.SearchByUsersRequest:
    if timestamps is not None and len(timestamps) != len(histories):
        raise ValueError(f"{len(timestamps)} timestamp lists for {len(histories)} users")
    users = [pb.UserHistory(**id_fields("history", h), timestamps=list(timestamps[i]) if timestamps is not None else [],
                            query_time=int(query_times[i]) if query_times is not None else 0)
             for i, h in enumerate(histories)]
    return pb.SearchByUsersRequest(index=index, k=k, users=users, keep_history=keep_history,
                                   **id_fields("allow_ids", allow), **id_fields("deny_ids", deny),
                                   where=where_message(where), **kwargs)


def users_reply(resp: pb.SearchByUsersResponse) -> Reply:
    reply = to_reply(resp.results)
    reply.unknown_ids_per_user = ([list(u.values) for u in resp.unknown_ids_str] if len(resp.unknown_ids_str)
                                  else [list(u.ids) for u in resp.unknown_ids])
    return reply


def rank_request(history: Ids, candidates: Ids, timestamps: Sequence[int] | None = None,
                 request_time: int = 0, microbatch: int = 0, ratings: Sequence[float] | None = None) -> pb.RankRequest:
    return pb.RankRequest(**id_fields("history", history), **id_fields("candidates", candidates),
                          timestamps=list(timestamps or []), request_time=request_time, microbatch=microbatch,
                          ratings=list(ratings or []))


def health_name(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class GenrecClient:
    def __init__(self, target: str, token: str | None = None, root_cert: bytes | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        options = channel_options(max_message_bytes)
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options)
                        if root_cert else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.admin_metadata = [("authorization", f"Bearer {token}")] if token else None

    def search_reply(self, queries, k: int, timeout: float | None = None, **kwargs) -> Reply:
        """kwargs: index, version, exact, kprime, exclude (per query, ids never to return), request_id."""
        return to_reply(self.stub.Search(search_request(queries, k, **kwargs), timeout=timeout))

    def search(self, queries, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """-> (D, I) like faiss; for a string-id catalog I holds the string ids ("" = padding)."""
        r = self.search_reply(queries, k, **kwargs)
        return r.scores, r.item_ids

    def search_by_user(self, history: Ids, k: int, timestamps: Sequence[int] | None = None, index: str = "",
                       keep_history: bool = False, timeout: float | None = None, **kwargs) -> Reply:
        req = search_by_user_request(history, k, timestamps, index, keep_history, **kwargs)
        return to_reply(self.stub.SearchByUser(req, timeout=timeout))

    def search_by_users(self, histories: Sequence[Ids], k: int, timestamps: Sequence[Sequence[int]] | None = None,
                        index: str = "", keep_history: bool = False, timeout: float | None = None, **kwargs) -> Reply:
        """Many users in one call (one encoder batch, one search batch): row i of the reply answers
        histories[i]; ``unknown_ids_per_user[i]`` lists its history ids the encoder skipped."""
        req = search_by_users_request(histories, k, timestamps, index, keep_history, **kwargs)
        return users_reply(self.stub.SearchByUsers(req, timeout=timeout))

    def rank(self, history: Ids, candidates: Ids, timestamps: Sequence[int] | None = None,
             request_time: int = 0, microbatch: int = 0, timeout: float | None = None,
             ratings: Sequence[float] | None = None) -> pb.RankResponse:
        """Engagement logits (and predicted ratings) of each candidate after the history; ``ratings``: the
        user's rating of each history item, for a ranker trained with ranking.rating_input."""
        req = rank_request(history, candidates, timestamps, request_time, microbatch, ratings)
        return self.stub.Rank(req, timeout=timeout)

    def info(self, index: str = "") -> pb.IndexInfo:
        return self.stub.GetIndexInfo(pb.IndexInfoRequest(index=index))

    def load_index(self, index: str, path: str, verify: str = "full", timeout: float | None = None) -> pb.IndexInfo:
        return self.stub.LoadIndex(pb.LoadIndexRequest(index=index, path=path, verify=verify), timeout=timeout,
                                   metadata=self.admin_metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status of the server ("") or one service: SERVING, NOT_SERVING, SERVICE_UNKNOWN."""
        return health_name(self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenrecClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGenrecClient:
    """``GenrecClient`` for asyncio code (grpc.aio): the same methods and arguments, each awaitable."""

    def __init__(self, target: str, token: str | None = None, root_cert: bytes | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        options = channel_options(max_message_bytes)
        self.channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options)
                        if root_cert else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.admin_metadata = [("authorization", f"Bearer {token}")] if token else None

    async def search_reply(self, queries, k: int, timeout: float | None = None, **kwargs) -> Reply:
        return to_reply(await self.stub.Search(search_request(queries, k, **kwargs), timeout=timeout))

    async def search(self, queries, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        r = await self.search_reply(queries, k, **kwargs)
        return r.scores, r.item_ids

    async def search_by_user(self, history: Ids, k: int, timestamps: Sequence[int] | None = None,
                             index: str = "", keep_history: bool = False, timeout: float | None = None, **kwargs) -> Reply:
        req = search_by_user_request(history, k, timestamps, index, keep_history, **kwargs)
        return to_reply(await self.stub.SearchByUser(req, timeout=timeout))

    async def search_by_users(self, histories: Sequence[Ids], k: int,
                              timestamps: Sequence[Sequence[int]] | None = None, index: str = "",
                              keep_history: bool = False, timeout: float | None = None, **kwargs) -> Reply:
        req = search_by_users_request(histories, k, timestamps, index, keep_history, **kwargs)
        return users_reply(await self.stub.SearchByUsers(req, timeout=timeout))

    async def rank(self, history: Ids, candidates: Ids, timestamps: Sequence[int] | None = None,
                   request_time: int = 0, microbatch: int = 0, timeout: float | None = None,
                   ratings: Sequence[float] | None = None) -> pb.RankResponse:
        req = rank_request(history, candidates, timestamps, request_time, microbatch, ratings)
        return await self.stub.Rank(req, timeout=timeout)

    async def info(self, index: str = "") -> pb.IndexInfo:
        return await self.stub.GetIndexInfo(pb.IndexInfoRequest(index=index))

    async def load_index(self, index: str, path: str, verify: str = "full", timeout: float | None = None) -> pb.IndexInfo:
        return await self.stub.LoadIndex(pb.LoadIndexRequest(index=index, path=path, verify=verify), timeout=timeout,
                                         metadata=self.admin_metadata)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        return health_name(await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGenrecClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
