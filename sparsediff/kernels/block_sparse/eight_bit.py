"""8-bit block-sparse attention: Q·Kᵀ in INT8 (per-query, per-key-block scales), P·V in 16-bit or FP8, fp32 acc.

The SageAttention recipe on our block-sparse walk:

* key smoothing: ``k - mean(k)`` over a head's keys. Every score of a query row moves by the same
  ``q·mean(k)``, which the softmax ignores, and the keys' shared offset (often most of their magnitude) no
  longer eats the 8-bit range. The LSE is corrected by ``scale · q·mean(k)`` after the kernel;
* Q and K in INT8 with one float32 scale per query and one per key block (``x8 = round(x / s)``, ``s = amax /
  127``): ``qk = dot(q8, k8) · s_q[:, None] · s_k``; online softmax in float32 as the 16-bit kernel. One key
  scale per block is what lets the Gluon kernel run its softmax on the int32 scores (1.2-1.3x faster there);
  ``k_rows=1`` keeps one per key;
* P·V: in the inputs' 16-bit dtype (``precision="int8"``), or in FP8 e4m3 (``"int8_fp8"``): ``p8 = p · 448``
  (P lies in [0, 1]; 448 is e4m3's largest value), V with one scale per channel over all keys, which factors
  out of the sum over keys: ``acc = dot(p8, v8, acc · alpha)`` in the loop, ``· s_v[d] / 448`` once at the end
  (as exact as per-tile scales on real layers: ``docs/results/fp8_value_scales/``).

Measured on SmolLM2's real q/k/v (4 layers, causal, 1,024 tokens): INT8 Q·Kᵀ per token with 16-bit P·V keeps
the output cosine similarity at 0.9996-1.0000 (relative L2 0.6-2.9 %); with FP8 P·V at 0.9990-0.9999
(2-4.5 %); FP8 e4m3 for Q·Kᵀ (measured while building this kernel) lost more on the layers with outlier
channels (down to 0.9957), so it is not offered. Per-tile scales for both q and k lost more as well; per-block
key scales alone (queries per token) raise the relative L2 error 1.03-1.33x over per-token keys on SmolLM2's
q/k/v (cosine still >= 0.9998), for the speed above. The quantization is one Triton pass over each of q, k, v
before the kernel (``quantize.py``). The Triton interpreter computes INT8 and FP8 dots, so the CPU tests run this
kernel itself. Not supported: ``repeat_q``, ``live_rows``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import interpreted
from .quantize import FP8, quantize, quantize_qk, round_to_e4m3
from .triton import LOG2E, _launch_config, online_softmax_step, program_coords, store_output


@triton.jit
def _block_sparse_fwd_8bit(
    Q, K, V, QScale, KScale, VScale, Out, Lse, BlockIndex, BlockCount,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    qk_scale, num_heads, num_kv_heads, group_size, nq, nk, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr,
    PV_8BIT: tl.constexpr, ROUND_FP8: tl.constexpr, K_ROWS: tl.constexpr,
):
    b, h, h_kv, q_start, q_block = program_coords(num_heads, group_size, BLOCK_M, BLOCK_SIZE)
    pid_bh = tl.program_id(1)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < nq) & d_mask[None, :], other=0.0)
    # One scale per query row and per key (per-token INT8).
    q_scale = tl.load(QScale + pid_bh * nq + offs_m, mask=offs_m < nq, other=0.0)[:, None] * qk_scale

    count = tl.load(BlockCount + b * stride_cb + h * stride_ch + q_block * stride_cq)
    index_base = BlockIndex + b * stride_ib + h * stride_ih + q_block * stride_iq
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    k_scales = KScale + (b * num_kv_heads + h_kv) * tl.cdiv(nk, K_ROWS)  # one scale per K_ROWS keys

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for t in tl.range(0, count * TILES):
        kv_block = tl.load(index_base + (t // TILES) * stride_ik)
        start_n = kv_block * BLOCK_SIZE + (t % TILES) * BLOCK_N
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=(cols[None, :] < nk) & d_mask[:, None], other=0.0)
        if K_ROWS % BLOCK_N == 0:  # one key scale for the whole tile: a per-row multiplier, no outer product
            qk = tl.dot(q, k).to(tl.float32) * (q_scale * tl.load(k_scales + start_n // K_ROWS))
        else:
            k_scale = tl.load(k_scales + cols // K_ROWS, mask=cols < nk, other=0.0)[None, :]
            qk = tl.dot(q, k).to(tl.float32) * (q_scale * k_scale)  # already in log2 units: softmax scale 1
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i, cols, offs_m, start_n, q_start, nk, causal_offset,
                                                   1.0, BLOCK_N, CAUSAL)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(cols[:, None] < nk) & d_mask[None, :], other=0.0)
        if PV_8BIT:  # P in e4m3 scaled by 448; V's per-channel scales come after the loop
            p8 = p * 448.0
            if ROUND_FP8:  # under the interpreter only: its own e4m3 cast rounds wrongly (quantize.py)
                p8 = round_to_e4m3(p8)
            acc = tl.dot(p8.to(v.dtype), v, acc * alpha[:, None], out_dtype=tl.float32)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if PV_8BIT:
        v_scale = tl.load(VScale + (b * num_kv_heads + h_kv) * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        acc = acc * (v_scale / 448.0)[None, :]
    store_output(acc, m_i, l_i, Out + b * stride_ob + h * stride_oh, Lse + pid_bh * nq, offs_m, offs_d, d_mask, nq,
                 stride_on, stride_od, WRITE_LSE)


def block_sparse_attention_8bit(q, k, v, block_index, block_count, *, scale, causal, block_size, return_lse,
                               config=None, pv_8bit=False, k_rows=None):
    """The 8-bit kernel on bf16/fp16/fp32 q, k, v (see the module docstring); returns ``(out, lse or None)`` with
    ``out`` in q's dtype and the LSE of the unsmoothed scores. ``pv_8bit``: P·V in FP8. ``k_rows``: keys per
    INT8 key scale (None: one per key block, as the Gluon kernel; 1: per token)."""
    k_rows = block_size if k_rows is None else k_rows
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = config or _launch_config(d, block_size, causal)
    if block_size % bm or block_size % bn:
        raise ValueError(f"block_size {block_size} must be a multiple of the tile sizes ({bm}, {bn})")
    q8, q_scale, k8, k_scale, shift = quantize_qk(q, k, return_lse, k_rows=k_rows)
    if pv_8bit:
        v8, v_scale, _ = quantize(v, bn, FP8, per_channel=True)
    else:  # 16-bit P·V, no V scales; the interpreter computes bf16 dots on raw bits, so float32 there
        v8 = v.float() if not v.is_cuda else (v if v.dtype in (torch.float16, torch.bfloat16) else v.bfloat16())
        v_scale = k_scale.new_ones(1, 1, 1)
    out = torch.empty_like(q)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device)
    si = [0 if block_index.shape[i] == 1 else block_index.stride(i) for i in range(2)]
    sc = [0 if block_count.shape[i] == 1 else block_count.stride(i) for i in range(2)]
    grid = (math.ceil(nq / bm), bsz * hq)
    _block_sparse_fwd_8bit[grid](
        q8, k8, v8, q_scale, k_scale, v_scale, out, lse, block_index, block_count,
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(),
        si[0], si[1], block_index.stride(2), block_index.stride(3),
        sc[0], sc[1], block_count.stride(2),
        scale * LOG2E, hq, hkv, hq // hkv, nq, nk, nk - nq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=causal, WRITE_LSE=return_lse, PV_8BIT=pv_8bit, ROUND_FP8=interpreted(), K_ROWS=k_rows,
        num_warps=warps,
        num_stages=stages,
    )
    if not return_lse:
        return out, None
    # Undo the smoothing in the LSE: every score of a row was lowered by scale * q·mean(k).
    return out, lse + scale * shift
