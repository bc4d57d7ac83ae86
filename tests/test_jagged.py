import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.kernels.jagged import (
    complete_cumsum,
    jagged_to_padded,
    last_of_each_row,
    padded_to_jagged,
    positions,
    segment_ids,
)

ragged = st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=6)


def test_complete_cumsum_hand_example():
    assert complete_cumsum(torch.tensor([2, 0, 3])).tolist() == [0, 2, 2, 5]
    assert complete_cumsum(torch.tensor([], dtype=torch.int64)).tolist() == [0]


@settings(max_examples=60, deadline=None)
@given(lengths=ragged, feat=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
def test_jagged_padded_round_trip_matches_loop(lengths, feat, dtype):
    offsets = complete_cumsum(torch.tensor(lengths))
    values = (torch.arange(int(offsets[-1]) * feat).reshape(-1, feat) + 1).to(dtype)
    n = max(max(lengths), 1)
    padded = jagged_to_padded(values, offsets, n, pad_value=0)
    for b, length in enumerate(lengths):
        row = values[offsets[b] : offsets[b] + length]
        assert torch.equal(padded[b, :length], row)
        assert torch.all(padded[b, length:] == 0)
    assert torch.equal(padded_to_jagged(padded, offsets), values)


@settings(max_examples=40, deadline=None)
@given(lengths=ragged)
def test_positions_and_segments(lengths):
    offsets = complete_cumsum(torch.tensor(lengths))
    expected_pos = [p for n in lengths for p in range(n)]
    expected_seg = [b for b, n in enumerate(lengths) for _ in range(n)]
    assert positions(offsets).tolist() == expected_pos
    assert segment_ids(offsets).tolist() == expected_seg


def test_last_of_each_row():
    offsets = complete_cumsum(torch.tensor([2, 1, 3]))
    values = torch.arange(6)
    assert last_of_each_row(values, offsets).tolist() == [1, 2, 5]


def test_row_longer_than_max_len_is_rejected():
    offsets = complete_cumsum(torch.tensor([4]))
    try:
        jagged_to_padded(torch.zeros(4, 2), offsets, 3)
    except ValueError as e:
        assert "exceeds max_len 3" in str(e)
    else:
        raise AssertionError("expected ValueError")
