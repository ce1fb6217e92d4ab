"""Hopper (sm_90) block-sparse attention forward in Gluon: warp-specialized, FlashAttention-3 schedule.

The Triton kernel (``block_sparse_triton.py``) runs each tile's softmax on the CUDA cores between its two
tensor-core GEMMs, so the tensor cores idle for that time. Here a CTA owns one 128-row query block and
splits the work three ways:

* a one-warp **loader** walks the kept key-block ids and streams K and V tiles into a ring of shared
  memory stages through TMA (separate K and V barriers, so QK^T starts before V lands);
* two **consumer warpgroups**, 64 query rows each, run the online softmax. Each overlaps its own work
  (``OVERLAP``): QK^T of tile j and PV of tile j-1 are issued together and the softmax of tile j runs
  while PV(j-1) is on the tensor cores;
* with ``PINGPONG`` (off by default: +2 % dense, -3 % at half density on an H100) the two consumers
  take turns to issue their GEMMs (an mbarrier per warpgroup), so one warpgroup's softmax runs while the
  other's GEMMs occupy the tensor cores.

Scope: head dim 64 or 128, ``block_size`` 128, fp16/bf16, sm_90; causal masking (end-aligned, as in
the Triton kernel) only on the tiles that need it. The public entry point falls back to the Triton
kernel elsewhere. Same outputs as the Triton kernel: natural-log LSE, rows with no kept key give zeros
and ``-inf``. There is no CPU interpreter for Gluon: CI compiles the kernel for sm_90a on the CPU and
checks registers and shared memory; its numerics are tested on the GPU (``SPARSEDIFF_TEST_DEVICE=cuda``).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_pairs import _consumer_pairs, _loader_pairs
from .gluon_parts import (
    _copy_v,
    _load_q,
    _p_operand,
    _store_out,
    _tile_coords,
    _v_tile,
    _wait_pv,
    out_layout,
    p_register_layout,
    score_layout,
)
from .gluon_softmax import _dequantize, _softmax_step, _softmax_step_int8

LOG2E = 1.4426950408889634
LOG2_448 = gl.constexpr(8.807354922057604)  # log2 of e4m3's largest value
BLOCK_SIZE = 128  # key block = tile width; a CTA covers one query block of the same size
ROWS_PER_WARPGROUP = 64
# Measured on H100 over 4 runs (docs/benchmarks.md): 3 K/V stages, in-warpgroup overlap on, 240 registers
# per consumer warpgroup (the loader keeps 24). Ping-pong gained ~2 % at density 1 but lost ~3 % at 0.5,
# where sparse attention runs, so it is off by default.
# int8_tile_k: INT8 keys with one scale per 128-key block, and the softmax on the int32 scores
# (``_softmax_step_int8``); False: per-token key scales, scores converted and scaled per element.
# prefetch_ids: the consumers load the kept block ids (and INT8 key scales) an iteration or two ahead instead
# of on the softmax's critical path (False: the old dependent loads, for A/B).
# fp8_p_shared: FP8 P·V takes P through a shared-memory tile; False: in registers after byte permutes (0.89x the
# shared path's speed on an H100, 2026-12-07).
# tree_reduce: the row max and row sum as shallow trees instead of 33-deep chains of dependent ops
# (``gluon_softmax._row_reduce``): within noise on an H200 (2026-12-07, -1 to +2 %), so off.
# pair_tiles: each softmax step takes two kept key blocks (gluon_pairs.py), which halves the per-step fixed
# cost (stage release and its barriers, row reductions, rescale); the 8-bit kernels with per-block key scales
# only (others keep one block per step), ``stages`` then counts pairs (default 2), no ping-pong and no
# in-warpgroup overlap. None (default): pairs where P·V is FP8 through shared memory (``int8_fp8``: 1.04x the
# one-block schedule on an H200, 2026-12-07), not for ``int8``, whose one-block overlap is worth more (0.93x).
# exp2_poly: of every 4 exponentials of P, this many run as a cubic polynomial on the FMA units instead of the
# MUFU (FlashAttention-4's trick), 0-2; no gain on an H100, where the MUFU is not the limit.
PAIR_STAGES = 2  # stages of two key blocks each: four in flight, what shared memory holds for 8-bit K
DEFAULT_SCHEDULE = dict(stages=3, pingpong=False, overlap=True, consumer_regs=240, loader_regs=24, int8_tile_k=True,
                        prefetch_ids=True, exp2_poly=0, fp8_p_shared=True, tree_reduce=False,
                        pair_tiles=None)


@gluon.jit
def _loader(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
            BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch, stride_cq,
            num_heads, group_size, q_tiles, QLive, STAGES: gl.constexpr, HAS_LIVE: gl.constexpr,
            V_TRANSPOSED: gl.constexpr):
    count, index_base, b, h, h_kv, pid_bh, q_block = _tile_coords(
        BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
        num_heads, group_size, QLive, q_tiles, HAS_LIVE)
    # 4-D descriptors over (B, H, N, D): any strides, and rows past N are zero-filled, never another head's.
    _load_q(q_desc, q_smem, q_bars, b, h, q_block, q_tiles)
    for t in range(count):
        s = t % STAGES
        phase = (t // STAGES) & 1
        kb = gl.load(index_base + t * stride_ik)
        # A stage is free once both consumers finished PV on it (mbarriers start as if phase 1 completed).
        mbarrier.wait(empty_bars.index(s), phase ^ 1)
        mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h_kv, kb * 128, 0], k_bars.index(s), k_smem.index(s))
        mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
        _copy_v(v_desc, b, h_kv, kb, v_bars.index(s), v_smem.index(s), V_TRANSPOSED)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars, Out, Lse,
              BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch, stride_cq,
              stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk, qk_scale, causal_offset, QLive,
              q_tiles, QScale, KScale, VScale, WG: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              PINGPONG: gl.constexpr, OVERLAP: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_N: gl.constexpr,
              CAUSAL: gl.constexpr, HAS_LIVE: gl.constexpr, INT8_QK: gl.constexpr, FP8_PV: gl.constexpr,
              TILE_K: gl.constexpr, PREFETCH: gl.constexpr, POLY: gl.constexpr, P_SHARED: gl.constexpr,
              TREE: gl.constexpr):
    BLOCK_N: gl.constexpr = 128
    ROWS: gl.constexpr = 64
    NEED_IDS: gl.constexpr = CAUSAL or (not EVEN_N) or INT8_QK  # the softmax reads the tile's key-block id
    s_layout: gl.constexpr = score_layout(INT8_QK)
    o_layout: gl.constexpr = out_layout(HEAD_DIM, FP8_PV)
    p_layout: gl.constexpr = p_register_layout(HEAD_DIM, FP8_PV)
    if INT8_QK:
        S_DTYPE: gl.constexpr = gl.int32
    else:
        S_DTYPE: gl.constexpr = gl.float32
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    count, index_base, b, h, h_kv, pid_bh, q_block = _tile_coords(
        BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
        num_heads, group_size, QLive, q_tiles, HAS_LIVE)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([ROWS], gl.float32, row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    q = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
    row0 = q_block * 128 + WG * ROWS
    if INT8_QK:  # q's per-token scales once; k's per token (a vector per tile) or per key block (a scalar)
        qrows = row0 + gl.arange(0, ROWS, layout=row_layout)
        row_scale = gl.load(QScale + pid_bh * nq + qrows, mask=qrows < nq, other=0.0) * qk_scale
        if TILE_K:
            k_scales = KScale + (b * (num_heads // group_size) + h_kv) * gl.cdiv(nk, BLOCK_N)
        else:
            k_scales = KScale + (b * (num_heads // group_size) + h_kv) * nk
        soft_scale = 1.0
    else:
        soft_scale = qk_scale
    # FP8 P·V: P scaled to [0, 448] (e4m3's range) through the exponent; l carries the same factor.
    p_shift = 0.0
    if FP8_PV:
        p_shift = LOG2_448
    turn = 0
    if PINGPONG:
        if WG == 1:
            mbarrier.arrive(turn_bars.index(0))  # warpgroup 0 issues first
    # With live_rows, a warpgroup whose 64 rows of q are all past the live ones skips its GEMMs and softmax:
    # it only releases each stage once the tile has landed (the loader's ring needs both arrivals in order)
    # and writes zeros / -inf. Not with ping-pong, whose turns need both warpgroups to issue.
    live_wg = True
    if HAS_LIVE and not PINGPONG:
        live_wg = (q_block % q_tiles) * 128 + WG * ROWS < gl.load(QLive + b)
    if count > 0 and not live_wg:
        for t in range(count):
            mbarrier.wait(v_bars.index(t % STAGES), (t // STAGES) & 1)
            mbarrier.arrive(empty_bars.index(t % STAGES))
    if count > 0 and live_wg:
        # The block ids (masking, INT8 key scales) are loaded ahead: ids two iterations, key scales one, so no
        # global load's latency sits between a tile's Q·Kᵀ and its softmax (PREFETCH=False: loaded in place).
        kb = gl.load(index_base)
        kb_next = kb
        kb_after = kb
        ks_next = 0.0
        if PREFETCH and NEED_IDS:
            kb_next = gl.load(index_base + stride_ik, mask=count > 1, other=0)
            kb_after = gl.load(index_base + 2 * stride_ik, mask=count > 2, other=0)
            if INT8_QK and TILE_K:
                ks_next = gl.load(k_scales + kb_next)
        mbarrier.wait(q_bars.index(WG), 0)
        # Tile 0: QK^T alone.
        mbarrier.wait(k_bars.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(WG), turn)
        s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], S_DTYPE, s_layout), use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - WG))
        turn ^= 1
        s = warpgroup_mma_wait(0, deps=[s_tok])
        if INT8_QK and TILE_K:
            mult = row_scale * gl.load(k_scales + kb)
            p, alpha, m_i, l_i = _softmax_step_int8(s, m_i, l_i, mult, kb, nk, p_shift, row0, causal_offset,
                                                    s_layout, BLOCK_N, ROWS, EVEN_N, CAUSAL, POLY, TREE)
        else:
            if INT8_QK:
                s = _dequantize(s, row_scale, k_scales, kb, nk, s_layout, BLOCK_N)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kb, nk, soft_scale, p_shift, row0, causal_offset,
                                               s_layout, BLOCK_N, ROWS, EVEN_N, CAUSAL, POLY, TREE)
        p_op = _p_operand(p, v_smem, p_smem.index(WG), p_layout, FP8_PV, P_SHARED)
        for j in range(1, count):
            st = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(st), (j // STAGES) & 1)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), turn)
            s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                                  gl.zeros([ROWS, BLOCK_N], S_DTYPE, s_layout), use_acc=False, is_async=True)
            if not OVERLAP:
                s = warpgroup_mma_wait(0, deps=[s_tok])
            acc_tok = warpgroup_mma(p_op, _v_tile(v_smem.index(prev), HEAD_DIM, BLOCK_N, FP8_PV), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG))
            turn ^= 1
            if PREFETCH and NEED_IDS:  # this tile's id and key scale came an iteration ago; fetch the next ones now
                kb = kb_next
                ks = ks_next
                if INT8_QK and TILE_K:
                    ks_next = gl.load(k_scales + kb_after)
                kb_next = kb_after
                kb_after = gl.load(index_base + (j + 2) * stride_ik, mask=j + 2 < count, other=0)
            else:
                kb = gl.load(index_base + j * stride_ik)
                ks = 0.0
                if INT8_QK and TILE_K:
                    ks = gl.load(k_scales + kb)
            if INT8_QK and TILE_K:
                mult = row_scale * ks
            if OVERLAP:
                s = warpgroup_mma_wait(1, deps=[s_tok])  # QK^T(j) done; PV(j-1) may still run
            if INT8_QK and TILE_K:
                p, alpha, m_i, l_i = _softmax_step_int8(s, m_i, l_i, mult, kb, nk, p_shift, row0, causal_offset,
                                                        s_layout, BLOCK_N, ROWS, EVEN_N, CAUSAL, POLY, TREE)
            else:
                if INT8_QK:
                    s = _dequantize(s, row_scale, k_scales, kb, nk, s_layout, BLOCK_N)
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kb, nk, soft_scale, p_shift, row0, causal_offset,
                                                   s_layout, BLOCK_N, ROWS, EVEN_N, CAUSAL, POLY, TREE)
            acc = _wait_pv(acc_tok, p_op, FP8_PV, P_SHARED)
            mbarrier.arrive(empty_bars.index(prev))
            acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
            p_op = _p_operand(p, v_smem, p_smem.index(WG), p_layout, FP8_PV, P_SHARED)
        last = (count - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((count - 1) // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(WG), turn)
        acc_tok = warpgroup_mma(p_op, _v_tile(v_smem.index(last), HEAD_DIM, BLOCK_N, FP8_PV), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - WG))
        acc = _wait_pv(acc_tok, p_op, FP8_PV, P_SHARED)
        mbarrier.arrive(empty_bars.index(last))

    _store_out(acc, m_i, l_i, p_shift, Out, Lse, VScale, b, h, h_kv, pid_bh, row0, nq, num_heads // group_size,
               stride_ob, stride_oh, stride_on, o_layout, row_layout, HEAD_DIM, ROWS, FP8_PV, WRITE_LSE)


@gluon.jit
def _block_sparse_fwd_gluon(q_desc, k_desc, v_desc, Out, Lse, BlockIndex, BlockCount,
                            stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch, stride_cq,
                            stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk, qk_scale,
                            causal_offset, q_tiles, QLive, QScale, KScale, VScale, HEAD_DIM: gl.constexpr,
                            STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                            OVERLAP: gl.constexpr, WRITE_LSE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                            LOADER_REGS: gl.constexpr, EVEN_N: gl.constexpr, CAUSAL: gl.constexpr,
                            HAS_LIVE: gl.constexpr, INT8_QK: gl.constexpr, FP8_PV: gl.constexpr,
                            TILE_K: gl.constexpr, PREFETCH: gl.constexpr, POLY: gl.constexpr,
                            P_SHARED: gl.constexpr, TREE: gl.constexpr, PAIR: gl.constexpr):
    # q and k in the inputs' 16-bit dtype, or INT8 (INT8_QK, per-token scales in QScale, KScale per token or, with
    # TILE_K, per 128-key block); v 16-bit, or
    # e4m3 stored (B, H, D, N) (FP8_PV, per-channel scales in VScale).
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    # PAIR (gluon_pairs.py): a stage holds two key blocks, in slots 2s and 2s + 1, and P two tiles per warpgroup
    SLOTS: gl.constexpr = 2 if PAIR else 1
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [SLOTS * STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [SLOTS * STAGES] + v_desc.block_type.shape, v_desc.layout)
    if FP8_PV and P_SHARED:  # one e4m3 P tile per consumer warpgroup (and key block of a pair)
        p_smem = gl.allocate_shared_memory(v_desc.dtype, [2 * SLOTS, 64, 128],
                                           gl.NVMMASharedLayout.get_default_for([64, 128], v_desc.dtype))
    else:
        p_smem = q_smem  # unused
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)  # both consumer warpgroups release a stage

    # Argument tuples are spelled out: constexprs inside concatenated tuples lose their constexpr-ness.
    if PAIR:
        gl.warp_specialize([
            (_consumer_pairs, (q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, Out, Lse,
                               BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb,
                               stride_ch, stride_cq, stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk,
                               qk_scale, causal_offset, QLive, q_tiles, QScale, KScale, VScale, 0, HEAD_DIM, STAGES,
                               WRITE_LSE, EVEN_N, CAUSAL, HAS_LIVE, INT8_QK, FP8_PV, TILE_K, POLY, P_SHARED, TREE)),
            (_consumer_pairs, (q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, Out, Lse,
                               BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb,
                               stride_ch, stride_cq, stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk,
                               qk_scale, causal_offset, QLive, q_tiles, QScale, KScale, VScale, 1, HEAD_DIM, STAGES,
                               WRITE_LSE, EVEN_N, CAUSAL, HAS_LIVE, INT8_QK, FP8_PV, TILE_K, POLY, P_SHARED, TREE)),
            (_loader_pairs, (k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
                             BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch,
                             stride_cq, num_heads, group_size, q_tiles, QLive, nk, STAGES, HAS_LIVE, FP8_PV)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars, Out, Lse,
                         BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch,
                         stride_cq, stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk, qk_scale,
                         causal_offset, QLive, q_tiles, QScale, KScale, VScale, 0, HEAD_DIM, STAGES, PINGPONG, OVERLAP,
                         WRITE_LSE, EVEN_N, CAUSAL, HAS_LIVE, INT8_QK, FP8_PV, TILE_K, PREFETCH, POLY, P_SHARED,
                         TREE)),
            (_consumer, (q_smem, k_smem, v_smem, p_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars, Out, Lse,
                         BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch,
                         stride_cq, stride_ob, stride_oh, stride_on, num_heads, group_size, nq, nk, qk_scale,
                         causal_offset, QLive, q_tiles, QScale, KScale, VScale, 1, HEAD_DIM, STAGES, PINGPONG, OVERLAP,
                         WRITE_LSE, EVEN_N, CAUSAL, HAS_LIVE, INT8_QK, FP8_PV, TILE_K, PREFETCH, POLY, P_SHARED,
                         TREE)),
            (_loader, (k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars, BlockCount,
                       BlockIndex, stride_ib, stride_ih, stride_iq, stride_ik, stride_cb, stride_ch, stride_cq,
                       num_heads, group_size, q_tiles, QLive, STAGES, HAS_LIVE, FP8_PV)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def gluon_support_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int) -> str | None:
    """None where this kernel applies, else what it supports (the caller uses the Triton kernel)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"needs an sm_90 GPU (H100/H200), got {q.device}"
    if block_size != BLOCK_SIZE:
        return f"supports block_size {BLOCK_SIZE} only, got {block_size}"
    if q.shape[-1] not in (64, 128):
        return f"supports head dims 64 and 128, got {q.shape[-1]}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"supports float16 and bfloat16, got {q.dtype}"
    return None


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int8: gl.int8,
              torch.float8_e4m3fn: gl.float8e4nv}


