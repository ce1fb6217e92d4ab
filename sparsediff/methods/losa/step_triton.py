"""Triton kernels of ``losa_step``: ``token_change_update`` (one program per token), ``mean_key_score`` (two
kernels over (batch x head, chunk of key blocks)), the live rows' mass from float32 logits, ``rank_blocks``,
``window_attention`` and the active-first order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.pdl import pdl_kwargs, pdl_start


@triton.jit
def _token_change_kernel(Q, QR, THR, ACT, H, NQ, sqb, sqh, sqt, thr2, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, ONLY_ACTIVE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
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
                                 num_warps=4 if block_h * block_d <= 4096 else 8, **pdl_kwargs(q))
    return active


@triton.jit
def _split_logits(q_hi, q_lo, m_ptr, n, dd, sms, smd, NKB, D: tl.constexpr, Q_SPLIT: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """q . means for one chunk of key blocks from the three bfloat16 parts of the means (smallest first),
    float32 accumulation: about float32 accuracy on bfloat16 tensor cores. ``Q_SPLIT``: q has a low part too.
    ``DOT_F32``: operands upcast first (the CPU interpreter computes bfloat16 dots on raw bits)."""
    mask = (n[None, :] < NKB) & (dd[:, None] < D)
    ptr = m_ptr + dd[:, None] * smd + n[None, :]
    lo = tl.load(ptr + 2 * sms, mask=mask, other=0.0)
    mid = tl.load(ptr + sms, mask=mask, other=0.0)
    hi = tl.load(ptr, mask=mask, other=0.0)
    if DOT_F32:
        q_hi, q_lo = q_hi.to(tl.float32), q_lo.to(tl.float32)
        lo, mid, hi = lo.to(tl.float32), mid.to(tl.float32), hi.to(tl.float32)
    acc = tl.dot(q_hi, lo)
    if Q_SPLIT:
        acc = tl.dot(q_lo, mid, acc)
    acc = tl.dot(q_hi, mid, acc)
    if Q_SPLIT:
        acc = tl.dot(q_lo, hi, acc)
    return tl.dot(q_hi, hi, acc)


@triton.jit
def _chunk_stats_kernel(Q, MS, Bias, Live, M, S, R, NKB, C, H, sqb, sqh, sqr, sms, smb, smh, smd, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, Q_SPLIT: tl.constexpr,
                        DOT_F32: tl.constexpr, USE_PDL: tl.constexpr):
    """Per (batch x head, chunk of key blocks, row tile): each live row's max and sum of exponentials over the
    chunk's logits, to ``M`` and ``S`` ``(B * H, R, C)``. Tiles past ``n_live`` return at once."""
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    live = tl.minimum(tl.load(Live + b), R)
    if t * BLOCK_M < live:
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        n = c * BLOCK_N + tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :],
                    mask=(rows[:, None] < live) & (dd[None, :] < D), other=0.0)
        q_hi = q.to(tl.bfloat16)
        q_lo = q_hi
        if Q_SPLIT:
            q_lo = (q.to(tl.float32) - q_hi.to(tl.float32)).to(tl.bfloat16)
        s = _split_logits(q_hi, q_lo, MS + b * smb + h * smh, n, dd, sms, smd, NKB, D, Q_SPLIT, DOT_F32)
        s += tl.load(Bias + n, mask=n < NKB, other=float("-inf"))[None, :]
        top = tl.max(s, axis=1)  # finite: a chunk holds at least one block, and the bias is finite
        at = (bh.to(tl.int64) * R + rows) * C + c
        tl.store(M + at, top, mask=rows < live)
        tl.store(S + at, tl.sum(tl.exp(s - top[:, None]), axis=1), mask=rows < live)


