import math

import numpy as np
import pytest
import torch

from genrec.retrieval.metrics import metrics_from_ranks, paired_bootstrap, per_user_metric, target_ranks


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


def test_per_user_metric_averages_to_the_table_metric():
    ranks = torch.tensor([0, 1, 9, 10, 57, 3])
    table = metrics_from_ranks(ranks, ks=(1, 10, 50))
    for name in ("hr@1", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "mrr"):
        values = per_user_metric(ranks.numpy(), name)
        assert values.shape == (6,) and values.mean() == pytest.approx(table[name])
    with pytest.raises(ValueError, match="unknown metric 'recall@10'"):
        per_user_metric(ranks.numpy(), "recall@10")


def test_paired_bootstrap_interval_covers_the_true_shift_and_separates_a_real_gap():
    rng = np.random.default_rng(0)
    b = rng.random(2000)
    same = paired_bootstrap(b, b, num_resamples=500)
    assert same == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}
    shifted = paired_bootstrap(b + 0.05 + rng.normal(0, 0.1, 2000), b, num_resamples=2000)
    assert shifted["lo"] < 0.05 < shifted["hi"] and shifted["lo"] > 0 and shifted["p"] < 0.01
    assert shifted["delta"] == pytest.approx(0.05, abs=0.01)
    noise = paired_bootstrap(b + rng.normal(0, 0.1, 2000), b, num_resamples=2000)
    assert noise["lo"] < 0 < noise["hi"] and noise["p"] > 0.05
    # the interval is about the mean: ~1.96 standard errors each side
    se = 0.1 / np.sqrt(2000)
    assert noise["hi"] - noise["lo"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(b[:3], b[:4])
