import math

import pytest
import torch

from genrec.config import RunConfig
from genrec.data.batches import SequenceBatch
from genrec.encoders.model import SequentialEncoder
from genrec.retrieval.losses import sampled_softmax_loss
from genrec.retrieval.similarity import DotProductSimilarity
from genrec.training import batch_loss


def naive_loss(pos, neg, pos_ids, neg_ids, temperature):
    total = 0.0
    for i in range(len(pos)):
        row_ids = neg_ids[i] if neg_ids.dim() == 2 else neg_ids
        logits = [pos[i].item() / temperature] + [
            neg[i, j].item() / temperature for j in range(neg.shape[1]) if row_ids[j] != pos_ids[i]
        ]
        m = max(logits)
        total += -(logits[0] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / len(pos)


@pytest.mark.parametrize("shared", [False, True])
def test_sampled_softmax_matches_naive_and_masks_collisions(shared):
    torch.manual_seed(0)
    pos = torch.randn(5)
    neg = torch.randn(5, 4)
    pos_ids = torch.tensor([1, 2, 3, 4, 5])
    neg_ids = torch.tensor([2, 3, 3, 9]) if shared else torch.tensor([[1, 7, 8, 9]] * 5)
    got = sampled_softmax_loss(pos, neg, pos_ids, neg_ids, temperature=0.05)
    assert got.item() == pytest.approx(naive_loss(pos, neg, pos_ids, neg_ids, 0.05), rel=1e-5)


def test_collision_changes_loss():
    pos, neg = torch.zeros(1), torch.zeros(1, 2)
    with_collision = sampled_softmax_loss(pos, neg, torch.tensor([3]), torch.tensor([[3, 4]]), 1.0)
    without = sampled_softmax_loss(pos, neg, torch.tensor([3]), torch.tensor([[5, 4]]), 1.0)
    assert with_collision.item() == pytest.approx(math.log(2))
    assert without.item() == pytest.approx(math.log(3))


def test_dense_and_gathered_negative_paths_agree(monkeypatch):
    import genrec.training as training

    cfg = RunConfig()
    cfg.model.item_emb_dim = cfg.model.dqk = cfg.model.dv = 8
    cfg.loss.num_negatives = 6
    model = SequentialEncoder(cfg.model, num_items=40, max_len=10).eval()
    offsets = torch.tensor([0, 3, 7])
    batch = SequenceBatch(items=torch.randint(1, 41, (7,)), offsets=offsets, max_len=4,
                          targets=torch.randint(1, 41, (7,)))
    losses = []
    for ratio in (1000, 0):  # dense path, then gathered path, same random draws
        monkeypatch.setattr(training, "DENSE_NEGATIVES_MAX_RATIO", ratio)
        g = torch.Generator().manual_seed(5)
        losses.append(batch_loss(model, batch, cfg, DotProductSimilarity(), generator=g))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)


@pytest.mark.parametrize("num_items", [30, 400])  # catalogue smaller / larger than the sampled pairs
def test_mol_per_position_loss_encodes_each_item_once_with_the_same_math(num_items):
    """The MoL per-position path scores the positive and its negatives in one call that encodes each
    distinct item once; without dropout its loss and every gradient equal the per-pair formula
    (item side encoded for each (position, item) pair, positives separately)."""
    from genrec.retrieval.mol import mutual_information_loss
    from genrec.retrieval.similarity import build_similarity

    torch.manual_seed(3)
    cfg = RunConfig()
    cfg.model.item_emb_dim = cfg.model.dqk = cfg.model.dv = 8
    cfg.similarity.type, cfg.similarity.mi_loss_weight = "mol", 0.01
    cfg.similarity.query_components, cfg.similarity.item_components, cfg.similarity.component_dim = 3, 2, 4
    cfg.similarity.query_hidden = cfg.similarity.gating_hidden = 16
    cfg.loss.num_negatives = 6
    model = SequentialEncoder(cfg.model, num_items=num_items, max_len=10).eval()
    sim = build_similarity(cfg.similarity, 8, 8).eval()
    offsets = torch.tensor([0, 3, 7])
    batch = SequenceBatch(items=torch.randint(1, num_items + 1, (7,)), offsets=offsets, max_len=4,
                          targets=torch.randint(1, num_items + 1, (7,)))
    neg_ids = torch.randint(1, num_items + 1, (7, 6))

    def per_pair() -> torch.Tensor:
        states = model(batch.items, batch.offsets, batch.max_len)
        table = model.item_embeddings()
        pos, pos_pi = sim.aligned(states, table[batch.targets], return_gates=True)
        neg, neg_pi = sim.per_query(states, table[neg_ids], return_gates=True)
        loss = sampled_softmax_loss(pos, neg, batch.targets, neg_ids, 1.0)
        return loss + 0.01 * mutual_information_loss(torch.cat([pos_pi.reshape(-1, 6), neg_pi.reshape(-1, 6)]))

    params = list(model.parameters()) + list(sim.parameters())
    expected = per_pair()
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    got = batch_loss(model, batch, cfg, sim, neg_ids=neg_ids)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(expected_grads, got_grads):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_training_keeps_freed_cpu_memory_where_glibc_allows_it():
    import platform

    from genrec.trainer import keep_freed_cpu_memory

    reused = keep_freed_cpu_memory()
    assert reused == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    x = torch.randn(1 << 22)  # allocations still work and are freed as usual
    assert torch.isfinite(torch.nn.functional.silu(x)).all()
