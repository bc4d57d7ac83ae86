"""Triton kernels vs their PyTorch references, on the CPU under TRITON_INTERPRET=1 (set in conftest
before triton is imported). Inputs are multiples of 1/8 so every partial sum is exact in float32 and
buffer membership at the threshold is decided identically by both."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.kernels.dispatch import resolve_backend, stage1_threshold_scan
from genrec.kernels.stage1_scan_reference import stage1_threshold_scan_reference

triton = pytest.importorskip("triton")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


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
       capacity=st.sampled_from([None, 1, 7, 64]), offset=st.integers(0, 1000), seed=st.integers(0, 999))
def test_stage1_scan_kernel_matches_the_reference(b, n, d, dtype, capacity, offset, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 9, (b, d), generator=g).float() / 8
    raw = torch.randint(-8, 9, (n, d), generator=g)
    codes = raw.to(torch.int8) if dtype == "int8" else (raw.float() / 8).to(DTYPES[dtype])
    thr = torch.randint(-6, 7, (b,), generator=g).float() / 4
    thr[0] = float("-inf")  # one query keeps everything
    rs, ri, rc = stage1_threshold_scan_reference(q, codes, thr, capacity, offset)
    ts, ti, tc = stage1_threshold_scan(q, codes, thr, capacity, offset, backend="triton")
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


def test_dispatch_picks_the_reference_on_cpu_and_triton_on_request():
    assert resolve_backend("stage1_threshold_scan", "auto", torch.device("cpu")) == "reference"
    assert resolve_backend("stage1_threshold_scan", "triton", torch.device("cpu")) == "triton"
    with pytest.raises(NotImplementedError):
        resolve_backend("no_such_op", "triton", torch.device("cpu"))
