"""Training loop: sampled softmax on every prefix position, validation each epoch, early stopping,
best-checkpoint restore, full-corpus test evaluation. Resumable from its last checkpoint."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genrec.checkpoint import load_checkpoint, save_checkpoint
from genrec.config import RunConfig, dump_config
from genrec.data.batches import SequenceBatch, train_batches
from genrec.data.sequences import SequenceDataset, leave_one_out
from genrec.data.source import load_dataset
from genrec.encoders.model import SequentialEncoder
from genrec.evaluation import evaluate_model, evaluate_popularity, format_metrics_table
from genrec.io import atomic_write_csv, atomic_write_json, atomic_write_text
from genrec.plots import learning_curve
from genrec.distributed import all_reduce_mean, broadcast_flag, cleanup, init_from_env, slice_batch, user_slice
from genrec.retrieval.losses import sample_negatives, sampled_softmax_loss
from genrec.retrieval.mol import mutual_information_loss
from genrec.retrieval.similarity import build_similarity

log = logging.getLogger("genrec.train")
DENSE_NEGATIVES_MAX_RATIO = 32  # score the whole catalogue when it has <= 32x as many items as negatives


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    pos_logits, pos_pi = similarity.aligned(states, table[batch.targets], return_gates=True)
    r = cfg.loss.num_negatives
    if cfg.loss.negatives == "per_position":
        if neg_ids is None:
            neg_ids = sample_negatives(model.num_items, (len(states), r), states.device, generator)
        if similarity.cheap_pairwise and table.shape[0] <= DENSE_NEGATIVES_MAX_RATIO * r:
            # Small catalogue: scoring every item and gathering the sampled columns is cheaper than
            # gathering an (L, R, D) tensor and scatter-adding its gradient back. Same samples, same loss.
            neg_logits, neg_pi = similarity.pairwise(states, table, return_gates=True)
            neg_logits = neg_logits.gather(1, neg_ids)
        else:
            neg_logits, neg_pi = similarity.per_query(states, table[neg_ids], return_gates=True)
    else:
        if neg_ids is None:
            neg_ids = sample_negatives(model.num_items, (r,), states.device, generator)
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


def make_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.out_dir) / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()):
        run_dir = Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
    params = list(model.parameters())
    if isinstance(similarity, torch.nn.Module):
        similarity.to(device)
        params += list(similarity.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(cfg.train.seed)
    history: list[dict] = []
    start_epoch, best_epoch, best_score, bad_epochs = 1, 0, -1.0, 0

    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        model.load_state_dict(state["model"])
        if "similarity" in state:
            similarity.load_state_dict(state["similarity"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        best_epoch, best_score, bad_epochs = state["best_epoch"], state["best_score"], state["bad_epochs"]
        run_dir = Path(resume).parent
        log.info("resuming from %s at epoch %d", resume, start_epoch)
    elif ctx.is_main:
        run_dir = make_run_dir(cfg)
    else:
        run_dir = None
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    # One negative stream that every rank advances alike (dropout and friends use the global RNG).
    neg_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    if resume is not None and "negatives_rng" in state:
        neg_gen.set_state(state["negatives_rng"])
    step_module = LossModule(model, similarity, cfg)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, find_unused_parameters=True)
    use_amp = device.type == "cuda" and cfg.train.bf16
    ks = tuple(cfg.eval.ks)

    def checkpoint(path: Path, epoch: int) -> None:
        extra = {"similarity": similarity.state_dict()} if isinstance(similarity, torch.nn.Module) else {}
        save_checkpoint(path, model, cfg, ds.item_ids, optimizer=optimizer.state_dict(), epoch=epoch, **extra,
                        history=history, best_epoch=best_epoch, best_score=best_score, bad_epochs=bad_epochs,
                        numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                        negatives_rng=neg_gen.get_state())

    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        model.train()
        if isinstance(similarity, torch.nn.Module):
            similarity.train()
        t0 = time.perf_counter()
        total_loss, steps, tokens = 0.0, 0, 0
        batches = train_batches(ds, split, cfg.data.max_len, cfg.train.batch_size, rng, cfg.train.stochastic_length_alpha)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False,
                   total=int(np.ceil(np.sum(split.train_end - ds.offsets[:-1] >= 2) / cfg.train.batch_size)))
        for batch in bar:
            r = cfg.loss.num_negatives
            shape = (len(batch.items), r) if cfg.loss.negatives == "per_position" else (r,)
            negs = sample_negatives(ds.num_items, shape, torch.device("cpu"), neg_gen)
            scale = 1.0
            if ctx.enabled:  # this rank's users; the scale makes DDP's average the global position mean
                n_users = len(batch.offsets) - 1
                if n_users < ctx.world_size:
                    continue  # a final sliver smaller than the world: every rank skips it alike
                global_positions = len(batch.items)
                batch, lo = slice_batch(batch, *user_slice(n_users, ctx.rank, ctx.world_size))
                if cfg.loss.negatives == "per_position":
                    negs = negs[lo : lo + len(batch.items)]
                scale = len(batch.items) / global_positions * ctx.world_size
            batch = batch.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext():
                loss = step_module(batch, negs.to(device)) * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += all_reduce_mean(loss.item(), ctx)
            steps += 1
            tokens += len(batch.items) * ctx.world_size
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.train.max_steps_per_epoch and steps >= cfg.train.max_steps_per_epoch:
                break
        seconds = time.perf_counter() - t0
        epoch_seconds.append(seconds)
        row = {"epoch": epoch, "train_loss": total_loss / max(steps, 1), "seconds": round(seconds, 3),
               "positions_per_s": round(tokens / seconds, 1)}
        improved = False
        if ctx.is_main and split.validation and (epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs):
            val = evaluate_model(model, ds, split, "valid", ks, cfg.eval.batch_size, cfg.eval.exclude_history,
                                 similarity=similarity)
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val["hr@10"] > best_score
            if improved:
                best_score, best_epoch, bad_epochs = val["hr@10"], epoch, 0
            else:
                bad_epochs += 1
        history.append(row)
        if ctx.is_main:
            log.info("epoch %d: loss %.4f, %.1fs (%.0f positions/s)%s", epoch, row["train_loss"], seconds,
                     row["positions_per_s"], f", val HR@10 {row['val_hr@10']:.4f}" if "val_hr@10" in row else "")
            if improved:
                checkpoint(run_dir / "checkpoint_best.pt", epoch)
            checkpoint(run_dir / "checkpoint_last.pt", epoch)
            atomic_write_csv(run_dir / "metrics.csv", history)
            learning_curve(history, run_dir / "learning_curve.png", f"{cfg.name} ({cfg.model.encoder})")
        stop = bool(split.validation and cfg.train.patience and bad_epochs >= cfg.train.patience)
        if broadcast_flag(stop, ctx):
            if ctx.is_main:
                log.info("early stop: no validation HR@10 gain for %d epochs (best epoch %d)", bad_epochs, best_epoch)
            break

    # The DDP reducer must go before its process group does: destroying the group first aborts the
    # process at exit ("terminate called without an active exception").
    del step_module
    if not ctx.is_main:
        cleanup(ctx)
        return None

    tested = run_dir / "checkpoint_last.pt"
    if not split.validation:  # the reference's protocol: the final weights, whatever validation would say
        best_epoch = history[-1]["epoch"] if history else 0
    elif best_epoch:
        tested = run_dir / "checkpoint_best.pt"
        best = load_checkpoint(tested, map_location=device)
        model.load_state_dict(best["model"])
        if "similarity" in best:
            similarity.load_state_dict(best["similarity"])
    test = evaluate_model(model, ds, split, "test", ks, cfg.eval.batch_size, cfg.eval.exclude_history, similarity=similarity)
    valid = (evaluate_model(model, ds, split, "valid", ks, cfg.eval.batch_size, cfg.eval.exclude_history, similarity=similarity)
             if split.validation else {})
    popularity = evaluate_popularity(ds, split, "test", ks, exclude_history=cfg.eval.exclude_history)
    result = TrainResult(run_dir, best_epoch, valid, test, popularity,
                         float(np.mean(epoch_seconds)) if epoch_seconds else 0.0, tested)
    atomic_write_json(run_dir / "results.json", {
        "best_epoch": best_epoch, "selection": "validation hr@10" if split.validation else "final epoch (no validation)",
        "checkpoint": tested.name, "valid": valid, "test": test, "popularity_test": popularity,
        "seconds_per_epoch": result.seconds_per_epoch, "data": ds.describe(), "device": str(device),
    })
    atomic_write_text(run_dir / "results.md", format_metrics_table(
        {f"{cfg.model.encoder}+{cfg.similarity.type} (test)": test, "popularity (test)": popularity}, ks) + "\n")
    cleanup(ctx)
    return result
