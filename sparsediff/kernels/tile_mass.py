"""Mean attention probability inside every (query-block, key-block) tile, without the N x N map.

    mass[b, h, i, j] = mean over query rows r in block i and keys c in block j of
                       exp(scale * q_r . k_c - lse_r)

Two passes: pass 1 gets each row's natural-log LSE (``row_lse``: the block-sparse kernel with a dense
index, which also yields the dense output for free); pass 2 (``tile_mass``) recomputes q.k tile by
tile and sums the normalised probabilities. Memory is O(N * D + (N / b)^2), never O(N^2): this is
what lets SparseD pick its pattern at 64k+ tokens on one GPU.

Shapes: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)`` (GQA: ``Hq % Hkv == 0``), lse ``(B, Hq, Nq)``
float32; returns ``(B, Hq, ceil(Nq/b), ceil(Nk/b))`` float32. Ragged tail tiles are averaged over
their valid tokens; with ``causal`` (end-aligned) masked pairs count as probability 0 but still count
in the tile's size, so a tile's mean is its share of the softmax mass per (row, key) pair.
On CUDA a Triton kernel runs pass 2; elsewhere a chunked PyTorch path computes the same numbers.
"""

from __future__ import annotations

import math

import torch

from .backend import choose_backend
from .block_sparse import block_sparse_attention
from .masks import dense_index

LOG2E = 1.4426950408889634
# Bytes of scores one chunk of the PyTorch path may hold; bounds peak memory at any length.
_CHUNK_BYTES = 64 * 2**20

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None


def row_lse(q, k, v, *, scale=None, causal=False, block_size=128, backend=None):
    """Pass 1: dense attention ``(out, lse)`` through the block-sparse kernel with every block kept."""
    nqb, nkb = math.ceil(q.shape[2] / block_size), math.ceil(k.shape[2] / block_size)
    index, count = dense_index(1, 1, nqb, nkb, device=q.device)
    return block_sparse_attention(
        q, k, v, index, count, scale=scale, causal=causal, block_size=block_size, return_lse=True,
        backend=backend, check_ids=False,
    )


def _tile_counts(nq, nk, block_size, device):
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    rows = torch.clamp(nq - torch.arange(nqb, device=device) * block_size, max=block_size).float()
    cols = torch.clamp(nk - torch.arange(nkb, device=device) * block_size, max=block_size).float()
    return rows[:, None] * cols[None, :]


