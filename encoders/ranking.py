"""Ranking with target-aware HSTU and M-FALCON inference.

Input of one request: a history of n items (oldest first, with timestamps) followed by m candidates.
Every candidate takes position id n and the request time, so candidate order cannot matter. The
target-aware mask lets history rows attend causally among themselves only, and each candidate attend
to the whole history and itself, never to another candidate: a candidate's score depends on the
history and on nothing else in its pass.

Three ways to score, equal up to float rounding (tested):
  full pass     [history; candidates] through the layers at once with the mask: O((n + m)^2 d);
  per candidate one pass per candidate over [history; c]: m times O((n + 1)^2 d), the naive baseline;
  M-FALCON      prefill the history once, keeping every layer's K/V; then microbatches of b candidates
                compute only their own rows against [cache; themselves] (delta-q): O(n^2 d + m (n + b) d).
All three go through the one attention op (kernels.dispatch.hstu_attention: target-aware and delta-q
modes), so on GPU they run the Triton kernel.
With ``rating_input``, each history row also carries the user's rating of that item (a learned
embedding of round(2 x rating), zero at start so a warm-started ranker is unchanged; candidate rows and
unknown ratings use the empty level 0): the ranker sees how the user judged what they watched, which an
id-only retrieval model does not.
The head is an MLP over D x [candidate state ⊙ item embedding ; user state ⊙ item embedding] (the user
state is the last history row, the retrieval query) plus a per-item bias -> one logit per task, added to a
retrieval prior on the engagement task: w x the retrieval logit. Without an anchor that logit is the
ranker's own cos(user state, item), which drifts as soon as its encoder is fine-tuned; with a
``RetrievalAnchor`` it is the frozen retrieval model's phi(query, item) / tau itself, so the ranker starts
as exactly retrieval's order and its encoder can learn freely, everything it learns being a correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.encoders.history import last_states, pack_histories
from genrec.encoders.hstu import HSTULayer
from genrec.encoders.model import SequentialEncoder
from genrec.kernels import hstu_attention


RATING_LEVELS = 10  # round(2 x rating) clamped to 1..10 covers 1-5 stars and half stars; 0 = no rating


def rating_ids(ratings: torch.Tensor) -> torch.Tensor:
    """ratings (n,) float (e.g. 1..5 stars) -> (n,) int64 embedding rows 1..RATING_LEVELS."""
    return torch.round(ratings.float() * 2).clamp(1, RATING_LEVELS).to(torch.int64)


@dataclass
class HistoryCache:
    """Per-layer K/V of a prefilled history: keys[l] (n, H, dqk), values[l] (n, H, dv); with the
    history's position ids (n,) and timestamps (n,) (or None) for the relative bias of later rows."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: torch.Tensor
    ts: torch.Tensor | None
    states: torch.Tensor  # (n, D) normalised history outputs
    anchor_query: torch.Tensor | None = None  # (1, D_q) the anchor's query state for this history


