"""Turn a :class:`DataConfig` into a :class:`SequenceDataset` (synthetic, prepared or any raw format)."""

from __future__ import annotations

from dataclasses import replace

from genrec.config import DataConfig
from genrec.data.loaders import DataFormatError, load_interactions
from genrec.data.published import PUBLISHED, ensure_dataset
from genrec.data.sequences import SequenceDataset, build_sequences, load_prepared
from genrec.data.synthetic import generate_synthetic


def load_dataset(cfg: DataConfig) -> SequenceDataset:
    if cfg.dataset is not None:  # a published set: its own format, the decompressed file under data/
        spec = PUBLISHED[cfg.dataset]
        cfg = replace(cfg, format=spec.format, path=str(ensure_dataset(cfg.dataset)))
    if cfg.format == "synthetic":
        return build_sequences(generate_synthetic(cfg.synthetic), cfg.kcore, cfg.kcore_passes)
    if not cfg.path:
        raise DataFormatError(f"data.path is required for format {cfg.format!r}")
    if cfg.format == "prepared":
        return load_prepared(cfg.path)
    inter = load_interactions(cfg.format, cfg.path, user_col=cfg.user_col, item_col=cfg.item_col,
                              time_col=cfg.time_col, rating_col=cfg.rating_col, delimiter=cfg.delimiter,
                              column_names=cfg.column_names)
    return build_sequences(inter, cfg.kcore, cfg.kcore_passes)
