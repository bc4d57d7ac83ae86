"""MoL stage 2 in one Triton kernel: gather each query's candidate rows from the item cache and compute
the exact MoL score in registers (logits, pair-gating MLP, SiLU, softmax, weighted sum).

Per query b and a tile of BLOCK_C candidate rows r:
    l   = G_r @ F_b                      G_r (C, P_X*d_P) flattened item components
                                         F_b (P_X*d_P, P) block-diagonal: F_b[j*d_P + e, j*P_Q + i] = f_i,e / tau
    h   = SiLU(l @ W1^T + b1)            the per-pair gating MLP, hidden H
    z   = SiLU(a_b * bx_r + h @ W2^T + b2)
    phi = sum_p softmax(z)_p * l_p
Logit columns are ordered j-major (p' = j * P_Q + i) so one matmul against F_b yields them all; the host
permutes W1, W2, b2, a and the item gate columns to match (phi does not depend on the order).
Only the (B, C) scores are written (C floats per query against C * P_X * d_P read); the top-k of
those runs after (``kernels.topk``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrec.kernels.dispatch import triton_interpreted
from genrec.kernels.mol_state import ItemCache, MoLGating, QueryState


@triton.jit
def _dot(a, b, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
    """a @ b in fp32. SPLIT: both operands as bf16 hi + lo parts and three tensor-core dots (hi hi, hi lo,
    lo hi), ~2^-16 relative per product instead of IEEE fp32 on the CUDA cores."""
    if SPLIT:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        if INTERPRETED:  # the interpreter mishandles bf16 dots: the same rounded values, widened
            a_hi, a_lo, b_hi, b_lo = a_hi.to(tl.float32), a_lo.to(tl.float32), b_hi.to(tl.float32), b_lo.to(tl.float32)
            out = tl.dot(a_hi, b_hi, input_precision="ieee")
            out = tl.dot(a_hi, b_lo, out, input_precision="ieee")
            return tl.dot(a_lo, b_hi, out, input_precision="ieee")
        out = tl.dot(a_hi, b_hi)
        out = tl.dot(a_hi, b_lo, out)
        return tl.dot(a_lo, b_hi, out)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mol_stage2_kernel(cand_ptr, comp_ptr, igate_ptr, perm_ptr, fbd_ptr, qgate_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr,
                       out_ptr, n_cand, pxd, n_logits, hidden,
                       stride_cand, stride_comp, stride_igate, stride_fbd_b, stride_fbd_r, stride_qgate, stride_out,
                       FULL: tl.constexpr, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_PXD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    tile = tl.program_id(0)  # axis 0: a full-corpus pass has far more than 65535 tiles
    b = tl.program_id(1).to(tl.int64)  # b * stride_out passes 2^31 on a full-corpus pass over 100M items
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < n_cand
    if FULL:  # exact MoL over the whole corpus: candidate c is row c
        rows = offs_c.to(tl.int64)
    else:
        rows = tl.load(cand_ptr + b * stride_cand + offs_c, mask=c_ok, other=-1)
    valid = c_ok & (rows >= 0)
    safe = tl.where(valid, rows, 0)
    e = tl.arange(0, BLOCK_PXD)
    p = tl.arange(0, BLOCK_P)
    hh = tl.arange(0, BLOCK_H)
    e_ok, p_ok, h_ok = e < pxd, p < n_logits, hh < hidden

    g = tl.load(comp_ptr + safe[:, None] * stride_comp + e[None, :], mask=valid[:, None] & e_ok[None, :], other=0.0)
    fbd = tl.load(fbd_ptr + b * stride_fbd_b + e[:, None] * stride_fbd_r + p[None, :], mask=e_ok[:, None] & p_ok[None, :], other=0.0)
    logits = _dot(g.to(tl.float32), fbd, SPLIT, INTERPRETED)  # (C, P), j-major; bf16 caches widen here

    w1t = tl.load(w1t_ptr + p[:, None] * hidden + hh[None, :], mask=p_ok[:, None] & h_ok[None, :], other=0.0)
    b1 = tl.load(b1_ptr + hh, mask=h_ok, other=0.0)
    h = _dot(logits, w1t, SPLIT, INTERPRETED) + b1[None, :]
    h = h * tl.sigmoid(h)
    w2t = tl.load(w2t_ptr + hh[:, None] * n_logits + p[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    b2 = tl.load(b2_ptr + p, mask=p_ok, other=0.0)
    pair = _dot(h, w2t, SPLIT, INTERPRETED) + b2[None, :]

    perm = tl.load(perm_ptr + p, mask=p_ok, other=0)
    bx = tl.load(igate_ptr + safe[:, None] * stride_igate + perm[None, :], mask=valid[:, None] & p_ok[None, :], other=0.0)
    a = tl.load(qgate_ptr + b * stride_qgate + p, mask=p_ok, other=0.0)
    z = a[None, :] * bx.to(tl.float32) + pair
    z = z * tl.sigmoid(z)
    z = tl.where(p_ok[None, :], z, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    w = tl.exp(z)
    phi = tl.sum(w * logits, axis=1) / tl.sum(w, axis=1)
    phi = tl.where(valid, phi, float("-inf"))
    tl.store(out_ptr + b * stride_out + offs_c, phi, mask=c_ok)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _packed(gating: MoLGating, pq: int, px: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """The gating weights in the kernel's j-major logit order (p' = j * P_Q + i <-> the module's
    p = i * P_X + j), built once per (weights, shape, device) and kept on the MoLGating."""
    key = ("triton", pq, px, str(dev))
    if key not in gating.packed:
        perm = (torch.arange(pq, device=dev)[None, :] * px + torch.arange(px, device=dev)[:, None]).reshape(-1)
        w1t = gating.w1.to(dev).float()[:, perm].T.contiguous()  # (P, H)
        w2t = gating.w2.to(dev).float()[perm, :].T.contiguous()  # (H, P)
        b1, b2 = gating.b1.to(dev).float().contiguous(), gating.b2.to(dev).float()[perm].contiguous()
        gating.packed[key] = (perm, perm.to(torch.int32).contiguous(), w1t, b1, w2t, b2)
    return gating.packed[key]


def mol_candidate_scores_triton(gating: MoLGating, q: QueryState, cache: ItemCache, cand: torch.Tensor | None,
                                block_c: int = 64, num_warps: int = 4, precision: str = "ieee") -> torch.Tensor:
    """Same contract as :func:`mol_candidate_scores_reference`; cand None scores every cached item.
    precision 'ieee' (fp32 dots, within ~1e-6 of the reference) or 'bf16x3' (tensor-core dots, ~1e-4 of max |phi|;
    see ``_dot``); block_c and num_warps are tuning knobs (``genrec bench kernels``)."""
    if precision not in ("ieee", "bf16x3"):
        raise ValueError(f"unknown precision {precision!r}; use ieee or bf16x3")
    comps = cache.components
    n_items, px, dp = comps.shape
    pq = q.components.shape[1]
    p_total = pq * px
    dev = q.components.device
    perm, perm32, w1t, b1, w2t, b2 = _packed(gating, pq, px, dev)
    f = q.components.float() / gating.tau  # (B, P_Q, d_P)
    fbd = torch.zeros(len(q), px * dp, p_total, device=dev)
    for j in range(px):
        fbd[:, j * dp : (j + 1) * dp, j * pq : (j + 1) * pq] = f.transpose(1, 2)
    qgate = q.gate.float()[:, perm].contiguous()
    flat = comps.reshape(n_items, px * dp)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    gate = cache.gate if cache.gate.is_contiguous() else cache.gate.contiguous()
    full = cand is None
    n_cand = n_items if full else cand.shape[1]
    cand_t = torch.zeros(1, 1, dtype=torch.int64, device=dev) if full else cand.to(torch.int64).contiguous()
    out = torch.empty(len(q), n_cand, dtype=torch.float32, device=dev)
    if len(q) and n_cand:
        grid = (triton.cdiv(n_cand, block_c), len(q))
        _mol_stage2_kernel[grid](cand_t, flat, gate, perm32, fbd, qgate, w1t, b1, w2t, b2, out,
                                 n_cand, px * dp, p_total, w1t.shape[1],
                                 cand_t.stride(0), flat.stride(0), gate.stride(0), fbd.stride(0), fbd.stride(1),
                                 qgate.stride(0), out.stride(0),
                                 FULL=full, SPLIT=precision == "bf16x3",
                                 INTERPRETED=triton_interpreted(), BLOCK_C=block_c, BLOCK_PXD=_pad(px * dp),
                                 BLOCK_P=_pad(p_total), BLOCK_H=_pad(w1t.shape[1]), num_warps=num_warps)
    return out
