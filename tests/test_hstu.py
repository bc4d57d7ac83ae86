import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.config import ModelConfig
from genrec.kernels.jagged import complete_cumsum
from genrec.encoders.model import SequentialEncoder
from genrec.kernels import hstu_attention
from genrec.kernels.hstu_attention_reference import table_lookup, time_bucket


def small_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(item_emb_dim=12, dqk=6, dv=6, num_heads=2, dropout=0.0, input_dropout=0.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_batch(lengths, num_items=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = complete_cumsum(torch.tensor(lengths))
    total = int(offsets[-1])
    items = torch.randint(1, num_items + 1, (total,), generator=g)
    ts = torch.cumsum(torch.randint(1, 10_000, (total,), generator=g), 0)
    nts = ts + torch.randint(0, 5000, (total,), generator=g)
    return items, offsets, ts, nts


def test_time_bucket_hand_values():
    d = torch.tensor([0, 1, -1, 2, 3, 100, -100, 10**12])
    expected = [0, 0, 0, math.floor(math.log(2) / 0.301), math.floor(math.log(3) / 0.301),
                math.floor(math.log(100) / 0.301), math.floor(math.log(100) / 0.301), 91]
    assert time_bucket(d, 0.301, 128).tolist() == expected
    assert time_bucket(torch.tensor([10**9]), 0.01, 128).item() == 128  # log(1e9) / 0.01 > 128: clamped


def test_table_lookup_gradient_matches_indexing():
    table = torch.randn(9, requires_grad=True)
    idx = torch.randint(0, 9, (4, 5, 5))
    grad = torch.randn(4, 5, 5)
    (g1,) = torch.autograd.grad(table_lookup(table, idx), table, grad)
    (g2,) = torch.autograd.grad(table[idx], table, grad)
    torch.testing.assert_close(g1, g2)


def naive_attention(q, k, v, offsets, alpha, scale, pos_table, time_table, ts, nts, divisor):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2])
    n_max = (pos_table.numel() + 1) // 2 if pos_table is not None else 0
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        for i in range(s, e):
            for j in range(s, i + 1):
                logit = alpha * (q[i] * k[j]).sum(-1)
                if pos_table is not None:
                    logit = logit + pos_table[n_max - 1 + (j - i)]
                if time_table is not None:
                    logit = logit + time_table[time_bucket(nts[i] - ts[j], divisor, time_table.numel() - 1)]
                out[i] += (F.silu(logit) * scale)[:, None] * v[j]
    return out


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), heads=st.integers(1, 2),
       use_pos=st.booleans(), use_time=st.booleans(), alpha=st.sampled_from([1.0, 0.5]))
def test_reference_attention_matches_naive_loop(lengths, heads, use_pos, use_time, alpha):
    torch.manual_seed(1)
    offsets = complete_cumsum(torch.tensor(lengths))
    total, n = int(offsets[-1]), max(max(lengths), 1)
    q, k, v = torch.randn(total, heads, 4), torch.randn(total, heads, 4), torch.randn(total, heads, 3)
    ts = torch.cumsum(torch.randint(1, 1000, (total,)), 0)
    nts = ts + 7
    pos_table = torch.randn(2 * 8 - 1) if use_pos else None
    time_table = torch.randn(33) if use_time else None
    got = hstu_attention(q, k, v, offsets, n, alpha=alpha, scale=1 / 8, pos_table=pos_table, time_table=time_table,
                         timestamps=ts if use_time else None, next_timestamps=nts if use_time else None)
    want = naive_attention(q, k, v, offsets, alpha, 1 / 8, pos_table, time_table, ts, nts, 0.301)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
@pytest.mark.parametrize("variant", [{}, {"uvqk_activation": "silu_u_only", "qk_scale": "inv_sqrt_dqk",
                                          "output_mode": "concat", "input_time_embedding": True}])
def test_causality_future_items_never_change_earlier_states(encoder, variant):
    torch.manual_seed(0)
    model = SequentialEncoder(small_cfg(encoder=encoder, **variant), num_items=30, max_len=10).eval()
    items, offsets, ts, nts = make_batch([7, 4])
    base = model(items, offsets, 7, ts, nts)
    changed = items.clone()
    changed[5] = (changed[5] % 30) + 1  # row 0, position 5
    ts2, nts2 = ts.clone(), nts.clone()
    ts2[6] += 10**6  # row 0, position 6: later events' times
    nts2[5] += 10**6
    out = model(changed, offsets, 7, ts2, nts2)
    torch.testing.assert_close(out[:5], base[:5])  # positions 0..4 of row 0 unchanged
    torch.testing.assert_close(out[7:], base[7:])  # row 1 unchanged
    assert not torch.allclose(out[5], base[5])


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_rows_do_not_depend_on_batch_neighbours(encoder):
    torch.manual_seed(0)
    model = SequentialEncoder(small_cfg(encoder=encoder), num_items=30, max_len=10).eval()
    items, offsets, ts, nts = make_batch([3, 8, 5])
    together = model(items, offsets, 8, ts, nts)
    alone = model(items[:3], offsets[:2], 3, ts[:3], nts[:3])
    torch.testing.assert_close(together[:3], alone, rtol=1e-5, atol=1e-6)


def test_outputs_are_unit_norm_and_rab_switches_matter():
    torch.manual_seed(0)
    items, offsets, ts, nts = make_batch([6, 2])
    outs = {}
    for pos in (True, False):
        for tim in (True, False):
            torch.manual_seed(0)
            m = SequentialEncoder(small_cfg(relative_position_bias=pos, relative_time_bias=tim), 30, 10).eval()
            outs[(pos, tim)] = m(items, offsets, 6, ts, nts)
            torch.testing.assert_close(outs[(pos, tim)].norm(dim=-1), torch.ones(8))
    assert not torch.allclose(outs[(True, True)], outs[(False, False)])
    assert not torch.allclose(outs[(True, True)], outs[(True, False)])


def test_hstu_gradients_reach_rab_tables():
    torch.manual_seed(0)
    model = SequentialEncoder(small_cfg(), num_items=30, max_len=10)
    items, offsets, ts, nts = make_batch([6, 3])
    model(items, offsets, 6, ts, nts).sum().backward()
    for layer in model.blocks:
        assert layer.pos_table.grad is not None and layer.pos_table.grad.abs().sum() > 0
        assert layer.time_table.grad is not None and layer.time_table.grad.abs().sum() > 0


def test_too_long_batch_is_rejected():
    model = SequentialEncoder(small_cfg(), num_items=30, max_len=4)
    items, offsets, ts, nts = make_batch([6])
    with pytest.raises(ValueError, match="exceeds the model's max_len 4"):
        model(items, offsets, 6, ts, nts)
