"""Training and evaluating the ranking stage (``task: ranking`` in a run config).

Examples come from the same leave-one-out split as retrieval. Training: for each user
(``ranking.cuts_per_user`` times per epoch), a random cut t of the training part gives history = items
before t, positive = items[t] (with its rating where the data has ratings) and ``ranking.negatives``
sampled items, ``ranking.hard_negatives`` of them from the retrieval checkpoint's top ``rerank_k`` for
that history (the ranker must learn to order what retrieval returns, not to tell it from random items)
and the rest uniform; the target-aware model scores a whole batch of such examples in one jagged pass
(``RankingModel.score_full_batch``). Loss on task 0 (engagement): BCE (positive 1, negatives 0), or with
``ranking.loss: listwise`` the softmax cross-entropy of the positive against its negatives (what
reranking needs: the order within a candidate list, not calibrated probabilities); + ``rating_weight`` x
MSE on task 1 (rating / 5, positives only). With ``ranking.rating_input`` the history rows also carry
the user's rating of each history item (rated data only).

Evaluation (valid for early stopping, test at the end): the held-out item against
``ranking.eval_negatives`` sampled items: AUC and logloss (normalised entropy's numerator). With
``ranking.retrieval_checkpoint``, also the two-stage pipeline: retrieve the top ``rerank_k`` (history
excluded) with that checkpoint, rerank them by engagement with M-FALCON, and report HR@k / NDCG@k of
retrieval alone vs retrieval + ranking. ``ranking.select_on: two_stage`` picks the best epoch by that
pipeline's validation HR@10 (on ``select_users`` users) instead of AUC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genrec.checkpoint import (anchor_from_checkpoint, load_checkpoint, load_ranking_weights,
                               ranking_model_from_checkpoint, ranking_state, save_checkpoint)
from genrec.config import RunConfig
from genrec.data.batches import history_batch, target_positions
from genrec.data.sequences import SequenceDataset, Split, leave_one_out
from genrec.data.source import load_dataset
from genrec.encoders.history import last_states
from genrec.encoders.model import SequentialEncoder
from genrec.encoders.ranking import RankingModel, RetrievalAnchor, warm_start
from genrec.evaluation import mask_history
from genrec.io import atomic_write, atomic_write_json
from genrec.retrieval.metrics import metrics_from_ranks, paired_metric
from genrec.trainer import TrainTask, fit, seed_everything

log = logging.getLogger(__name__)
EVAL_CHUNK = 32  # users per packed forward pass (retrieval top-K, ranking) in evaluation
PAIRED_METRICS = ("hr@10", "ndcg@10", "hr@50", "mrr")
TWO_STAGE_RANKS_FILE = "two_stage_test_ranks.npz"  # in a ranking run's directory: TwoStageRanks of the test users


@dataclass
class RankingResult:
    run_dir: Path
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    two_stage: dict[str, dict[str, float]]


@dataclass
class Example:
    """One ranking request cut from a user's sequence at ``target`` (an absolute event index)."""

    history: torch.Tensor              # (n,) int64 internal item ids
    timestamps: torch.Tensor | None    # (n,) int64
    ratings: torch.Tensor | None       # (n,) float32, the user's ratings of the history items
    positive: int                      # the item at target
    request_time: int | None           # its timestamp


def _example(ds: SequenceDataset, u: int, target: int, max_len: int) -> Example:
    start = max(int(ds.offsets[u]), target - max_len)
    return Example(torch.from_numpy(ds.items[start:target]),
                   torch.from_numpy(ds.timestamps[start:target]) if ds.timestamps is not None else None,
                   torch.from_numpy(ds.ratings[start:target]) if ds.ratings is not None else None,
                   int(ds.items[target]),
                   int(ds.timestamps[target]) if ds.timestamps is not None else None)


def _score_examples(model: RankingModel, examples: list[Example], candidates: list[torch.Tensor]) -> list[torch.Tensor]:
    """(m_b, T) logits per example from packed target-aware passes of up to EVAL_CHUNK examples (equal to
    the serving path's prefill + M-FALCON, tested; packing many short requests is far cheaper on CPU)."""
    out = []
    for lo in range(0, len(examples), EVAL_CHUNK):
        exs = examples[lo : lo + EVAL_CHUNK]
        out += model.score_full_batch(
            [e.history for e in exs], candidates[lo : lo + EVAL_CHUNK],
            [e.timestamps for e in exs] if exs[0].timestamps is not None else None, [e.request_time for e in exs],
            history_ratings=[e.ratings for e in exs] if exs[0].ratings is not None else None)
    return out


