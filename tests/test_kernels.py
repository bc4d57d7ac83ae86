"""Triton kernels vs their PyTorch references, on the CPU under TRITON_INTERPRET=1 (set in conftest
before triton is imported), or compiled on a GPU with GENREC_TEST_DEVICE=cuda (the references stay on
the CPU as the oracle). Inputs are multiples of 1/8 so every partial sum is exact in float32 and
buffer membership at the threshold is decided identically by both."""

import copy
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from genrec.kernels.jagged import complete_cumsum
from genrec.kernels.dispatch import hstu_attention, resolve_backend, stage1_threshold_scan
from genrec.kernels.stage1_scan_reference import stage1_threshold_scan_reference

triton = pytest.importorskip("triton")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
DEVICE = torch.device(os.environ.get("GENREC_TEST_DEVICE", "cpu"))  # where the kernels run


def dev(*xs):
    """Copies on the kernel's device (tensors only; leaves stay leaves)."""
    out = [x.detach().to(DEVICE).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in xs]
    return out[0] if len(out) == 1 else out


def kept(scores, ids, counts, cap):
    """Per row: {id: score} of the buffered hits (order-free), and how many slots were filled."""
    rows = []
    for b in range(scores.shape[0]):
        n = min(int(counts[b]), cap if cap is not None else int(counts[b]))
        valid = ids[b] >= 0
        assert int(valid.sum()) == n
        rows.append(dict(zip(ids[b][valid].tolist(), scores[b][valid].tolist())))
    return rows


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 20), n=st.integers(0, 200), d=st.integers(1, 40), dtype=st.sampled_from(sorted(DTYPES)),
       capacity=st.sampled_from([None, 1, 7, 64]), offset=st.integers(0, 1000), seed=st.integers(0, 999),
       knobs=st.sampled_from([{}, {"block_q": 32, "block_n": 64, "tiles": 3}]))
def test_stage1_scan_kernel_matches_the_reference(b, n, d, dtype, capacity, offset, seed, knobs):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 9, (b, d), generator=g).float() / 8
    raw = torch.randint(-8, 9, (n, d), generator=g)
    codes = raw.to(torch.int8) if dtype == "int8" else (raw.float() / 8).to(DTYPES[dtype])
    thr = torch.randint(-6, 7, (b,), generator=g).float() / 4
    thr[0] = float("-inf")  # one query keeps everything
    rs, ri, rc = stage1_threshold_scan_reference(q, codes, thr, capacity, offset)
    if knobs:  # block shapes and tiles per program (the tuning knobs) through the kernel's own entry point
        from genrec.kernels.stage1_scan_triton import stage1_threshold_scan_triton

        out = stage1_threshold_scan_triton(*dev(q, codes, thr), capacity, offset, **knobs)
    else:
        out = stage1_threshold_scan(*dev(q, codes, thr), capacity, offset, backend="triton")
    ts, ti, tc = (x.cpu() for x in out)
    assert torch.equal(rc, tc)  # counts keep counting past the capacity: overflow is visible
    assert ts.shape == rs.shape and ti.dtype == torch.int64
    ref_rows, tri_rows = kept(rs, ri, rc, capacity), kept(ts, ti, tc, capacity)
    full = stage1_threshold_scan_reference(q, codes, thr, None, offset)
    for b_, (r, t) in enumerate(zip(ref_rows, tri_rows)):
        if capacity is None or rc[b_] <= capacity:
            assert t == r
        else:  # overflow: the kernel keeps *some* capacity hits (whichever won the slots), all genuine
            hits = dict(zip(full[1][b_].tolist(), full[0][b_].tolist()))
            assert len(t) == capacity and all(hits.get(i) == s for i, s in t.items())


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 5), n=st.integers(1, 300), d=st.integers(1, 70), dtype=st.sampled_from(["int8", "bfloat16"]),
       seed=st.integers(0, 999))
