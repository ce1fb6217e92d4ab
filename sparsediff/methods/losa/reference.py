"""LoSA's step math in plain PyTorch: token change, the active rows' mass per key block against the block mean
keys, their union and ranking (the references of ``step_kernels`` and the CPU path)."""

from __future__ import annotations

import math

import torch

from . import step_kernels as losa_step
from .step_kernels import (
    block_logits,
)


def token_change(q_now, q_ref):
    """Relative L2 change per token ``(B, Nq)``, over all query heads of the token."""
    diff = (q_now.float() - q_ref.float()).square().sum(dim=(1, 3))
    ref = q_ref.float().square().sum(dim=(1, 3))
    return torch.sqrt(diff / ref.clamp_min(1e-12))


def _active_mass(qf, active, means_t, bias, per_kv_head, outliers_t=None, block_size=1):
    """The active tokens' summed softmax mass per key block against the block mean keys: ``(B, Hq, 1, nkb)``,
    or ``(B, Hkv, 1, nkb)`` summed over each KV group's query heads. ``means_t`` ``(B, Hkv, D, nkb)`` are
    the block means times the softmax scale, transposed; ``bias`` is added to the logits (or None).
    ``outliers_t``: the blocks' largest-norm keys, laid out as ``means_t`` (``losa_step.block_logits``)."""
    bsz, hq, nq, d = qf.shape
    hkv, nkb = means_t.shape[1], means_t.shape[3]
    group = hq // hkv
    # Query heads of one KV group share the key means: one matmul per group.
    logits = block_logits(qf.reshape(bsz, hkv, group * nq, d), means_t.transpose(-1, -2),
                          None if outliers_t is None else outliers_t.transpose(-1, -2), block_size)
    probs = torch.softmax(logits if bias is None else logits.add_(bias), dim=-1)
    weight = active.to(probs.dtype)[:, None, None, :]  # stable tokens carry no weight
    if per_kv_head:  # one batched product over the group's heads and the block's tokens
        return torch.matmul(weight.repeat(1, 1, 1, group), probs)
    return torch.matmul(weight, probs.view(bsz, hq, nq, nkb))


def mean_key_union(q, active, key_means, keep, scale, per_kv_head=False, keep_sinks=False, key_outliers=None,
                   block_size=1):
    """Built-in LoSA selection: one set of ``keep`` prefix key blocks per batch row and head (or per KV
    head, shared by its query heads), ranked by the active tokens' softmax mass against the block mean
    keys. q ``(B, Hq, Nq, D)``, active bool ``(B, Nq)``, key_means ``(B, Hkv, nkb, D)``; returns a bool
    mask ``(B, Hq or Hkv, nkb)``. Stable tokens carry no weight, so they cannot inflate the union.
    ``keep_sinks``: the first key block is always one of the ``keep``. ``key_outliers`` ``(B, Hkv, nkb, D)``:
    each block's largest-norm key, scored with the mean as ``losa_step.block_logits`` says."""
    # Written out plainly (not through _active_mass): the tests use it as the reference for the fused path.
    bsz, hq, nq, d = q.shape
    hkv, nkb = key_means.shape[1], key_means.shape[2]
    means = key_means.float().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, nkb, D)
    logits = torch.matmul(q.float(), means.transpose(-1, -2)) * scale  # (B, Hq, Nq, nkb)
    if key_outliers is not None:
        peak = torch.matmul(q.float(), key_outliers.float().repeat_interleave(hq // hkv, dim=1).transpose(-1, -2))
        logits = torch.logaddexp(logits, peak * scale - math.log(block_size))
    probs = torch.softmax(logits, dim=-1)
    score = (probs * active[:, None, :, None]).sum(dim=2)  # (B, Hq, nkb)
    if per_kv_head:
        score = score.view(bsz, hkv, hq // hkv, nkb).sum(dim=2)
    if keep_sinks:
        score[..., 0] = float("inf")
    top = torch.topk(score, keep, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


def mean_key_rank(qf, active, means_t, bias, keep, per_kv_head=False, splits=1, keep_sinks=False, outliers_t=None,
                  block_size=1):
    """:func:`mean_key_union` for prefix buffers sized to a capacity: the ``keep`` best key-block ids
    per batch row and head (or KV head), best first, int32 ``(B, H, 1, keep)``. ``bias`` ``(nkb,)`` is
    0 on the current prefix's blocks and -1e30 past it: those get no softmax mass and rank last, so the
    first ``k`` ids are the top ``k`` of the current prefix for every ``k`` (the kernels read a count).
    ``splits > 1``: laid out for that many query blocks (:func:`rank_blocks`). ``keep_sinks``: block 0 first."""
    score = _active_mass(qf, active, means_t, bias, per_kv_head, outliers_t, block_size).add_(bias)[:, :, 0]
    return rank_blocks(score, keep, splits, first=keep_sinks)


def rank_blocks(score, keep, splits=1, first=False, repeat=1):
    """The ``keep`` best key-block ids of ``score`` ``(B, H, nkb)``, best first: int32 ``(B, H, 1, keep)``, or
    laid out for ``splits`` query blocks (``strided_layout``). Stable descending sort order, one kernel on
    CUDA (``methods.losa.step_kernels.rank_blocks``); ``first``: block 0 ahead of all; ``repeat``: each split's row
    repeated for that many query tiles."""
    return losa_step.rank_blocks(score, keep, splits, first=first, repeat=repeat)


