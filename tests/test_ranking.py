"""Target-aware ranking and M-FALCON: the cached, microbatched path equals the full pass and the naive
one-candidate-per-pass baseline; scores are invariant to candidate order and to which other
candidates share the pass; history rows never see candidates."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.config import ModelConfig
from genrec.encoders.model import SequentialEncoder
from genrec.encoders.ranking import RankingModel
from genrec.kernels.hstu_attention_reference import attention_geometry

TOL = dict(rtol=1e-4, atol=1e-5)


def ranker(time=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(item_emb_dim=16, num_blocks=2, num_heads=2, dqk=8, dv=8, input_time_embedding=time,
                      relative_time_bias=time, **kw)
    return RankingModel(SequentialEncoder(cfg, num_items=50, max_len=40)).eval()


def request(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, 51, (n,), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (n,), generator=g), 0) + 10**9
    cands = torch.randint(1, 51, (m,), generator=g)
    return hist, ts, cands


def test_target_aware_geometry():
    """3 history rows + 2 targets: causal history, each target sees the history and itself, at position 3."""
    visible, q_pos, k_pos = attention_geometry(torch.tensor([0, 5]), 5, torch.tensor([0, 5]), 5, torch.tensor([2]))
    m = visible[0]
    assert q_pos.tolist() == [[0, 1, 2, 3, 3]] and k_pos.tolist() == [[0, 1, 2, 3, 3]]
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril()) and not m[:3, 3:].any()
    assert m[3:, :3].all() and m[3, 3] and m[4, 4] and not m[3, 4] and not m[4, 3]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 12), micro=st.integers(1, 5), time=st.booleans(), seed=st.integers(0, 99))
@torch.no_grad()
def test_cached_microbatched_equals_full_pass_and_naive_per_candidate(n, m, micro, time, seed):
    model = ranker(time=time, seed=seed % 3)
    hist, ts, cands = request(n, m, seed)
    ts = ts if time else None
    full = model.score_full(hist, cands, ts, request_time=None if ts is None else int(ts[-1]) + 60)
    naive = model.score_per_candidate(hist, cands, ts, request_time=None if ts is None else int(ts[-1]) + 60)
    cached = model.score(hist, cands, ts, request_time=None if ts is None else int(ts[-1]) + 60, microbatch=micro)
    torch.testing.assert_close(full, naive, **TOL)
    torch.testing.assert_close(cached, full, **TOL)


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 25), st.integers(1, 9)), min_size=1, max_size=5), time=st.booleans(),
       seed=st.integers(0, 99))
@torch.no_grad()
def test_a_jagged_batch_of_requests_scores_each_like_its_own_pass(sizes, time, seed):
    """The training path: ragged requests packed into one pass give every request its own scores."""
    model = ranker(time=time, seed=seed % 3)
    reqs = [request(n, m, seed + i) for i, (n, m) in enumerate(sizes)]
    times = [int(ts[-1]) + 60 * i for i, (_, ts, _) in enumerate(reqs)]
    batch, states = model.score_full_batch([h for h, _, _ in reqs], [c for _, _, c in reqs],
                                           [ts for _, ts, _ in reqs] if time else None, times if time else None,
                                           return_history=True)
    for (hist, ts, cands), got, got_states, t in zip(reqs, batch, states, times):
        want, want_states = model.score_full(hist, cands, ts if time else None, t if time else None, return_history=True)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_states, want_states, **TOL)


@torch.no_grad()
def test_history_ratings_reach_every_scoring_path_alike():
    """A rating-aware ranker: full pass, batch, M-FALCON and per-candidate agree with ratings; a fresh
    (zero) rating embedding changes nothing, a trained one does."""
    model = ranker(seed=2)
    rated = RankingModel(model.encoder, rating_input=True).eval()
    rated.load_state_dict(model.state_dict(), strict=False)
    hist, ts, cands = request(17, 7, seed=5)
    stars = torch.tensor([1.0, 5.0, 3.5, 4.0, 2.0, 5.0, 4.5, 3.0, 1.0, 2.5, 4.0, 4.0, 5.0, 3.0, 2.0, 1.5, 4.0])
    torch.testing.assert_close(rated.score_full(hist, cands, ts, history_ratings=stars), model.score_full(hist, cands, ts))
    rated.rating_emb.weight[1:].normal_(generator=torch.Generator().manual_seed(0))
    full = rated.score_full(hist, cands, ts, history_ratings=stars)
    assert not torch.allclose(full, rated.score_full(hist, cands, ts))
    torch.testing.assert_close(rated.score(hist, cands, ts, microbatch=3, history_ratings=stars), full, **TOL)
    torch.testing.assert_close(rated.score_per_candidate(hist, cands, ts, history_ratings=stars), full, **TOL)
    batch = rated.score_full_batch([hist[:5], hist], [cands[:2], cands], [ts[:5], ts], history_ratings=[stars[:5], stars])
    torch.testing.assert_close(batch[1], full, **TOL)
    with pytest.raises(ValueError, match="3 ratings for a history of 17 items"):
        rated.score(hist, cands, ts, history_ratings=stars[:3])


@torch.no_grad()
def test_permutation_and_subset_invariance_and_untouched_history():
    model = ranker()
    hist, ts, cands = request(20, 9, seed=4)
    full, hist_states = model.score_full(hist, cands, ts, return_history=True)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.score_full(hist, cands[perm], ts), full[perm], **TOL)
    torch.testing.assert_close(model.score_full(hist, cands[2:5], ts), full[2:5], **TOL)
    torch.testing.assert_close(hist_states, model.prefill(hist, ts).states, **TOL)
    other = model.score_full(hist, torch.tensor([7, 7, 7]), ts, return_history=True)[1]
    torch.testing.assert_close(other, hist_states, **TOL)  # history rows never see candidates


def test_ranking_rejects_histories_it_cannot_place():
    model = ranker()
    with pytest.raises(ValueError, match="at most 39"):
        model.score(torch.ones(40, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match="empty history"):
        model.score(torch.ones(0, dtype=torch.long), torch.tensor([1]))


@torch.no_grad()
def test_ranking_paths_on_the_triton_kernel_match_the_reference():
    """Full pass (target-aware) and M-FALCON (delta-q) through the Triton attention (interpreter on CPU)."""
    pytest.importorskip("triton")
    model = ranker(seed=1)
    hist, ts, cands = request(13, 6, seed=2)
    want_full, want_cached = model.score_full(hist, cands, ts), model.score(hist, cands, ts, microbatch=4)
    for layer in model.encoder.blocks:
        layer.cfg.attention_backend = "triton"
    torch.testing.assert_close(model.score_full(hist, cands, ts), want_full, **TOL)
    torch.testing.assert_close(model.score(hist, cands, ts, microbatch=4), want_cached, **TOL)


def test_encoder_learning_rate_groups_and_freezing():
    from genrec.config import RunConfig
    from genrec.ranking_training import parameter_groups

    cfg = RunConfig()
    cfg.train.lr = 1e-3
    model = ranker()
    n_encoder = len(list(model.encoder.parameters()))
    cfg.ranking.encoder_lr = 1e-5
    groups = parameter_groups(model, cfg)
    assert len(groups[1]["params"]) == n_encoder and groups[1]["lr"] == 1e-5 and "lr" not in groups[0]
    assert len(groups[0]["params"]) == len(list(model.parameters())) - n_encoder
    cfg.ranking.encoder_lr = 0.0
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.train.lr)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    hist, ts, cands = request(9, 4)
    model.train()
    loss = model.score_full(hist, cands, ts).square().sum() + model.retrieval_weight
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # frozen
    assert model.retrieval_weight.item() != 20.0  # the ranking parameters moved
    cfg.ranking.encoder_lr = -1.0
    with pytest.raises(ValueError, match="encoder_lr must be >= 0"):
        parameter_groups(ranker(), cfg)


def anchored(seed=0, time=True, similarity=None):
    """A ranker whose retrieval prior comes from a separate, frozen retrieval model."""
    from genrec.encoders.ranking import RetrievalAnchor
    from genrec.retrieval.similarity import DotProductSimilarity

    base = ranker(time=time, seed=seed)
    torch.manual_seed(seed + 100)
    cfg = ModelConfig(item_emb_dim=16, num_blocks=1, num_heads=1, dqk=8, dv=8, input_time_embedding=time,
                      relative_time_bias=time)
    anchor = RetrievalAnchor(SequentialEncoder(cfg, num_items=50, max_len=30), similarity or DotProductSimilarity(), 0.05)
    return RankingModel(base.encoder, anchor=anchor).eval(), anchor


@torch.no_grad()
def test_an_anchored_ranker_starts_as_the_retrieval_models_order_on_every_path():
    """Untrained (zero head and item bias): each candidate's engagement logit is exactly the anchor's
    phi(query, item) / tau, its query being the anchor's state after the history's last event (the last 30
    events: its own max_len); full pass, jagged batch and M-FALCON all agree."""
    from genrec.encoders.history import last_states, pack_histories

    model, anchor = anchored()
    hist, ts, cands = request(35, 8, seed=3)
    t = int(ts[-1]) + 60
    packed = pack_histories([hist.numpy()], 30, [ts.numpy()], [t])
    q = last_states(anchor.encoder, packed)[0]
    want = (anchor.encoder.item_embeddings(cands) @ q) / 0.05
    full = model.score_full(hist, cands, ts, t)
    torch.testing.assert_close(full[:, 0], want, **TOL)
    torch.testing.assert_close(model.score(hist, cands, ts, t, microbatch=3), full, **TOL)
    batch = model.score_full_batch([hist[:9], hist], [cands[:4], cands], [ts[:9], ts], [None, t])
    torch.testing.assert_close(batch[1], full, **TOL)
    torch.testing.assert_close(batch[0], model.score_full(hist[:9], cands[:4], ts[:9]), **TOL)


def test_the_anchor_stays_frozen_and_in_eval_mode_while_the_ranker_trains():
    from genrec.config import RunConfig
    from genrec.ranking_training import parameter_groups

    model, anchor = anchored(seed=1)
    model.train()
    assert not anchor.training and not anchor.encoder.training and model.encoder.training
    cfg = RunConfig()
    cfg.train.lr, cfg.ranking.encoder_lr = 1e-3, 1e-4
    grouped = {id(p) for g in parameter_groups(model, cfg) for p in g["params"]}
    assert not any(id(p) in grouped for p in anchor.parameters())
    assert all(not p.requires_grad for p in anchor.parameters())
    before = [p.clone() for p in anchor.parameters()]
    opt = torch.optim.AdamW(parameter_groups(model, cfg))
    hist, ts, cands = request(12, 5, seed=1)
    with torch.no_grad():
        model.head[-1].weight.normal_()
    loss = model.score_full_batch([hist], [cands], [ts])[0][:, 0].logsumexp(0)
    loss.backward()
    opt.step()
    assert all(a.equal(b) for a, b in zip(anchor.parameters(), before))
    assert model.encoder.item_emb.weight.grad is not None


@torch.no_grad()
def test_an_anchored_ranker_round_trips_through_its_checkpoint(tmp_path):
    """The anchor (encoder + MoL similarity + temperature) travels inside the ranking checkpoint."""
    from genrec.checkpoint import (anchor_from_checkpoint, load_checkpoint, ranking_model_from_checkpoint,
                                   ranking_state, save_checkpoint)
    import numpy as np

    from genrec.config import RunConfig
    from genrec.encoders.history import last_states, pack_histories
    from genrec.retrieval.similarity import build_similarity

    retrieval_cfg = RunConfig()
    retrieval_cfg.model = ModelConfig(item_emb_dim=16, num_blocks=1, num_heads=1, dqk=8, dv=8)
    retrieval_cfg.similarity.type = "mol"
    retrieval_cfg.similarity.query_components, retrieval_cfg.similarity.item_components = 2, 2
    retrieval_cfg.similarity.component_dim, retrieval_cfg.similarity.query_hidden = 8, 16
    retrieval_cfg.similarity.gating_hidden = 8
    torch.manual_seed(4)
    enc = SequentialEncoder(retrieval_cfg.model, num_items=50, max_len=30)
    sim = build_similarity(retrieval_cfg.similarity, 16, 16)
    save_checkpoint(tmp_path / "retrieval.pt", enc, retrieval_cfg, np.arange(1, 51), similarity=sim.state_dict())
    anchor = anchor_from_checkpoint(load_checkpoint(tmp_path / "retrieval.pt"))
    assert anchor.temperature == 1.0  # MoL scores are logits already
    model = RankingModel(ranker(time=False, seed=2).encoder, anchor=anchor).eval()
    model.head[-1].weight.normal_()
    cfg = RunConfig()
    cfg.task, cfg.model = "ranking", model.encoder.cfg
    save_checkpoint(tmp_path / "ranker.pt", model.encoder, cfg, np.arange(1, 51), **ranking_state(model))
    again = ranking_model_from_checkpoint(load_checkpoint(tmp_path / "ranker.pt"))
    assert again.anchor is not None and isinstance(again.anchor.similarity, torch.nn.Module)
    hist, _, cands = request(14, 6, seed=8)
    torch.testing.assert_close(again.score(hist, cands), model.score(hist, cands), **TOL)
    query = last_states(enc.eval(), pack_histories([hist.numpy()], enc.max_len)).expand(len(cands), -1)
    plain = sim.eval().aligned(query, enc.item_embeddings(cands))
    torch.testing.assert_close(again.anchor.logits(again.anchor.queries([hist]), [cands]), plain, **TOL)