def _negatives(rng: np.random.Generator, num_items: int, count: int, positive: int) -> list[int]:
    negs = rng.integers(1, num_items + 1, count)
    return [int(x) for x in negs if x != positive]


class Retriever:
    """The ranking stage's retrieval model: top-K of a user's next item, history excluded. It is a
    ``RetrievalAnchor`` (frozen encoder + similarity) put to a second use, so an anchored ranker and its
    candidate source share one copy of the retrieval model."""

    def __init__(self, anchor: RetrievalAnchor, num_items: int):
        self.model, self.similarity = anchor.encoder, anchor.similarity
        if self.model.num_items != num_items:
            raise ValueError(f"retrieval checkpoint has {self.model.num_items} items, the data {num_items}")
        with torch.no_grad():
            self.items = self.model.item_embeddings().float()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, num_items: int) -> "Retriever":
        return cls(anchor_from_checkpoint(load_checkpoint(checkpoint)), num_items)

    @torch.no_grad()
    def top(self, ds: SequenceDataset, users, targets, k: int) -> torch.Tensor:
        """(B, k) item ids ranked for position targets[b] of user users[b] (the items before it are the
        history, excluded from the answer), all B histories in one jagged forward pass."""
        ends = np.asarray(targets, dtype=np.int64)
        query_times = ds.timestamps[ends] if ds.timestamps is not None else None  # the target's time
        batch = history_batch(ds, np.asarray(users, dtype=np.int64), ends, self.model.max_len, query_times)
        states = last_states(self.model, batch.packed())
        scores = self.similarity.pairwise(states, self.items)
        mask_history(scores, batch)  # the batch already holds each row's full history
        return torch.topk(scores, k, dim=1).indices


def batch_loss(model: RankingModel, ds: SequenceDataset, users, targets, cfg: RunConfig,
               rng: np.random.Generator, retriever: Retriever | None = None) -> torch.Tensor:
    """Mean loss of one example per (user, target index), all scored in one jagged pass."""
    examples = [_example(ds, int(u), int(t), cfg.data.max_len) for u, t in zip(users, targets)]
    tops = None
    if retriever is not None and cfg.ranking.hard_negatives:
        tops = retriever.top(ds, users, targets, cfg.ranking.rerank_k)
    cands = []
    for row, ex in enumerate(examples):
        pos, hard = ex.positive, []
        if tops is not None:
            top = tops[row][tops[row] != pos]
            hard = top[torch.from_numpy(rng.choice(len(top), min(cfg.ranking.hard_negatives, len(top)), replace=False))].tolist()
        easy = _negatives(rng, ds.num_items, cfg.ranking.negatives - len(hard), pos)
        cands.append(torch.tensor([pos, *hard, *easy]))
    losses = []
    for lg, t in zip(_score_examples(model, examples, cands), targets):
        if cfg.ranking.loss == "listwise":
            loss = torch.logsumexp(lg[:, 0], dim=0) - lg[0, 0]  # -log softmax of the positive (index 0)
        else:
            labels = torch.zeros(len(lg))
            labels[0] = 1.0
            loss = F.binary_cross_entropy_with_logits(lg[:, 0], labels)
        if ds.ratings is not None and cfg.ranking.rating_weight > 0:
            loss = loss + cfg.ranking.rating_weight * (lg[0, 1] - float(ds.ratings[t]) / 5.0) ** 2
        losses.append(loss)
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate_ranking(model: RankingModel, ds: SequenceDataset, split: Split, stage: str, cfg: RunConfig,
                     seed: int = 0, users: np.ndarray | None = None) -> dict[str, float]:
    """AUC and logloss of the held-out item vs sampled negatives, averaged over evaluation users (or over
    ``users``, a subset of them)."""
    model.eval()
    rng = np.random.default_rng(seed)
    aucs, losses = [], []
    users = split.eval_users if users is None else users
    examples = [_example(ds, u, int(t), cfg.data.max_len) for u, t in zip(users, target_positions(ds, users, stage))]
    cands = [torch.tensor([ex.positive, *_negatives(rng, ds.num_items, cfg.ranking.eval_negatives, ex.positive)])
             for ex in examples]
    for logits in _score_examples(model, examples, cands):
        s = logits[:, 0]
        aucs.append(float(((s[1:] < s[0]).float() + 0.5 * (s[1:] == s[0]).float()).mean()))
        labels = torch.zeros(len(s))
        labels[0] = 1.0
        losses.append(float(F.binary_cross_entropy_with_logits(s, labels)))
    model.train()
    return {"auc": float(np.mean(aucs)), "logloss": float(np.mean(losses))}


