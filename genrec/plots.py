"""PNG plots of run histories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genrec.io import atomic_write  # noqa: E402


def learning_curve(history: list[dict], path: str | Path, title: str) -> Path:
    """Training loss and validation HR@10 / NDCG@10 per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="sampled-softmax loss", title="training loss")
    val = [r for r in history if "val_hr@10" in r]
    ax_val.plot([r["epoch"] for r in val], [r["val_hr@10"] for r in val], marker="o", ms=3, label="HR@10")
    ax_val.plot([r["epoch"] for r in val], [r["val_ndcg@10"] for r in val], marker="o", ms=3, label="NDCG@10")
    ax_val.set(xlabel="epoch", title="validation (full corpus)")
    ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write ``fig`` as a PNG atomically (no half-written file on a crash) and close it."""
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
