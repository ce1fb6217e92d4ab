"""Dropped key blocks as pooled softmax terms: what a block-sparse attention skipped, added back coarsely.

For query row r and every key block j that r's query block dropped and that r sees whole (under the
end-aligned causal mask: the block's last key is at or before r's position), one extra softmax term

    logit = log n_j + scale * q_r . mean(k_j),   value = mean(v_j)      (n_j = tokens in block j)

i.e. the block's keys replaced by their mean. :func:`dropped_block_attention` returns that partial attention
``(out, lse)`` over the pooled terms; :func:`add_dropped_blocks` merges it into a block-sparse result by the
LSE (exact merge of disjoint key sets). By Jensen's inequality the pooled weight never exceeds the block's
true mass. Partially visible dropped blocks get no term (the diagonal block is always kept, so this is rare).

On CUDA one Triton kernel per (query block, head) runs an online softmax over the pooled keys and merges in
place; elsewhere a chunked PyTorch path. ``dropped_block_attention_ref`` is the float64 reference.
"""

from __future__ import annotations

import math

import torch

from .backend import choose_backend
from .masks import index_to_mask
from .merge import merge_attention

LOG2E = 1.4426950408889634
_CHUNK_BYTES = 64 * 2**20

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["add_dropped_blocks", "block_means", "dropped_block_attention", "dropped_block_attention_ref"]


def block_means(x: torch.Tensor, block_size: int):
    """``(mean (B, H, nb, D) float32, tokens per block (nb,) float32)`` over the real tokens of each block."""
    n = x.shape[2]
    nb = math.ceil(n / block_size)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = torch.nn.functional.pad(x.to(acc), (0, 0, 0, nb * block_size - n))
    count = torch.clamp(n - torch.arange(nb, device=x.device) * block_size, max=block_size).to(acc)
    return padded.view(*x.shape[:2], nb, block_size, x.shape[-1]).sum(3) / count[:, None], count


def _dropped(block_index, block_count, nkb):
    return ~index_to_mask(block_index, block_count, nkb)