class RetrievalAnchor(nn.Module):
    """A frozen retrieval model inside the ranker: encoder + similarity (dot product or MoL) + its training
    temperature. ``logits`` gives each candidate the retrieval logit phi(query, item) / tau, the order the
    two-stage pipeline starts from. Always in eval mode, never trained (its weights are buffers of the
    ranker only in name: requires_grad is off and ``train()`` keeps it in eval)."""

    def __init__(self, encoder: SequentialEncoder, similarity, temperature: float, config: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.similarity = similarity  # an nn.Module for MoL (registered), a plain object for dot product
        self.temperature = float(temperature)
        self.config = config  # the retrieval run's resolved config (kept with the ranking checkpoint)
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def queries(self, histories: list[torch.Tensor], history_ts: list[torch.Tensor] | None = None,
                request_times: list[int | None] | None = None) -> torch.Tensor:
        """histories[b] (n_b,) int64 item ids, history_ts[b] (n_b,) int64 or None, request_times[b] the time
        of the request (None: the last event's) -> (B, D_q) float32 query states, each history's last
        ``encoder.max_len`` events."""
        dev = histories[0].device
        packed = pack_histories([h.cpu().numpy() for h in histories], self.encoder.max_len,
                                None if history_ts is None else [t.cpu().numpy() for t in history_ts], request_times)
        return last_states(self.encoder, packed.to(dev))

    @torch.no_grad()
    def logits(self, queries: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
        """queries (B, D_q), candidates[b] (m_b,) int64 item ids -> (sum m_b,) float32 retrieval logits,
        request by request."""
        ms = torch.tensor([len(c) for c in candidates], device=queries.device)
        rows = torch.repeat_interleave(torch.arange(len(candidates), device=queries.device), ms)
        items = self.encoder.item_embeddings(torch.cat(candidates))
        return self.similarity.aligned(queries[rows], items).float() / self.temperature


def _attend(layer: HSTULayer, q, k, v, n_keys, n_queries, n_targets, key_ts, query_next_ts):
    """Requests through the dispatch op. One request: ints; k, v (n_keys, H, d) hold the history then the
    target rows, q (n_queries, H, dqk) the last n_queries key rows, n_targets of the keys are targets
    (position id = history length, each sees the history and itself). Several requests: n_keys,
    n_queries, n_targets are (B,) int64 lengths and the rows are concatenated request by request.
    Returns (sum n_queries, H, dv)."""
    dev = q.device
    n_keys, n_queries, n_targets = (torch.as_tensor(x, device=dev).reshape(-1) for x in (n_keys, n_queries, n_targets))
    use_time = layer.time_table is not None and key_ts is not None
    return hstu_attention(
        q, k, v, F.pad(torch.cumsum(n_keys, 0), (1, 0)), int(n_keys.max()),
        backend=layer.cfg.attention_backend, alpha=layer.alpha, scale=1.0 / layer.max_len,
        pos_table=layer.pos_table, time_table=layer.time_table if use_time else None,
        timestamps=key_ts if use_time else None, next_timestamps=query_next_ts if use_time else None,
        time_divisor=layer.cfg.time_bucket_divisor,
        q_offsets=F.pad(torch.cumsum(n_queries, 0), (1, 0)), max_q_len=int(n_queries.max()),
        num_targets=n_targets,
    )


class RankingModel(nn.Module):
    """Target-aware HSTU ranker: a SequentialEncoder's embeddings and HSTU layers + a multi-task head.

    The encoder's max_len must exceed the longest history (candidates sit at position n)."""

    def __init__(self, encoder: SequentialEncoder, num_tasks: int = 2, head_hidden: int = 64, rating_input: bool = False,
                 anchor: RetrievalAnchor | None = None):
        super().__init__()
        if encoder.cfg.encoder != "hstu":
            raise ValueError("the ranking model needs an HSTU encoder")
        self.encoder = encoder
        d = encoder.cfg.item_emb_dim
        self.head = nn.Sequential(nn.Linear(2 * d, head_hidden), nn.SiLU(), nn.Linear(head_hidden, num_tasks))
        nn.init.zeros_(self.head[-1].weight)  # the head starts as no correction: an untrained ranker is exactly
        nn.init.zeros_(self.head[-1].bias)    # the retrieval prior below (+ zero item bias)
        self.item_bias = nn.Embedding(encoder.num_items + 1, num_tasks)  # per-item prior (popularity) per task
        nn.init.zeros_(self.item_bias.weight)
        # engagement starts from the retrieval logit cos(user, item) / tau (tau 0.05 as in training), so a
        # warm-started ranker ranks like retrieval before it learns anything; the head adds a correction
        # (with an anchor: w = 1 on the anchor's own phi / tau)
        self.retrieval_weight = nn.Parameter(torch.tensor(20.0 if anchor is None else 1.0))
        self.anchor = anchor
        self.rating_emb = nn.Embedding(RATING_LEVELS + 1, d, padding_idx=0) if rating_input else None
        if self.rating_emb is not None:
            nn.init.zeros_(self.rating_emb.weight)

    # ---- inputs ----
    def _inputs(self, items: torch.Tensor, pos: torch.Tensor, ts: torch.Tensor | None, next_ts: torch.Tensor | None,
                ratings: torch.Tensor | None = None):
        """ratings: (L,) int64 rating rows (0 = none) or None."""
        extra = self.rating_emb(ratings) if self.rating_emb is not None and ratings is not None else None
        return self.encoder.input_features(items, pos, ts, next_ts, extra)

    @staticmethod
    def _times(history_ts: torch.Tensor | None, request_time: int | None, n: int, m: int, device):
        """Event times and 'time of the next prediction' for history rows then m candidate rows."""
        if history_ts is None:
            return None, None
        req = int(history_ts[-1]) if request_time is None else int(request_time)
        req_t = torch.full((m,), req, dtype=torch.int64, device=device)
        nxt = torch.cat([history_ts[1:], torch.tensor([req], device=device)]) if n else history_ts
        return torch.cat([history_ts, req_t]), torch.cat([nxt, req_t])

    def _rating_rows(self, history_ratings: torch.Tensor | None, n: int, m: int, device) -> torch.Tensor | None:
        """(n + m,) int64 rating rows for n history rows (from (n,) float ratings) then m candidates (0)."""
        if self.rating_emb is None or history_ratings is None:
            return None
        if len(history_ratings) != n:
            raise ValueError(f"{len(history_ratings)} ratings for a history of {n} items")
        return torch.cat([rating_ids(history_ratings.to(device)), torch.zeros(m, dtype=torch.int64, device=device)])

    def _check(self, history: torch.Tensor) -> int:
        n = len(history)
        if n == 0:
            raise ValueError("empty history")
        if n >= self.encoder.max_len:
            raise ValueError(f"history of {n} items: the model takes at most {self.encoder.max_len - 1} (keep the most recent)")
        return n

    def _head(self, states: torch.Tensor, user: torch.Tensor, candidates: torch.Tensor,
              anchor_logits: torch.Tensor | None = None) -> torch.Tensor:
        """states (m, D) candidate rows, user (D,) or (m, D) the last history row of each candidate's
        request (the retrieval query state), anchor_logits (m,) the anchor's retrieval logits (needed when
        the model has an anchor)."""
        emb = self.encoder.item_embeddings(candidates) * self.encoder.cfg.item_emb_dim
        # unit vectors: entries of a product are ~1/D, hence the factor D (each half then sums to D x cosine)
        features = torch.cat([states * emb, user.expand_as(states) * emb], dim=-1)
        out = self.head(features) + self.item_bias(candidates)
        if self.anchor is not None:
            base = anchor_logits
        else:
            base = (user.expand_as(states) * emb).sum(-1) / self.encoder.cfg.item_emb_dim
        return out + F.pad((self.retrieval_weight * base)[:, None], (0, out.shape[1] - 1))

    # ---- the three scoring paths ----
    def score_full(self, history: torch.Tensor, candidates: torch.Tensor, history_ts: torch.Tensor | None = None,
                   request_time: int | None = None, return_history: bool = False,
                   history_ratings: torch.Tensor | None = None):
        """One pass over [history; candidates] with the target-aware mask -> (m, T) logits
        (+ the (n, D) history states with ``return_history``). history_ratings: (n,) float or None."""
        logits, states = self.score_full_batch([history], [candidates], None if history_ts is None else [history_ts],
                                               [request_time], return_history=True,
                                               history_ratings=None if history_ratings is None else [history_ratings])
        return (logits[0], states[0]) if return_history else logits[0]

    def score_full_batch(self, histories: list[torch.Tensor], candidates: list[torch.Tensor],
                         history_ts: list[torch.Tensor] | None = None, request_times: list[int | None] | None = None,
                         return_history: bool = False, history_ratings: list[torch.Tensor] | None = None):
        """B requests in ONE jagged pass (training batches): request b is [histories[b]; candidates[b]]
        with the target-aware mask, so each request's logits equal its own ``score_full``.

        histories[b] (n_b,) int64, candidates[b] (m_b,) int64, history_ts[b] (n_b,) int64 or None,
        request_times[b] int or None, history_ratings[b] (n_b,) float or None. Returns a list of (m_b, T)
        logits (+ a list of (n_b, D) history states)."""
        dev = histories[0].device
        ns = [self._check(h) for h in histories]
        ms = [len(c) for c in candidates]
        request_times = request_times or [None] * len(histories)
        pos = torch.cat([torch.cat([torch.arange(n, device=dev), torch.full((m,), n, device=dev)]) for n, m in zip(ns, ms)])
        ts = next_ts = None
        if history_ts is not None:
            times = [self._times(t, r, n, m, dev) for t, r, n, m in zip(history_ts, request_times, ns, ms)]
            ts, next_ts = torch.cat([t for t, _ in times]), torch.cat([t for _, t in times])
        ratings = None
        if self.rating_emb is not None and history_ratings is not None:
            ratings = torch.cat([self._rating_rows(r, n, m, dev) for r, n, m in zip(history_ratings, ns, ms)])
        x = self._inputs(torch.cat([torch.cat([h, c]) for h, c in zip(histories, candidates)]), pos, ts, next_ts, ratings)
        lens = torch.tensor(ns) + torch.tensor(ms)
        for layer in self.encoder.blocks:
            u, v, q, k = layer.project(x)
            x = layer.finish(x, u, _attend(layer, q, k, v, lens, lens, torch.tensor(ms), ts, next_ts))
        states = F.normalize(x, dim=-1, eps=1e-6)
        starts = torch.cumsum(lens, 0) - lens
        is_candidate = torch.cat([torch.arange(n + m) >= n for n, m in zip(ns, ms)]).to(dev)
        users = states[torch.repeat_interleave(starts + torch.tensor(ns) - 1, torch.tensor(ms)).to(dev)]
        anchor_logits = None
        if self.anchor is not None:
            anchor_logits = self.anchor.logits(self.anchor.queries(histories, history_ts, request_times), candidates)
        logits = self._head(states[is_candidate], users, torch.cat(candidates), anchor_logits).split(ms)
        if not return_history:
            return list(logits)
        return list(logits), list(states[~is_candidate].split(ns))

    def score_per_candidate(self, history: torch.Tensor, candidates: torch.Tensor, history_ts=None, request_time=None,
                            history_ratings=None):
        """The naive baseline: one full pass per candidate."""
        return torch.cat([self.score_full(history, c[None], history_ts, request_time, history_ratings=history_ratings)
                          for c in candidates])

    def prefill(self, history: torch.Tensor, history_ts: torch.Tensor | None = None,
                request_time: int | None = None, history_ratings: torch.Tensor | None = None) -> HistoryCache:
        """Run the history alone (causal) and keep each layer's K/V for the candidates to attend to."""
        n, dev = self._check(history), history.device
        pos = torch.arange(n, device=dev)
        ts, next_ts = self._times(history_ts, request_time, n, 0, dev)
        x = self._inputs(history, pos, ts, next_ts, self._rating_rows(history_ratings, n, 0, dev))
        keys, values = [], []
        for layer in self.encoder.blocks:
            u, v, q, k = layer.project(x)
            keys.append(k)
            values.append(v)
            x = layer.finish(x, u, _attend(layer, q, k, v, n, n, 0, ts, next_ts))
        anchor_query = None
        if self.anchor is not None:
            anchor_query = self.anchor.queries([history], None if history_ts is None else [history_ts], [request_time])
        return HistoryCache(keys, values, pos, ts, F.normalize(x, dim=-1, eps=1e-6), anchor_query)

    def score_cached(self, cache: HistoryCache, candidates: torch.Tensor, request_time: int | None = None,
                     microbatch: int = 256) -> torch.Tensor:
        """M-FALCON: candidates in microbatches against the prefilled cache -> (m, T) logits."""
        n, dev = len(cache.pos), candidates.device
        req = None if cache.ts is None else (int(cache.ts[-1]) if request_time is None else int(request_time))
        out = []
        for start in range(0, len(candidates), microbatch):
            c = candidates[start : start + microbatch]
            b = len(c)
            pos = torch.full((b,), n, device=dev)
            t = None if req is None else torch.full((b,), req, dtype=torch.int64, device=dev)
            x = self._inputs(c, pos, t, t)
            key_ts = None if t is None else torch.cat([cache.ts, t])
            for layer, hk, hv in zip(self.encoder.blocks, cache.keys, cache.values):
                u, v, q, k = layer.project(x)  # delta-q: b candidate rows against [history; themselves]
                attn = _attend(layer, q, torch.cat([hk, k]), torch.cat([hv, v]), n + b, b, b, key_ts, t)
                x = layer.finish(x, u, attn)
            anchor_logits = None if self.anchor is None else self.anchor.logits(cache.anchor_query, [c])
            out.append(self._head(F.normalize(x, dim=-1, eps=1e-6), cache.states[-1], c, anchor_logits))
        return torch.cat(out) if out else torch.empty(0, self.head[-1].out_features, device=dev)

    def score(self, history: torch.Tensor, candidates: torch.Tensor, history_ts: torch.Tensor | None = None,
              request_time: int | None = None, microbatch: int = 256,
              history_ratings: torch.Tensor | None = None) -> torch.Tensor:
        """Production path: prefill once, then M-FALCON microbatches. (m, T) logits."""
        return self.score_cached(self.prefill(history, history_ts, request_time, history_ratings), candidates,
                                 request_time, microbatch)


def warm_start(encoder: SequentialEncoder, state_dict: dict) -> list[str]:
    """Copy a retrieval encoder's weights into a ranking encoder whose max_len is larger: equal shapes
    are copied, position embeddings row by row, relative-position tables centred on offset 0.
    Returns the names that could not be copied."""
    own = encoder.state_dict()
    skipped = []
    for name, w in state_dict.items():
        if name not in own:
            skipped.append(name)
            continue
        dst = own[name]
        if dst.shape == w.shape:
            dst.copy_(w)
        elif name.endswith("pos_emb.weight") and dst.shape[1:] == w.shape[1:]:
            dst[: min(len(w), len(dst))].copy_(w[: min(len(w), len(dst))])
        elif name.endswith("pos_table") and w.dim() == 1:
            cs, cd, half = (len(w) - 1) // 2, (len(dst) - 1) // 2, (min(len(w), len(dst)) - 1) // 2
            dst[cd - half : cd + half + 1].copy_(w[cs - half : cs + half + 1])
        else:
            skipped.append(name)
    return skipped
