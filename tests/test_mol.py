import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.retrieval.mol import MixtureOfLogits, mutual_information_loss
from genrec.retrieval.search import MoLSearcher
from genrec.kernels.topk import (chunked_topk, chunked_topk_columns, column_block_topk, merge_topk, select_topk,
                                  sort_by_score_then_id, unique_rows)


def small_mol(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(query_dim=6, item_dim=5, query_components=3, item_components=2, component_dim=4, query_hidden=8,
                gating_hidden=8)
    args.update(kw)
    return MixtureOfLogits(**args).eval()


def test_score_equals_naive_per_pair_loop():
    mol = small_mol()
    u, x = torch.randn(3, 6), torch.randn(4, 5)
    q, items = mol.encode_queries(u), mol.encode_items(x)
    got = mol.score(q, items)
    for b in range(3):
        f = F.normalize(mol.query_mlp(u[b : b + 1]).view(3, 4), dim=-1)
        a = mol.gate_query(u[b])
        for n in range(4):
            g = F.normalize(mol.item_proj(x[n : n + 1]).view(2, 4), dim=-1)
            logits = torch.stack([(f[i] * g[j]).sum() / 0.05 for i in range(3) for j in range(2)])
            h = F.silu(a * mol.gate_item(x[n]) + mol.gate_pair(logits))
            pi = torch.softmax(h, -1)
            assert got[b, n].item() == pytest.approx((pi * logits).sum().item(), rel=1e-5, abs=1e-5)


def test_aligned_scores_equal_all_pairs_scores():
    mol = small_mol()
    q, items = mol.encode_queries(torch.randn(3, 6)), mol.encode_items(torch.randn(7, 5))
    full = mol.score(q, items)
    rows = torch.tensor([[0, 3, 6], [1, 1, 2], [5, 4, 0]])
    aligned = mol.score(q, items.take(rows.reshape(-1)), aligned=True)
    torch.testing.assert_close(aligned, full.gather(1, rows))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), train=st.booleans())
def test_score_lies_between_min_and_max_logit(seed, train):
    mol = small_mol(seed)
    mol.train(train)
    q, items = mol.encode_queries(torch.randn(4, 6)), mol.encode_items(torch.randn(9, 5))
    logits = mol.logits(q, items)
    phi, pi = mol.score(q, items, return_gates=True)
    assert torch.all(phi <= logits.max(-1).values + 1e-4) and torch.all(phi >= logits.min(-1).values - 1e-4)
    assert torch.all(logits.abs() <= 1 / 0.05 + 1e-4)
    torch.testing.assert_close(pi.sum(-1), torch.ones_like(phi))


def test_user_id_components_add_logits():
    mol = small_mol(user_id_buckets=10, user_id_components=2)
    assert mol.num_logits == (3 + 2) * 2
    q = mol.encode_queries(torch.randn(2, 6), user_ids=torch.tensor([3, 17]))
    assert q.components.shape == (2, 5, 4)
    with pytest.raises(ValueError, match="pass user_ids"):
        mol.encode_queries(torch.randn(2, 6))


def test_mutual_information_loss_hand_examples():
    p = 4
    uniform = torch.full((5, p), 1 / p)  # every pair undecided: -log4 + log4 = 0
    assert mutual_information_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    one_hot_balanced = torch.eye(p)  # decisive and balanced: -log4 + 0 (the minimum)
    assert mutual_information_loss(one_hot_balanced).item() == pytest.approx(-math.log(p), rel=1e-5)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 3)  # decisive but all on one component: 0
    assert mutual_information_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    pi = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    expected = -math.log(4) + math.log(2)
    assert mutual_information_loss(pi).item() == pytest.approx(expected, rel=1e-5)


def test_sort_and_merge_break_ties_by_smaller_id():
    s, i = sort_by_score_then_id(torch.tensor([[1.0, 2.0, 2.0, 1.0]]), torch.tensor([[7, 9, 3, 2]]))
    assert i.tolist() == [[3, 9, 2, 7]]
    s, i = merge_topk(torch.tensor([[5.0, 1.0]]), torch.tensor([[4, 8]]), torch.tensor([[5.0, 3.0]]),
                      torch.tensor([[2, 6]]), 3)
    assert i.tolist() == [[2, 4, 6]] and s.tolist() == [[5.0, 5.0, 3.0]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 70), chunk=st.integers(1, 25), seed=st.integers(0, 99))
