"""Similarity between query states and items, training losses over it, and ranking metrics."""

from genrec.retrieval.losses import sampled_softmax_loss
from genrec.retrieval.metrics import metrics_from_ranks, target_ranks
from genrec.retrieval.similarity import DotProductSimilarity, MoLSimilarity, build_similarity

__all__ = ["DotProductSimilarity", "MoLSimilarity", "build_similarity", "metrics_from_ranks", "sampled_softmax_loss", "target_ranks"]