def test_stage1_scan_bf16x2_scores_stay_within_their_error_bound(b, n, d, dtype, seed):
    """Arbitrary fp32 queries: the kernel splits q into bf16 hi + lo (codes are exact in bf16), so each
    product is off by at most |q_d c_d| 2^-16 and the fp32 sums add ~d 2^-24; the bound used is
    2^-15 * sum_d |q_d c_d| per score, against a float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g) * 3
    codes = (torch.randint(-127, 128, (n, d), generator=g).to(torch.int8) if dtype == "int8"
             else torch.randn(n, d, generator=g).to(torch.bfloat16))
    s, i, c = (x.cpu() for x in stage1_threshold_scan(*dev(q, codes, torch.full((b,), float("-inf"))), None,
                                                       backend="triton"))
    assert torch.equal(c, torch.full((b,), n))
    exact = q.double() @ codes.double().T
    mag = q.double().abs() @ codes.double().abs().T
    got = torch.full((b, n), float("nan"), dtype=torch.float64).scatter_(1, i, s.double())
    assert ((got - exact).abs() <= mag * 2**-15 + 1e-30).all()


def test_dispatch_picks_the_cpu_kernel_or_the_reference_on_cpu_and_triton_on_request():
    cpu = torch.device("cpu")
    from genrec.kernels.dispatch import cpu_kernels_available

    want = "cpu" if cpu_kernels_available() else "reference"  # numba is absent only where genrec runs uninstalled
    assert resolve_backend("stage1_threshold_scan", "auto", cpu) == want  # the one op with a CPU kernel
    assert resolve_backend("stage1_topk", "auto", cpu) == "reference"
    assert resolve_backend("mol_candidate_scores", "auto", cpu) == "reference"
    assert resolve_backend("stage1_threshold_scan", "triton", cpu) == "triton"
    with pytest.raises(NotImplementedError):
        resolve_backend("no_such_op", "triton", cpu)
    with pytest.raises(NotImplementedError, match="no CPU kernel"):
        resolve_backend("stage1_topk", "cpu", cpu)


# ---- jagged HSTU attention ----

def attention_case(seed, lengths, heads, dqk, dv, pos, time, targets, new_rows=None):
    """Random jagged inputs; new_rows (per sequence) turns on delta-q (queries = last rows)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int64)
    offsets = complete_cumsum(lens)
    total, n = int(offsets[-1]), max(lengths)
    case = {
        "q": torch.randn(total, heads, dqk, generator=g), "k": torch.randn(total, heads, dqk, generator=g),
        "v": torch.randn(total, heads, dv, generator=g), "offsets": offsets, "max_len": n,
        "kw": {"alpha": 1 / dqk ** 0.5, "scale": 1 / 64},
    }
    if pos:
        case["kw"]["pos_table"] = torch.randn(2 * 64 - 1, generator=g)
    if time:
        ts = torch.randint(0, 10**6, (total,), generator=g)
        case["kw"].update(time_table=torch.randn(41, generator=g), timestamps=ts,
                          next_timestamps=ts + torch.randint(0, 10**5, (total,), generator=g), time_divisor=0.301)
    if targets:
        case["kw"]["num_targets"] = torch.tensor([torch.randint(0, ln + 1, (1,), generator=g).item() for ln in lengths])
    return case


def bucket_margin(case) -> float:
    """Distance of the closest (query, key) time gap to a bucket edge, in units of log(dt)/divisor
    (float64): the kernel and torch compute float32 logs that may differ in the last bit."""
    kw = case["kw"]
    if "time_table" not in kw:
        return 1.0
    r = torch.log((kw["next_timestamps"][:, None] - kw["timestamps"][None, :]).abs().clamp(min=1).double()) / 0.301
    r = r[r > 0]
    return float((r - r.round()).abs().min()) if r.numel() else 1.0


def close(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert err <= tol * (1 + want.float().abs().max().item() if want.numel() else 1), err


ATTN_TOL = {"float32": 2e-5, "bfloat16": 3e-2}


@settings(max_examples=14, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), heads=st.integers(1, 2),
       dqk=st.sampled_from([4, 16, 20]), dv=st.sampled_from([8, 12]), pos=st.booleans(), time=st.booleans(),
       targets=st.booleans(), dtype=st.sampled_from(sorted(ATTN_TOL)), seed=st.integers(0, 999))