def test_chunked_topk_equals_full_sort_with_ties_and_padding(n, k, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (3, n), generator=g).float()  # many ties
    scores[0, : n // 2] = float("-inf")  # excluded items
    s, i = chunked_topk(lambda a, b: scores[:, a:b], n, 3, k, chunk)
    for row in range(3):
        order = sorted(range(n), key=lambda j: (-scores[row, j].item(), j))
        valid = [j for j in order if scores[row, j] > float("-inf")][:k]
        assert i[row, : len(valid)].tolist() == valid
        assert torch.all(i[row, len(valid):] == -1) and torch.all(torch.isneginf(s[row, len(valid):]))


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 30), group=st.sampled_from([1, 2, 3, 4, 8]), b=st.sampled_from([1, 2, 5, 32, 33]),
       extra=st.integers(0, 3), k=st.integers(1, 20), levels=st.sampled_from([2, 5, 1000]), start=st.integers(0, 50),
       seed=st.integers(0, 999))
def test_column_block_topk_equals_select_topk_on_the_whole_block(groups, group, b, extra, k, levels, start, seed):
    """The group-max pre-selection returns exactly select_topk's answer (score desc, then smaller id),
    including blocks with few distinct scores (ties across the group cut), -inf rows, k near C, both
    group-max paths (strided max, halving) and padding columns past ``batch`` that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, levels, (groups * group, b + extra), generator=g).float()
    full[torch.rand(full.shape, generator=g) < 0.2] = float("-inf")
    full[:, b:] = 10.0 * levels  # padding columns: would win every group if they were read
    block = full[:, :b]
    s, i = column_block_topk(full, start, k, group=group, batch=b)
    ids = torch.arange(start, start + len(block)).expand(b, -1)
    want_s, want_i = select_topk(block.T, ids, k)
    finite = torch.isfinite(want_s)  # -inf entries: same count, their ids are arbitrary (reported as -1)
    assert torch.equal(s, want_s) and torch.equal(i[finite], want_i[finite])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), b=st.integers(1, 4), k=st.integers(1, 40), chunk=st.integers(1, 200), seed=st.integers(0, 99))
def test_chunked_topk_columns_equals_chunked_topk(n, b, k, chunk, seed):
    """Item-major chunks (with their -inf padding to a multiple of 64 rows) give chunked_topk's answer."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (b, n), generator=g).float()
    scores[0, : n // 3] = float("-inf")

    def write(a, e, out):
        out.copy_(scores[:, a:e].T)

    s, i = chunked_topk_columns(write, n, b, k, chunk)
    want_s, want_i = chunked_topk(lambda a, e: scores[:, a:e], n, b, k, chunk)
    assert torch.equal(s, want_s) and torch.equal(i, want_i)


def test_unique_rows():
    assert unique_rows(torch.tensor([[3, 1, 3, -1], [2, 2, 2, 2]])).tolist() == [[1, 3], [2, -1]]


@torch.no_grad()
def brute_force(mol, u, x, k):
    phi = mol.score(mol.encode_queries(u), mol.encode_items(x))
    ids = torch.arange(x.shape[0]).expand_as(phi)
    s, i = sort_by_score_then_id(phi, ids)
    return s[:, :k].numpy(), i[:, :k].numpy()


@pytest.mark.parametrize("method", ["exact", "topk_per_embedding", "topk_avg", "combined"])
def test_every_method_with_a_full_budget_equals_brute_force(method):
    mol = small_mol()
    u, x = torch.randn(5, 6), torch.randn(50, 5)
    searcher = MoLSearcher(mol, x, chunk_size=7)
    r = searcher.search_with_certificate(u, 10, method=method, budget=50)
    want_s, want_i = brute_force(mol, u, x, 10)
    np.testing.assert_array_equal(r.ids, want_i)
    np.testing.assert_allclose(r.scores, want_s, rtol=1e-5, atol=1e-5)
    if method in ("exact", "topk_per_embedding", "combined"):
        assert r.exact.all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 12), k=st.integers(1, 8))
def test_certificate_is_never_wrong(seed, budget, k):
    mol = small_mol(seed % 7)
    g = torch.Generator().manual_seed(seed)
    u, x = torch.randn(6, 6, generator=g), torch.randn(40, 5, generator=g)
    r = MoLSearcher(mol, x, chunk_size=9).search_with_certificate(u, k, method="topk_per_embedding", budget=budget)
    _, want_i = brute_force(mol, u, x, k)
    for row in np.flatnonzero(r.exact):
        np.testing.assert_array_equal(r.ids[row], want_i[row])
    assert r.ids.shape == (6, k)  # the requested k is honoured, never the whole candidate set


def test_external_ids_exclusion_and_padding():
    mol = small_mol()
    x = torch.randn(6, 5)
    ids = np.array([100, 101, 102, 103, 104, 105])
    searcher = MoLSearcher(mol, x, ids=ids)
    s, i = searcher.search(torch.randn(2, 6), 8, exclude=[[100, 103], []])
    assert set(i[0][:4]) == {101, 102, 104, 105} and list(i[0][4:]) == [-1] * 4
    assert np.all(np.isneginf(s[0][4:])) and np.all(np.diff(s[0][:4]) <= 0)
    assert sorted(i[1][:6]) == list(ids) and list(i[1][6:]) == [-1, -1]
    assert s.dtype == np.float32 and i.dtype == np.int64


