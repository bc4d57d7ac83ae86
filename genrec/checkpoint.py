"""Checkpoints: weights + optimizer + resolved config + item id map in one atomically written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec import __version__
from genrec.config import RunConfig, from_dict, to_dict
from genrec.encoders.model import SequentialEncoder
from genrec.encoders.ranking import RankingModel, RetrievalAnchor
from genrec.io import atomic_write
from genrec.retrieval.similarity import build_similarity

CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, model: SequentialEncoder, cfg: RunConfig, item_ids: np.ndarray,
                    **extra: Any) -> Path:
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "genrec_version": __version__,
        "model": model.state_dict(),
        "config": to_dict(cfg),
        "num_items": model.num_items,
        "max_len": model.max_len,
        "item_ids": item_ids.tolist(),
        **extra,
    }
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{p}: not a readable genrec checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{p}: not a genrec checkpoint (missing model/config)")
    if state.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{p}: written by a newer genrec (format {state['format_version']})")
    return state


def similarity_from_checkpoint(state: dict[str, Any], device: str | torch.device = "cpu"):
    """The trained similarity of a checkpoint: DotProductSimilarity, or an eval-mode MoLSimilarity."""
    cfg = from_dict(state["config"])
    d = cfg.model.item_emb_dim
    sim = build_similarity(cfg.similarity, d, d)
    if isinstance(sim, torch.nn.Module):
        if "similarity" not in state:
            raise CheckpointError("checkpoint config says similarity 'mol' but holds no similarity weights")
        sim.load_state_dict(state["similarity"])
        sim.to(device).eval()
    return sim


def model_from_checkpoint(state: dict[str, Any], device: str | torch.device = "cpu") -> tuple[SequentialEncoder, RunConfig]:
    cfg = from_dict(state["config"])
    model = SequentialEncoder(cfg.model, state["num_items"], state["max_len"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def ranking_state(model: RankingModel) -> dict[str, Any]:
    """What a ``task: ranking`` checkpoint holds besides the encoder (saved as ``model``)."""
    state = {"ranking_head": model.head.state_dict(), "ranking_item_bias": model.item_bias.state_dict(),
             "ranking_retrieval_weight": model.retrieval_weight.detach()}
    if model.rating_emb is not None:
        state["ranking_rating_emb"] = model.rating_emb.state_dict()
    if model.anchor is not None:
        state["ranking_anchor"] = anchor_state(model.anchor)
    return state


def anchor_from_checkpoint(state: dict[str, Any]) -> RetrievalAnchor:
    """The frozen retrieval model of a retrieval checkpoint (or of a ranking checkpoint's ``ranking_anchor``),
    scoring at its training temperature."""
    encoder, cfg = model_from_checkpoint(state)
    temperature = cfg.loss.temperature if cfg.similarity.type == "dot" else 1.0  # MoL scores are logits / tau already
    return RetrievalAnchor(encoder, similarity_from_checkpoint(state), temperature, state["config"])


def anchor_state(anchor: RetrievalAnchor) -> dict[str, Any]:
    """What rebuilds an anchor: a retrieval checkpoint in miniature (encoder, similarity, config)."""
    state = {"model": anchor.encoder.state_dict(), "config": anchor.config, "num_items": anchor.encoder.num_items,
             "max_len": anchor.encoder.max_len}
    if isinstance(anchor.similarity, torch.nn.Module):
        state["similarity"] = anchor.similarity.state_dict()
    return state


def load_ranking_weights(model: RankingModel, state: dict[str, Any]) -> RankingModel:
    """Copy a ranking checkpoint's encoder, head, item bias, rating embedding and retrieval weight into ``model``."""
    model.encoder.load_state_dict(state["model"])
    model.head.load_state_dict(state["ranking_head"])
    if model.rating_emb is not None:
        model.rating_emb.load_state_dict(state["ranking_rating_emb"])
    model.item_bias.load_state_dict(state["ranking_item_bias"])
    with torch.no_grad():
        model.retrieval_weight.copy_(state["ranking_retrieval_weight"])
    return model


def ranking_model_from_checkpoint(state: dict[str, Any]) -> RankingModel:
    """The eval-mode ranker of a ``task: ranking`` checkpoint."""
    encoder, cfg = model_from_checkpoint(state)
    anchor = anchor_from_checkpoint(state["ranking_anchor"]) if "ranking_anchor" in state else None
    model = RankingModel(encoder, num_tasks=2, head_hidden=cfg.ranking.head_hidden, rating_input=cfg.ranking.rating_input,
                         anchor=anchor)
    return load_ranking_weights(model, state).eval()
