"""The Hopper Gluon kernel's pair schedule (``pair_tiles``): each softmax step takes two kept key blocks.

Every step of the one-block schedule (``gluon.py``) pays a fixed cost besides its GEMMs and exponentials: the
stage release with its warpgroup barriers, the row-max shuffles, the rescale of the 64 x D accumulator and the
update of m and l. On the 8-bit kernels, whose GEMMs are short, that fixed part is what the tensor cores wait
for (docs/eight_bit.md). Here a ring stage holds two key blocks (K and V of both, one set of barriers), and
each consumer warpgroup issues both Q·Kᵀ, runs one online-softmax update over the 256 scores of a row, and
issues both P·V, so the fixed cost is paid once per 256 keys. An odd count's last stage pairs its block with one
past the end of K, which TMA fills with zeros and the softmax masks.

The two score tiles take 128 registers per thread, which leaves no room for the one-block schedule's
in-warpgroup overlap with a 16-bit P in registers; with an FP8 P in shared memory there is room, but ptxas moved
the wait for P·V(t - 1) above the exponentials of pair t (no overlap in the SASS) and the causal variant spilled,
so each warpgroup runs its steps in order and the other warpgroup's GEMMs fill the tensor cores meanwhile.
Shared memory holds two stages of pairs (four blocks in flight) for 8-bit K with one scale per key block
(``int8_tile_k``); the caller keeps the one-block schedule for 16-bit K and V, which do not fit twice, and for
per-token key scales.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .gluon_parts import (
    _copy_v,
    _load_q,
    _p_operand,
    _store_out,
    _tile_coords,
    _v_tile,
    out_layout,
    p_register_layout,
    score_layout,
)
from .gluon_softmax import _softmax_pair

LOG2_448 = gl.constexpr(8.807354922057604)  # log2 of e4m3's largest value


@gluon.jit
def _pair_ids(index_base, stride_ik, t, count, past_end):
    # The key-block ids of pair t; an odd count's missing partner (and pairs past the count) the block past the end.
    kb_a = gl.load(index_base + 2 * t * stride_ik, mask=2 * t < count, other=past_end)
    kb_b = gl.load(index_base + (2 * t + 1) * stride_ik, mask=2 * t + 1 < count, other=past_end)
    return kb_a, kb_b


@gluon.jit
def _loader_pairs(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
                  BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch, stride_cq,
                  num_heads, group_size, q_tiles, QLive, nk, STAGES: gl.constexpr, HAS_LIVE: gl.constexpr,
                  V_TRANSPOSED: gl.constexpr):
    count, index_base, b, h, h_kv, pid_bh, q_block = _tile_coords(
        BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
        num_heads, group_size, QLive, q_tiles, HAS_LIVE)
    _load_q(q_desc, q_smem, q_bars, b, h, q_block, q_tiles)
    past_end = gl.cdiv(nk, 128)
    for t in range((count + 1) // 2):
        s = t % STAGES
        kb_a, kb_b = _pair_ids(index_base, stride_ik, t, count, past_end)
        mbarrier.wait(empty_bars.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(k_bars.index(s), 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h_kv, kb_a * 128, 0], k_bars.index(s), k_smem.index(2 * s))
        tma.async_copy_global_to_shared(k_desc, [b, h_kv, kb_b * 128, 0], k_bars.index(s), k_smem.index(2 * s + 1))
        mbarrier.expect(v_bars.index(s), 2 * v_desc.block_type.nbytes)
        _copy_v(v_desc, b, h_kv, kb_a, v_bars.index(s), v_smem.index(2 * s), V_TRANSPOSED)
        _copy_v(v_desc, b, h_kv, kb_b, v_bars.index(s), v_smem.index(2 * s + 1), V_TRANSPOSED)


@gluon.jit
def _pair_scales(k_scales, kb_a, kb_b, past_end):
    # The two key blocks' INT8 scales (0 past the end).
    ks_a = gl.load(k_scales + kb_a, mask=kb_a < past_end, other=0.0)
    ks_b = gl.load(k_scales + kb_b, mask=kb_b < past_end, other=0.0)
    return ks_a, ks_b


@gluon.jit
def _scores_pair(q, k_smem, k_bars, t, s_layout: gl.constexpr, HEAD_DIM: gl.constexpr,
                 BLOCK_N: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr):
    # Pair t's two INT8 Q·Kᵀ tiles (int32), once its keys have landed.
    st = t % STAGES
    mbarrier.wait(k_bars.index(st), (t // STAGES) & 1)
    zeros = gl.zeros([ROWS, BLOCK_N], gl.int32, s_layout)
    s_a = warpgroup_mma(q, k_smem.index(2 * st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros, use_acc=False,
                        is_async=True)
    s_b = warpgroup_mma(q, k_smem.index(2 * st + 1).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros,
                        use_acc=False, is_async=True)
    return warpgroup_mma_wait(0, deps=[s_a, s_b])


@gluon.jit
def _pv_pair(op_a, op_b, v_smem, st, acc, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, FP8_PV: gl.constexpr):
    acc = warpgroup_mma(op_a, _v_tile(v_smem.index(2 * st), HEAD_DIM, BLOCK_N, FP8_PV), acc, is_async=True)
    return warpgroup_mma(op_b, _v_tile(v_smem.index(2 * st + 1), HEAD_DIM, BLOCK_N, FP8_PV), acc, is_async=True)


@gluon.jit
def _p_pair_to_shared(p_a, p_b, slot_a, slot_b):
    # Both e4m3 P tiles of a pair into the warpgroup's slots, then one fence and one warpgroup barrier.
    slot_a.store(p_a.to(slot_a.dtype))
    slot_b.store(p_b.to(slot_b.dtype))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _consumer_pairs(q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, Out, Lse,
                    BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch,
                    stride_cq, stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk, qk_scale,
                    causal_offset, QLive, q_tiles, QScale, KScale, VScale, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_N: gl.constexpr, CAUSAL: gl.constexpr,
                    HAS_LIVE: gl.constexpr, INT8_QK: gl.constexpr, FP8_PV: gl.constexpr, TILE_K: gl.constexpr,
                    POLY: gl.constexpr, P_SHARED: gl.constexpr, TREE: gl.constexpr):
    BLOCK_N: gl.constexpr = 128
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = score_layout(INT8_QK)
    o_layout: gl.constexpr = out_layout(HEAD_DIM, FP8_PV)
    p_layout: gl.constexpr = p_register_layout(HEAD_DIM, FP8_PV)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    gl.static_assert(INT8_QK and TILE_K, "the pair schedule takes INT8 keys with one scale per key block")

    count, index_base, b, h, h_kv, pid_bh, q_block = _tile_coords(
        BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
        num_heads, group_size, QLive, q_tiles, HAS_LIVE)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([ROWS], gl.float32, row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    q = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
    row0 = q_block * 128 + WG * ROWS
    past_end = gl.cdiv(nk, BLOCK_N)
    # A score in log2 units is the int32 one times q's scale, qk_scale and the key block's scale.
    qrows = row0 + gl.arange(0, ROWS, layout=row_layout)
    row_scale = gl.load(QScale + pid_bh * nq + qrows, mask=qrows < nq, other=0.0) * qk_scale
    k_scales = KScale + (b * (num_heads // group_size) + h_kv) * past_end
    p_shift = 0.0
    if FP8_PV:
        p_shift = LOG2_448
    live_wg = True
    if HAS_LIVE:
        live_wg = (q_block % q_tiles) * 128 + WG * ROWS < gl.load(QLive + b)
    pairs = (count + 1) // 2
    if count > 0 and not live_wg:  # release each stage once it has landed, as the one-block schedule does
        for t in range(pairs):
            mbarrier.wait(v_bars.index(t % STAGES), (t // STAGES) & 1)
            mbarrier.arrive(empty_bars.index(t % STAGES))
    if count > 0 and live_wg:
        # Block ids and key scales are loaded a pair ahead, off the path from Q·Kᵀ to the softmax.
        kb_a, kb_b = _pair_ids(index_base, stride_ik, 0, count, past_end)
        ks_a, ks_b = _pair_scales(k_scales, kb_a, kb_b, past_end)
        mbarrier.wait(q_bars.index(WG), 0)
        for t in range(pairs):
            st = t % STAGES
            next_a, next_b = _pair_ids(index_base, stride_ik, t + 1, count, past_end)
            next_ks_a, next_ks_b = _pair_scales(k_scales, next_a, next_b, past_end)
            s_a, s_b = _scores_pair(q, k_smem, k_bars, t, s_layout, HEAD_DIM, BLOCK_N, ROWS, STAGES)
            mult_a = row_scale * ks_a
            mult_b = row_scale * ks_b
            p_a, p_b, alpha, m_i, l_i = _softmax_pair(s_a, s_b, m_i, l_i, mult_a, mult_b, kb_a, kb_b, nk,
                                                      p_shift, row0, causal_offset, s_layout, BLOCK_N, ROWS,
                                                      CAUSAL or not EVEN_N, CAUSAL, POLY, TREE)
            acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
            if FP8_PV and P_SHARED:
                op_a = p_smem.index(2 * WG)
                op_b = p_smem.index(2 * WG + 1)
                _p_pair_to_shared(p_a, p_b, op_a, op_b)
            else:
                op_a = _p_operand(p_a, v_smem, p_smem, p_layout, FP8_PV, False)
                op_b = _p_operand(p_b, v_smem, p_smem, p_layout, FP8_PV, False)
            mbarrier.wait(v_bars.index(st), (t // STAGES) & 1)
            acc = _pv_pair(op_a, op_b, v_smem, st, acc, HEAD_DIM, BLOCK_N, FP8_PV)
            if FP8_PV:  # the wait takes no 8-bit deps; a register P gets a use after it
                acc = warpgroup_mma_wait(0, deps=[acc])
                if not P_SHARED:
                    gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [op_a], dtype=gl.int8, is_pure=False,
                                              pack=4)
                    gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [op_b], dtype=gl.int8, is_pure=False,
                                              pack=4)
            else:
                acc, op_a, op_b = warpgroup_mma_wait(0, deps=[acc, op_a, op_b])
            mbarrier.arrive(empty_bars.index(st))
            kb_a, kb_b, ks_a, ks_b = next_a, next_b, next_ks_a, next_ks_b

    _store_out(acc, m_i, l_i, p_shift, Out, Lse, VScale, b, h, h_kv, pid_bh, row0, nq, num_heads // group_size,
               stride_ob, stride_oh, stride_on, o_layout, row_layout, HEAD_DIM, ROWS, FP8_PV, WRITE_LSE)