@pytest.mark.parametrize("queries,k,message", [
    (np.full((1, 6), np.nan, dtype=np.float32), 3, "NaN or Inf"),
    (np.ones((1, 5), dtype=np.float32), 3, "query dim 5 does not match the index dim 6"),
    (np.ones((0, 6), dtype=np.float32), 3, "empty query batch"),
    (np.ones((1, 6), dtype=np.float32), 0, "k must be a positive integer"),
    (np.ones((1, 6), dtype=np.int64), 3, "must be floating point"),
    (np.ones(6, dtype=np.float32), 3, "must be 2-D"),
])
def test_bad_queries_raise_clear_errors(queries, k, message):
    searcher = MoLSearcher(small_mol(), torch.randn(10, 5))
    with pytest.raises(ValueError, match=message):
        searcher.search(queries, k)
    with pytest.raises(ValueError, match="unknown method"):
        searcher.search(np.ones((1, 6), dtype=np.float32), 3, method="hnsw")


def test_certificate_certifies_rows_at_partial_budgets():
    certified = 0
    for seed in range(10):
        mol = small_mol(seed % 7)
        g = torch.Generator().manual_seed(seed)
        u, x = torch.randn(6, 6, generator=g), torch.randn(40, 5, generator=g)
        r = MoLSearcher(mol, x).search_with_certificate(u, 1, method="topk_per_embedding", budget=12)
        assert np.all(np.isfinite(r.bound))
        certified += int(r.exact.sum())
    assert certified > 0  # the property test above is not vacuous


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(st.sampled_from([0.0, -0.0, 1.5, -1.5, 2.0, -2.0, 1e-30, -1e-30, 3e38, -3e38,
                                      float("inf"), float("-inf")]), min_size=1, max_size=30),
       seed=st.integers(0, 999))
