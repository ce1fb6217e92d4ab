"""Triton kernel of ``prefix_merge.merge_prefix``: one program per (batch x head, block of rows)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_prefix_kernel(PO, PL, IO, IL, RO, RL, CO, CL, ACT, RANK, Out, Lse, S, R, H, nq, PACK, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_INNER: tl.constexpr,
                         HAS_RES: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_RANK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rm = r < nq
    m = rm[:, None] & (c[None, :] < D)
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # Packed parts: head h is rows [j * nq, (j + 1) * nq) of packed head h // PACK, j = h % PACK; with
    # RANK token-major: token i of head h is row RANK[b, i] * PACK + j.
    if HAS_RANK:
        in_part = tl.load(RANK + (bh // H) * nq + r, mask=rm, other=0).to(tl.int64) * PACK + bh % PACK
    else:
        in_part = (bh % PACK) * nq + r
    part_row0 = (bh // PACK) * S * R
    row = bh * nq + r
    if HAS_CACHE:  # stable rows take the cached prefix: they skip the walk over the splits (no loads)
        act = tl.load(ACT + (bh // H) * nq + r, mask=rm, other=0) != 0
        rp = rm & act
    else:
        rp = rm
    mp = rp[:, None] & (c[None, :] < D)
    for s in range(0, S):
        prow = part_row0 + s * R + in_part
        lse = tl.load(PL + prow, mask=rp, other=float("-inf"))
        part = tl.load(PO + prow[:, None] * D + c[None, :], mask=mp, other=0.0).to(tl.float32)
        new = tl.maximum(top, lse)
        new_safe = tl.where(new == float("-inf"), 0.0, new)
        alpha = tl.exp(top - new_safe)
        w = tl.exp(lse - new_safe)
        acc = acc * alpha[:, None] + part * w[:, None]
        total = total * alpha + w
        top = new
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    lse = tl.where(total > 0, top_safe + tl.log(total), float("-inf"))
    if HAS_RES:
        out += tl.load(RO + row[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        lse += tl.load(RL + row, mask=rm, other=0.0)
    if HAS_CACHE:
        # Read the cache before writing it: a load after the store could run in another thread of the
        # program and miss the write. Every row continues at the cache's precision, as later steps read it.
        st = rm & (act == 0)  # active rows never read the cache
        cached = tl.load(CO + row[:, None] * D + c[None, :], mask=st[:, None] & (c[None, :] < D),
                         other=0.0).to(tl.float32)
        cached_lse = tl.load(CL + row, mask=st, other=float("-inf"))
        out = tl.where(act[:, None], out.to(CO.dtype.element_ty).to(tl.float32), cached)
        lse = tl.where(act, lse, cached_lse)
        tl.store(CO + row[:, None] * D + c[None, :], out.to(CO.dtype.element_ty), mask=m & act[:, None])
        tl.store(CL + row, lse, mask=rm & act)
    if HAS_INNER:
        lb = tl.load(IL + row, mask=rm, other=float("-inf"))
        ob = tl.load(IO + row[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        mx = tl.maximum(lse, lb)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        ea = tl.exp(lse - mx_safe)
        eb = tl.exp(lb - mx_safe)
        tot = ea + eb
        out = (out * ea[:, None] + ob * eb[:, None]) / tl.where(tot > 0, tot, 1.0)[:, None]
        lse = tl.where(tot > 0, mx_safe + tl.log(tot), float("-inf"))
    tl.store(Out + row[:, None] * D + c[None, :], out.to(Out.dtype.element_ty), mask=m)
    tl.store(Lse + row, lse, mask=rm)


def merge_prefix_triton(parts_out, parts_lse, nq, inner, residual, cache, active, out_dtype, pack=1, rank=None):
    bsz, h, s, r, d = parts_out.shape
    h *= pack
    po, pl = parts_out.contiguous(), parts_lse.contiguous()
    out = torch.empty(bsz, h, nq, d, dtype=out_dtype, device=po.device)
    lse = torch.empty(bsz, h, nq, dtype=torch.float32, device=po.device)
    io, il = (inner[0].contiguous(), inner[1].contiguous()) if inner is not None else (out, lse)
    ro, rl = (residual[0].contiguous(), residual[1].contiguous()) if residual is not None else (out, lse)
    if cache is not None:
        if not (cache[0].is_contiguous() and cache[1].is_contiguous()):
            raise ValueError("the cache is written in place and must be contiguous")
        co, cl, act = cache[0], cache[1], active.contiguous().view(torch.uint8)
    else:
        co, cl, act = out, lse, lse
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(32, 4096 // block_d))
    # Each program walks all S splits: with few heads x rows, use shorter row blocks so that several
    # programs per SM share the walk (128 programs at B*H = 32, nq = 32 would leave most SMs idle).
    while block_r > 4 and bsz * h * triton.cdiv(nq, block_r) < 512:
        block_r //= 2
    grid = (bsz * h, triton.cdiv(nq, block_r))
    rk = lse if rank is None else rank.contiguous()
    _merge_prefix_kernel[grid](po, pl, io, il, ro, rl, co, cl, act, rk, out, lse, s, r, h, nq, pack, D=d,
                               BLOCK_D=block_d, BLOCK_R=block_r, HAS_INNER=inner is not None,
                               HAS_RES=residual is not None,
                               HAS_CACHE=cache is not None, HAS_RANK=rank is not None)
    return out, lse
