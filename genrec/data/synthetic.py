"""Built-in synthetic interaction data with the structure real logs have.

Each item belongs to a cluster and has a Zipf popularity; each item also has a few "successor" items
in its cluster (think sequels or complements). A user has a sparse taste over clusters. The next event
either follows a successor of the current item (with ``follow_prob``; seconds to minutes later) or
draws a fresh cluster from the user's taste and an item by popularity (hours to days later). Items
never repeat within a user, so leave-one-out targets are never hidden by history exclusion.

A sequential model can learn the successor chains and the tastes; popularity cannot, which is what
makes this data useful to prove that training works.
"""

from __future__ import annotations

import numpy as np

from genrec.config import SyntheticConfig
from genrec.data.loaders import Interactions


def generate_synthetic(cfg: SyntheticConfig) -> Interactions:
    rng = np.random.default_rng(cfg.seed)
    n_items, n_clusters = cfg.num_items, cfg.num_clusters
    if n_items < 2 * n_clusters:
        raise ValueError(f"synthetic: num_items ({n_items}) must be >= 2 * num_clusters ({n_clusters})")
    cluster_of = rng.permutation(np.arange(n_items) % n_clusters)
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** cfg.zipf_exponent
    members = [np.flatnonzero(cluster_of == c) for c in range(n_clusters)]
    member_probs = [popularity[m] / popularity[m].sum() for m in members]
    successors = np.empty((n_items, cfg.num_successors), dtype=np.int64)
    for c, m in enumerate(members):
        for i in m:
            others = m[m != i]
            w = popularity[others] / popularity[others].sum()
            successors[i] = rng.choice(others, size=cfg.num_successors, replace=len(others) < cfg.num_successors, p=w)

    lengths = np.clip(rng.geometric(1.0 / cfg.mean_length, size=cfg.num_users), cfg.min_length, cfg.max_length)
    lengths = np.minimum(lengths, n_items // 2)
    tastes = rng.dirichlet(np.full(n_clusters, cfg.taste_concentration), size=cfg.num_users)
    users, items, times = [], [], []
    start = 1_600_000_000
    for u in range(cfg.num_users):
        seen: set[int] = set()
        t = start + int(rng.integers(0, 365 * 86400))
        current = -1
        seq, seq_t = [], []
        for _ in range(lengths[u]):
            item = -1
            if current >= 0 and rng.random() < cfg.follow_prob:
                fresh = [s for s in successors[current] if s not in seen]
                if fresh:
                    item = int(fresh[rng.integers(len(fresh))])
                    t += int(rng.exponential(600)) + 1
            tries = 0
            while item < 0:
                c = rng.choice(n_clusters, p=tastes[u])
                cand = int(rng.choice(members[c], p=member_probs[c]))
                tries += 1
                if cand in seen and tries >= 50:  # taste exhausted: any unseen item
                    cand = int(rng.choice(np.setdiff1d(np.arange(n_items), list(seen))))
                if cand not in seen:
                    item = cand
                    t += int(rng.exponential(2 * 86400)) + 60
            seen.add(item)
            current = item
            seq.append(item)
            seq_t.append(t)
        users.extend([u + 1] * len(seq))
        items.extend(seq)
        times.extend(seq_t)
    return Interactions(
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64) + 1,
        timestamps=np.asarray(times, dtype=np.int64),
        ratings=None,
        source=f"synthetic(seed={cfg.seed})",
    )
