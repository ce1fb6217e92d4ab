"""The online softmax of the Hopper Gluon kernel (``gluon.py``): one key tile's row max, exponentials and row
sum, in 16 bits or on INT8 Q·Kᵀ scores, with the schedule's ablations (exponentials partly on the FMA units,
tree-shaped row reductions). Device functions only; the kernel and its schedule live in ``gluon.py``.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


def _exp2_asm(poly: int) -> str:
    """PTX for 4 exponentials (pack=4): the first 4 - poly on the MUFU, the last ``poly`` as 2^round(x) times a
    cubic in the remainder on the FMA units (relative error 8e-5, far below P's 16- or 8-bit rounding). Inputs
    below -126 clamp there (2^-126 ~ 1e-38 instead of 0: under any P rounding, and never a NaN for -inf)."""
    lines = ["{", ".reg .f32 t, j, f, p;", ".reg .b32 e, r;"]
    for i in range(4 - poly):
        lines.append(f"ex2.approx.ftz.f32 ${i}, ${i + 4};")
    for i in range(4 - poly, 4):
        lines += [f"max.ftz.f32 t, ${i + 4}, 0fC2FC0000;",  # -126
                  "add.rn.ftz.f32 j, t, 0f4B400000;",  # 1.5 * 2^23 + round(t): the integer in j's low bits
                  "sub.rn.ftz.f32 f, j, 0f4B400000;",
                  "sub.rn.ftz.f32 f, t, f;",  # t - round(t), in [-0.5, 0.5]
                  "fma.rn.ftz.f32 p, f, 0f3D61A4C4, 0f3E786D33;",
                  "fma.rn.ftz.f32 p, p, f, 0f3F317A8D;",
                  "fma.rn.ftz.f32 p, p, f, 0f3F7FFB58;",
                  "shl.b32 e, j, 23;",  # round(t) into the exponent field
                  "mov.b32 r, p;", "add.s32 r, r, e;", f"mov.b32 ${i}, r;"]
    return "\n".join(lines + ["}"])


EXP2_POLY_ASM = [gl.constexpr(_exp2_asm(n)) for n in range(3)]
_EXP2_POLY_1 = EXP2_POLY_ASM[1]
_EXP2_POLY_2 = EXP2_POLY_ASM[2]


@gluon.jit
def _exp2(x, POLY: gl.constexpr):
    if POLY == 0:
        y = gl.exp2(x)
    elif POLY == 1:
        y = gl.inline_asm_elementwise(_EXP2_POLY_1, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32, is_pure=True,
                                      pack=4)
    else:
        y = gl.inline_asm_elementwise(_EXP2_POLY_2, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32, is_pure=True,
                                      pack=4)
    return y


@gluon.jit
def _row_reduce(x, s_layout: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, SUM: gl.constexpr,
                TREE: gl.constexpr):
    # Row max (or, with SUM, row sum) of a score tile. A thread holds 2 x 16 values of a row (column
    # 8i + 2 * (lane % 4) + {0, 1}); gl.max / gl.sum fold its 32 into one dependent chain (33 ops deep in SASS).
    # TREE reduces over the 16 groups as 4 x 4 first: chains of 3 + 3 (the reshape only relabels registers);
    # the max is the same value, the float32 sum only changes its rounding order.
    if TREE:
        x4 = gl.reshape(x, [ROWS, 4, BLOCK_N // 32, 8])
        if SUM:
            r = gl.sum(gl.sum(gl.sum(x4, 2), 1), 1)
        else:
            r = gl.max(gl.max(gl.max(x4, 2), 1), 1)
        r = gl.convert_layout(r, gl.SliceLayout(1, s_layout))
    elif SUM:
        r = gl.sum(x, 1)
    else:
        r = gl.max(x, 1)
    return r


@gluon.jit
def _finite_max(m_new, MAY_BE_EMPTY: gl.constexpr):
    # A row that has seen only masked keys has m = -inf, and exp2 must not see -inf - -inf.
    if MAY_BE_EMPTY:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    return m_use


@gluon.jit
def _exp2_p(x, masked, POLY: gl.constexpr):
    # P's exponentials; a masked tile takes the MUFU, since masked scores must give exact zeros, which the clamped
    # polynomial does not.
    if POLY > 0:
        if masked:
            p = gl.exp2(x)
        else:
            p = _exp2(x, POLY)
    else:
        p = gl.exp2(x)
    return p


@gluon.jit
def _needs_mask(kblock, nk, row0, causal_offset, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    # A tile pays for masking only on the ragged tail of K or, causal, past the diagonal of its rows.
    start_n = kblock * BLOCK_N
    return (start_n + BLOCK_N > nk) or (CAUSAL and start_n + BLOCK_N - 1 > row0 + causal_offset)


@gluon.jit
def _mask(x, kblock, nk, row0, causal_offset, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
          CAUSAL: gl.constexpr):
    # -inf on the keys past nk and, causal, past each row's diagonal.
    cols = kblock * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    valid = (cols < nk)[None, :]
    if CAUSAL:
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        valid = valid & (cols[None, :] <= rows[:, None] + causal_offset)
    return gl.where(valid, x, float("-inf"))


@gluon.jit
def _softmax_step(s, m_i, l_i, kblock, nk, qk_scale, p_shift, row0, causal_offset, s_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr, ROWS: gl.constexpr, EVEN_N: gl.constexpr, CAUSAL: gl.constexpr,
                  POLY: gl.constexpr, TREE: gl.constexpr):
    # Only tiles on the ragged tail or the causal diagonal pay for masking (kblock: the tile's key-block id,
    # loaded ahead by the caller). Without causal masking a kept block always holds a valid key, so m is finite
    # from the first tile on; with it, a row may have seen only masked keys (m = -inf), and exp2 must not see
    # -inf - -inf. p_shift (log2 units) scales P and l alike, which the output's division cancels.
    masked = False
    if CAUSAL or not EVEN_N:
        masked = _needs_mask(kblock, nk, row0, causal_offset, BLOCK_N, CAUSAL)
        if masked:
            s = _mask(s, kblock, nk, row0, causal_offset, s_layout, BLOCK_N, ROWS, CAUSAL)
    m_new = gl.maximum(m_i, _row_reduce(s, s_layout, ROWS, BLOCK_N, False, TREE) * qk_scale)
    m_use = _finite_max(m_new, CAUSAL)
    p = _exp2_p(s * qk_scale - (m_use - p_shift)[:, None], masked, POLY)
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + _row_reduce(p, s_layout, ROWS, BLOCK_N, True, TREE)
    return p, alpha, m_new, l_i


@gluon.jit
def _dequantize(s, row_scale, k_scales, kblock, nk, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    # INT8 Q·Kᵀ with per-token key scales: int32 tile -> float32 scores in log2 units (row_scale holds q's
    # scale times qk_scale).
    cols = kblock * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    k_scale = gl.load(k_scales + cols, mask=cols < nk, other=0.0)
    return s.to(gl.float32) * row_scale[:, None] * k_scale[None, :]


@gluon.jit
def _softmax_step_int8(s, m_i, l_i, mult, kblock, nk, p_shift, row0, causal_offset, s_layout: gl.constexpr,
                       BLOCK_N: gl.constexpr, ROWS: gl.constexpr, EVEN_N: gl.constexpr, CAUSAL: gl.constexpr,
                       POLY: gl.constexpr, TREE: gl.constexpr):
    # INT8 Q·Kᵀ with one scale per key block: a score is s * mult (mult: q's scale x the block's key scale x
    # qk_scale, per row), so the online softmax runs on the int32 tile itself. The row max is an integer max;
    # s reaches float32 by an integer add and a bitcast (0x4B400000 is 1.5 * 2^23: adding |s| < 2^22 to its bits
    # gives 1.5 * 2^23 + s exactly; D <= 128 int8 products stay below 2^21), whose offset folds into the
    # exponent's bias, so each score costs one FMA and one exp2, as in the 16-bit kernel. The offset's rounding
    # in the bias is below one unit of s, far under the INT8 rounding. Tiles that need masking take the plain
    # path.
    masked = False
    if CAUSAL or not EVEN_N:
        masked = _needs_mask(kblock, nk, row0, causal_offset, BLOCK_N, CAUSAL)
    if masked:
        p, alpha, m_new, l_i = _softmax_step(s.to(gl.float32) * mult[:, None], m_i, l_i, kblock, nk, 1.0, p_shift,
                                             row0, causal_offset, s_layout, BLOCK_N, ROWS, EVEN_N, CAUSAL, POLY,
                                             TREE)
    else:
        m_new = gl.maximum(m_i, _row_reduce(s, s_layout, ROWS, BLOCK_N, False, TREE).to(gl.float32) * mult)
        m_use = _finite_max(m_new, CAUSAL)
        f = (s + 0x4B400000).to(gl.float32, bitcast=True)
        bias = mult * 12582912.0 + (m_use - p_shift)
        p = _exp2(f * mult[:, None] - bias[:, None], POLY)
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + _row_reduce(p, s_layout, ROWS, BLOCK_N, True, TREE)
    return p, alpha, m_new, l_i


@gluon.jit
def _half_scores(s, mult, kblock, nk, row0, causal_offset, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                 ROWS: gl.constexpr, MAY_MASK: gl.constexpr, CAUSAL: gl.constexpr, TREE: gl.constexpr):
    # One INT8 key block of a pair (``_softmax_pair``; scores s * mult): t and per-row scale and offset with the
    # scores in log2 units t * scale - offset (masked keys: t = -inf), the row max of those scores, and whether
    # masking applied. Unmasked, t is s as a float by the integer add and bitcast of ``_softmax_step_int8`` (offset
    # mult * 1.5 * 2^23) and the row max an integer max. A block id past the last block (the odd count's missing
    # partner, loaded as zeros) masks every key.
    masked = False
    if MAY_MASK:
        masked = _needs_mask(kblock, nk, row0, causal_offset, BLOCK_N, CAUSAL)
    if masked:  # scale first: mult may be 0
        t = _mask(s.to(gl.float32) * mult[:, None], kblock, nk, row0, causal_offset, s_layout, BLOCK_N, ROWS, CAUSAL)
        scale = gl.full([ROWS], 1.0, gl.float32, gl.SliceLayout(1, s_layout))
        offset = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        row_max = _row_reduce(t, s_layout, ROWS, BLOCK_N, False, TREE)
    else:
        t = (s + 0x4B400000).to(gl.float32, bitcast=True)
        scale = mult
        offset = mult * 12582912.0
        row_max = _row_reduce(s, s_layout, ROWS, BLOCK_N, False, TREE).to(gl.float32) * mult
    return t, scale, offset, row_max, masked


@gluon.jit
def _pair_exp2(t, scale, offset, m_use, p_shift, masked, POLY: gl.constexpr):
    return _exp2_p(t * scale[:, None] - (offset + m_use - p_shift)[:, None], masked, POLY)


@gluon.jit
def _softmax_pair(s_a, s_b, m_i, l_i, mult_a, mult_b, kblock_a, kblock_b, nk, p_shift, row0, causal_offset,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr, MASK_A: gl.constexpr,
                  CAUSAL: gl.constexpr, POLY: gl.constexpr, TREE: gl.constexpr):
    # The online softmax over two key blocks at once: one row max, one rescale factor and one update of m and l
    # per 256 keys instead of per 128. The second block may be the missing partner of an odd count (all masked).
    # Without MASK_A the first block is never masked, so m is finite from the first pair on.
    t_a, sc_a, off_a, max_a, masked_a = _half_scores(s_a, mult_a, kblock_a, nk, row0, causal_offset, s_layout,
                                                     BLOCK_N, ROWS, MASK_A, CAUSAL, TREE)
    t_b, sc_b, off_b, max_b, masked_b = _half_scores(s_b, mult_b, kblock_b, nk, row0, causal_offset, s_layout,
                                                     BLOCK_N, ROWS, True, CAUSAL, TREE)
    m_new = gl.maximum(m_i, gl.maximum(max_a, max_b))
    m_use = _finite_max(m_new, MASK_A)
    p_a = _pair_exp2(t_a, sc_a, off_a, m_use, p_shift, masked_a, POLY)
    p_b = _pair_exp2(t_b, sc_b, off_b, m_use, p_shift, masked_b, POLY)
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + (_row_reduce(p_a, s_layout, ROWS, BLOCK_N, True, TREE)
                         + _row_reduce(p_b, s_layout, ROWS, BLOCK_N, True, TREE))
    return p_a, p_b, alpha, m_new, l_i
