"""Data-parallel training under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU).

    torchrun --standalone --nproc_per_node=2 -m genrec train --config configs/ml1m_hstu.yaml
    torchrun --nnodes=2 --node_rank=0 --master_addr=host0 --master_port=29500 --nproc_per_node=8 \\
        -m genrec train --config ...                                   # (and node_rank=1 on host1)

Every rank draws the same global batch (same seed, same shuffle) and keeps its contiguous slice of the
users, so no user is seen twice and the global batch is what one process with ``train.batch_size``
would see. Losses are scaled so that DDP's gradient average equals the single-process gradient of the
mean over all positions of the global batch; negatives come from one generator every rank advances
alike, so a run with dropout off matches the single-process run step for step (tested). Rank 0 alone
evaluates, checkpoints and writes the run directory; its early-stopping decision is broadcast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from genrec.data.batches import SequenceBatch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (CUDA for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def user_slice(num_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [a, b) of a global batch's users for ``rank`` (sizes differ by at most one)."""
    return rank * num_users // world_size, (rank + 1) * num_users // world_size


def slice_batch(batch: SequenceBatch, a: int, b: int) -> tuple[SequenceBatch, int]:
    """Rows a..b-1 of a training batch (targets per position) and the offset of its first position."""
    off = batch.offsets
    lo, hi = int(off[a]), int(off[b])
    cut = lambda t: None if t is None else t[lo:hi]  # noqa: E731
    lengths = (off[a + 1 : b + 1] - off[a:b])
    part = SequenceBatch(items=batch.items[lo:hi], offsets=off[a : b + 1] - lo,
                         max_len=int(lengths.max()) if b > a else 0, targets=batch.targets[lo:hi],
                         timestamps=cut(batch.timestamps), next_timestamps=cut(batch.next_timestamps),
                         users=None if batch.users is None else np.asarray(batch.users)[a:b])
    return part, lo


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