@dataclass
class TwoStageRanks:
    """Per-user 0-based test ranks of the held-out item: retrieval alone, and reranked at each depth d (the
    ranker reorders retrieval's top d; a target outside it is a miss, rank >= MISS)."""

    users: np.ndarray                    # (U,) int64
    retrieval: np.ndarray                # (U,) int64
    reranked: dict[int, np.ndarray]      # depth -> (U,) int64

    MISS = 10**6

    def metrics(self, ks) -> dict[str, dict[str, float]]:
        """{"retrieval": ..., "retrieval+ranking" (deepest depth): ..., "retrieval+ranking@d": ... per depth}."""
        deepest = max(self.reranked)
        out = {"retrieval": metrics_from_ranks(torch.from_numpy(self.retrieval), ks),
               "retrieval+ranking": metrics_from_ranks(torch.from_numpy(self.reranked[deepest]), ks)}
        for d, r in sorted(self.reranked.items()):
            if d != deepest:
                out[f"retrieval+ranking@{d}"] = metrics_from_ranks(torch.from_numpy(r), tuple(k for k in ks if k <= d))
        return out

    def paired(self, resamples: int = 10_000) -> dict[str, dict[str, dict[str, float]]]:
        """depth -> metric -> two-stage minus retrieval over the same users: delta, 95% bootstrap CI, p,
        and the ratio of the means."""
        out = {}
        for d, r in sorted(self.reranked.items()):
            rows = {}
            for m in PAIRED_METRICS:
                stats = paired_metric([r], [self.retrieval], m, resamples)
                rows[m] = {"two_stage": stats["a"], "retrieval": stats["b"], "delta": stats["delta"],
                           "ci95_lo": stats["lo"], "ci95_hi": stats["hi"], "p": stats["p"], "ratio": stats["ratio"]}
            out[str(d)] = rows
        return out

    def save(self, path: Path) -> Path:
        """users, retrieval and ``reranked_<d>`` arrays in one .npz (no pickles), written atomically."""
        arrays = {"users": self.users, "retrieval": self.retrieval, **{f"reranked_{d}": r for d, r in self.reranked.items()}}
        return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: Path) -> "TwoStageRanks":
        """The ranks ``save`` wrote."""
        with np.load(path, allow_pickle=False) as z:
            reranked = {int(k.removeprefix("reranked_")): z[k] for k in z.files if k.startswith("reranked_")}
            return cls(z["users"], z["retrieval"], reranked)


@torch.no_grad()
def two_stage_ranks(model: RankingModel, ds: SequenceDataset, split: Split, cfg: RunConfig,
                    retriever: Retriever | None = None, stage: str = "test", users: np.ndarray | None = None,
                    depths: tuple[int, ...] | None = None) -> TwoStageRanks:
    """Retrieve the top max(depths) (history excluded) with the retrieval checkpoint, score them once with the
    ranker (a candidate's score does not depend on the other candidates), and rerank each depth's prefix by
    engagement (ties keep retrieval's order). The test (last) or valid (second-to-last) item of ``users``
    (default: every evaluation user); depths default to (rerank_k,)."""
    retriever = retriever or Retriever.from_checkpoint(cfg.ranking.retrieval_checkpoint, ds.num_items)
    depths = tuple(sorted(set(depths or (cfg.ranking.rerank_k,))))
    k = depths[-1]
    model.eval()
    users = np.asarray(split.eval_users if users is None else users, dtype=np.int64)
    ranks_retrieval, ranks_reranked = [], {d: [] for d in depths}
    for lo in range(0, len(users), EVAL_CHUNK):
        chunk = [int(u) for u in users[lo : lo + EVAL_CHUNK]]
        targets = target_positions(ds, np.asarray(chunk), stage).tolist()
        tops = list(retriever.top(ds, chunk, targets, k))
        logits = _score_examples(model, [_example(ds, u, t, cfg.data.max_len) for u, t in zip(chunk, targets)], tops)
        for target, top, lg in zip(targets, tops, logits):
            pos = int(ds.items[target])
            hit = (top == pos).nonzero()
            ranks_retrieval.append(int(hit[0]) if len(hit) else TwoStageRanks.MISS)
            for d in depths:
                order = top[:d][torch.argsort(-lg[:d, 0], stable=True)]
                hit = (order == pos).nonzero()
                ranks_reranked[d].append(int(hit[0]) if len(hit) else TwoStageRanks.MISS)
    model.train()
    return TwoStageRanks(users, np.asarray(ranks_retrieval, dtype=np.int64),
                         {d: np.asarray(r, dtype=np.int64) for d, r in ranks_reranked.items()})