@triton.jit
def _chunk_mass_kernel(Q, MS, Bias, Live, M, S, P, R, NKB, C, H, sqb, sqh, sqr, sms, smb, smh, smd, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                       Q_SPLIT: tl.constexpr, DOT_F32: tl.constexpr, USE_PDL: tl.constexpr):
    """Per (batch x head, chunk of key blocks): the live rows' softmax mass on the chunk's blocks, tile by tile
    in row order (deterministic), each row's normaliser combined from the chunk statistics; plus the bias."""
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    live = tl.minimum(tl.load(Live + b), R)
    n = c * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    cc = tl.arange(0, BLOCK_C)
    bias = tl.load(Bias + n, mask=n < NKB, other=float("-inf"))
    m_ptr = MS + b * smb + h * smh
    acc = tl.zeros([BLOCK_N], tl.float32)
    for t in range(0, tl.cdiv(live, BLOCK_M)):  # live tiles only: the launch shape stays fixed
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        use = rows < live
        at = (bh.to(tl.int64) * R + rows[:, None]) * C + cc[None, :]
        mc = tl.load(M + at, mask=use[:, None] & (cc[None, :] < C), other=float("-inf"))
        sc = tl.load(S + at, mask=use[:, None] & (cc[None, :] < C), other=0.0)
        top = tl.where(use, tl.max(mc, axis=1), 0.0)
        total = tl.sum(sc * tl.exp(mc - top[:, None]), axis=1)
        weight = tl.where(use, 1.0 / tl.where(use, total, 1.0), 0.0)  # rows past the live ones carry no mass
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :],
                    mask=use[:, None] & (dd[None, :] < D), other=0.0)
        q_hi = q.to(tl.bfloat16)
        q_lo = q_hi
        if Q_SPLIT:
            q_lo = (q.to(tl.float32) - q_hi.to(tl.float32)).to(tl.bfloat16)
        # The same logits as the first kernel's (same code and tile shape): recomputed, never in memory.
        s = _split_logits(q_hi, q_lo, m_ptr, n, dd, sms, smd, NKB, D, Q_SPLIT, DOT_F32) + bias[None, :]
        acc += tl.sum(tl.exp(s - top[:, None]) * weight[:, None], axis=0)
    tl.store(P + bh.to(tl.int64) * NKB + n, acc + bias, mask=n < NKB)


def mean_key_score_triton(rows, n_live, split, bias, block_n=64):
    """``split``: ``(3, B, H, D, nkb)`` bfloat16 parts of the means (``losa_step.split_means``). Two kernels over
    chunks of ``block_n`` key blocks, so that all SMs share the work even with 8 heads of ~32 live rows: each
    chunk's max and normaliser per live row, then each chunk's mass from the combined normalisers.
    Tiles of 32 rows, chunks of 64 blocks, 4 warps: the best of 10 settings on an H100 at LoSA's shapes (8
    heads, 512 / 1024 blocks, 32 of 128 or 128 of 512 rows live: 7.3-21.6 us per call; chunks of 128 were up
    to 1.2 us faster at 1024 blocks and 2.6-4.1 us slower at 512, chunks of 32 2.3-10 us slower, 64-row tiles
    slower everywhere)."""
    b, h, r, d = rows.shape
    nkb = split.shape[4]
    if rows.stride(3) != 1:
        rows = rows.contiguous()
    if split.stride(4) != 1:
        split = split.contiguous()
    block_m = 32
    block_d = max(16, triton.next_power_of_2(d))
    chunks = triton.cdiv(nkb, block_n)
    tops = torch.empty(b * h, r, chunks, dtype=torch.float32, device=rows.device)
    sums = torch.empty_like(tops)
    score = torch.empty(b, h, nkb, dtype=torch.float32, device=rows.device)
    live = n_live if n_live.dtype == torch.int32 and n_live.is_contiguous() else n_live.to(torch.int32).contiguous()
    bias = bias.contiguous()
    args = (r, nkb, chunks, h, rows.stride(0), rows.stride(1), rows.stride(2), split.stride(0), split.stride(1),
            split.stride(2), split.stride(3))
    kw = dict(D=d, BLOCK_N=block_n, BLOCK_D=block_d, Q_SPLIT=rows.dtype != torch.bfloat16, DOT_F32=not rows.is_cuda,
              BLOCK_M=block_m, num_warps=4, **pdl_kwargs(rows))
    _chunk_stats_kernel[(b * h, chunks, triton.cdiv(r, block_m))](rows, split, bias, live, tops, sums, *args, **kw)
    _chunk_mass_kernel[(b * h, chunks)](rows, split, bias, live, tops, sums, score, *args,
                                        BLOCK_C=max(16, triton.next_power_of_2(chunks)), **kw)
    return score