def _pooled_torch(q, k, v, block_index, block_count, *, scale, causal, block_size):
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    nkb = math.ceil(nk / block_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    km, count = block_means(k, block_size)
    vm, _ = block_means(v, block_size)
    km, vm = km.repeat_interleave(group, 1), vm.repeat_interleave(group, 1)
    dropped = _dropped(block_index, block_count, nkb).expand(bsz, hq, -1, nkb)
    last_key = torch.clamp(torch.arange(1, nkb + 1, device=q.device) * block_size, max=nk) - 1
    out = torch.empty(bsz, hq, nq, d, dtype=acc, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=acc, device=q.device)
    rows = max(block_size, _CHUNK_BYTES // max(1, bsz * hq * nkb * 8) // block_size * block_size)
    for start in range(0, nq, rows):
        stop = min(start + rows, nq)
        r = torch.arange(start, stop, device=q.device)
        s = torch.matmul(q[:, :, start:stop].to(acc), km.transpose(-1, -2)) * scale + count.log()
        ok = dropped[:, :, r // block_size]
        if causal:
            ok = ok & (last_key[None, :] <= r[:, None] + nk - nq)
        s = s.masked_fill(~ok, float("-inf"))
        part = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - part.masked_fill(torch.isinf(part), 0.0)[..., None])
        out[:, :, start:stop] = torch.matmul(p, vm)
        lse[:, :, start:stop] = part
    return out, lse.float()


if triton is not None:

    @triton.jit
    def _dropped_fwd(
        Q, KM, VM, Log2N, Kept, Out, Lse,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_mb, stride_mh, stride_mn, stride_md,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_pb, stride_ph, stride_pq,
        num_heads, group_size, nq, nk, nkb, causal_offset, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        # One program: BLOCK_M rows of one query block and head; online softmax over the pooled keys of the
        # blocks it dropped, merged into (Out, Lse) in place.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        h_kv = h // group_size
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qblock = (pid_m * BLOCK_M) // BLOCK_SIZE
        row_ok = rows < nq
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kept_row = Kept + b * stride_pb + h * stride_ph + qblock * stride_pq
        m_base = b * stride_mb + h_kv * stride_mh
        for j0 in range(0, nkb, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < nkb
            kept = tl.load(kept_row + cols, mask=col_ok, other=1) != 0
            km = tl.load(KM + m_base + cols[None, :] * stride_mn + offs_d[:, None] * stride_md,
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_IEEE:  # float32 inputs on the GPU: full float32 products, not TF32
                s = tl.dot(q, km, input_precision="ieee")
            elif DOT_F32:
                s = tl.dot(q, km)
            else:
                # 16-bit q: the float32 means as a 16-bit head and remainder, two dots. One rounded mean
                # would move each pooled logit by 2^-9 of it (bfloat16), far above the float32 LSE's error.
                km_hi = km.to(q.dtype)
                s = tl.dot(q, km_hi) + tl.dot(q, (km - km_hi.to(tl.float32)).to(q.dtype))
            s = s * qk_scale + tl.load(Log2N + cols, mask=col_ok, other=0.0)[None, :]
            ok = (~kept & col_ok)[None, :] & row_ok[:, None]
            if CAUSAL:
                last_key = tl.minimum((cols + 1) * BLOCK_SIZE, nk) - 1
                ok = ok & (last_key[None, :] <= rows[:, None] + causal_offset)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            vm = tl.load(VM + m_base + cols[:, None] * stride_mn + offs_d[None, :] * stride_md,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vm, input_precision="ieee")
            elif DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, vm)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), vm.to(q.dtype))
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        # Merge with the block-sparse result (natural-log LSE in, natural-log LSE out).
        o_ptr = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
        o_ok = row_ok[:, None] & d_ok[None, :]
        out_a = tl.load(o_ptr, mask=o_ok, other=0.0).to(tl.float32)
        lse_ptr = Lse + pid_bh * nq + rows
        lse_a = tl.load(lse_ptr, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        lse_b = tl.where(l_i > 0, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.math.log2(l_i), float("-inf"))
        top = tl.maximum(lse_a, lse_b)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        wa = tl.math.exp2(lse_a - top_safe)
        wb = tl.math.exp2(lse_b - top_safe)
        total = wa + wb
        merged = tl.where(total > 0, top_safe + tl.math.log2(total), float("-inf"))
        inv = tl.where(total > 0, 1.0 / total, 0.0)
        out_b = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        res = (out_a * wa[:, None] + out_b * wb[:, None]) * inv[:, None]
        tl.store(o_ptr, res.to(Out.dtype.element_ty), mask=o_ok)
        tl.store(lse_ptr, merged * 0.6931471805599453, mask=row_ok)


def _add_triton(q, k, v, block_index, block_count, out, lse, *, scale, causal, block_size):
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    km, count = block_means(k, block_size)
    vm, _ = block_means(v, block_size)
    kept = index_to_mask(block_index, block_count, nkb).expand(bsz, hq, nqb, nkb).to(torch.uint8)
    out, lse = out.contiguous().clone(), lse.float().contiguous().clone()
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, block_size)
    grid = (math.ceil(nq / block_m), bsz * hq)
    _dropped_fwd[grid](
        q, km, vm, count.log2().contiguous(), kept, out, lse, *q.stride(), *km.stride(), *out.stride(),
        *kept.stride()[:3], hq, hq // hkv, nq, nk, nkb, nk - nq, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=32, CAUSAL=causal,
        DOT_F32=q.dtype == torch.float32 or not q.is_cuda,  # the interpreter has no bf16 dot
        DOT_IEEE=q.is_cuda and q.dtype == torch.float32, num_warps=4,
    )
    return out, lse


def dropped_block_attention(q, k, v, block_index, block_count, *, scale=None, causal=False, block_size=128):
    """``(out (B, Hq, Nq, D) float32, lse (B, Hq, Nq) float32)``: attention over the pooled terms of the
    dropped key blocks only (rows with none: zeros and ``-inf``). PyTorch path (any device)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _pooled_torch(q, k, v, block_index, block_count, scale=scale, causal=causal, block_size=block_size)
    return out.masked_fill(torch.isneginf(lse)[..., None], 0.0).float(), lse


def add_dropped_blocks(q, k, v, block_index, block_count, out, lse, *, scale=None, causal=False, block_size=128,
                       backend=None):
    """Merge the pooled terms of the dropped key blocks into a block-sparse ``(out, lse)`` (same block index).

    ``backend``: None (Triton on CUDA for fp16/bf16/fp32), ``"triton"`` (CPU: under ``TRITON_INTERPRET=1``)
    or ``"torch"``. Returns the merged ``(out, lse)`` in ``out``'s dtype and float32."""
    backend = choose_backend(backend, q, applies=q.dtype != torch.float64, op="add_dropped_blocks")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "triton":
        return _add_triton(q, k, v, block_index, block_count, out, lse, scale=scale, causal=causal,
                           block_size=block_size)
    out_p, lse_p = dropped_block_attention(q, k, v, block_index, block_count, scale=scale, causal=causal,
                                           block_size=block_size)
    return merge_attention(out, lse, out_p.to(out.dtype), lse_p, backend="torch")


def dropped_block_attention_ref(q, k, v, block_index, block_count, *, scale=None, causal=False, block_size=128):
    """Float64 reference: the pooled terms as explicit extra keys of a dense softmax."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    nkb = math.ceil(nk / block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    km = torch.stack([k[:, :, j * block_size:(j + 1) * block_size].mean(2) for j in range(nkb)], 2)
    vm = torch.stack([v[:, :, j * block_size:(j + 1) * block_size].mean(2) for j in range(nkb)], 2)
    n = torch.tensor([min(block_size, nk - j * block_size) for j in range(nkb)], dtype=torch.float64,
                     device=q.device)
    s = q @ km.repeat_interleave(group, 1).transpose(-1, -2) * scale + n.log()
    dropped = ~index_to_mask(block_index, block_count, nkb)
    ok = dropped.expand(q.shape[0], q.shape[1], -1, nkb).repeat_interleave(block_size, 2)[:, :, :nq]
    if causal:
        last = torch.tensor([min((j + 1) * block_size, nk) - 1 for j in range(nkb)], device=q.device)
        ok = ok & (last[None, :] <= torch.arange(nq, device=last.device)[:, None] + nk - nq)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vm.repeat_interleave(group, 1), lse