def evaluate_two_stage(model: RankingModel, ds: SequenceDataset, split: Split, cfg: RunConfig,
                       retriever: Retriever | None = None, stage: str = "test",
                       users: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Retrieval top rerank_k by the retrieval checkpoint, then reranked by engagement: HR/NDCG for both, on the
    test (last) or valid (second-to-last) item of ``users`` (default: every evaluation user)."""
    ranks = two_stage_ranks(model, ds, split, cfg, retriever, stage, users)
    return ranks.metrics(tuple(x for x in cfg.eval.ks if x <= cfg.ranking.rerank_k))


def format_paired(paired: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of ``TwoStageRanks.paired()``: per depth and metric, both arms, the paired difference
    with its 95% CI, and the ratio two-stage / retrieval."""
    lines = ["| rerank depth | metric | retrieval | two-stage | delta | 95% CI | ratio |", "|---" * 7 + "|"]
    for depth, rows in sorted(paired.items(), key=lambda kv: int(kv[0])):
        for m, r in rows.items():
            lines.append(f"| {depth} | {m} | {r['retrieval']:.4f} | {r['two_stage']:.4f} | {r['delta']:+.4f} | "
                         f"[{r['ci95_lo']:+.4f}, {r['ci95_hi']:+.4f}] | {r['ratio']:.3f} |")
    return "\n".join(lines)


def evaluate_ranking_checkpoint(state: dict, cfg: RunConfig, stage: str = "test",
                                depths: tuple[int, ...] = ()) -> tuple[dict[str, float], TwoStageRanks]:
    """A ranking checkpoint on its data: AUC / logloss vs sampled items, and the two-stage ranks at each
    depth (default: rerank_k) with the retrieval model it was trained against (its anchor when it has one,
    else ``ranking.retrieval_checkpoint``)."""
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds)
    model = ranking_model_from_checkpoint(state)
    if model.encoder.num_items != ds.num_items:
        raise ValueError(f"dataset has {ds.num_items} items but the ranker was trained on {model.encoder.num_items}")
    if model.anchor is not None:
        retriever = Retriever(model.anchor, ds.num_items)
    elif cfg.ranking.retrieval_checkpoint:
        retriever = Retriever.from_checkpoint(cfg.ranking.retrieval_checkpoint, ds.num_items)
    else:
        raise ValueError("this ranking checkpoint has no retrieval model: set ranking.retrieval_checkpoint (--set)")
    ranking = evaluate_ranking(model, ds, split, stage, cfg)
    return ranking, two_stage_ranks(model, ds, split, cfg, retriever, stage, depths=depths or (cfg.ranking.rerank_k,))


def parameter_groups(model: RankingModel, cfg: RunConfig) -> list[dict]:
    """The encoder at ``ranking.encoder_lr`` (frozen at 0), everything ranking-specific at train.lr."""
    encoder_lr = cfg.train.lr if cfg.ranking.encoder_lr is None else cfg.ranking.encoder_lr
    if encoder_lr < 0:
        raise ValueError(f"ranking.encoder_lr must be >= 0, got {encoder_lr}")
    encoder = list(model.encoder.parameters())
    mine = {id(p) for p in encoder}
    if model.anchor is not None:  # frozen: never an optimizer's
        mine |= {id(p) for p in model.anchor.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in mine]}]
    if encoder_lr > 0:
        groups.append({"params": encoder, "lr": encoder_lr})
    else:
        for p in encoder:
            p.requires_grad_(False)
    return groups


