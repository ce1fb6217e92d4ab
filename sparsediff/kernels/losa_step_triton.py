"""Triton kernels of ``losa_step``: ``token_change_update`` (one program per token) and ``mean_key_score``
(one program per (batch x head, tile of query rows))."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_change_kernel(Q, QR, THR, ACT, H, NQ, sqb, sqh, sqt, thr2, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, ONLY_ACTIVE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (dd[None, :] < D)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t * sqt + dd[None, :], mask=m, other=0.0).to(tl.float32)
    ref_at = QR + ((b * H + h[:, None]) * NQ + t) * D + dd[None, :]
    ref = tl.load(ref_at, mask=m, other=0.0)
    diff = q - ref
    dsq = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    qsq = tl.sum(tl.sum(q * q, axis=1), axis=0)
    thr = tl.load(THR + b * NQ + t)
    act = dsq >= thr
    tl.store(ACT + b * NQ + t, act.to(tl.int8))
    # Every load above feeds the reductions, so the stores below cannot overtake them.
    new_thr = tl.maximum(qsq, 1e-12) * thr2
    if ONLY_ACTIVE:  # stable tokens keep their references (rewritten unchanged)
        q = tl.where(act, q, ref)
        new_thr = tl.where(act, new_thr, thr)
    tl.store(ref_at, q, mask=m)
    tl.store(THR + b * NQ + t, new_thr)


def token_change_triton(q, q_ref, ref_thr, thr2, only_active):
    b, h, n, d = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    active = torch.empty(b, n, dtype=torch.bool, device=q.device)
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    _token_change_kernel[(b, n)](q, q_ref, ref_thr, active.view(torch.int8), h, n, q.stride(0), q.stride(1),
                                 q.stride(2), thr2, D=d, BLOCK_H=block_h, BLOCK_D=block_d, ONLY_ACTIVE=only_active,
                                 num_warps=4 if block_h * block_d <= 4096 else 8)
    return active


@triton.jit
def _mean_key_score_kernel(Q, M, Bias, Live, P, R, NKB, T, H, sqb, sqh, sqr, smb, smh, smn, smd,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    live = tl.load(Live + b)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    out = P + (bh.to(tl.int64) * T + t) * NKB
    first = (t == 0).to(tl.float32)  # tile 0 adds the bias to the score once
    if t * BLOCK_M < live:
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :],
                    mask=(rows[:, None] < R) & (dd[None, :] < D), other=0.0).to(tl.float32)
        m_base = M + b * smb + h * smh
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        # Pass 1: each row's softmax max and normaliser over all key blocks.
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            mk = tl.load(m_base + n[None, :] * smn + dd[:, None] * smd, mask=(n[None, :] < NKB) & (dd[:, None] < D),
                         other=0.0)
            s = tl.dot(q, mk, input_precision="tf32x3") + tl.load(Bias + n, mask=n < NKB, other=float("-inf"))[None, :]
            new = tl.maximum(top, tl.max(s, axis=1))
            total = total * tl.exp(top - new) + tl.sum(tl.exp(s - new[:, None]), axis=1)
            top = new
        weight = tl.where(rows < live, 1.0 / total, 0.0)  # rows past the live ones carry no mass
        # Pass 2: the live rows' probabilities summed per key block.
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            mk = tl.load(m_base + n[None, :] * smn + dd[:, None] * smd, mask=(n[None, :] < NKB) & (dd[:, None] < D),
                         other=0.0)
            bias = tl.load(Bias + n, mask=n < NKB, other=float("-inf"))
            s = tl.dot(q, mk, input_precision="tf32x3") + bias[None, :]
            p = tl.exp(s - top[:, None]) * weight[:, None]
            tl.store(out + n, tl.sum(p, axis=0) + first * tl.where(n < NKB, bias, 0.0), mask=n < NKB)
    else:  # no live row in this tile: its share of the score is zero (plus the bias on tile 0)
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            bias = tl.load(Bias + n, mask=n < NKB, other=0.0)
            tl.store(out + n, first * bias, mask=n < NKB)


def mean_key_score_triton(rows, n_live, means, bias):
    b, h, r, d = rows.shape
    nkb = means.shape[2]
    if rows.stride(3) != 1:
        rows = rows.contiguous()
    block_m = 32 if r <= 256 else 64
    block_n = 64
    block_d = max(16, triton.next_power_of_2(d))
    tiles = triton.cdiv(r, block_m)
    partial = torch.empty(b, h, tiles, nkb, dtype=torch.float32, device=rows.device)
    live = n_live.to(torch.int32).contiguous()
    _mean_key_score_kernel[(b * h, tiles)](
        rows, means, bias.contiguous(), live, partial, r, nkb, tiles, h, rows.stride(0), rows.stride(1),
        rows.stride(2), *means.stride(), D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return partial.sum(dim=2) if tiles > 1 else partial[:, :, 0]
