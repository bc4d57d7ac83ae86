"""PNG plots of run histories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genrec.io import atomic_write  # noqa: E402


def learning_curve(history: list[dict], path: str | Path, title: str,
                   metrics: Sequence[str] = ("val_hr@10", "val_ndcg@10")) -> Path:
    """Training loss and the validation ``metrics`` (history keys) per epoch."""
    trained = [r for r in history if r["train_loss"] != ""]  # epoch 0 rows (untrained) have no loss
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in metrics:
        rows = [r for r in history if key in r]
        ax_val.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", ms=3,
                    label=key.removeprefix("val_"))
    ax_val.set(xlabel="epoch", title="validation")
    ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def save_axes_figure(fig, ax, path: str | Path, legend_size: int = 8) -> Path:
    """A benchmark plot's common finish: log-friendly grid, legend, atomic PNG write."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write ``fig`` as a PNG atomically (no half-written file on a crash) and close it."""
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
