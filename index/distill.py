"""A stage-1 projection learned from MoL scores ("learned<d>").

The fixed stage-1 proxies score <sum_i f_i(q), mean_j g_j(x)>, which forgets how MoL's gates weight each
(query component, item component) pair. The learned proxy keeps every component:

    s1(q, x) = <W_q^T vec(f(q)), W_x^T vec(g(x))>      vec(f(q)) (P_Q * d_P,)   vec(g(x)) (P_X * d_P,)

a rank-d bilinear form over all component pairs, still one int8 d-dim code per item and one matmul per
query. W_q, W_x start at the pca<d> solution and are fitted on a sample of items and training queries
by distillation: minimise KL(softmax(MoL(q, .)) || softmax(gamma * s1(q, .))) over the sampled items,
which puts the weight on each query's head, where stage 1 must not lose items.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from genrec.index.stage1 import pca_projection
from genrec.retrieval.mol import ItemCache, MixtureOfLogits, QueryState

log = logging.getLogger(__name__)


def noisy_item_queries(items, count: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Stand-in query states when no real ones are given: sampled item embeddings plus Gaussian noise of
    norm ~``noise``, re-normalised (encoder states live in the item space). (count, D) float32."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(items), min(count, len(items)), replace=False))
    x = np.asarray(items[rows], dtype=np.float32)
    x = x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pca_init(item_flat: torch.Tensor, px: int, pq: int, dp: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pca<dim> proxy written as maps on flattened components: (P_X*d_P, dim), (P_Q*d_P, dim)."""

    mean = item_flat.view(-1, px, dp).mean(1)
    v = pca_projection(mean, dim)  # (d_P, dim)
    return torch.eye(dp).repeat(px, 1) @ v / px, torch.eye(dp).repeat(pq, 1) @ v


def teacher_scores(mol: MixtureOfLogits, q: QueryState, cache: ItemCache, chunk: int = 16) -> torch.Tensor:
    """Exact MoL scores (m, s) float32 of m queries against the s cached sample items."""
    out = []
    with torch.no_grad():
        for s in range(0, q.components.shape[0], chunk):
            part = QueryState(q.components[s : s + chunk], q.gate[s : s + chunk])
            out.append(mol.score(part, cache).float())
    return torch.cat(out)


def distill_projection(mol: MixtureOfLogits, item_cache: ItemCache, queries: QueryState, dim: int,
                       steps: int = 300, batch: int = 128, lr: float = 0.01, seed: int = 0,
                       holdout: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit (W_x (P_X*d_P, dim), W_q (P_Q*d_P, dim)) float32 on sampled items (their cached components)
    and m query states. Returns the maps and a report: KL and top-10-in-top-1% recall of the sample
    before / after on held-out queries (so a bad fit is visible in the build log and manifest)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    m, pq, dp = queries.components.shape
    px = item_cache.components.shape[1]
    item_flat = item_cache.components.float().reshape(len(item_cache), px * dp)
    query_flat = queries.components.float().reshape(m, pq * dp)
    teacher = F.log_softmax(teacher_scores(mol, queries, item_cache), dim=-1)
    order = torch.randperm(m, generator=gen)
    n_hold = int(m * holdout) if m >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    wx0, wq0 = pca_init(item_flat, px, pq, dp, dim)
    wx, wq = wx0.clone().requires_grad_(), wq0.clone().requires_grad_()
    log_gamma = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([wx, wq, log_gamma], lr=lr)

    def kl(rows: torch.Tensor) -> torch.Tensor:
        student = (query_flat[rows] @ wq) @ (item_flat @ wx).T * log_gamma.exp() * 20.0
        return F.kl_div(F.log_softmax(student, dim=-1), teacher[rows], log_target=True, reduction="batchmean")

    before = _report(query_flat[hold], item_flat, teacher[hold], wq0, wx0)
    for _ in range(steps):
        rows = train[torch.randint(len(train), (min(batch, len(train)),), generator=gen)]
        opt.zero_grad()
        loss = kl(rows)
        loss.backward()
        opt.step()
    wx, wq = wx.detach().contiguous(), wq.detach().contiguous()
    report = {"queries": m, "items": len(item_cache), "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
              "heldout_top10_in_top1pct_pca": before, "heldout_top10_in_top1pct_learned": _report(query_flat[hold], item_flat, teacher[hold], wq, wx)}
    log.info("stage-1 distillation: %s", report)
    return wx, wq, report


def _report(qf: torch.Tensor, itf: torch.Tensor, teacher: torch.Tensor, wq: torch.Tensor, wx: torch.Tensor) -> float | None:
    """Mean fraction of each query's MoL top-10 (within the sample) inside its stage-1 top 1%."""
    if len(qf) == 0:
        return None
    keep = max(10, itf.shape[0] // 100)
    with torch.no_grad():
        s1 = (qf @ wq) @ (itf @ wx).T
        top = teacher.topk(10, dim=-1).indices
        cand = s1.topk(keep, dim=-1).indices
        hits = (top[:, :, None] == cand[:, None, :]).any(-1).float().mean()
    return round(float(hits), 4)


def fit_learned_stage1(mol: MixtureOfLogits, items, rows: torch.Tensor, dim: int, queries: np.ndarray | None = None,
                       steps: int = 300, seed: int = 0, proxy_count: int = 1024):
    """The h-indexer's entry point: distil on items[rows] (raw embeddings, tensor or memmap) and the given
    query states (or ``proxy_count`` noisy item copies). Returns ((W_x, W_q), report)."""
    if queries is not None:
        queries = np.asarray(queries)
        want = mol.init_kwargs["query_dim"]
        if queries.ndim != 2 or queries.shape[1] != want or len(queries) < 2:
            raise ValueError(f"training queries must be (m >= 2, {want}) query states, got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("training queries contain NaN or Inf")
    with torch.no_grad():
        x = items[rows] if isinstance(items, torch.Tensor) else torch.from_numpy(np.asarray(items[rows.numpy()], dtype=np.float32))
        cache = mol.encode_items(x.float())
        # seed + 1: never the rows build-index's recall summary draws its proxy queries from (seed)
        u = noisy_item_queries(items, proxy_count, seed + 1) if queries is None else np.asarray(queries, dtype=np.float32)
        q = mol.encode_queries(torch.from_numpy(np.ascontiguousarray(u)))
    wx, wq, report = distill_projection(mol, cache, q, dim, steps=steps, seed=seed)
    report["query_source"] = "proxy (noisy items)" if queries is None else "given"
    return (wx, wq), report
