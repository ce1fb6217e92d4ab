"""Fused Triton LSE merge: reads both partial outputs once, writes the merged output and LSE."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(OutA, LseA, OutB, LseB, Out, Lse, rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rm = r < rows
    m = rm[:, None] & (c[None, :] < D)
    la = tl.load(LseA + r, mask=rm, other=float("-inf"))
    lb = tl.load(LseB + r, mask=rm, other=float("-inf"))
    mx = tl.maximum(la, lb)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    ea = tl.exp(la - mx_safe)
    eb = tl.exp(lb - mx_safe)
    s = ea + eb
    s_safe = tl.where(s == 0.0, 1.0, s)
    a = tl.load(OutA + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(OutB + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
    out = (a * (ea / s_safe)[:, None] + b * (eb / s_safe)[:, None])
    tl.store(Out + r[:, None] * D + c[None, :], out.to(Out.dtype.element_ty), mask=m)
    tl.store(Lse + r, mx_safe + tl.log(s), mask=rm)


def merge_attention_triton(out_a, lse_a, out_b, lse_b):
    d = out_a.shape[-1]
    oa, ob = out_a.contiguous(), out_b.contiguous()
    la, lb = lse_a.float().contiguous(), lse_b.float().contiguous()
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    rows = la.numel()
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 8192 // block_d))
    _merge_kernel[(triton.cdiv(rows, block_r),)](oa, la, ob, lb, out, lse, rows, D=d, BLOCK_D=block_d,
                                                 BLOCK_R=block_r)
    return out, lse
