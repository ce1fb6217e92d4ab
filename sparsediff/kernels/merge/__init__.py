"""Exact merge of two attentions over disjoint key sets through their log-sum-exp.

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A side with lse = -inf (it saw no key) contributes nothing; if both are -inf the result is zeros
with lse = -inf. FlashBlock and LoSA merge cached and fresh partial attentions with it.
"""

from __future__ import annotations

import torch

from ..backend import choose_backend


def _merge_torch(out_a, lse_a, out_b, lse_b):
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    empty = torch.isneginf(lse)
    safe = lse.masked_fill(empty, 0.0)
    wa = torch.exp(la - safe).masked_fill(empty, 0.0)[..., None]
    wb = torch.exp(lb - safe).masked_fill(empty, 0.0)[..., None]
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


def merge_attention(out_a, lse_a, out_b, lse_b, *, backend: str | None = None):
    """Merge ``(out_a, lse_a)`` and ``(out_b, lse_b)``: outs ``(..., N, D)``, lses ``(..., N)`` float32."""
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have the same shape")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_b.shape[:-1]:
        raise ValueError(
            f"lse shapes {tuple(lse_a.shape)}, {tuple(lse_b.shape)} must equal the outputs' shape without "
            f"the last dim, {tuple(out_a.shape[:-1])}"
        )
    if out_a.dtype != out_b.dtype:
        raise TypeError(f"out_a and out_b must share a dtype, got {out_a.dtype} and {out_b.dtype}")
    if not (out_a.device == out_b.device == lse_a.device == lse_b.device):
        raise ValueError("merge_attention inputs must be on one device")
    if choose_backend(backend, out_a, applies=out_a.dtype != torch.float64, op="merge_attention") == "triton":
        from .triton import merge_attention_triton

        return merge_attention_triton(out_a, lse_a, out_b, lse_b)
    return _merge_torch(out_a, lse_a, out_b, lse_b)
