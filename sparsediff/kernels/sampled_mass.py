"""Block mass from sampled query rows: exact attention of a few rows of each query block to every key.

    mass[b, h, i, j] = mean over the sampled rows r of query block i of
                       sum over keys c in key block j of softmax_c(scale * q_r . k_c)

i.e. the share of a row's softmax mass that key block j holds, averaged over ``rows`` rows spread
evenly through the block (row ``i*b + floor((t + 1) * n_i / rows) - 1`` for t < rows, n_i = rows in
the block, so the block's last row is always sampled). It is an unbiased estimate of the exact block
oracle's per-row mass; each row of ``mass`` sums to 1 over the visible key blocks. Cost: ``rows /
block_size`` of dense Q·Kᵀ and of its exponentials, no P·V.

On CUDA one Triton kernel does it in two passes over key blocks: pass 1 writes each sampled row's
log-sum-exp per key block to a scratch buffer and keeps the row's running LSE; pass 2 re-reads the
scratch (from L2) and writes the per-block means. Elsewhere a chunked PyTorch path computes the same
numbers. ``sampled_block_mass_ref`` is the float64 reference.

Shapes: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)`` (GQA: ``Hq % Hkv == 0``); returns
``(B, Hq, ceil(Nq/b), ceil(Nk/b))`` float32. ``causal`` is end-aligned: row ``r`` sees keys
``c <= r + Nk - Nq``; a row that sees no key contributes 0.
"""

from __future__ import annotations

import functools
import math

import torch

from .backend import choose_backend, sm_count

LOG2E = 1.4426950408889634
# Bytes of scores one chunk of the PyTorch path may hold.
_CHUNK_BYTES = 64 * 2**20

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["sampled_rows", "sampled_block_mass", "sampled_block_mass_ref"]


@functools.lru_cache(maxsize=64)
def _sampled_rows_cpu(nq: int, block_size: int, rows: int) -> torch.Tensor:
    nqb = math.ceil(nq / block_size)
    first = torch.arange(nqb) * block_size
    n_i = torch.clamp(nq - first, max=block_size)
    t = torch.arange(1, rows + 1)
    return (first[:, None] + (t[None, :] * n_i[:, None]) // rows - 1).clamp_min(first[:, None])


def sampled_rows(nq: int, block_size: int, rows: int, device=None) -> torch.Tensor:
    """``(ceil(nq / block_size), rows)`` int64: the query positions sampled in each query block."""
    return _sampled_rows_cpu(nq, block_size, rows).to(device)


def _check(q, k, block_size, rows):
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) must agree, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= block_size:
        raise ValueError(f"rows (sampled query rows per block) must be an int in [1, block_size={block_size}], "
                         f"got {rows!r}")


