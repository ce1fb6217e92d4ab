"""Plain-PyTorch references for (block-sparse, masked) attention, written for clarity, not speed.

They materialise the full Nq x Nk score matrix and accumulate in float32 (or float64 when given
float64), so tests can compare the fast paths against them on small shapes.
"""

from __future__ import annotations

import math

import torch

from ..masks import index_to_mask


def expand_block_mask(block_mask: torch.Tensor, nq: int, nk: int, block_size: int) -> torch.Tensor:
    """Token-level boolean mask (..., Nq, Nk) from a block mask (..., ceil(Nq/b), ceil(Nk/b))."""
    token_mask = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return token_mask[..., :nq, :nk]


def causal_token_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """End-aligned causal mask (as SDPA with is_causal=True): query i sees keys j <= i + (Nk - Nq)."""
    rows = torch.arange(nq, device=device)[:, None] + (nk - nq)
    cols = torch.arange(nk, device=device)[None, :]
    return cols <= rows


def masked_attention_ref(q, k, v, token_mask, *, scale=None, upcast=True):
    """Softmax attention restricted to ``token_mask`` (broadcastable to (B, Hq, Nq, Nk)).

    Returns ``(out, lse)``; rows with no allowed key give zeros and lse = -inf. ``upcast=False``
    computes the matmuls in the inputs' own precision: PyTorch's low-precision error, the yardstick
    for a kernel's error budget (FlashAttention's test habit).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not upcast:
        acc = q.dtype
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask, float("-inf")).float() if not upcast else \
        scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.matmul(probs.to(acc), v.to(acc))
    return out.to(q.dtype), lse.to(torch.float64 if acc == torch.float64 else torch.float32)


def block_sparse_attention_ref(
    q, k, v, block_index, block_count, *, scale=None, causal=False, block_size=128, upcast=True
):
    """Reference for :func:`sparsediff.kernels.block_sparse_attention`; returns ``(out, lse)``."""
    nq, nk = q.shape[-2], k.shape[-2]
    num_kv_blocks = math.ceil(nk / block_size)
    block_mask = index_to_mask(block_index, block_count, num_kv_blocks)
    token_mask = expand_block_mask(block_mask, nq, nk, block_size)
    if causal:
        token_mask = token_mask & causal_token_mask(nq, nk, device=q.device)
    return masked_attention_ref(q, k, v, token_mask, scale=scale, upcast=upcast)
