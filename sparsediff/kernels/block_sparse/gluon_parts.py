"""Device helpers the Hopper Gluon kernel's two consumer schedules share (``gluon.py``: one key block per
softmax step; ``gluon_pairs.py``: two): the CTA's coordinates, the loader's copies of Q and V and the P·V operands.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma_wait


@gluon.constexpr_function
def score_layout(int8_qk):
    # The Q·Kᵀ accumulator of a 64 x 128 tile: 8-bit wgmma takes K = 32 per instruction (int32), 16-bit K = 16.
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32 if int8_qk else 16])


@gluon.constexpr_function
def out_layout(head_dim, fp8_pv):
    # The P·V accumulator; 8-bit P·V wgmma takes K = 32 per instruction.
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, head_dim, 32 if fp8_pv else 16])


@gluon.constexpr_function
def p_register_layout(head_dim, fp8_pv):
    # P as P·V's A operand in registers: four 8-bit or two 16-bit values per register.
    return gl.DotOperandLayout(operand_index=0, parent=out_layout(head_dim, fp8_pv), k_width=4 if fp8_pv else 2)


@gluon.jit
def _tile_coords(BlockCount, BlockIndex, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, stride_cq,
                 num_heads, group_size, QLive, q_tiles, HAS_LIVE: gl.constexpr):
    q_block = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    count = gl.load(BlockCount + b * stride_cb + h * stride_ch + q_block * stride_cq)
    if HAS_LIVE:  # a query block past the live rows keeps nothing: no loads, zeros and -inf
        if (q_block % q_tiles) * 128 >= gl.load(QLive + b):
            count = 0
    index_base = BlockIndex + b * stride_ib + h * stride_ih + q_block * stride_iq
    return count, index_base, b, h, h // group_size, pid_bh, q_block


@gluon.jit
def _load_q(q_desc, q_smem, q_bars, b, h, q_block, q_tiles):
    # Both warpgroups' 64 rows of the query block. q holds q_tiles query blocks; output block i reads block
    # i % q_tiles (repeat_q: no copy of q). 4-D descriptors over (B, H, N, D): rows past N are zero-filled.
    for w in gl.static_range(2):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, (q_block % q_tiles) * 128 + w * 64, 0], q_bars.index(w),
                                        q_smem.index(w))


@gluon.jit
def _copy_v(v_desc, b, h_kv, kblock, bar, slot, V_TRANSPOSED: gl.constexpr):
    # One key block's V tile into its slot (the caller set the barrier's expected bytes).
    if V_TRANSPOSED:  # FP8 V is stored (B, H, D, N): the tile is D x 128 keys
        tma.async_copy_global_to_shared(v_desc, [b, h_kv, 0, kblock * 128], bar, slot)
    else:
        tma.async_copy_global_to_shared(v_desc, [b, h_kv, kblock * 128, 0], bar, slot)


@gluon.jit
def _p_operand(p, v_smem, p_slot, p_layout: gl.constexpr, FP8_PV: gl.constexpr, P_SHARED: gl.constexpr):
    # P as the A operand of the P·V wgmma: in registers (16-bit, or e4m3 after byte permutes), or in e4m3
    # through this warpgroup's shared slot (P_SHARED). FP8 P is already scaled to [0, 448] by the exponent.
    if FP8_PV and P_SHARED:
        p_slot.store(p.to(v_smem.dtype))
        fence_async_shared()
        gl.thread_barrier()  # the warpgroup's four warps have written their rows
        op = p_slot
    else:
        op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    return op


@gluon.jit
def _wait_pv(acc_tok, p_op, FP8_PV: gl.constexpr, P_SHARED: gl.constexpr):
    # Wait for P·V; a register P stays alive until then (deps). The wait takes no 8-bit deps, so an FP8 P in
    # registers gets a use after it instead; a shared one needs nothing.
    if FP8_PV:
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        if not P_SHARED:
            gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [p_op], dtype=gl.int8, is_pure=False, pack=4)
    else:
        acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
    return acc


@gluon.jit
def _v_tile(v_slot, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, FP8_PV: gl.constexpr):
    # The (BLOCK_N, HEAD_DIM) B operand: a transposed view of a keys-contiguous FP8 tile (8-bit wgmma needs
    # K-major B), or the 16-bit tile as stored.
    if FP8_PV:
        tile = v_slot.reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
    else:
        tile = v_slot.reshape([BLOCK_N, HEAD_DIM])
    return tile


@gluon.jit
def _store_out(acc, m_i, l_i, p_shift, Out, Lse, VScale, b, h, h_kv, pid_bh, row0, nq, kv_heads, stride_ob,
               stride_oh, stride_on, o_layout: gl.constexpr, row_layout: gl.constexpr, HEAD_DIM: gl.constexpr,
               ROWS: gl.constexpr, FP8_PV: gl.constexpr, WRITE_LSE: gl.constexpr):
    # A warpgroup's 64 output rows and their LSE. Rows that kept no key (l = 0) get zeros and lse = -inf.
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, orow_layout)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    rows = row0 + gl.arange(0, ROWS, layout=orow_layout)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if FP8_PV:  # V's per-channel scales factor out of the sum over keys (P's 448 cancels against l's)
        v_scale = gl.load(VScale + (b * kv_heads + h_kv) * HEAD_DIM + cols)
        out = out * v_scale[None, :]
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols[None, :]
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows < nq)[:, None])
    if WRITE_LSE:
        lse = (m_i + gl.log2(l_i) - p_shift) / 1.4426950408889634
        lrows = row0 + gl.arange(0, ROWS, layout=row_layout)
        gl.store(Lse + pid_bh * nq + lrows, lse, mask=lrows < nq)