def _tile_sums_torch(q, k, lse, *, scale, causal, block_size):
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Group query heads by their KV head so k is never repeated in memory.
    qg = q.view(bsz, hkv, group, nq, d)
    lse_g = lse.view(bsz, hkv, group, nq).to(acc)
    kf = k.to(acc)
    pad_k = nkb * block_size - nk
    sums = torch.empty(bsz, hq, nqb, nkb, dtype=acc, device=q.device)
    rows_per_chunk = max(block_size, _CHUNK_BYTES // max(bsz * hq * nk * (acc.itemsize * 2), 1))
    rows_per_chunk = rows_per_chunk // block_size * block_size
    cols = torch.arange(nk, device=q.device)
    for start in range(0, nq, rows_per_chunk):
        stop = min(start + rows_per_chunk, nq)
        s = torch.matmul(qg[:, :, :, start:stop].to(acc), kf[:, :, None].transpose(-1, -2)) * scale
        p = torch.exp(s - lse_g[:, :, :, start:stop, None])
        # Rows with lse = -inf saw no key: their probabilities are 0, not nan.
        p = torch.nan_to_num(p, nan=0.0, posinf=0.0)
        if causal:
            rows = torch.arange(start, stop, device=q.device)[:, None] + (nk - nq)
            p = p.masked_fill(cols[None, :] > rows, 0.0)
        p = torch.nn.functional.pad(p, (0, pad_k, 0, (-(stop - start)) % block_size))
        c = p.shape[3] // block_size
        p = p.view(bsz, hkv, group, c, block_size, nkb, block_size).sum(dim=(4, 6))
        sums[:, :, start // block_size : start // block_size + c] = p.view(bsz, hq, c, nkb)
    return sums.float()


if triton is not None:

    @triton.jit
    def _tile_mass_fwd(
        Q, K, Lse, Out,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_ob, stride_oh, stride_om, stride_ok,
        qk_scale, num_heads, group_size, nq, nk, nkb, causal_offset,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # One program: BLOCK_M query rows of one head against every key block; writes one partial
        # tile sum per key block (sub-tiles of a query block are summed by the launcher).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        h_kv = h // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        row_ok = offs_m < nq
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        lse = tl.load(Lse + pid_bh * nq + offs_m, mask=row_ok, other=float("inf"))
        # -inf LSE (a row that saw no key) would give exp(+inf): treat it as contributing nothing.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b * stride_kb + h_kv * stride_kh
        TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for j in range(0, nkb):
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for t in range(TILES):
                cols = j * BLOCK_SIZE + t * BLOCK_N + offs_n
                kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                             mask=(cols[None, :] < nk) & d_mask[:, None], other=0.0)
                if DOT_F32:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt) * qk_scale
                valid = (cols[None, :] < nk) & row_ok[:, None]
                if CAUSAL:
                    valid = valid & (cols[None, :] <= offs_m[:, None] + causal_offset)
                p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
                total += tl.sum(p, 1)
            tl.store(Out + b * stride_ob + h * stride_oh + pid_m * stride_om + j * stride_ok, tl.sum(total, 0))


def _tile_sums_triton(q, k, lse, *, scale, causal, block_size):
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nkb = math.ceil(nk / block_size)
    block_d = max(16, triton.next_power_of_2(d))
    bm = min(64 if block_d <= 128 else 32, block_size)
    bn = min(64 if block_d <= 128 else 32, block_size)
    n_m = math.ceil(nq / bm)
    partial = torch.empty(bsz, hq, n_m, nkb, dtype=torch.float32, device=q.device)
    lse = lse.float().contiguous()
    _tile_mass_fwd[(n_m, bsz * hq)](
        q, k, lse, partial, *q.stride(), *k.stride(), *partial.stride(),
        scale * LOG2E, hq, hq // hkv, nq, nk, nkb, nk - nq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        DOT_F32=not q.is_cuda and q.dtype == torch.bfloat16, num_warps=4, num_stages=2,
    )
    per_block = block_size // bm
    nqb = math.ceil(nq / block_size)
    partial = torch.nn.functional.pad(partial, (0, 0, 0, nqb * per_block - n_m))
    return partial.view(bsz, hq, nqb, per_block, nkb).sum(dim=3)


def tile_mass(q, k, lse, *, scale=None, causal=False, block_size=128, backend=None):
    """Pass 2: mean softmax probability per (query-block, key-block) tile, ``(B, Hq, nqb, nkb)`` float32."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) must agree, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    backend = choose_backend(backend, q, applies=q.dtype in (torch.float16, torch.bfloat16), op="tile_mass")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "triton":
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 256:
            raise TypeError(f"the Triton tile-mass kernel takes fp16/bf16 with head dim % 8 == 0 <= 256, "
                            f"got {q.dtype}, head dim {q.shape[-1]}")
        sums = _tile_sums_triton(q.contiguous(), k.contiguous(), lse, scale=scale, causal=causal,
                                 block_size=block_size)
    else:
        sums = _tile_sums_torch(q, k, lse, scale=scale, causal=causal, block_size=block_size)
    return sums / _tile_counts(q.shape[2], k.shape[2], block_size, q.device)


def tile_mass_ref(q, k, *, scale=None, causal=False, block_size=128):
    """Reference: the full probability map (O(N^2) memory), average-pooled per tile, float32."""
    acc = torch.float64
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).to(acc)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        future = torch.arange(nk, device=s.device)[None, :] > torch.arange(nq, device=s.device)[:, None] + (nk - nq)
        s = s.masked_fill(future, float("-inf"))
    p = torch.softmax(s, dim=-1)
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    p = torch.nn.functional.pad(p, (0, nkb * block_size - nk, 0, nqb * block_size - nq))
    sums = p.view(*p.shape[:2], nqb, block_size, nkb, block_size).sum(dim=(3, 5))
    return (sums / _tile_counts(nq, nk, block_size, q.device).to(acc)).float()
