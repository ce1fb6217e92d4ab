"""Triton kernel of ``prefix_merge.merge_prefix``: one program per (batch x head, row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pdl import pdl_kwargs, pdl_start


@triton.jit
def _merge_prefix_kernel(PO, PL, IO, IL, RO, RL, CO, CL, ACT, RANK, Out, Lse, S, R, H, nq, PACK, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_INNER: tl.constexpr,
                         HAS_RES: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_RANK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    # One program (one warp) per (batch x head, row); it loads BLOCK_S splits of its row at once (a walk of
    # one split at a time was latency-bound: 26 us per call at 51 splits, LoSA at a 128k prefix on an H100;
    # one warp instead of four: 3.4 vs 6.2 us there, 5.7 vs 12.0 us at 64k with 128-token blocks).
    bh = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    b = bh // H
    c = tl.arange(0, BLOCK_D)
    cm = c < D
    # Packed parts: head h is rows [j * nq, (j + 1) * nq) of packed head h // PACK, j = h % PACK; with
    # RANK token-major: token i of head h is row RANK[b, i] * PACK + j.
    if HAS_RANK:
        in_part = tl.load(RANK + b * nq + i).to(tl.int64) * PACK + bh % PACK
    else:
        in_part = (bh % PACK) * nq + i
    part_row = (bh // PACK) * S * R + in_part
    row = bh * nq + i
    act = True
    if HAS_CACHE:  # stable rows take the cached prefix: they skip the splits (no loads)
        act = tl.load(ACT + b * nq + i) != 0
    top = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    if act:
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < S
            prow = part_row + s.to(tl.int64) * R
            lse = tl.load(PL + prow, mask=sm, other=float("-inf"))
            part = tl.load(PO + prow[:, None] * D + c[None, :], mask=sm[:, None] & cm[None, :], other=0.0)
            new = tl.maximum(top, tl.max(lse, axis=0))
            new_safe = tl.where(new == float("-inf"), 0.0, new)
            alpha = tl.exp(top - new_safe)
            w = tl.exp(lse - new_safe)
            acc = acc * alpha + tl.sum(part.to(tl.float32) * w[:, None], axis=0)
            total = total * alpha + tl.sum(w, axis=0)
            top = new
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    out = acc / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, top_safe + tl.log(total), float("-inf"))
    if HAS_RES:
        out += tl.load(RO + row * D + c, mask=cm, other=0.0).to(tl.float32)
        lse += tl.load(RL + row)
    if HAS_CACHE:
        # Every row continues at the cache's precision, as later steps read it.
        if act:
            out = out.to(CO.dtype.element_ty).to(tl.float32)
            tl.store(CO + row * D + c, out.to(CO.dtype.element_ty), mask=cm)
            tl.store(CL + row, lse)
        else:
            out = tl.load(CO + row * D + c, mask=cm, other=0.0).to(tl.float32)
            lse = tl.load(CL + row)
    if HAS_INNER:
        lb = tl.load(IL + row)
        ob = tl.load(IO + row * D + c, mask=cm, other=0.0).to(tl.float32)
        mx = tl.maximum(lse, lb)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        ea = tl.exp(lse - mx_safe)
        eb = tl.exp(lb - mx_safe)
        tot = ea + eb
        out = (out * ea + ob * eb) / tl.where(tot > 0, tot, 1.0)
        lse = tl.where(tot > 0, mx_safe + tl.log(tot), float("-inf"))
    tl.store(Out + row * D + c, out.to(Out.dtype.element_ty), mask=cm)
    tl.store(Lse + row, lse)


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
    block_s = max(2, min(32, triton.next_power_of_2(s), 4096 // block_d))
    rk = lse if rank is None else rank.contiguous()
    _merge_prefix_kernel[(bsz * h, nq)](po, pl, io, il, ro, rl, co, cl, act, rk, out, lse, s, r, h, nq, pack, D=d,
                                        BLOCK_D=block_d, BLOCK_S=block_s, HAS_INNER=inner is not None,
                                        HAS_RES=residual is not None, HAS_CACHE=cache is not None,
                                        HAS_RANK=rank is not None, num_warps=1,
                                        **pdl_kwargs(out))
    return out, lse
