"""Triton block-sparse attention forward (FlashAttention-2 style online softmax) with LSE output.

Grid: (ceil(Nq / BLOCK_M), B * Hq). A program owns BLOCK_M query rows of one head, reads the kept
key-block ids of its query block and walks them in BLOCK_N-wide tiles. Programs of one head are
adjacent in launch order, so a head's K/V stay hot in L2 while its query blocks run.
Under the CPU interpreter bf16 operands are upcast before each dot (see ``_interpreter_bf16``).
Tiles that may hold masked keys (ragged tail, causal diagonal) take a masked branch; all others run
mask-free, which keeps the inner loop as short as dense FlashAttention's. On Hopper, contiguous K/V
are read through TMA tensor descriptors (a 2-D view of rows x D); tiles that run past a head's last
key read the next head's rows (or TMA's zero fill), and those columns are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def program_coords(num_heads, group_size, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Batch, query head, key/value head, first query row and query block of this program."""
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start = tl.program_id(0) * BLOCK_M
    return b, h, h // group_size, q_start, q_start // BLOCK_SIZE


@triton.jit
def online_softmax_step(qk, m_i, l_i, cols, offs_m, start_n, q_start, nk, causal_offset, qk_scale,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """One key tile of the online softmax on raw scores ``qk`` (times ``qk_scale`` = log2 units): returns
    ``(p, alpha, m_new, l_new)``. Only tiles on the ragged tail or the causal diagonal pay for masking (and for
    the guard against rows that have seen only masked keys, where m stays -inf and inf - inf is NaN)."""
    needs_mask = start_n + BLOCK_N > nk
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > q_start + causal_offset)
    if needs_mask:
        valid = cols[None, :] < nk
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_offset)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_output(acc, m_i, l_i, out_base, lse_base, offs_m, offs_d, d_mask, nq, stride_on, stride_od,
                 WRITE_LSE: tl.constexpr):
    """Normalise and store a program's rows; rows that kept no key (l = 0) get zeros and lse = -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = out_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_base.dtype.element_ty), mask=(offs_m[:, None] < nq) & d_mask[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        tl.store(lse_base + offs_m, lse, mask=offs_m < nq)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse, BlockIndex, BlockCount, k_desc, v_desc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    qk_scale, num_heads, num_kv_heads, group_size, nq, nk, causal_offset, q_rows, QLive,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, HAS_LIVE: tl.constexpr,
):
    b, h, h_kv, q_start, q_block = program_coords(num_heads, group_size, BLOCK_M, BLOCK_SIZE)
    pid_bh = tl.program_id(1)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # q holds q_rows rows; output row i reads row i % q_rows (repeat_q: no copy of q).
    q_ptrs = Q + b * stride_qb + h * stride_qh + (offs_m % q_rows)[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < nq) & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    count = tl.load(BlockCount + b * stride_cb + h * stride_ch + q_block * stride_cq)
    if HAS_LIVE:  # a row tile past the live rows of q keeps nothing (zeros, -inf)
        count = tl.where(q_start % q_rows >= tl.load(QLive + b), 0, count)
    index_base = BlockIndex + b * stride_ib + h * stride_ih + q_block * stride_iq
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kv_row0 = (b * num_kv_heads + h_kv) * nk  # first row of this head in the (B*Hkv*Nk, D) TMA view

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for t in tl.range(0, count * TILES, warp_specialize=WARP_SPECIALIZE):
        kv_block = tl.load(index_base + (t // TILES) * stride_ik)
        start_n = kv_block * BLOCK_SIZE + (t % TILES) * BLOCK_N
        cols = start_n + offs_n
        # Loads stay outside any branch so the software pipeliner can prefetch them.
        if USE_TMA:
            k = k_desc.load([kv_row0 + start_n, 0]).T
        else:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=(cols[None, :] < nk) & d_mask[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        p, alpha, m_new, l_i = online_softmax_step(tl.dot(q, k), m_i, l_i, cols, offs_m, start_n, q_start, nk,
                                                   causal_offset, qk_scale, BLOCK_N, CAUSAL)
        if USE_TMA:
            v = v_desc.load([kv_row0 + start_n, 0])
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=(cols[:, None] < nk) & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    store_output(acc, m_i, l_i, Out + b * stride_ob + h * stride_oh, Lse + pid_bh * nq, offs_m, offs_d, d_mask, nq,
                 stride_on, stride_od, WRITE_LSE)


def _interpreter_bf16(q: torch.Tensor) -> bool:
    # The Triton interpreter computes bf16 dots on raw bits (numpy has no bf16): upcast there only.
    return not q.is_cuda and q.dtype == torch.bfloat16


def _launch_config(head_dim: int, block_size: int, causal: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), tuned on H100 by benchmarks/bench_kernels.py."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64:
        # D <= 64: 64x128 tiles with 4 warps beat 128x128/8 by ~18 % on H100 (docs/benchmarks.md).
        bm, bn, warps, stages = 64, 128, 4, 3
    elif block_d <= 128:
        # Best at every density on H100 (docs/benchmarks.md, 2026-11-23 sweep).
        bm, bn, warps, stages = 128, 128, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 4, 2
    return min(bm, block_size), min(bn, block_size), warps, stages


def _tma_ok(k: torch.Tensor, v: torch.Tensor, head_dim: int) -> bool:
    """TMA needs a (rows, D) view with unit last stride, 16-byte aligned rows and a power-of-two D."""
    return (
        k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9
        and k.is_contiguous() and v.is_contiguous()
        and head_dim == triton.next_power_of_2(head_dim) and head_dim * k.element_size() % 16 == 0
    )


def block_sparse_attention_triton(q, k, v, block_index, block_count, *, scale, causal, block_size, return_lse,
                                  config=None, use_tma=None, warp_specialize=None, repeat_q=1, live_rows=None):
    bsz, hq, q_rows, d = q.shape
    nq = q_rows * repeat_q
    hkv, nk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = config or _launch_config(d, block_size, causal)
    if block_size % bm or block_size % bn:
        raise ValueError(f"block_size {block_size} must be a multiple of the tile sizes ({bm}, {bn})")
    out = torch.empty_like(q) if repeat_q == 1 else q.new_empty(bsz, hq, nq, d)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device) if return_lse else out
    # Broadcast dims (size 1) get stride 0, so one index serves every batch / head.
    si = [0 if block_index.shape[i] == 1 else block_index.stride(i) for i in range(2)]
    sc = [0 if block_count.shape[i] == 1 else block_count.stride(i) for i in range(2)]
    use_tma = _tma_ok(k, v, d) if use_tma is None else use_tma
    # Warp specialization paid 0-3 % on H100 with TMA (docs/benchmarks.md); it is off elsewhere.
    warp_specialize = use_tma if warp_specialize is None else warp_specialize
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        rows = bsz * hkv * nk
        k_desc = TensorDescriptor(k, shape=[rows, d], strides=[d, 1], block_shape=[bn, d])
        v_desc = TensorDescriptor(v, shape=[rows, d], strides=[d, 1], block_shape=[bn, d])
    else:
        k_desc, v_desc = k, v
    grid = (math.ceil(nq / bm), bsz * hq)
    _block_sparse_fwd[grid](
        q, k, v, out, lse, block_index, block_count, k_desc, v_desc,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        si[0], si[1], block_index.stride(2), block_index.stride(3),
        sc[0], sc[1], block_count.stride(2),
        scale * LOG2E, hq, hkv, hq // hkv, nq, nk, nk - nq, q_rows, block_count if live_rows is None else live_rows,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=causal, WRITE_LSE=return_lse, DOT_F32=_interpreter_bf16(q), USE_TMA=use_tma,
        WARP_SPECIALIZE=warp_specialize, HAS_LIVE=live_rows is not None, num_warps=warps, num_stages=stages,
    )
    return out, (lse if return_lse else None)