def test_ranking_key_orders_by_score_desc_then_id_asc(vals, seed):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(len(vals) + 3)[: len(vals)] - 1  # distinct, may include -1
    vals = torch.tensor([vals]).tolist()[0]  # float32-rounded, as the scores are compared
    s, i = select_topk(torch.tensor([vals]), torch.tensor([ids.tolist()]), len(vals))
    expected = sorted(zip(vals, ids.tolist()), key=lambda t: (-t[0], t[1] < 0, t[1]))
    assert i[0].tolist() == [e[1] for e in expected]
    assert s[0].tolist() == [e[0] for e in expected]


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 45), levels=st.sampled_from([2, 5, 1000]), seed=st.integers(0, 999))
def test_select_topk_equals_python_sort(m, k, levels, seed):
    """Both paths: rows whose k-th score is tied beyond the cut (few levels) and rows with distinct scores."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (4, m), generator=g).float() / levels
    ids = torch.stack([torch.randperm(m, generator=g) * 3 for _ in range(4)])
    s, i = select_topk(scores, ids, k)
    for row in range(4):
        expected = sorted(zip(scores[row].tolist(), ids[row].tolist()), key=lambda t: (-t[0], t[1]))[:k]
        assert list(zip(s[row].tolist(), i[row].tolist())) == expected


def test_bf16_item_cache_halves_memory_and_stays_close_to_fp32():
    torch.manual_seed(0)
    mol = small_mol()
    u, x = torch.randn(8, 6), torch.randn(400, 5)
    full = MoLSearcher(mol, x)
    half = MoLSearcher(mol, x, cache_dtype=torch.bfloat16)
    assert half.cache.components.dtype == torch.bfloat16
    assert half.cache.components.element_size() * 2 == full.cache.components.element_size()
    s32, i32 = full.search(u, 10)
    s16, i16 = half.search(u, 10)
    # bf16 keeps 8 bits of mantissa: unit-norm components move by <= 2^-8 each, logits by ~ d_P * 2^-8 / tau
    phi = mol.score(mol.encode_queries(u), mol.encode_items(x)).detach()
    np.testing.assert_allclose(s16, np.take_along_axis(phi.numpy(), i16, 1), atol=0.05 * (1 / mol.tau) * 2 ** -3)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i16, i32)])
    assert overlap >= 0.8


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), p=st.sampled_from([0.2, 0.5, 0.8]))
def test_gating_dropout_is_the_softmax_over_the_kept_gates(seed, p):
    """Training-mode gates are zero where dropped and, where kept, the eval-mode gates renormalised over the
    kept entries (the dropout-then-renormalise of the reference, drawn as a masked softmax)."""
    mol = small_mol(seed, gating_dropout=p)
    q, items = mol.encode_queries(torch.randn(5, 6)), mol.encode_items(torch.randn(7, 5))
    logits = mol.logits(q, items)
    pi_eval, _ = mol.mix(q, items, logits)
    torch.manual_seed(seed)
    mol.train()
    pi, phi = mol.mix(q, items, logits)
    kept = pi > 0
    assert 0 < (~kept).float().mean().item() < 1
    expected = torch.where(kept, pi_eval, 0.0)
    torch.testing.assert_close(pi, expected / expected.sum(-1, keepdim=True).clamp(min=1e-30), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi, (pi * logits).sum(-1))


def test_bfloat16_training_precision_stays_close_to_float32_and_eval_is_exact():
    from genrec.retrieval.similarity import MoLSimilarity

    torch.manual_seed(0)
    mol = small_mol(0, item_dropout=0.0, gating_dropout=0.0)
    full, low = MoLSimilarity(mol), MoLSimilarity(mol, "bfloat16")
    u = torch.randn(6, 6)
    table = torch.randn(9, 5, requires_grad=True)
    ids = torch.randint(0, 9, (6, 4))
    for sim in (full, low):
        sim.eval()
    assert torch.equal(full.per_query_ids(u, table, ids), low.per_query_ids(u, table, ids))
    grads = []
    for sim in (full, low):
        sim.train()
        phi, pi = sim.per_query_ids(u, table, ids, return_gates=True)
        assert phi.dtype == pi.dtype == torch.float32
        table.grad = None
        phi.sum().backward()
        grads.append((phi.detach(), table.grad.clone()))
    (phi32, g32), (phi16, g16) = grads
    assert g16.dtype == torch.float32  # items' gradients are summed in float32
    torch.testing.assert_close(phi16, phi32, rtol=0.02, atol=0.15)  # logits span [-20, 20]
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match="train_precision"):
        MoLSimilarity(mol, "float16")


def _scores_and_grads(sim, u, table, ids, seed):
    """Training-mode scores, gates and the gradients of (u, table, MoL weights) for one fixed seed."""
    torch.manual_seed(seed)
    u, table = u.clone().requires_grad_(), table.clone().requires_grad_()
    sim.zero_grad(set_to_none=True)
    phi, pi = sim.per_query_ids(u, table, ids, return_gates=True)
    (phi.square().sum() + mutual_information_loss(pi)).backward()
    weights = [p.grad.clone() for p in sim.parameters() if p.grad is not None]
    return phi.detach(), pi.detach(), u.grad, table.grad, weights


@pytest.mark.parametrize("chunk_pairs", [4, 12, 25])
def test_chunked_checkpointed_training_scores_match_one_piece(chunk_pairs):
    """train_chunk_pairs splits the queries (4 pairs a query here: 1, 3 and 6 queries a chunk, the last
    chunk short) and recomputes each in backward: without gate dropout the scores, gates and every
    gradient equal the unchunked step's."""
    from genrec.retrieval.similarity import MoLSimilarity

    torch.manual_seed(0)
    mol = small_mol(0, item_dropout=0.0, gating_dropout=0.0).double()  # float64: summation order is not the test
    u, table, ids = torch.randn(7, 6, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 9, (7, 4))
    one, chunked = MoLSimilarity(mol), MoLSimilarity(mol, train_chunk_pairs=chunk_pairs)
    one.train(), chunked.train()
    ref, got = _scores_and_grads(one, u, table, ids, 1), _scores_and_grads(chunked, u, table, ids, 1)
    for a, b in zip(ref[:4] + tuple(ref[4]), got[:4] + tuple(got[4])):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="train_chunk_pairs"):
        MoLSimilarity(mol, train_chunk_pairs=-1)


def test_checkpoint_recomputation_replays_the_gate_dropout_masks(monkeypatch):
    """With gate dropout on, the checkpointed chunks' gradients equal those of the same chunks kept in
    memory (checkpoint replaced by a plain call): backward saw the masks forward drew."""
    import genrec.retrieval.similarity as similarity

    torch.manual_seed(0)
    mol = small_mol(0, item_dropout=0.1, gating_dropout=0.3)
    u, table, ids = torch.randn(7, 6), torch.randn(9, 5), torch.randint(0, 9, (7, 4))
    sim = similarity.MoLSimilarity(mol, train_chunk_pairs=8)
    sim.train()
    checkpointed = _scores_and_grads(sim, u, table, ids, 3)
    monkeypatch.setattr(similarity, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    kept = _scores_and_grads(sim, u, table, ids, 3)
    for a, b in zip(kept[:4] + tuple(kept[4]), checkpointed[:4] + tuple(checkpointed[4])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(checkpointed[0], _scores_and_grads(sim, u, table, ids, 4)[0])  # dropout is live
