"""Retrieval training: sampled softmax on every prefix position, validation each epoch, early stopping,
best-checkpoint restore, full-corpus test evaluation; resumable. The loop is ``genrec.trainer.fit``;
this module plugs the retrieval task into it."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec.checkpoint import save_checkpoint
from genrec.config import RunConfig
from genrec.data.batches import SequenceBatch, train_batches
from genrec.data.sequences import SequenceDataset, Split, leave_one_out
from genrec.data.source import load_dataset
from genrec.distributed import DistContext, cleanup, init_from_env, slice_batch, user_slice
from genrec.encoders.model import SequentialEncoder
from genrec.evaluation import evaluate_model, evaluate_popularity, format_metrics_table
from genrec.io import atomic_write_json, atomic_write_text
from genrec.retrieval.losses import sample_negatives, sampled_softmax_loss
from genrec.retrieval.mol import mutual_information_loss
from genrec.retrieval.similarity import build_similarity
from genrec.trainer import TrainTask, fit, make_run_dir, seed_everything, select_device

__all__ = ["TrainResult", "batch_loss", "make_run_dir", "seed_everything", "select_device", "train"]
log = logging.getLogger("genrec.train")
DENSE_NEGATIVES_MAX_RATIO = 32  # score the whole catalogue when it has <= 32x as many items as negatives


@dataclass
class TrainResult:
    """best_epoch: the epoch of the tested weights (validation-best; the last epoch without validation),
    stored in ``checkpoint``. valid is empty without validation."""

    run_dir: Path
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    popularity_test: dict[str, float]
    seconds_per_epoch: float
    checkpoint: Path | None = None


def batch_loss(model: SequentialEncoder, batch: SequenceBatch, cfg: RunConfig, similarity,
               generator: torch.Generator | None = None, neg_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled-softmax loss over every position of a training batch (+ MoL load balancing).

    neg_ids: pre-drawn negatives, (L, R) per position or (R,) batch-shared, int64 in 1..num_items
    (default: drawn here from ``generator``)."""
    states = model(batch.items, batch.offsets, batch.max_len, batch.timestamps, batch.next_timestamps)
    table = model.item_embeddings()  # (num_items + 1, D), normalised once per step
    r = cfg.loss.num_negatives
    if cfg.loss.negatives == "per_position":
        if neg_ids is None:
            neg_ids = sample_negatives(model.num_items, (len(states), r), states.device, generator)
        if similarity.cheap_pairwise and table.shape[0] <= DENSE_NEGATIVES_MAX_RATIO * r:
            # Small catalogue: scoring every item and gathering the sampled columns is cheaper than
            # gathering an (L, R, D) tensor and scatter-adding its gradient back. Same samples, same loss.
            pos_logits, pos_pi = similarity.aligned(states, table[batch.targets], return_gates=True)
            neg_logits, neg_pi = similarity.pairwise(states, table, return_gates=True)
            neg_logits = neg_logits.gather(1, neg_ids)
        else:
            # the positive and the R negatives of a position in one call: MoL encodes each item once
            ids = torch.cat([batch.targets[:, None], neg_ids], 1)
            logits, gates = similarity.per_query_ids(states, table, ids, return_gates=True)
            pos_logits, neg_logits = logits[:, 0], logits[:, 1:]
            pos_pi, neg_pi = (None, None) if gates is None else (gates[:, :1], gates[:, 1:])
    else:
        if neg_ids is None:
            neg_ids = sample_negatives(model.num_items, (r,), states.device, generator)
        pos_logits, pos_pi = similarity.aligned(states, table[batch.targets], return_gates=True)
        neg_logits, neg_pi = similarity.pairwise(states, table[neg_ids], return_gates=True)
    temperature = cfg.loss.temperature if cfg.similarity.type == "dot" else 1.0  # MoL logits carry 1/tau
    loss = sampled_softmax_loss(pos_logits, neg_logits, batch.targets, neg_ids, temperature)
    if pos_pi is not None and cfg.similarity.mi_loss_weight > 0:
        pi = torch.cat([pos_pi.reshape(-1, pos_pi.shape[-1]), neg_pi.reshape(-1, neg_pi.shape[-1])])
        loss = loss + cfg.similarity.mi_loss_weight * mutual_information_loss(pi)
    return loss


class LossModule(torch.nn.Module):
    """Encoder + similarity whose forward is the training loss: the unit DDP wraps."""

    def __init__(self, model: SequentialEncoder, similarity, cfg: RunConfig):
        super().__init__()
        self.model = model
        self.trainable_similarity = similarity if isinstance(similarity, torch.nn.Module) else None
        self.similarity, self.cfg = similarity, cfg

    def forward(self, batch: SequenceBatch, neg_ids: torch.Tensor) -> torch.Tensor:
        return batch_loss(self.model, batch, self.cfg, self.similarity, neg_ids=neg_ids)