@cache
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _GL_DTYPES[dtype])


def _tma_ready(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, unit last stride and 16-byte multiples elsewhere."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def kernel_maxnreg(schedule: dict) -> int:
    """Registers per thread for the whole CTA: 3 warpgroups share the register file, and the default
    partition (consumer 0) gets what the workers leave."""
    return (2 * schedule["consumer_regs"] + schedule["loader_regs"]) // 3 // 8 * 8


def block_sparse_attention_gluon(q, k, v, block_index, block_count, *, scale, return_lse, causal=False, repeat_q=1,
                                 live_rows=None, **schedule):
    """Same contract as ``block_sparse_attention_triton`` (``repeat_q``: Nq a multiple of 128); ``schedule`` overrides
    ``DEFAULT_SCHEDULE`` keys (stages, pingpong, overlap, consumer_regs, loader_regs) for ablations. ``live_rows``:
    int32 ``(B,)``, rows of q from ``live_rows[b]`` on (before ``repeat_q``) are skipped by 64-row warpgroup and
    get zeros and ``-inf``."""
    return _launch(q, k, v, block_index, block_count, scale=scale, return_lse=return_lse, causal=causal,
                   repeat_q=repeat_q, live_rows=live_rows, **schedule)


def block_sparse_attention_gluon_int8(q, k, v, block_index, block_count, *, scale, return_lse, causal=False,
                                      pv_fp8=False, **schedule):
    """``precision="int8"`` on Hopper: Q·Kᵀ in INT8 (per-token scales, keys smoothed by their mean, as
    ``eight_bit.py``), P·V in v's 16-bit dtype, or with ``pv_fp8`` (``"int8_fp8"``) in e4m3 with per-channel
    V scales, on this kernel's schedule. Returns ``(out, lse or None)``, the LSE of the unsmoothed scores."""
    from .quantize import FP8, quantize, quantize_qk

    tile_k = {**DEFAULT_SCHEDULE, **schedule}["int8_tile_k"]
    q8, q_scale, k8, k_scale, shift = quantize_qk(q, k, return_lse, k_rows=BLOCK_SIZE if tile_k else 1)
    v_scale = None
    if pv_fp8:
        v, v_scale, _ = quantize(v, BLOCK_SIZE, FP8, per_channel=True, transpose=True)
    out, lse = _launch(q8, k8, v, block_index, block_count, scale=scale, return_lse=return_lse, causal=causal,
                       scales=(q_scale, k_scale, v_scale), out_dtype=q.dtype, **schedule)
    return out, (lse + scale * shift if return_lse else None)


def resolve_schedule(schedule: dict, *, eight_bit: bool, fp8_pv: bool) -> dict:
    """``DEFAULT_SCHEDULE`` with the caller's overrides, and ``pair_tiles`` decided: None picks the measured
    choice (pairs where P·V is FP8 through shared memory), and pairs apply only to 8-bit K with one scale per
    key block, where ``stages`` counts pairs."""
    unknown = set(schedule) - set(DEFAULT_SCHEDULE)
    if unknown:
        raise ValueError(f"unknown schedule options {sorted(unknown)}; known: {sorted(DEFAULT_SCHEDULE)}")
    cfg = {**DEFAULT_SCHEDULE, **schedule}
    if cfg["pair_tiles"] is None:  # ping-pong needs one block per step
        cfg["pair_tiles"] = fp8_pv and cfg["fp8_p_shared"] and not cfg["pingpong"]
    # 16-bit pairs don't fit twice in shared memory; per-token key scales keep the one-block schedule. Asked for
    # by the caller there, pairs are an error; from a global default they simply don't apply.
    eligible = eight_bit and cfg["int8_tile_k"]
    if schedule.get("pair_tiles") and not eligible:
        raise ValueError("pair_tiles needs an 8-bit precision (int8 or int8_fp8) with one key scale per block "
                         "(int8_tile_k=True)")
    cfg["pair_tiles"] = bool(cfg["pair_tiles"]) and eligible
    if cfg["pair_tiles"]:
        if cfg["pingpong"]:
            raise ValueError("pair_tiles runs without ping-pong; pass pingpong=False or pair_tiles=False")
        cfg["stages"] = schedule.get("stages", PAIR_STAGES)
    return cfg


def _launch(q, k, v, block_index, block_count, *, scale, return_lse, causal=False, repeat_q=1, live_rows=None,
            scales=None, out_dtype=None, **schedule):
    fp8_pv = scales is not None and scales[2] is not None  # v is then e4m3, (B, H, D, N)
    cfg = resolve_schedule(schedule, eight_bit=scales is not None, fp8_pv=fp8_pv)
    q, k, v = (t if _tma_ready(t) else t.contiguous() for t in (q, k, v))
    bsz, hq, q_rows, d = q.shape
    nq = q_rows * repeat_q
    hkv, nk = k.shape[1], k.shape[2]
    q_block, kv_block = [1, 1, ROWS_PER_WARPGROUP, d], [1, 1, BLOCK_SIZE, d]
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), q_block, _smem_layout(ROWS_PER_WARPGROUP, d, q.dtype))
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), kv_block, _smem_layout(BLOCK_SIZE, d, k.dtype))
    v_block = [1, 1, d, BLOCK_SIZE] if fp8_pv else kv_block
    v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), v_block, _smem_layout(*v_block[2:], v.dtype))
    out = q.new_empty(bsz, hq, nq, d, dtype=out_dtype or q.dtype)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device) if return_lse else out
    si = [0 if block_index.shape[i] == 1 else block_index.stride(i) for i in range(2)]
    sc = [0 if block_count.shape[i] == 1 else block_count.stride(i) for i in range(2)]
    q_scale, k_scale, v_scale = scales if scales is not None else (lse, lse, None)  # unused without INT8_QK
    v_scale = lse if v_scale is None else v_scale
    grid = (triton.cdiv(nq, BLOCK_SIZE), bsz * hq)
    _block_sparse_fwd_gluon[grid](
        q_desc, k_desc, v_desc, out, lse, block_index, block_count,
        si[0], si[1], block_index.stride(2), block_index.stride(3), sc[0], sc[1], block_count.stride(2),
        out.stride(0), out.stride(1), out.stride(2), hq, hq // hkv, nq, nk, scale * LOG2E, nk - nq,
        triton.cdiv(q_rows, BLOCK_SIZE), block_count if live_rows is None else live_rows, q_scale, k_scale, v_scale,
        HEAD_DIM=d, STAGES=cfg["stages"], PINGPONG=cfg["pingpong"], OVERLAP=cfg["overlap"], WRITE_LSE=return_lse,
        CONSUMER_REGS=cfg["consumer_regs"], LOADER_REGS=cfg["loader_regs"], EVEN_N=nk % BLOCK_SIZE == 0,
        CAUSAL=causal, HAS_LIVE=live_rows is not None, INT8_QK=scales is not None, FP8_PV=fp8_pv,
        TILE_K=cfg["int8_tile_k"], PREFETCH=cfg["prefetch_ids"], POLY=cfg["exp2_poly"],
        P_SHARED=cfg["fp8_p_shared"], TREE=cfg["tree_reduce"], PAIR=cfg["pair_tiles"], num_warps=4,
        maxnreg=kernel_maxnreg(cfg),
    )
    return out, (lse if return_lse else None)
