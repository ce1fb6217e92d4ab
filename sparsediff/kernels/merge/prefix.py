"""One pass that finishes a block-diffusion attention call from its partial results.

Inputs are partial attentions over disjoint key sets, each with its LSE:

  * ``parts`` ``(B, H, S, R, D)`` / ``(B, H, S, R)``: the prefix attention split over ``S`` key chunks
    (rows ``< nq`` of each are used); they merge by LSE into the prefix attention. ``pack > 1``: parts
    of ``H / pack`` packed heads, rows ``[j * nq, (j + 1) * nq)`` of packed head ``p`` being head
    ``p * pack + j`` (query heads of a KV group stacked into one query block); with ``rank`` ``(B, nq)``
    the stacking is token-major: row ``rank[b, i] * pack + j``;
  * ``residual`` (optional): a float32 correction added to the merged prefix output and LSE
    (FlashBlock's cached ``dense - sparse`` term);
  * ``cache`` + ``active`` (optional): rows whose ``active[b, i]`` is True take the fresh prefix and
    write it into the cache (in place); the other rows read the cached prefix instead (LoSA);
  * ``inner`` (optional): the in-block attention, merged last by LSE.

Eager PyTorch needs about twenty small kernels for this; the Triton kernel does it in one launch, which
is what the per-step cost of FlashBlock and LoSA is made of at long prefixes.
"""

from __future__ import annotations

import torch

from ..backend import choose_backend


def _lse_merge(out_a, lse_a, out_b, lse_b):
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    out = (wa[..., None] * out_a + wb[..., None] * out_b) / torch.where(total > 0, total, 1.0)[..., None]
    return out, torch.where(total > 0, top + torch.log(total), torch.full_like(total, float("-inf")))


def unpack_heads(x, nq: int, pack: int, rank=None):
    """``(B, H / pack, S, R[, D])`` packed parts -> ``(B, H, S, nq[, D])``; with ``rank`` ``(B, nq)`` the
    token-major layout (row ``rank[b, t] * pack + j``), else head-major (row ``j * nq + t``)."""
    b, hp, s, r = x.shape[:4]
    tail = x.shape[4:]
    if rank is not None:
        rows = rank.long()[:, None, :] * pack + torch.arange(pack, device=x.device)[None, :, None]  # (B, P, nq)
        rows = rows.view(b, 1, 1, pack * nq, *([1] * len(tail))).expand(b, hp, s, pack * nq, *tail)
        x = x.gather(3, rows)
    x = x[:, :, :, : pack * nq].reshape(b, hp, s, pack, nq, *tail)
    return x.transpose(2, 3).reshape(b, hp * pack, s, nq, *tail)


def _merge_prefix_torch(parts_out, parts_lse, nq, inner, residual, cache, active, out_dtype, pack=1, rank=None):
    if pack > 1 or rank is not None:
        parts_out, parts_lse = unpack_heads(parts_out, nq, pack, rank), unpack_heads(parts_lse, nq, pack, rank)
    lse_s = parts_lse[:, :, :, :nq].float()
    out_s = parts_out[:, :, :, :nq].float()
    top = lse_s.amax(dim=2)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse_s - top[:, :, None])
    total = weight.sum(dim=2)
    out = (weight[..., None] * out_s).sum(dim=2) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, top + torch.log(total), torch.full_like(total, float("-inf")))
    if residual is not None:
        out, lse = out + residual[0].float(), lse + residual[1]
    if cache is not None:
        rows = active[:, None, :]
        out = torch.where(rows[..., None], out, cache[0].float())
        lse = torch.where(rows, lse, cache[1])
        cache[0].copy_(out)
        cache[1].copy_(lse)
        out = cache[0].float()  # what a later step reads: the cached rows, at the cache's precision
    if inner is not None:
        out, lse = _lse_merge(out, lse, inner[0].float(), inner[1].float())
    return out.to(out_dtype), lse


def merge_prefix(parts_out, parts_lse, nq, inner=None, *, residual=None, cache=None, active=None, out_dtype=None,
                 backend=None, pack=1, rank=None):
    """``(out, lse)`` of the finished call; see the module docstring. ``out_dtype`` defaults to the
    dtype of ``inner``'s output (else of ``parts_out``); ``lse`` is float32 ``(B, H, nq)``."""
    if not isinstance(pack, int) or pack < 1:
        raise ValueError(f"pack must be a positive int, got {pack!r}")
    if parts_out.dim() != 5 or parts_lse.shape != parts_out.shape[:-1] or parts_out.shape[3] < pack * nq:
        raise ValueError(f"parts must be (B, H / pack, S, R >= pack * nq, D) with LSE (B, H / pack, S, R), got "
                         f"{tuple(parts_out.shape)} and {tuple(parts_lse.shape)} for nq={nq}, pack={pack}")
    if rank is not None and tuple(rank.shape) != (parts_out.shape[0], nq):
        raise ValueError(f"rank must be (B, nq) = ({parts_out.shape[0]}, {nq}), got {tuple(rank.shape)}")
    if (cache is None) != (active is None):
        raise ValueError("cache and active go together")
    if out_dtype is None:
        out_dtype = inner[0].dtype if inner is not None else parts_out.dtype
    if choose_backend(backend, parts_out, op="merge_prefix") == "triton":
        from .prefix_triton import merge_prefix_triton

        return merge_prefix_triton(parts_out, parts_lse, nq, inner, residual, cache, active, out_dtype, pack, rank)
    return _merge_prefix_torch(parts_out, parts_lse, nq, inner, residual, cache, active, out_dtype, pack, rank)
