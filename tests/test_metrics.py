import math

import pytest
import torch

from genrec.retrieval.metrics import metrics_from_ranks, target_ranks


def test_target_ranks_hand_example_with_ties_broken_by_id():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [float("-inf"), 0.2, 0.3, 0.2]])
    # row 0: target 3 (0.5) behind item 1 (0.9) and item 2 (0.5, smaller id) -> rank 2
    # row 1: target 1 (0.2) behind item 2 (0.3); item 3 ties but has a larger id -> rank 1
    assert target_ranks(scores, torch.tensor([3, 1])).tolist() == [2, 1]


def test_metrics_hand_worked():
    ranks = torch.tensor([0, 1, 9, 10])
    m = metrics_from_ranks(ranks, ks=(1, 10))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["ndcg@1"] == pytest.approx(0.25)
    expected_ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 4
    assert m["ndcg@10"] == pytest.approx(expected_ndcg10)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