def _mass_torch(q, k, *, block_size, rows, scale, causal):
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = sampled_rows(nq, block_size, rows, q.device).flatten()  # (nqb * rows,)
    qs = q[:, :, pos].to(acc).view(bsz, hkv, group, nqb * rows, d)
    kf = k.to(acc)[:, :, None]
    out = torch.empty(bsz, hq, nqb, nkb, dtype=acc, device=q.device)
    cols = torch.arange(nk, device=q.device)
    per_chunk = max(1, _CHUNK_BYTES // max(1, bsz * hq * rows * nk * acc.itemsize * 2))
    for start in range(0, nqb, per_chunk):
        stop = min(start + per_chunk, nqb)
        r = slice(start * rows, stop * rows)
        s = torch.matmul(qs[:, :, :, r], kf.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(cols[None, :] > pos[r, None] + (nk - nq), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
        p = torch.nn.functional.pad(p, (0, nkb * block_size - nk))
        p = p.view(bsz, hkv, group, stop - start, rows, nkb, block_size).sum(dim=-1).mean(dim=4)
        out[:, :, start:stop] = p.reshape(bsz, hq, stop - start, nkb)
    return out.float()


if triton is not None:

    @triton.jit
    def _sampled_mass_fwd(
        Q, K, Scratch, RowLse, Out,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        num_heads, group_size, nq, nk, nqb, nkb, causal_offset, qk_scale, blocks_per_split,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
        GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
        DOT_IEEE: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # One program: GROUPS query blocks x ROWS sampled rows of one head, against every key block.
        BLOCK_M: tl.constexpr = GROUPS * ROWS
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        h_kv = h // group_size
        offs_m = tl.arange(0, BLOCK_M)
        qblock = pid_m * GROUPS + offs_m // ROWS
        first = qblock * BLOCK_SIZE
        n_i = tl.minimum(nq - first, BLOCK_SIZE)
        pos = tl.maximum(first + ((offs_m % ROWS + 1) * n_i) // ROWS - 1, first)
        row_ok = qblock < nqb
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + h * stride_qh + pos[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h_kv * stride_kh
        # Scratch rows: (B * Hq, nqb * ROWS, nkb) log2-sum-exp of each sampled row per key block.
        srow = pid_bh * nqb * ROWS + pid_m * BLOCK_M + offs_m
        offs_n = tl.arange(0, BLOCK_N)
        m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
        last_row = tl.max(tl.where(row_ok, pos, 0), 0)
        j_end = nkb
        if CAUSAL:
            j_end = tl.minimum(nkb, tl.maximum(last_row + causal_offset, -1) // BLOCK_SIZE + 1)
        j_start = 0
        if SPLIT:  # this program's share of the key blocks; the row LSE and the means come from the reduce kernel
            j_start = tl.program_id(2) * blocks_per_split
            # Its causally invisible blocks read as "no mass" in the reduce.
            for j in range(tl.maximum(j_end, j_start), tl.minimum(nkb, j_start + blocks_per_split)):
                tl.store(Scratch + srow * nkb + j, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), mask=row_ok)
            j_end = tl.minimum(j_end, j_start + blocks_per_split)
        TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for j in range(j_start, j_end):
            m_blk = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_blk = tl.zeros([BLOCK_M], dtype=tl.float32)
            for t in range(TILES):
                cols = j * BLOCK_SIZE + t * BLOCK_N + offs_n
                kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                             mask=(cols[None, :] < nk) & d_ok[:, None], other=0.0)
                if DOT_F32:
                    kt = kt.to(tl.float32)
                if DOT_IEEE:  # float32 inputs: full float32 products, not TF32
                    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, kt) * qk_scale
                valid = cols[None, :] < nk
                if CAUSAL:
                    valid = valid & (cols[None, :] <= pos[:, None] + causal_offset)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_blk, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_blk = l_blk * tl.math.exp2(m_blk - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
                m_blk = m_new
            m_safe = tl.where(m_blk == float("-inf"), 0.0, m_blk)
            ls = tl.where(l_blk > 0, m_safe + tl.math.log2(l_blk), float("-inf"))
            tl.store(Scratch + srow * nkb + j, ls, mask=row_ok)
            m_new = tl.maximum(m_run, ls)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.math.exp2(m_run - m_safe) + tl.math.exp2(ls - m_safe)
            m_run = m_new
        if not SPLIT:  # one program saw every key block: the row LSE is complete, write the means
            m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
            lse = tl.where(l_run > 0, m_safe + tl.math.log2(l_run), float("inf"))  # +inf: the row contributes 0
            tl.store(RowLse + srow, lse, mask=row_ok)
            # Pass 2 reads the same rows back as (GROUPS, ROWS) tiles; the barrier makes the writes visible.
            tl.debug_barrier()
            g = tl.arange(0, GROUPS)
            t2 = tl.arange(0, ROWS)
            srow2 = pid_bh * nqb * ROWS + pid_m * BLOCK_M + g[:, None] * ROWS + t2[None, :]
            ok2 = (pid_m * GROUPS + g) < nqb
            lse2 = tl.load(RowLse + srow2, mask=ok2[:, None], other=float("inf"))
            out_base = Out + pid_bh * nqb * nkb + (pid_m * GROUPS + g) * nkb
            for j in range(0, nkb):
                if j < j_end:
                    ls2 = tl.load(Scratch + srow2 * nkb + j, mask=ok2[:, None], other=float("-inf"))
                    mass = tl.sum(tl.math.exp2(ls2 - lse2), 1) / ROWS
                else:
                    mass = tl.zeros([GROUPS], dtype=tl.float32)
                tl.store(out_base + j, mass, mask=ok2)

    @triton.jit
    def _sampled_mass_reduce(
        Scratch, Out, nqb, nkb, ROWS: tl.constexpr, GROUPS: tl.constexpr,
    ):
        # Split launches: each row's LSE over all key blocks from the scratch, then the per-block means.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, GROUPS)
        t2 = tl.arange(0, ROWS)
        srow = pid_bh * nqb * ROWS + pid_m * GROUPS * ROWS + g[:, None] * ROWS + t2[None, :]
        ok = (pid_m * GROUPS + g) < nqb
        m_run = tl.full([GROUPS, ROWS], float("-inf"), dtype=tl.float32)
        l_run = tl.zeros([GROUPS, ROWS], dtype=tl.float32)
        for j in range(0, nkb):
            ls = tl.load(Scratch + srow * nkb + j, mask=ok[:, None], other=float("-inf"))
            m_new = tl.maximum(m_run, ls)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.math.exp2(m_run - m_safe) + tl.math.exp2(ls - m_safe)
            m_run = m_new
        m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
        lse = tl.where(l_run > 0, m_safe + tl.math.log2(l_run), float("inf"))
        out_base = Out + pid_bh * nqb * nkb + (pid_m * GROUPS + g) * nkb
        for j in range(0, nkb):
            ls = tl.load(Scratch + srow * nkb + j, mask=ok[:, None], other=float("-inf"))
            tl.store(out_base + j, tl.sum(tl.math.exp2(ls - lse), 1) / ROWS, mask=ok)


# Sampled rows per program (one tensor-core tile of queries), key columns per tile, warps: every program
# reads all keys once, so more rows per program means less key traffic. ``key_splits`` > 1 spreads each
# program's key blocks over that many programs and adds a small reduce launch; None picks it from the GPU: the
# query side alone gives few programs (32k tokens, 16 heads, 4 rows: 128 on a 132-SM H100, one key loop of 256
# blocks each), so the loop's latency bounds the time. H100, 4 rows per 128-token block (bench_selection.py,
# 2026-12-07): 32k 0.765 ms (64 rows, 4 warps, no split) -> 0.536 (2 splits) -> 0.484 (128 rows, 128 keys a
# tile, 8 warps, 4 splits: what the rule below picks); 64k 2.029 -> 1.905 (128 rows, no split) -> 1.759 (4
# splits; the rule picks 2 there, not measured).
LAUNCH = dict(rows_per_program=128, block_n=128, num_warps=8, key_splits=None)
# Automatic split: about this many programs per SM, and at least this many key blocks per split.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_BLOCKS = 16


def auto_key_splits(programs: int, nkb: int, sms: int) -> int:
    """Key splits for ``programs`` query-side programs over ``nkb`` key blocks on ``sms`` SMs: about
    :data:`SPLIT_PROGRAMS_PER_SM` programs per SM, each split holding at least :data:`SPLIT_MIN_BLOCKS`, a
    power of two."""
    want = max(1, min(math.ceil(SPLIT_PROGRAMS_PER_SM * sms / max(1, programs)), nkb // SPLIT_MIN_BLOCKS))
    # Rounded down to a power of two: on an H100 at 32k, 3 splits ran 0.598 ms against 0.536 for 2 (64-row
    # programs) and 5 splits 0.541 against 0.484 for 4 (128-row programs).
    return 1 << (want.bit_length() - 1)


def _sms(x) -> int:
    """SMs of x's GPU; 0 elsewhere (no split under the interpreter unless a test says otherwise)."""
    return sm_count(x.device) if x.is_cuda else 0


def _mass_triton(q, k, *, block_size, rows, scale, causal, launch=None):
    launch = LAUNCH | (launch or {})
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    block_d = max(16, triton.next_power_of_2(d))
    rows_p2 = triton.next_power_of_2(rows)
    if rows_p2 != rows:
        raise ValueError(f"the Triton path needs a power-of-two number of sampled rows, got {rows}")
    groups = max(1, launch["rows_per_program"] // rows)
    block_n = min(launch["block_n"] if block_d <= 128 else 32, block_size)
    programs = math.ceil(nqb / groups) * bsz * hq
    splits = launch["key_splits"]
    if splits is None:
        splits = auto_key_splits(programs, nkb, _sms(q))
    splits = max(1, min(int(splits), nkb))
    per_split = math.ceil(nkb / splits)
    splits = math.ceil(nkb / per_split)
    scratch = torch.empty(bsz * hq, nqb * rows, nkb, dtype=torch.float32, device=q.device)
    row_lse = torch.empty(bsz * hq, nqb * rows, dtype=torch.float32, device=q.device)
    out = torch.empty(bsz, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    grid = (math.ceil(nqb / groups), bsz * hq, splits)
    _sampled_mass_fwd[grid](
        q, k, scratch, row_lse, out, *q.stride(), *k.stride(),
        hq, hq // hkv, nq, nk, nqb, nkb, nk - nq, scale * LOG2E, per_split,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, ROWS=rows, GROUPS=groups, BLOCK_N=block_n,
        CAUSAL=causal, DOT_F32=not q.is_cuda, DOT_IEEE=q.is_cuda and q.dtype == torch.float32, SPLIT=splits > 1,
        num_warps=launch["num_warps"], num_stages=2,
    )
    if splits > 1:
        _sampled_mass_reduce[(math.ceil(nqb / groups), bsz * hq)](scratch, out, nqb, nkb, ROWS=rows, GROUPS=groups)
    return out


def sampled_block_mass(q, k, *, block_size=128, rows=4, scale=None, causal=False, backend=None):
    """Estimated share of each row's attention mass per (query block, key block), ``(B, Hq, nqb, nkb)``
    float32, from ``rows`` sampled query rows per block (see the module docstring).

    ``backend``: None (Triton on CUDA for fp16/bf16/fp32 and power-of-two ``rows``, else PyTorch),
    ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``.
    """
    _check(q, k, block_size, rows)
    applies = (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and rows & (rows - 1) == 0
               and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)
    backend = choose_backend(backend, q, applies=applies, op="sampled_block_mass")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "triton":
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.shape[-1] % 8 or q.shape[-1] > 256:
            raise TypeError(f"the Triton sampled-mass kernel takes fp16/bf16/fp32 with head dim % 8 == 0 <= 256, "
                            f"got {q.dtype}, head dim {q.shape[-1]}")
        if q.dtype != k.dtype:
            raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
        return _mass_triton(q, k, block_size=block_size, rows=rows, scale=scale, causal=causal)
    return _mass_torch(q, k, block_size=block_size, rows=rows, scale=scale, causal=causal)


def sampled_block_mass_ref(q, k, *, block_size=128, rows=4, scale=None, causal=False):
    """Reference in float64 from the full probability rows of the sampled queries."""
    _check(q, k, block_size, rows)
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pos = sampled_rows(nq, block_size, rows, q.device)
    kk = k.repeat_interleave(group, dim=1).double()
    s = torch.matmul(q.double()[:, :, pos.flatten()], kk.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > pos.flatten()[:, None] + nk - nq,
                          float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    nkb = math.ceil(nk / block_size)
    p = torch.nn.functional.pad(p, (0, nkb * block_size - nk))
    p = p.view(*p.shape[:2], pos.shape[0], rows, nkb, block_size).sum(-1).mean(-2)
    return p.float()
