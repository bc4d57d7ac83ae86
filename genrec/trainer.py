"""The one training loop. Retrieval (``genrec.training``) and ranking (``genrec.ranking_training``) each
plug a ``TrainTask`` into ``fit``.

``fit`` owns what the tasks share: epochs and progress bars, validation with early stopping and the
best-epoch restore, atomic checkpoint / config / metrics writes, the learning curve, and resume (every
checkpoint carries the optimizer, the RNG states and the history). A task owns its batches, its loss,
its validation metric and what its checkpoint holds besides that.
"""

from __future__ import annotations

import ctypes
import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from genrec.checkpoint import load_checkpoint
from genrec.config import RunConfig, dump_config
from genrec.distributed import DistContext, all_reduce_mean, broadcast_flag
from genrec.io import atomic_write_csv, atomic_write_text
from genrec.plots import learning_curve

log = logging.getLogger("genrec.train")
NO_SCORE = -1.0  # best_score before any validation (every selection metric is >= 0)


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available")
    return device


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (no mmap for large
    blocks, no trimming). A CPU training step allocates and frees GBs of activations; fresh pages cost a
    fault each on first touch, which made elementwise ops over MoL's (positions x negatives x P) tensors
    ~6x slower than on reused memory. The price: the process keeps its peak RSS. Returns False where
    there is no glibc (macOS, musl), leaving the allocator as it was."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: RunConfig) -> Path:
    """out_dir/name, or out_dir/name-<time> when that already holds a run."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()):
        run_dir = Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class TrainTask(ABC):
    """What a task plugs into ``fit``. ``select_key``: the validation metric (higher is better) that
    picks the best epoch; ``curve_metrics``: the validation metrics the learning curve plots."""

    select_key: str = "hr@10"
    curve_metrics: tuple[str, ...] = ("hr@10",)

    @abstractmethod
    def epoch_batches(self, rng: np.random.Generator) -> tuple[Iterable[Any], int | None]:
        """One epoch's batches (drawn with ``rng``, the loop's resumable generator) and their count."""

    @abstractmethod
    def step(self, batch: Any, rng: np.random.Generator) -> tuple[torch.Tensor | None, int]:
        """(the batch's loss, the examples or positions it covered); loss None skips the batch."""

    @abstractmethod
    def validate(self, epoch: int) -> dict[str, float] | None:
        """Validation metrics after ``epoch`` (0: the untrained model), or None when none is due."""

    @abstractmethod
    def save(self, path: Path, **loop_state: Any) -> None:
        """Write a checkpoint at ``path`` holding the task's weights and ``loop_state``."""

    @abstractmethod
    def load(self, state: dict[str, Any], resume: bool) -> None:
        """Load a checkpoint's weights (and with ``resume``, the task's own RNG state)."""

    @abstractmethod
    def train_mode(self, training: bool) -> None:
        """Switch the task's modules between train and eval mode."""


@dataclass
class FitOutcome:
    """run_dir: None on a non-zero rank. checkpoint: the file whose weights the task now holds (the
    validation-best epoch, else the last one); best_epoch: its epoch."""

    run_dir: Path | None
    history: list[dict]
    best_epoch: int
    checkpoint: Path | None
    seconds_per_epoch: float
    selected: bool  # True when validation picked the epoch


def fit(task: TrainTask, cfg: RunConfig, optimizer: torch.optim.Optimizer, *, resume: str | Path | None = None,
        progress: bool = True, ctx: DistContext | None = None, device: torch.device | str = "cpu") -> FitOutcome:
    """Train ``task`` for cfg.train.epochs (or until cfg.train.patience validations without gain); with
    ``resume``, continue an interrupted run from its checkpoint_last.pt, in its run directory."""
    ctx = ctx or DistContext()
    if torch.device(device).type == "cpu" and keep_freed_cpu_memory():
        log.debug("glibc keeps freed memory for reuse (CPU training)")
    rng = np.random.default_rng(cfg.train.seed)
    history: list[dict] = []
    start_epoch, best_epoch, best_score, bad_epochs = 1, 0, NO_SCORE, 0
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        task.load(state, resume=True)
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        best_epoch, best_score, bad_epochs = state["best_epoch"], state["best_score"], state["bad_epochs"]
        run_dir = Path(resume).parent
        log.info("resuming from %s at epoch %d", resume, start_epoch)
    else:
        run_dir = make_run_dir(cfg) if ctx.is_main else None
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    def record(epoch: int, row: dict, val: dict[str, float] | None) -> None:
        nonlocal best_epoch, best_score, bad_epochs
        improved = False
        if val is not None:
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val[task.select_key] > best_score
            if improved:
                best_score, best_epoch, bad_epochs = val[task.select_key], epoch, 0
            else:
                bad_epochs += 1
        history.append(row)
        if not ctx.is_main:
            return
        rate = f" ({row['positions_per_s']:.0f} positions/s)" if row.get("positions_per_s") else ""
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (val or {}).items())
        log.info("epoch %d: loss %s, %.1fs%s%s", epoch, row["train_loss"] if row["train_loss"] == "" else
                 f"{row['train_loss']:.4f}", row["seconds"], rate, f", val {shown}" if shown else "")
        loop_state = dict(optimizer=optimizer.state_dict(), epoch=epoch, history=history, best_epoch=best_epoch,
                          best_score=best_score, bad_epochs=bad_epochs, numpy_rng=rng.bit_generator.state,
                          torch_rng=torch.get_rng_state())
        if improved:
            task.save(run_dir / "checkpoint_best.pt", **loop_state)
        task.save(run_dir / "checkpoint_last.pt", **loop_state)
        atomic_write_csv(run_dir / "metrics.csv", history)
        learning_curve(history, run_dir / "learning_curve.png", f"{cfg.name} ({cfg.task}, {cfg.model.encoder})",
                       [f"val_{m}" for m in task.curve_metrics])

    if start_epoch == 1 and ctx.is_main:
        untrained = task.validate(0)
        if untrained is not None:
            record(0, {"epoch": 0, "train_loss": "", "seconds": 0.0}, untrained)

    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        task.train_mode(True)
        t0 = time.perf_counter()
        total_loss, steps, positions = 0.0, 0, 0
        batches, count = task.epoch_batches(rng)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False, total=count)
        for batch in bar:
            loss, covered = task.step(batch, rng)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            total_loss += all_reduce_mean(value, ctx)
            steps += 1
            positions += covered
            bar.set_postfix(loss=f"{value:.3f}")
            if cfg.train.max_steps_per_epoch and steps >= cfg.train.max_steps_per_epoch:
                break
        seconds = time.perf_counter() - t0
        epoch_seconds.append(seconds)
        row = {"epoch": epoch, "train_loss": total_loss / max(steps, 1), "seconds": round(seconds, 3),
               "positions_per_s": round(positions / seconds, 1)}
        record(epoch, row, task.validate(epoch) if ctx.is_main else None)
        stop = bool(cfg.train.patience and bad_epochs >= cfg.train.patience)
        if broadcast_flag(stop, ctx):
            if ctx.is_main:
                log.info("early stop: no validation %s gain for %d epochs (best epoch %d)", task.select_key,
                         bad_epochs, best_epoch)
            break

    seconds_per_epoch = float(np.mean(epoch_seconds)) if epoch_seconds else 0.0
    if not ctx.is_main:
        return FitOutcome(None, history, best_epoch, None, seconds_per_epoch, False)
    selected = best_score > NO_SCORE
    tested = run_dir / ("checkpoint_best.pt" if selected else "checkpoint_last.pt")
    if selected:
        task.load(load_checkpoint(tested, map_location=device), resume=False)
    else:  # no validation: the final weights, whatever validation would say (the reference's protocol)
        best_epoch = history[-1]["epoch"] if history else 0
    return FitOutcome(run_dir, history, best_epoch, tested, seconds_per_epoch, selected)