class RankingTask(TrainTask):
    """The ranking stage in ``fit``: batches of (user, random cut) examples; validation every epoch by
    AUC, or with ``select_on: two_stage`` by the pipeline's HR@10 on ``select_users`` users (then also
    for the untrained ranker, epoch 0)."""

    def __init__(self, cfg: RunConfig, ds: SequenceDataset, split: Split, model: RankingModel,
                 retriever: Retriever | None):
        self.cfg, self.ds, self.split, self.model, self.retriever = cfg, ds, split, model, retriever
        self.two_stage = cfg.ranking.select_on == "two_stage"
        self.select_key = "two_stage_hr@10" if self.two_stage else "auc"
        self.curve_metrics = ("two_stage_hr@10", "retrieval_hr@10") if self.two_stage else ("auc",)
        self.users = np.repeat(np.flatnonzero(split.train_end - ds.offsets[:-1] >= 2), cfg.ranking.cuts_per_user)
        self.select_users = np.random.default_rng(cfg.train.seed + 2).permutation(split.eval_users)[: cfg.ranking.select_users]
        n_auc = cfg.ranking.valid_auc_users
        self.auc_users = (np.sort(np.random.default_rng(cfg.train.seed + 3).permutation(split.eval_users)[:n_auc])
                          if n_auc and n_auc < len(split.eval_users) else None)

    def epoch_batches(self, rng):
        order, size = rng.permutation(self.users), self.cfg.train.batch_size

        def batches():
            for lo in range(0, len(order), size):
                users = order[lo : lo + size]
                yield users, [int(rng.integers(self.ds.offsets[u] + 1, self.split.train_end[u])) for u in users]

        return batches(), -(-len(order) // size)

    def step(self, batch, rng):
        users, targets = batch
        return batch_loss(self.model, self.ds, users, targets, self.cfg, rng, self.retriever), len(users)

    def validate(self, epoch: int):
        val = evaluate_ranking(self.model, self.ds, self.split, "valid", self.cfg, users=self.auc_users) if epoch > 0 else {}
        if self.two_stage:
            two = evaluate_two_stage(self.model, self.ds, self.split, self.cfg, self.retriever, "valid", self.select_users)
            val["two_stage_hr@10"] = two["retrieval+ranking"]["hr@10"]
            val["retrieval_hr@10"] = two["retrieval"]["hr@10"]
        return val or None

    def save(self, path, **loop_state) -> None:
        save_checkpoint(path, self.model.encoder, self.cfg, self.ds.item_ids, **ranking_state(self.model), **loop_state)

    def load(self, state, resume: bool) -> None:
        load_ranking_weights(self.model, state)

    def train_mode(self, training: bool) -> None:
        self.model.train(training)


def train_ranking(cfg: RunConfig, resume: str | Path | None = None, progress: bool = True) -> RankingResult:
    """Train the ranker per ``cfg`` (``task: ranking``); with ``resume``, continue that checkpoint_last.pt."""
    if not cfg.train.validation:
        raise ValueError("task: ranking picks its epoch on the validation events; train.validation: false is for retrieval")
    if cfg.ranking.hard_negatives and not cfg.ranking.retrieval_checkpoint:
        raise ValueError("ranking.hard_negatives needs ranking.retrieval_checkpoint")
    if cfg.ranking.select_on == "two_stage" and not cfg.ranking.retrieval_checkpoint:
        raise ValueError("ranking.select_on: two_stage needs ranking.retrieval_checkpoint")
    if cfg.ranking.anchor and not cfg.ranking.retrieval_checkpoint:
        raise ValueError("ranking.anchor needs ranking.retrieval_checkpoint")
    seed_everything(cfg.train.seed)
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds)
    if cfg.ranking.rating_input and ds.ratings is None:
        raise ValueError(f"ranking.rating_input needs ratings, and {cfg.data.path or cfg.data.format} has none")
    retrieval = anchor_from_checkpoint(load_checkpoint(cfg.ranking.retrieval_checkpoint)) \
        if cfg.ranking.retrieval_checkpoint else None
    retriever = Retriever(retrieval, ds.num_items) if retrieval is not None else None
    anchor = retrieval if cfg.ranking.anchor else None
    # candidates sit at position n, one past the longest history
    model = RankingModel(SequentialEncoder(cfg.model, ds.num_items, cfg.data.max_len + 1), 2, cfg.ranking.head_hidden,
                         rating_input=cfg.ranking.rating_input, anchor=anchor)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay)
    if retriever is not None and cfg.ranking.warm_start:
        with torch.no_grad():
            skipped = warm_start(model.encoder, retriever.model.state_dict())
        log.info("ranker initialised from %s%s", cfg.ranking.retrieval_checkpoint,
                 f" (not copied: {', '.join(skipped)})" if skipped else "")
    outcome = fit(RankingTask(cfg, ds, split, model, retriever), cfg, optimizer, resume=resume, progress=progress)
    valid = evaluate_ranking(model, ds, split, "valid", cfg)
    test = evaluate_ranking(model, ds, split, "test", cfg)
    two_stage, paired = {}, {}
    if retriever is not None:
        ranks = two_stage_ranks(model, ds, split, cfg, retriever, depths=(*cfg.ranking.eval_depths, cfg.ranking.rerank_k))
        ranks.save(outcome.run_dir / TWO_STAGE_RANKS_FILE)
        two_stage = ranks.metrics(tuple(x for x in cfg.eval.ks if x <= cfg.ranking.rerank_k))
        paired = ranks.paired()
    atomic_write_json(outcome.run_dir / "results.json", {"best_epoch": outcome.best_epoch, "valid": valid, "test": test,
                                                         "two_stage_test": two_stage, "two_stage_test_paired": paired})
    return RankingResult(outcome.run_dir, outcome.best_epoch, valid, test, two_stage)