class RetrievalTask(TrainTask):
    """Next-item retrieval: every rank trains its slice of each global batch (DDP under torchrun);
    validation (rank 0) is full-corpus HR@10 every ``eval_every`` epochs and at the last one."""

    select_key = "hr@10"
    curve_metrics = ("hr@10", "ndcg@10")

    def __init__(self, cfg: RunConfig, ds: SequenceDataset, split: Split, model: SequentialEncoder, similarity,
                 ctx: DistContext, device: torch.device):
        self.cfg, self.ds, self.split, self.model, self.similarity = cfg, ds, split, model, similarity
        self.ctx, self.device = ctx, device
        # One negative stream that every rank advances alike (dropout and friends use the global RNG).
        self.neg_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.step_module: torch.nn.Module | None = LossModule(model, similarity, cfg)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(self.step_module, find_unused_parameters=True)
        self.use_amp = device.type == "cuda" and cfg.train.bf16

    def parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.model.parameters())
        if isinstance(self.similarity, torch.nn.Module):
            params += list(self.similarity.parameters())
        return params

    def epoch_batches(self, rng):
        cfg, ds, split = self.cfg, self.ds, self.split
        count = int(np.ceil(np.sum(split.train_end - ds.offsets[:-1] >= 2) / cfg.train.batch_size))
        return train_batches(ds, split, cfg.data.max_len, cfg.train.batch_size, rng,
                             cfg.train.stochastic_length_alpha), count

    def step(self, batch: SequenceBatch, rng):
        cfg, ctx = self.cfg, self.ctx
        r = cfg.loss.num_negatives
        shape = (len(batch.items), r) if cfg.loss.negatives == "per_position" else (r,)
        negs = sample_negatives(self.ds.num_items, shape, torch.device("cpu"), self.neg_gen)
        scale = 1.0
        if ctx.enabled:  # this rank's users; the scale makes DDP's average the global position mean
            n_users = len(batch.offsets) - 1
            if n_users < ctx.world_size:
                return None, 0  # a final sliver smaller than the world: every rank skips it alike
            global_positions = len(batch.items)
            batch, lo = slice_batch(batch, *user_slice(n_users, ctx.rank, ctx.world_size))
            if cfg.loss.negatives == "per_position":
                negs = negs[lo : lo + len(batch.items)]
            scale = len(batch.items) / global_positions * ctx.world_size
        batch = batch.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext():
            loss = self.step_module(batch, negs.to(self.device)) * scale
        return loss, len(batch.items) * ctx.world_size

    def evaluate(self, stage: str) -> dict[str, float]:
        cfg = self.cfg
        return evaluate_model(self.model, self.ds, self.split, stage, tuple(cfg.eval.ks), cfg.eval.batch_size,
                              cfg.eval.exclude_history, similarity=self.similarity)

    def validate(self, epoch: int):
        due = epoch > 0 and (epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs)
        return self.evaluate("valid") if self.split.validation and due else None

    def save(self, path: Path, **loop_state: Any) -> None:
        if isinstance(self.similarity, torch.nn.Module):
            loop_state["similarity"] = self.similarity.state_dict()
        save_checkpoint(path, self.model, self.cfg, self.ds.item_ids, negatives_rng=self.neg_gen.get_state(),
                        **loop_state)

    def load(self, state: dict[str, Any], resume: bool) -> None:
        self.model.load_state_dict(state["model"])
        if "similarity" in state:
            self.similarity.load_state_dict(state["similarity"])
        if resume and "negatives_rng" in state:
            self.neg_gen.set_state(state["negatives_rng"])

    def train_mode(self, training: bool) -> None:
        self.model.train(training)
        if isinstance(self.similarity, torch.nn.Module):
            self.similarity.train(training)


def train(cfg: RunConfig, resume: str | Path | None = None, dataset: SequenceDataset | None = None,
          progress: bool = True) -> TrainResult | None:
    """Train per ``cfg``; with ``resume``, continue from that checkpoint's epoch in its run dir.

    Under torchrun (WORLD_SIZE > 1) every rank trains its slice of each global batch with DDP; rank 0
    evaluates, checkpoints and returns the result, the other ranks return None."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    ctx = init_from_env(device)
    device = ctx.device if ctx.enabled else device
    seed_everything(cfg.train.seed)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    split = leave_one_out(ds, cfg.train.validation)
    log.info("data: %s", ds.describe())
    model = SequentialEncoder(cfg.model, ds.num_items, cfg.data.max_len).to(device)
    d = cfg.model.item_emb_dim
    similarity = build_similarity(cfg.similarity, d, d)
    if isinstance(similarity, torch.nn.Module):
        similarity.to(device)
    task = RetrievalTask(cfg, ds, split, model, similarity, ctx, device)
    optimizer = torch.optim.AdamW(task.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay)
    outcome = fit(task, cfg, optimizer, resume=resume, progress=progress, ctx=ctx, device=device)
    # The DDP reducer must go before its process group does: destroying the group first aborts the
    # process at exit ("terminate called without an active exception").
    task.step_module = None
    if not ctx.is_main:
        cleanup(ctx)
        return None

    ks = tuple(cfg.eval.ks)
    test = task.evaluate("test")
    valid = task.evaluate("valid") if split.validation else {}
    popularity = evaluate_popularity(ds, split, "test", ks, exclude_history=cfg.eval.exclude_history)
    run_dir = outcome.run_dir
    result = TrainResult(run_dir, outcome.best_epoch, valid, test, popularity, outcome.seconds_per_epoch,
                         outcome.checkpoint)
    atomic_write_json(run_dir / "results.json", {
        "best_epoch": outcome.best_epoch,
        "selection": "validation hr@10" if split.validation else "final epoch (no validation)",
        "checkpoint": outcome.checkpoint.name, "valid": valid, "test": test, "popularity_test": popularity,
        "seconds_per_epoch": result.seconds_per_epoch, "data": ds.describe(), "device": str(device),
    })
    atomic_write_text(run_dir / "results.md", format_metrics_table(
        {f"{cfg.model.encoder}+{cfg.similarity.type} (test)": test, "popularity (test)": popularity}, ks) + "\n")
    cleanup(ctx)
    return result
