"""Experimental variant of the block-sparse forward: QK^T of the next tile issued before this tile's softmax.

The default kernel (``block_sparse_triton``) runs each tile as QK^T -> softmax -> PV; the softmax
(exp2, row max / sum, accumulator rescale) runs on the CUDA cores while the tensor cores idle. Here the
loop is software-pipelined by hand as FlashAttention-3 does inside a warpgroup: the next tile's
QK^T is issued (an asynchronous WGMMA on Hopper) before the current tile's softmax, so the two can
overlap. Same arguments and results as the default kernel; selected by ``pipeline_qk=True``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_k(k_desc, k_base, kv_row0, start_n, offs_n, offs_d, d_mask, nk, stride_kn, stride_kd,
            USE_TMA: tl.constexpr, DOT_F32: tl.constexpr):
    if USE_TMA:
        k = k_desc.load([kv_row0 + start_n, 0]).T
    else:
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=(cols[None, :] < nk) & d_mask[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    return k


@triton.jit
def _load_v(v_desc, v_base, kv_row0, start_n, offs_n, offs_d, d_mask, nk, stride_vn, stride_vd,
            USE_TMA: tl.constexpr):
    if USE_TMA:
        v = v_desc.load([kv_row0 + start_n, 0])
    else:
        cols = start_n + offs_n
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(cols[:, None] < nk) & d_mask[None, :], other=0.0)
    return v


@triton.jit
def _online_softmax(qk, start_n, m_i, l_i, offs_m, offs_n, nk, q_start, causal_offset, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile's softmax step: ``(p, alpha, l_i, m_i)``; only ragged-tail / causal-diagonal tiles mask."""
    needs_mask = start_n + BLOCK_N > nk
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > q_start + causal_offset)
    if needs_mask:
        cols = start_n + offs_n
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
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _block_sparse_fwd_pipelined(
    Q, K, V, Out, Lse, BlockIndex, BlockCount, k_desc, v_desc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    qk_scale, num_heads, num_kv_heads, group_size, nq, nk, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group_size
    q_start = pid_m * BLOCK_M
    q_block = q_start // BLOCK_SIZE

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < nq) & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    count = tl.load(BlockCount + b * stride_cb + h * stride_ch + q_block * stride_cq)
    index_base = BlockIndex + b * stride_ib + h * stride_ih + q_block * stride_iq
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kv_row0 = (b * num_kv_heads + h_kv) * nk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    n_iter = count * TILES
    # Prologue: the first tile's QK^T (block 0 stands in for a row that keeps nothing; then unused).
    start_n = tl.load(index_base, mask=n_iter > 0, other=0) * BLOCK_SIZE
    k = _load_k(k_desc, k_base, kv_row0, start_n, offs_n, offs_d, d_mask, nk, stride_kn, stride_kd, USE_TMA, DOT_F32)
    qk = tl.dot(q, k)
    for t in tl.range(1, n_iter, warp_specialize=WARP_SPECIALIZE):
        next_start = tl.load(index_base + (t // TILES) * stride_ik) * BLOCK_SIZE + (t % TILES) * BLOCK_N
        k = _load_k(k_desc, k_base, kv_row0, next_start, offs_n, offs_d, d_mask, nk, stride_kn, stride_kd,
                    USE_TMA, DOT_F32)
        qk_next = tl.dot(q, k)  # asynchronous on Hopper: overlaps the softmax below
        p, alpha, l_i, m_i = _online_softmax(qk, start_n, m_i, l_i, offs_m, offs_n, nk, q_start, causal_offset,
                                             qk_scale, CAUSAL, BLOCK_N)
        v = _load_v(v_desc, v_base, kv_row0, start_n, offs_n, offs_d, d_mask, nk, stride_vn, stride_vd, USE_TMA)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        qk = qk_next
        start_n = next_start
    if n_iter > 0:  # epilogue: the last tile
        p, alpha, l_i, m_i = _online_softmax(qk, start_n, m_i, l_i, offs_m, offs_n, nk, q_start, causal_offset,
                                             qk_scale, CAUSAL, BLOCK_N)
        v = _load_v(v_desc, v_base, kv_row0, start_n, offs_n, offs_d, d_mask, nk, stride_vn, stride_vd, USE_TMA)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < nq) & d_mask[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        tl.store(Lse + pid_bh * nq + offs_m, lse, mask=offs_m < nq)
