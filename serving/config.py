"""``genrec serve`` configuration: a typed dataclass loaded from YAML, overridable with --set."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IndexEntry:
    name: str = "default"
    path: str = ""            # an index version directory, or <root>/<name> to take its latest version
    verify: str = "full"      # full | size: checks run before the index is served
    mmap: bool = False        # False: read into RAM (faster scans); True: map from disk (indexes beyond RAM)
    device: str = "cpu"       # where its searches run: cpu, cuda or cuda:N (flat and MoL h-indexer kinds, and shards of them)


@dataclass
class BatchingConfig:
    enabled: bool = True
    max_batch: int = 64       # queries coalesced into one search
    max_delay_ms: float = 1.0  # how long the first request of a batch waits for company
    queue_size: int = 256     # requests waiting; beyond it RESOURCE_EXHAUSTED
    workers: int = 1          # threads taking batches from the queue (more only with cores to spare)


@dataclass
class LimitsConfig:
    max_k: int = 1000
    max_nq: int = 1024
    max_history: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 128
    workers: int = 16


@dataclass
class TLSConfig:
    cert: str = ""
    key: str = ""


@dataclass
class BrokerConfig:
    # each shard's gRPC target: host:port, or a name resolving to several replicas of that shard
    # (dns:///shard-0.genrec:50051, ipv4:10.0.0.5:50051,10.0.0.6:50051), balanced round-robin over the
    # replicas whose grpc.health.v1 says SERVING
    shards: tuple[str, ...] = ()
    tls_root_cert: str = ""        # PEM of the CA the shards' certificates chain to: TLS to the shards ("" = plaintext)
    tls_server_name: str = ""      # the name the shards' certificates carry, when it is not the target's host
    policy: str = "partial"        # partial: answer from the shards that replied (and name the others); fail: UNAVAILABLE
    shard_timeout_s: float = 5.0   # per-shard cap, within the request's own deadline
    health_interval_s: float = 1.0


@dataclass
class ServeConfig:
    role: str = "server"       # server: holds indexes; broker: fans requests out to shard servers
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    host: str = "127.0.0.1"
    port: int = 50051          # 0 = any free port (tests)
    indexes: tuple[IndexEntry, ...] = ()
    default_index: str = ""    # "" = the first entry
    encoder_checkpoint: str = ""  # for SearchByUser; "" = that method answers FAILED_PRECONDITION
    allow_unpaired_indexes: bool = False  # serve indexes built from another checkpoint than the encoder (experts)
    ranking_checkpoint: str = ""  # a task: ranking run's checkpoint, for Rank; "" = UNIMPLEMENTED
    model_device: str = "cpu"  # where the encoder and the ranker run: cpu, cuda or cuda:N
    rank_microbatch: int = 256
    max_candidates: int = 10000
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics_port: int = -1     # -1 = no metrics endpoint, 0 = any free port
    tls: TLSConfig = field(default_factory=TLSConfig)
    admin_token: str = ""      # when set, LoadIndex needs "authorization: Bearer <token>"
    admin_open: bool = False   # without a token admin methods are refused, unless this opens them (warned)
    reflection: bool = True    # gRPC server reflection (grpcurl); false for production
    access_log: bool = False   # one log line per request (logger genrec.access: method, code, ms, peer)
    warmup_queries: int = 4
    grace_seconds: float = 5.0
    threads: int = 0           # torch threads (0 = leave as is)
