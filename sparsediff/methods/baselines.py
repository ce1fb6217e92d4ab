"""Baseline block selectors, registered under the same signature as BA-Att's:

- ``"block_mean"``: block means only (BA-Att with β = 0, no outlier keys, no sorting).
- ``"fixed"``: a data-independent pattern: sinks + the last key block + a local window around the
  diagonal, widened until the target density (mass mode: treated as density = mass).
- ``"xattention"``: XAttention-style anti-diagonal scoring: inside each block, sums of q·k over
  anti-diagonals sampled every ``stride`` tokens, softmax over keys, summed per block.

Run them through ``BlockSparseMethod(selector=name, sparsity=...)``.
"""

from __future__ import annotations

import math

import torch

from .ba_att import ba_scores
from .block_select import budget_of, policy_of, select_from_scores
from .selectors import register_selector

# Bytes of sampled scores one xattention chunk may hold.
_CHUNK_BYTES = 128 * 2**20


def _select(scores, q, k, config, causal, global_tokens, layer=None, **kw):
    density, mass = budget_of(config, layer)
    return select_from_scores(scores, nq=q.shape[2], nk=k.shape[2], density=density, mass=mass, causal=causal,
                              global_tokens=global_tokens, **policy_of(config), **kw)


@register_selector("block_mean")
def select_block_mean(q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    scores = ba_scores(q, k, block_size=config.block_size, beta=0.0, scale=scale, outlier_keys=0)
    return _select(scores, q, k, config, causal, global_tokens, layer)


@register_selector("fixed")
def select_fixed(q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    bs = config.block_size
    nq, nk = q.shape[2], k.shape[2]
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    density, mass = budget_of(config, layer)
    # Priority falls off with distance from the diagonal block (end-aligned), so top-k keeps a window.
    centre = ((torch.arange(nqb, device=q.device) * bs + bs // 2).clamp(max=nq - 1) + nk - nq) // bs
    distance = (torch.arange(nkb, device=q.device)[None, :] - centre[:, None]).abs().float()
    scores = (-distance).expand(q.shape[0], q.shape[1], nqb, nkb)
    last = torch.zeros(nqb, nkb, dtype=torch.bool, device=q.device)
    last[:, -1] = True
    # A fixed pattern has no mass estimate: a mass budget is read as that density, spread evenly over rows.
    policy = dict(policy_of(config), allocation="row")
    return select_from_scores(scores, nq=nq, nk=nk, density=density if density is not None else mass,
                              causal=causal, global_tokens=global_tokens, extra_forced=last, weight_by_count=False,
                              **policy)


def xattention_scores(q, k, *, block_size=128, stride=8, scale=None, causal=False):
    """Per (query block, key block): mean over the block's sampled query rows of the softmax mass that
    anti-diagonal samples put on the key block. Returns log-mass ``(B, Hq, nqb, nkb)``."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    qp = torch.nn.functional.pad(q, (0, 0, 0, nqb * block_size - nq))
    kp = torch.nn.functional.pad(k, (0, 0, 0, nkb * block_size - nk))
    # Row a of qs pairs query S*a + S-1-i with key S*c + i: the product sums one anti-diagonal.
    qs = torch.cat([qp[:, :, stride - 1 - i :: stride] for i in range(stride)], dim=-1).float()
    ks = torch.cat([kp[:, :, i::stride] for i in range(stride)], dim=-1).float()
    rows, cols = qs.shape[2], ks.shape[2]
    per_block = block_size // stride
    group = hq // hkv
    qs = qs.view(bsz, hkv, group, rows, stride * d)
    col_first_key = torch.arange(cols, device=q.device) * stride
    out = torch.empty(bsz, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    chunk_blocks = max(1, _CHUNK_BYTES // max(1, bsz * hq * per_block * cols * 4 * 2))
    for start in range(0, nqb, chunk_blocks):
        stop = min(start + chunk_blocks, nqb)
        sample = qs[:, :, :, start * per_block : stop * per_block]
        logits = torch.matmul(sample, ks[:, :, None].transpose(-1, -2)) * (scale / stride)
        invalid = col_first_key[None, :] >= nk
        if causal:
            row_last_query = torch.arange(start * per_block, stop * per_block, device=q.device) * stride + stride - 1
            invalid = invalid | (col_first_key[None, :] > row_last_query[:, None] + nk - nq)
        probs = torch.softmax(logits.masked_fill(invalid, float("-inf")), dim=-1).nan_to_num(0.0)
        mass = probs.view(bsz, hkv, group, stop - start, per_block, nkb, per_block).sum(dim=(4, 6)) / per_block
        out[:, :, start:stop] = mass.reshape(bsz, hq, stop - start, nkb)
    return torch.log(out + 1e-30)


@register_selector("xattention")
def select_xattention(q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    scores = xattention_scores(q, k, block_size=config.block_size, stride=getattr(config, "stride", 8),
                               scale=scale, causal=causal)
    return _select(scores, q, k, config, causal, global_tokens, layer, weight_by_count=False)


@register_selector("oracle")
def select_oracle(q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    """The true mean attention probability per tile (two dense passes): an upper bound for any
    selector at equal density, for fidelity studies, not a fast path."""
    from ..kernels.tile_mass import row_lse, tile_mass

    bs = config.block_size
    _, lse = row_lse(q, k, k, scale=scale, causal=causal, block_size=bs)
    mass = tile_mass(q, k, lse, scale=scale, causal=causal, block_size=bs)
    return _select(torch.log(mass + 1e-30), q, k, config, causal, global_tokens, layer)