@triton.jit
def _live_mass_kernel(L, Bias, Live, P, R, NKB, T, H, slb, slh, slr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    live = tl.load(Live + b)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    out = P + (bh.to(tl.int64) * T + t) * NKB
    first = (t == 0).to(tl.float32)  # tile 0 adds the bias to the score once
    if t * BLOCK_M < live:
        use = rows < live  # live rows only (rows past R are never live)
        base = L + b * slb + h * slh + rows[:, None].to(tl.int64) * slr
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        # Pass 1: each live row's softmax max and normaliser over all key blocks.
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            m = use[:, None] & (n[None, :] < NKB)
            s = tl.load(base + n[None, :], mask=m, other=0.0)
            s = tl.where(m, s + tl.load(Bias + n, mask=n < NKB, other=0.0)[None, :], float("-inf"))
            new = tl.maximum(top, tl.max(s, axis=1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp(top - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            top = new
        weight = tl.where(use, 1.0 / tl.where(use, total, 1.0), 0.0)
        top = tl.where(use, top, 0.0)
        # Pass 2: the live rows' probabilities summed per key block.
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            m = use[:, None] & (n[None, :] < NKB)
            bias = tl.load(Bias + n, mask=n < NKB, other=0.0)
            s = tl.load(base + n[None, :], mask=m, other=0.0) + bias[None, :]
            p = tl.where(m, tl.exp(s - top[:, None]) * weight[:, None], 0.0)
            tl.store(out + n, tl.sum(p, axis=0) + first * bias, mask=n < NKB)
    else:  # no live row in this tile: its share of the score is zero (plus the bias on tile 0)
        for n0 in range(0, NKB, BLOCK_N):
            n = n0 + cols
            tl.store(out + n, first * tl.load(Bias + n, mask=n < NKB, other=0.0), mask=n < NKB)


def live_mass_triton(logits, n_live, bias, block_m=16):
    """``mean_key_score`` from float32 logits ``(B, H, R, nkb)`` (rows . means, without the bias): the live
    rows' softmax mass per key block, one program per (batch x head, tile of ``block_m`` rows); tiles past
    ``n_live`` only write zeros. The per-tile partial scores are summed in a fixed order (deterministic).
    16-row tiles: 21 us per cached step in LoSA's graph at 64k / 128-token blocks on an H100, 32-row tiles
    40 us (timed alone with the matmul, do_bench ranked them the other way: 0.071 vs 0.049 ms)."""
    b, h, r, nkb = logits.shape
    if logits.stride(3) != 1:
        logits = logits.contiguous()
    tiles = triton.cdiv(r, block_m)
    partial = torch.empty(b, h, tiles, nkb, dtype=torch.float32, device=logits.device)
    live = n_live if n_live.dtype == torch.int32 and n_live.is_contiguous() else n_live.to(torch.int32).contiguous()
    _live_mass_kernel[(b * h, tiles)](logits, bias.contiguous(), live, partial, r, nkb, tiles, h, logits.stride(0),
                                      logits.stride(1), logits.stride(2), BLOCK_M=block_m, BLOCK_N=128, num_warps=4,
                                      **pdl_kwargs(logits))
    return partial.sum(dim=2) if tiles > 1 else partial[:, :, 0]


@triton.jit
def _descending_key(x, idx):
    """int64 keys that order float32 ``x`` at indices ``idx`` as torch's stable descending sort does: NaN
    above +inf, -0.0 equal to +0.0, ties by lower index first. Distinct for distinct indices."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negatives: larger magnitude -> smaller key
    key = tl.where(x == 0.0, 0, key)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _rank_blocks_kernel(S, Out, N, KEEP, SPLITS, CHUNK, REPEAT, H, ssb, ssh, ssn, BLOCK_I: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_PAD: tl.constexpr, FIRST: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    s_row = S + (bh // H).to(tl.int64) * ssb + (bh % H).to(tl.int64) * ssh
    out = Out + bh.to(tl.int64) * (SPLITS * REPEAT * CHUNK)
    i = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    ki = _descending_key(tl.load(s_row + i * ssn, mask=i < N, other=0.0), i)
    if FIRST:  # block 0 above every key, NaN's included
        ki = tl.where(i == 0, 0x7FFFFFFFFFFFFFFF, ki)
    # An element's rank is the number of keys above its own (keys are distinct, so ranks are too). Small
    # row tiles: many programs, since a few per SM leave the comparisons latency-bound.
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        # Past the row: below every key (the lowest, -inf's, is about -0x7F80_0001 << 32).
        kj = tl.where(j < N, _descending_key(tl.load(s_row + j * ssn, mask=j < N, other=0.0), j),
                      -0x7FFFFFFFFFFFFFFF)
        if FIRST:
            kj = tl.where(j == 0, 0x7FFFFFFFFFFFFFFF, kj)
        rank += tl.sum((kj[None, :] > ki[:, None]).to(tl.int32), axis=1)
    # Rank r goes to split r % SPLITS, slot r // SPLITS (prefix_attention.strided_layout); each split's row is
    # written REPEAT times (one per query tile of the split, as the attention kernel reads them).
    for t in range(REPEAT):
        tl.store(out + ((rank % SPLITS) * REPEAT + t) * CHUNK + rank // SPLITS, i, mask=(i < N) & (rank < KEEP))
        if blk == 0:  # the layout's padding past KEEP ranks holds block 0
            r = KEEP + tl.arange(0, BLOCK_PAD)
            tl.store(out + ((r % SPLITS) * REPEAT + t) * CHUNK + r // SPLITS, tl.zeros([BLOCK_PAD], dtype=tl.int32),
                     mask=r < SPLITS * CHUNK)


def rank_blocks_triton(score, keep, splits, first=False, repeat=1):
    b, h, n = score.shape
    chunk = -(-keep // splits)
    out = torch.empty(b, h, splits * repeat, chunk, dtype=torch.int32, device=score.device)
    block_i = 16
    block_j = min(256, max(16, triton.next_power_of_2(n)))
    _rank_blocks_kernel[(b * h, triton.cdiv(n, block_i))](
        score, out, n, keep, splits, chunk, repeat, h, score.stride(0), score.stride(1), score.stride(2),
        BLOCK_I=block_i,
        BLOCK_J=block_j, BLOCK_PAD=max(16, triton.next_power_of_2(splits)), FIRST=bool(first), num_warps=4,
        **pdl_kwargs(score))
    return out


@triton.jit
def _window_attention_kernel(Q, K, V, Idx, Bias, Out, L, HKV, G, NQ, W, scale, sqb, sqh, sqt, skb, skh, skn, svb,
                             svh, svn, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BF16: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    # The KV group's query heads stacked: row r is token r % NQ of query head h * G + r // NQ.
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < G * NQ
    head = h * G + r // NQ
    tok = r % NQ
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqt + dd[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if not BF16:
        q = q.to(tl.float32)
    kp = K + b * skb + h * skh
    vp = V + b * svb + h * svh
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, W, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < W
        bias = tl.load(Bias + n, mask=n_ok, other=float("-inf"))
        # A chunk of masked rows only (the window's padding past the block) adds nothing: skip its loads.
        if tl.max(bias, axis=0) > float("-inf"):
            rows = tl.load(Idx + n, mask=n_ok, other=0)  # KV rows of the window (gathered here: no copies)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(kp + rows[:, None] * skn + dd[None, :], mask=kv_mask, other=0.0)
            if BF16:  # bfloat16 q and k (CUDA): products exact in the float32 accumulator
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = s * scale + bias[None, :]
            new = tl.maximum(top, tl.max(s, axis=1))
            shift = tl.where(new == float("-inf"), 0.0, new)  # a row with no valid key yet stays at zero mass
            alpha = tl.exp(top - shift)
            p = tl.exp(s - shift[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(vp + rows[:, None] * svn + dd[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None]
            if BF16:  # bfloat16 v: p as three bfloat16 parts (about float32 accuracy), smallest first
                p_hi = p.to(tl.bfloat16)
                rest = p - p_hi.to(tl.float32)
                p_mid = rest.to(tl.bfloat16)
                acc = tl.dot((rest - p_mid.to(tl.float32)).to(tl.bfloat16), v, acc)
                acc = tl.dot(p_mid, v, acc)
                acc = tl.dot(p_hi, v, acc)
            else:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            top = new
    at = (b * HKV * G + head) * NQ + tok
    tl.store(L + at, top + tl.log(total), mask=r_ok)
    tl.store(Out + at[:, None] * D + dd[None, :], acc / total[:, None], mask=r_ok[:, None] & d_ok[None, :])


def window_attention_triton(q, k, v, idx, bias, scale, out=None):
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    w = idx.shape[0]
    if q.stride(3) != 1:
        q = q.contiguous()
    if out is None:
        out = (torch.empty(b, hq, nq, d, dtype=torch.float32, device=q.device),
               torch.empty(b, hq, nq, dtype=torch.float32, device=q.device))
    out, lse = out
    # 128-key chunks, 2 stages: 6.9 / 9.9 us against 7.7 / 12.6 with 64 (128k prefix, 32 / 128-token blocks,
    # H100, graph replays; 32- and 64-row tiles and 8 warps were no faster).
    block_m, block_n = 16, 128
    rows = (hq // hkv) * nq
    bf16 = q.is_cuda and q.dtype == k.dtype == v.dtype == torch.bfloat16
    _window_attention_kernel[(b * hkv, triton.cdiv(rows, block_m))](
        q, k, v, idx, bias, out, lse, hkv, hq // hkv, nq, w, float(scale), q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), D=d, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), BF16=bf16, num_warps=4, num_stages=2,
        **pdl_kwargs(q))
    return out, lse


@triton.jit
def _active_first_kernel(Q, Act, Stacked, Rank, NRows, Stat, HQ, HKV, G, NQ, R, pad_iters, sqb, sqh, sqt,
                         D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                         BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    tt = tl.arange(0, BLOCK_T)
    act = tl.load(Act + b * NQ + tt, mask=tt < NQ, other=0).to(tl.int32)
    a_t = tl.load(Act + b * NQ + t).to(tl.int32)
    n_act = tl.sum(act, axis=0)
    act_before = tl.sum(tl.where(tt < t, act, 0), axis=0)
    # The stable active-first order: active tokens in token order, then the others.
    pos = tl.where(a_t != 0, act_before, n_act + t - act_before)
    tl.store(Rank + b * NQ + t, pos.to(tl.int64))
    tl.store(Stat + b * (NQ + 1) + t, a_t.to(tl.int8))
    if t == 0:
        tl.store(NRows + b, n_act * G)
        tl.store(Stat + b * (NQ + 1) + NQ, (n_act > 0).to(tl.int8))
    # Token t's query heads to rows pos * G + j of their KV group (token-major stacking).
    hq = tl.arange(0, BLOCK_HQ)
    dd = tl.arange(0, BLOCK_D)
    m = (hq[:, None] < HQ) & (dd[None, :] < D)
    x = tl.load(Q + b * sqb + hq[:, None] * sqh + t * sqt + dd[None, :], mask=m)
    dst = ((b * HKV + hq // G) * R + pos * G + hq % G) * D
    tl.store(Stacked + dst[:, None] + dd[None, :], x, mask=m)
    # Zero padding rows past NQ * G: this program takes every NQ-th of them.
    hk = tl.arange(0, BLOCK_HKV)
    for i in range(pad_iters):
        r = NQ * G + t + i * NQ
        pm = (hk[:, None] < HKV) & (dd[None, :] < D) & (r < R)
        tl.store(Stacked + ((b * HKV + hk[:, None]) * R + r) * D + dd[None, :],
                 tl.zeros([BLOCK_HKV, BLOCK_D], dtype=Stacked.dtype.element_ty), mask=pm)


def active_first_triton(q, active, num_kv_heads, block_size):
    b, hq, nq, d = q.shape
    group = hq // num_kv_heads
    rows = -(-nq * group // block_size) * block_size
    if q.stride(3) != 1:
        q = q.contiguous()
    stacked = torch.empty(b, num_kv_heads, rows, d, dtype=q.dtype, device=q.device)
    rank = torch.empty(b, nq, dtype=torch.int64, device=q.device)
    n_rows = torch.empty(b, dtype=torch.int32, device=q.device)
    stat = torch.empty(b, nq + 1, dtype=torch.bool, device=q.device)
    _active_first_kernel[(b, nq)](
        q, active.contiguous().view(torch.int8), stacked, rank, n_rows, stat.view(torch.int8), hq, num_kv_heads,
        group, nq, rows, -(-(rows - nq * group) // nq), q.stride(0), q.stride(1), q.stride(2), D=d,
        BLOCK_T=max(16, triton.next_power_of_2(nq)), BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads), BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4,
        **pdl_kwargs(q))
    return stacked, rank, n_rows, stat
