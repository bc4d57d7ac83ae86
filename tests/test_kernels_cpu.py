"""The compiled CPU kernel of the stage-1 threshold scan (numba) vs its PyTorch reference. Inputs on a
1/8 grid make every partial sum exact in float32, so both decide buffer membership at the threshold
identically and the buffers must be equal, order included (ascending ids)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.kernels.dispatch import stage1_threshold_scan
from genrec.kernels.stage1_scan_reference import stage1_threshold_scan_reference

pytest.importorskip("numba")  # a dependency of the package; absent only where the code runs uninstalled (GPU image)
from genrec.kernels.stage1_scan_cpu import BLOCK, split_work, stage1_threshold_scan_cpu  # noqa: E402


def grid_inputs(b: int, n: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 9, (b, d), generator=g).float() / 8
    raw = torch.randint(-8, 9, (n, d), generator=g)
    codes = raw.to(torch.int8) if dtype == torch.int8 else raw.float() / 8
    thr = torch.randint(-6, 7, (b,), generator=g).float() / 4
    thr[0] = float("-inf")  # one query keeps everything
    return q, codes, thr


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 11), n=st.integers(0, 3 * BLOCK + 5), d=st.integers(1, 40),
       dtype=st.sampled_from([torch.int8, torch.float32]), capacity=st.sampled_from([None, 0, 1, 7, 300]),
       offset=st.integers(0, 1000), threads=st.sampled_from([1, 2, 3]), transposed=st.booleans(),
       seed=st.integers(0, 999))
def test_cpu_scan_kernel_equals_the_reference(b, n, d, dtype, capacity, offset, threads, transposed, seed):
    """Ragged sizes around the block, dims off the 8-wide unroll, capacities that overflow, 1-3 threads
    (item segments merged in order, query groups), codes as a (d, n) view or row-major (copied)."""
    q, codes, thr = grid_inputs(b, n, d, dtype, seed)
    want = stage1_threshold_scan_reference(q, codes, thr, capacity, offset)
    layout = codes.t().contiguous().t() if transposed else codes
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = stage1_threshold_scan_cpu(q, layout, thr, capacity, offset)
    finally:
        torch.set_num_threads(old)
    for w, o in zip(want, got):
        assert w.dtype == o.dtype and torch.equal(w, o)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 6), n=st.integers(1, 2 * BLOCK), d=st.integers(1, 33), seed=st.integers(0, 999))
def test_cpu_scan_scores_of_arbitrary_floats_stay_within_fp32_rounding(b, n, d, seed):
    """Real-valued queries and codes: the kernel sums the d products in order in fp32, so each score is
    within d * 2^-23 * sum_d |q_d c_d| of the float64 value."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g) * 3
    codes = torch.randint(-127, 128, (n, d), generator=g).to(torch.int8)
    s, i, c = stage1_threshold_scan_cpu(q, codes, torch.full((b,), float("-inf")))
    assert torch.equal(c, torch.full((b,), n)) and torch.equal(i, torch.arange(n).expand(b, -1))
    exact = q.double() @ codes.double().T
    mag = q.double().abs() @ codes.double().abs().T
    assert ((s.double() - exact).abs() <= mag * d * 2**-23 + 1e-30).all()


def test_a_capacity_none_scan_whose_hits_outgrow_the_first_buffer_rescans_exactly():
    """capacity None: the kernel first guesses a per-segment width (4,096), then rescans at the exact
    width; every hit comes back, in order."""
    q, codes, thr = grid_inputs(2, 3 * BLOCK, 4, torch.int8, 0)
    thr[:] = float("-inf")
    s, i, c = stage1_threshold_scan_cpu(q, codes, thr)
    assert torch.equal(c, torch.full((2,), 3 * BLOCK)) and torch.equal(i, torch.arange(3 * BLOCK).expand(2, -1))


def test_work_split_covers_the_threads_without_splitting_below_a_block():
    assert split_work(1, 10 * BLOCK, 2) == (2, 1)  # batch 1: two item segments
    assert split_work(1, BLOCK, 4) == (1, 1)  # one block: no split
    assert split_work(3, 100 * BLOCK, 4) == (2, 1)
    assert split_work(32, 100 * BLOCK, 2) == (1, 16)  # a batch: by queries, the codes streamed once per thread


def test_the_dispatcher_routes_cpu_scans_to_the_kernel_and_refuses_bf16_codes_there():
    q, codes, thr = grid_inputs(3, 500, 16, torch.int8, 1)
    auto = stage1_threshold_scan(q, codes, thr, 50)
    for w, o in zip(stage1_threshold_scan_reference(q, codes, thr, 50), auto):
        assert torch.equal(w, o)
    with pytest.raises(ValueError, match="int8 or float32"):
        stage1_threshold_scan(q, codes.to(torch.bfloat16), thr, backend="cpu")
    out = stage1_threshold_scan(q, codes.to(torch.bfloat16), thr)  # auto: bf16 stays on the reference
    assert torch.equal(out[2], stage1_threshold_scan_reference(q, codes.to(torch.bfloat16), thr)[2])


def test_a_forked_child_scans_on_its_own_thread_pool():
    """The kernel's tasks run on a thread pool; a child forked after the parent used it (a pre-fork server,
    multiprocessing) has none of those threads and must make its own instead of waiting on them forever."""
    import multiprocessing as mp

    q, codes, thr = grid_inputs(1, 4 * BLOCK, 8, torch.int8, 2)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = stage1_threshold_scan_cpu(q, codes, thr, 100)  # the parent's pool now exists
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_scan_in_child, (q, codes, thr)).get(timeout=60)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def _scan_in_child(q, codes, thr):
    torch.set_num_threads(2)
    return stage1_threshold_scan_cpu(q, codes, thr, 100)


def test_without_numba_auto_falls_back_to_the_reference_and_cpu_says_what_is_missing(monkeypatch):
    """The GPU image runs the copied code without installing it (no numba): CPU scans must still work."""
    from genrec.kernels import dispatch

    monkeypatch.setattr(dispatch, "cpu_kernels_available", lambda: False)
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("stage1_threshold_scan", "auto", cpu) == "reference"
    with pytest.raises(ImportError, match="needs numba"):
        dispatch.resolve_backend("stage1_threshold_scan", "cpu", cpu)
    q, codes, thr = grid_inputs(2, 300, 8, torch.int8, 3)
    for w, o in zip(stage1_threshold_scan_reference(q, codes, thr, 20), stage1_threshold_scan(q, codes, thr, 20)):
        assert torch.equal(w, o)
