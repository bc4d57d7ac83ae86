"""Typed run configuration: dataclasses loaded from YAML, overridable with ``--set a.b=c``.

Unknown keys and values of the wrong type are errors that name the key, so a typo in a config never
silently falls back to a default. The resolved config is saved next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


@dataclass
class SyntheticConfig:
    """Built-in generator: latent user tastes over item clusters, Zipf popularity, item-to-item
    successor chains (sequential signal) and timestamps with short gaps inside a chain."""

    num_users: int = 2000
    num_items: int = 1000
    num_clusters: int = 20
    mean_length: float = 50.0
    min_length: int = 6
    max_length: int = 300
    follow_prob: float = 0.5
    num_successors: int = 3
    zipf_exponent: float = 1.2
    taste_concentration: float = 0.3
    seed: int = 0


@dataclass
class DataConfig:
    # synthetic | ml-1m | ml-20m | ml-100k | recbole | csv | parquet | sasrec | prepared
    format: str = "synthetic"
    path: str | None = None
    # A published benchmark set (genrec.data.published) instead of format + path: found in $GENREC_DATA_DIR
    # or ../shared/data, checked, decompressed once into data/.
    dataset: Literal["ml1m"] | None = None
    # Column names for csv/parquet (generic interaction tables).
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = "timestamp"
    rating_col: str | None = None
    delimiter: str = ","
    column_names: list[str] | None = None  # csv without a header row: names of its columns, in order
    kcore: int = 0  # keep users and items with >= kcore interactions; 0 = off
    kcore_passes: int = 0  # 0 = repeat until stable; 1 = one pass (the Amazon recipe)
    max_len: int = 200  # history length the encoder sees (most recent items)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    encoder: Literal["hstu", "sasrec"] = "hstu"
    item_emb_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dqk: int = 50  # per head
    dv: int = 50  # per head
    dropout: float = 0.2  # linear/output dropout inside blocks
    input_dropout: float = 0.2
    attn_dropout: float = 0.0
    # HSTU fused U/V/Q/K weight init: "normal" = N(0, 0.02) as in the research code; "xavier" = Xavier-uniform.
    uvqk_init: Literal["normal", "xavier"] = "normal"
    # HSTU relative attention bias (rab): switch each table independently.
    relative_position_bias: bool = True
    relative_time_bias: bool = True
    time_bucket_divisor: float = 0.301
    num_time_buckets: int = 128
    # Production-variant switches (defaults reproduce the research model).
    uvqk_activation: Literal["silu", "silu_u_only"] = "silu"
    qk_scale: Literal["none", "inv_sqrt_dqk"] = "none"  # multiply <q, k> by 1/sqrt(dqk) before SiLU
    output_mode: Literal["gated", "concat"] = "gated"
    input_time_embedding: bool = False
    ffn_dim: int | None = None  # SASRec feed-forward width; None = item_emb_dim
    attention_backend: Literal["auto", "reference", "triton"] = "auto"


@dataclass
class SimilarityConfig:
    """dot: cosine of L2-normalised states and items. mol: Mixture of Logits (RAILS), trained jointly.

    With mol, scores are already logits / tau, so the sampled softmax uses temperature 1 (loss.temperature
    applies to dot only)."""

    type: Literal["dot", "mol"] = "dot"
    query_components: int = 8  # P_Q
    item_components: int = 4  # P_X
    component_dim: int = 64  # d_P
    query_hidden: int = 512
    gating_hidden: int = 128
    tau: float = 0.05
    item_dropout: float = 0.1
    gating_dropout: float = 0.2
    mi_loss_weight: float = 1e-3
    # bfloat16: train the per-pair MoL math under bf16 autocast (a 1.8x faster MoL step on AMX/AVX512-BF16
    # CPUs); weights, the encoder, the loss and every eval / index path stay float32
    train_precision: Literal["float32", "bfloat16"] = "float32"
    # per-position negatives in training: score at most this many (position, item) pairs at a time, each
    # chunk under activation checkpointing (recomputed in backward), so a step's memory no longer grows
    # with positions x negatives (HSTU-large + MoL on ML-1M peaked past 24 GiB unchunked); 0: one piece
    train_chunk_pairs: int = 262144


@dataclass
class LossConfig:
    num_negatives: int = 128
    temperature: float = 0.05
    # per_position: fresh uniform negatives for every supervised position (the reference recipe);
    # batch_shared: one uniform set shared by the whole batch (a matmul instead of a gather; faster).
    negatives: Literal["per_position", "batch_shared"] = "per_position"


@dataclass
class TrainConfig:
    epochs: int = 101
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    patience: int = 10  # epochs without validation HR@10 improvement before stopping; 0 = never stop
    # False: the reference's own protocol. No validation split: every event but the last trains, all
    # epochs run (patience is ignored) and the final weights are tested.
    validation: bool = True
    eval_every: int = 1
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda[:i]
    bf16: bool = True  # bf16 autocast when on CUDA
    stochastic_length_alpha: float | None = None  # e.g. 1.6; None = off
    max_steps_per_epoch: int | None = None
    num_threads: int | None = None


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (1, 10, 50, 200)
    batch_size: int = 256
    exclude_history: bool = True


@dataclass
class RankingConfig:
    """task: ranking (genrec/ranking_training.py)."""

    negatives: int = 16             # sampled negatives per positive in training
    hard_negatives: int = 0         # of those, drawn from the retrieval checkpoint's top rerank_k (needs it)
    cuts_per_user: int = 1          # training examples per user per epoch (random cut points of its sequence)
    rating_input: bool = False      # history rows carry the user's rating of each item (needs rated data)
    encoder_lr: float | None = None  # learning rate of the warm-started encoder (None = train.lr, 0 = frozen);
                                    # the head, biases and rating embedding always train at train.lr
    head_hidden: int = 64
    rating_weight: float = 0.1      # MSE on rating / 5 (task 1) where the data has ratings
    eval_negatives: int = 100       # AUC / logloss: held-out item vs this many sampled items
    retrieval_checkpoint: str = ""  # two-stage evaluation: retrieve with this checkpoint, then rerank
    warm_start: bool = True         # initialise the ranker's encoder from retrieval_checkpoint (same model config)
    rerank_k: int = 200
    loss: Literal["bce", "listwise"] = "bce"  # engagement: per-candidate BCE, or softmax CE of the positive vs its negatives
    select_on: Literal["auc", "two_stage"] = "auc"  # best epoch / early stop: validation AUC, or validation
                                    # two-stage HR@10 (retrieve rerank_k, rerank; needs retrieval_checkpoint)
    select_users: int = 500         # validation users for select_on: two_stage (a fixed sample)
    valid_auc_users: int = 0        # per-epoch validation AUC on a fixed sample of this many users (0 = all);
                                    # the final valid / test AUC always uses every user
    anchor: bool = False            # the engagement logit's base is the frozen retrieval checkpoint's own logit
                                    # phi / tau (a copy travels in the ranking checkpoint), not the ranker's
                                    # cos(user, item): its encoder can then be fine-tuned without losing retrieval
    eval_depths: list[int] = field(default_factory=list)  # test two-stage also at these rerank depths (<= rerank_k)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    task: Literal["retrieval", "ranking"] = "retrieval"
    ranking: RankingConfig = field(default_factory=RankingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Value ranges, checked wherever a config is built (files, overrides, checkpoints) before anything runs:
# field -> (lowest, highest, lowest allowed?, highest allowed?); None = unbounded. Sequences: every element.
AT_LEAST_1 = (1, None, True, True)
NON_NEGATIVE = (0, None, True, True)
POSITIVE = (0, None, False, True)
FRACTION = (0, 1, True, False)  # a dropout rate: 0 <= p < 1
PROBABILITY = (0, 1, True, True)
LIMITS: dict[type, dict[str, tuple]] = {
    SyntheticConfig: {"num_users": AT_LEAST_1, "num_items": AT_LEAST_1, "num_clusters": AT_LEAST_1,
                      "mean_length": POSITIVE, "min_length": (2, None, True, True), "max_length": (2, None, True, True),
                      "follow_prob": PROBABILITY, "num_successors": AT_LEAST_1, "zipf_exponent": NON_NEGATIVE,
                      "taste_concentration": POSITIVE},
    DataConfig: {"kcore": NON_NEGATIVE, "kcore_passes": NON_NEGATIVE, "max_len": AT_LEAST_1},
    ModelConfig: {"item_emb_dim": AT_LEAST_1, "num_blocks": AT_LEAST_1, "num_heads": AT_LEAST_1, "dqk": AT_LEAST_1,
                  "dv": AT_LEAST_1, "dropout": FRACTION, "input_dropout": FRACTION, "attn_dropout": FRACTION,
                  "time_bucket_divisor": POSITIVE, "num_time_buckets": AT_LEAST_1, "ffn_dim": AT_LEAST_1},
    SimilarityConfig: {"query_components": AT_LEAST_1, "item_components": AT_LEAST_1, "component_dim": AT_LEAST_1,
                       "query_hidden": AT_LEAST_1, "gating_hidden": AT_LEAST_1, "tau": POSITIVE,
                       "item_dropout": FRACTION, "gating_dropout": FRACTION, "mi_loss_weight": NON_NEGATIVE,
                       "train_chunk_pairs": NON_NEGATIVE},
    LossConfig: {"num_negatives": AT_LEAST_1, "temperature": POSITIVE},
    TrainConfig: {"epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "betas": (0, 1, True, False),
                  "weight_decay": NON_NEGATIVE, "patience": NON_NEGATIVE, "eval_every": AT_LEAST_1,
                  "stochastic_length_alpha": (0, 2, False, True), "max_steps_per_epoch": AT_LEAST_1,
                  "num_threads": AT_LEAST_1},
    EvalConfig: {"ks": AT_LEAST_1, "batch_size": AT_LEAST_1},
    RankingConfig: {"negatives": AT_LEAST_1, "hard_negatives": NON_NEGATIVE, "cuts_per_user": AT_LEAST_1,
                    "encoder_lr": NON_NEGATIVE, "head_hidden": AT_LEAST_1, "rating_weight": NON_NEGATIVE,
                    "eval_negatives": AT_LEAST_1, "rerank_k": AT_LEAST_1, "select_users": AT_LEAST_1,
                    "eval_depths": AT_LEAST_1, "valid_auc_users": NON_NEGATIVE},
}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # a run directory's name: one safe path component


def _check_range(key: str, value: Any, limit: tuple) -> None:
    lo, hi, lo_ok, hi_ok = limit
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if v is None or isinstance(v, bool):
            continue
        below = lo is not None and (v < lo or (v == lo and not lo_ok))
        above = hi is not None and (v > hi or (v == hi and not hi_ok))
        if below or above:
            left, right = "[" if lo_ok else "(", "]" if hi_ok else ")"
            span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(f"{key}: {v!r} is out of range {span}")


def check_config(cfg: Any, prefix: str = "") -> Any:
    """Raise ConfigError naming the first key whose value is out of range (types are checked on load);
    recurses into sections. Returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, key)
        elif f.name in LIMITS.get(type(cfg), {}):
            _check_range(key, value, LIMITS[type(cfg)][f.name])
    if isinstance(cfg, SyntheticConfig) and cfg.max_length < cfg.min_length:
        raise ConfigError(f"{prefix}.max_length: {cfg.max_length} is below min_length {cfg.min_length}")
    if isinstance(cfg, RankingConfig) and cfg.hard_negatives > cfg.negatives:
        raise ConfigError(f"{prefix}.hard_negatives: {cfg.hard_negatives} is more than negatives ({cfg.negatives})")
    if isinstance(cfg, RankingConfig) and any(d > cfg.rerank_k for d in cfg.eval_depths):
        raise ConfigError(f"{prefix}.eval_depths: {cfg.eval_depths} go deeper than rerank_k ({cfg.rerank_k})")
    if isinstance(cfg, RunConfig) and not RUN_NAME.fullmatch(cfg.name):
        raise ConfigError(f"name: {cfg.name[:80]!r} must be one path component of letters, digits and . _ + - "
                          f"(at most 128, not starting with . or -)")
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown config key{where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    obj = cls(**kwargs)
    return check_config(obj, prefix) if not prefix else obj  # the top level checks every section once


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, values or {})


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return values


def load_dataclass(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Any config dataclass from a YAML file (+ ``a.b=c`` overrides), with the same strict checks."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return _build(cls, apply_overrides(values, overrides or []))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    return load_dataclass(RunConfig, path, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