def test_hstu_attention_kernel_forward_and_gradients_match_the_reference(lengths, heads, dqk, dv, pos, time, targets,
                                                                          dtype, seed):
    case = attention_case(seed, lengths, heads, dqk, dv, pos, time, targets)
    assume(bucket_margin(case) > 2e-5)
    kw = case["kw"]
    for name in ("pos_table", "time_table"):
        if name in kw:
            kw[name].requires_grad_()
    low = [case[x].to(DTYPES[dtype]).requires_grad_() for x in "qkv"]
    exact = [x.detach().float().requires_grad_() for x in low]  # the oracle runs in fp32 on the same values
    out_w = torch.randn(case["q"].shape[0], heads, dv, generator=torch.Generator().manual_seed(seed + 1))

    def run(inputs, backend, device=torch.device("cpu"), **extra):
        kw_d = {name: dev(v) if device != torch.device("cpu") else v for name, v in kw.items()}
        leaves = [kw_d[name] for name in ("pos_table", "time_table") if name in kw_d]
        out = hstu_attention(*inputs, case["offsets"].to(device), case["max_len"], backend=backend, **kw_d, **extra)
        grads = torch.autograd.grad((out.float() * out_w.to(device)).sum(), [*inputs, *leaves], allow_unused=True)
        return out.cpu(), [g.cpu() if g is not None else None for g in grads]

    want, want_grads = run(exact, "reference")
    got, got_grads = run(dev(*low), "triton", DEVICE, tuning={"block_m": 16, "block_n": 16})
    assert got.dtype == DTYPES[dtype]
    tol = ATTN_TOL[dtype]
    close(got, want, tol)
    for g_got, g_want in zip(got_grads, want_grads):
        close(g_got, g_want, 2 * tol)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), heads=st.integers(1, 2), pos=st.booleans(),
       time=st.booleans(), targets=st.booleans(), seed=st.integers(0, 999), data=st.data())
def test_delta_q_rows_equal_the_same_rows_of_the_full_pass(lengths, heads, pos, time, targets, seed, data):
    """M-FALCON's delta-q mode: only the last rows of each sequence as queries, against all keys."""
    case = attention_case(seed, lengths, heads, 16, 8, pos, time, targets)
    assume(bucket_margin(case) > 2e-5)
    new = [data.draw(st.integers(0, ln)) for ln in lengths]
    kw = dict(case["kw"])
    rows = torch.cat([torch.arange(int(case["offsets"][b + 1]) - m, int(case["offsets"][b + 1])) for b, m in enumerate(new)])
    full = hstu_attention(case["q"], case["k"], case["v"], case["offsets"], case["max_len"], backend="reference", **kw)[rows]
    if time:
        kw["next_timestamps"] = kw["next_timestamps"][rows]
    q_offsets = complete_cumsum(torch.tensor(new))
    q = case["q"][rows].requires_grad_()
    k, v = case["k"].clone().requires_grad_(), case["v"].clone().requires_grad_()
    outs = {}
    for backend, device, extra in (("reference", torch.device("cpu"), {}),
                                   ("triton", DEVICE, {"tuning": {"block_m": 16, "block_n": 16}})):
        inputs = [q, k, v] if device.type == "cpu" else dev(q, k, v)
        kw_d = kw if device.type == "cpu" else {name: dev(x) for name, x in kw.items()}
        out = hstu_attention(*inputs, case["offsets"].to(device), case["max_len"], backend=backend,
                             q_offsets=q_offsets.to(device), max_q_len=max(new), **kw_d, **extra)
        grads = torch.autograd.grad(out.sum(), inputs) if out.numel() else ()
        outs[backend] = (out.cpu(), [g.cpu() for g in grads])
    close(outs["reference"][0], full, 1e-5)
    close(outs["triton"][0], full, 2e-5)
    for g_got, g_want in zip(outs["triton"][1], outs["reference"][1]):
        close(g_got, g_want, 4e-5)


def test_attention_dropout_stays_on_the_reference():
    case = attention_case(0, [5, 3], 1, 4, 4, True, False, False)
    args = (case["q"], case["k"], case["v"], case["offsets"], case["max_len"])
    torch.manual_seed(0)
    a = hstu_attention(*args, backend="auto", dropout=0.5, training=True, **case["kw"])
    torch.manual_seed(0)
    b = hstu_attention(*args, backend="reference", dropout=0.5, training=True, **case["kw"])
    assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="dropout"):
        hstu_attention(*args, backend="triton", dropout=0.5, training=True, **case["kw"])


