"""Dense attention in the library's tensor conventions, with optional LSE: the fallback of every method."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..kernels import block_sparse_attention, dense_index


@functools.lru_cache(maxsize=64)
def _full_index(nqb: int, nkb: int, device: str):
    # Built once per shape and device: the LSE path is called every step by the caching methods.
    return dense_index(1, 1, nqb, nkb, device=device)


def dense_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """SDPA over ``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk, D)``; causal is end-aligned when Nq != Nk."""
    if return_lse:
        block = 128 if q.dtype in (torch.float16, torch.bfloat16) else 64
        nqb, nkb = math.ceil(q.shape[2] / block), math.ceil(k.shape[2] / block)
        index, count = _full_index(nqb, nkb, str(q.device))
        return block_sparse_attention(
            q, k, v, index, count, scale=scale, causal=causal, block_size=block, return_lse=True, check_ids=False
        )
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if causal and nq != nk:
        # SDPA's is_causal is top-left aligned for Nq != Nk; we align to the end (prefix caches).
        mask = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + (nk - nq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
