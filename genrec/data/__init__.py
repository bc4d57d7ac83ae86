"""Interaction data: raw-format loaders, chronological per-user sequences, splits, batches."""

from genrec.data.loaders import DataFormatError, Interactions, load_interactions
from genrec.data.sequences import SequenceDataset, build_sequences, load_prepared, save_prepared

__all__ = [
    "DataFormatError",
    "Interactions",
    "SequenceDataset",
    "build_sequences",
    "load_interactions",
    "load_prepared",
    "save_prepared",
]