def test_encoder_training_step_on_the_triton_attention_matches_the_reference():
    """The HSTU encoder's forward and every parameter gradient (incl. both bias tables) on the kernel."""
    from genrec.config import ModelConfig
    from genrec.encoders.model import SequentialEncoder

    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        cfg = ModelConfig(item_emb_dim=16, num_blocks=2, num_heads=2, dqk=8, dv=8, dropout=0.0, input_dropout=0.0,
                          attention_backend=backend)
        device = DEVICE if backend == "triton" else torch.device("cpu")
        model = SequentialEncoder(cfg, num_items=30, max_len=24).train().to(device)
        g = torch.Generator().manual_seed(1)
        lengths = torch.tensor([7, 1, 24, 0, 12])
        offsets = complete_cumsum(lengths)
        items = torch.randint(1, 31, (int(offsets[-1]),), generator=g)
        ts = torch.cumsum(torch.randint(0, 10**4, (int(offsets[-1]),), generator=g), 0)
        out = model(*dev(items, offsets), int(lengths.max()), *dev(ts, ts + 30)) if device.type != "cpu" else \
            model(items, offsets, int(lengths.max()), ts, ts + 30)
        (out * torch.randn(out.shape, generator=g).to(device)).sum().backward()
        grads[backend] = {name: p.grad.cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["triton"].keys()
    assert any("time_table" in name for name in grads["triton"]) and any("pos_table" in name for name in grads["triton"])
    for name, want in grads["reference"].items():  # fp32 sums in another order: relative to the largest entry
        assert (grads["triton"][name] - want).abs().max() <= 1e-5 * want.abs().max(), name


# ---- MoL stage 2 ----

@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 4), c=st.integers(0, 70), n=st.integers(1, 50), pq=st.integers(1, 3), px=st.integers(1, 3),
       dp=st.sampled_from([4, 8]), hidden=st.sampled_from([8, 24]), cache_dtype=st.sampled_from(["float32", "bfloat16"]),
       user_ids=st.booleans(), seed=st.integers(0, 999), precision=st.sampled_from(["ieee", "bf16x3"]))
def test_mol_stage2_kernel_matches_the_reference(b, c, n, pq, px, dp, hidden, cache_dtype, user_ids, seed, precision):
    """Gathered candidates (with -1 holes) and the full-corpus variant; bf16 caches; hashed user-id
    components (P_Q grows by one)."""
    from genrec.kernels.dispatch import mol_candidate_scores
    from genrec.kernels.mol_stage2_triton import mol_candidate_scores_triton
    from genrec.retrieval.mol import ItemCache, MixtureOfLogits

    torch.manual_seed(seed)
    mol = MixtureOfLogits(12, 10, pq, px, dp, 16, hidden, user_id_buckets=7 if user_ids else 0,
                          user_id_components=1 if user_ids else 0).eval()
    with torch.no_grad():
        enc = mol.encode_items(torch.randn(n, 10))
        cache = ItemCache(enc.components.to(DTYPES[cache_dtype]), enc.gate.to(DTYPES[cache_dtype]))
        q = mol.encode_queries(torch.randn(b, 12), torch.arange(b) if user_ids else None)
        cand = torch.randint(-1, n, (b, c))
        mol_d = copy.deepcopy(mol).to(DEVICE)
        q_d = type(q)(*(dev(getattr(q, f)) for f in q.__dataclass_fields__))
        cache_d = ItemCache(*dev(cache.components, cache.gate))
        gating, gating_d = mol.gating(), mol_d.gating()
        # the tensor-level reference is the module's own eval-mode score
        close(mol_candidate_scores(gating, q, cache, None, backend="reference"), mol.score(q, cache).float(), 1e-6)
        for rows in (cand, None):
            want = mol_candidate_scores(gating, q, cache, rows, backend="reference")
            got = mol_candidate_scores_triton(gating_d, q_d, cache_d, dev(rows) if rows is not None else None,
                                              precision=precision).cpu()
            assert got.shape == want.shape and got.dtype == torch.float32
            assert torch.equal(torch.isneginf(got), torch.isneginf(want))
            finite = torch.isfinite(want)
            close(got[finite], want[finite], 1e-5 if precision == "ieee" else 5e-4)  # bf16x3: ~1e-4 seen


@settings(max_examples=8, deadline=None)  # the interpreter's tl.sort is slow: small corpora, many splits
@given(b=st.integers(1, 8), n=st.integers(0, 90), d=st.integers(1, 20), dtype=st.sampled_from(sorted(DTYPES)),
       k=st.sampled_from([1, 5, 16, 33]), splits=st.sampled_from([None, 1, 3]), offset=st.integers(0, 1000),
       seed=st.integers(0, 999))
def test_stage1_topk_kernel_matches_the_reference_including_ties(b, n, d, dtype, k, splits, offset, seed):
    """Running top-k in registers (keys = order-preserving score bits + inverted id): the same (score desc,
    id asc) answer as the reference; values on a 1/8 grid make ties (and -0.0 vs 0.0) common."""
    from genrec.kernels.dispatch import stage1_topk

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 9, (b, d), generator=g).float() / 8
    raw = torch.randint(-2, 3, (n, d), generator=g)
    codes = raw.to(torch.int8) if dtype == "int8" else (raw.float() / 8).to(DTYPES[dtype])
    want = stage1_topk(q, codes, k, offset, backend="reference")
    got = [x.cpu() for x in stage1_topk(*dev(q, codes), k, offset, backend="triton", splits=splits)]
    assert got[0].shape == got[1].shape == (b, k) and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])
