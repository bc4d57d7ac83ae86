"""Where a served index or model runs: a config's device string, checked against this machine."""

from __future__ import annotations

import torch


class PlacementError(ValueError):
    """An index or model cannot be placed on the device its config names (not a device name, a device
    this machine lacks, or an index kind that searches on the CPU only)."""


def resolve_device(device: str) -> torch.device:
    """A config's device string ("cpu", "cuda", "cuda:1") -> a torch.device that exists on this machine."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlacementError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"device {device!r} asked for, but this machine has no CUDA device torch can use")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlacementError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise PlacementError(f"device {device!r}: genrec serves on cpu or cuda")
    return dev
