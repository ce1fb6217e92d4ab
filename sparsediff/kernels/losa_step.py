"""Two per-step pieces of LoSA's cached step, each one kernel on CUDA (Triton, ``losa_step_triton``) and
plain PyTorch elsewhere (the float32 reference).

``token_change_update``: which tokens moved, and the references of the next step's test. q ``(B, Hq, Nq,
D)``, ``q_ref`` ``(B, Hq, Nq, D)`` float32 and ``ref_thr`` ``(B, Nq)`` float32 (LoSA's state, updated in
place). Token ``t`` is active when ``|q_t - q_ref_t|^2 >= ref_thr_t`` over all heads and dims; afterwards
``q_ref <- q`` and ``ref_thr <- threshold^2 * max(|q|^2, 1e-12)`` for every token, or with ``only_active``
for the active tokens only. Fourteen small ops in PyTorch, one program per token on CUDA.

``mean_key_score``: the softmax mass of a set of query rows per key block, against the block mean keys:
``score[b, h, j] = sum over r < n_live[b] of softmax_j(rows[b, h, r] . means[b, h, j] + bias[j]) + bias[j]``.
``rows`` ``(B, H, R, D)``: query rows of which only the first ``n_live[b]`` count (LoSA orders a block's
tokens active-first and stacks each KV group's query heads, so the active rows lead); ``means`` ``(B, H, nkb,
D)`` float32, the block mean keys already times the softmax scale (any strides); ``bias`` ``(nkb,)`` float32,
0 on the blocks that may be chosen and -1e30 on the others (padding of a capacity-sized state): added to the
logits and once more to the score, so that those blocks get no mass and rank last. The CUDA kernel skips
the query tiles past ``n_live`` at a fixed launch shape (CUDA-graph safe), so its cost follows the number of
live rows, and the logits never reach memory. It multiplies on bfloat16 tensor cores: the float32 means are
split into three bfloat16 parts (``split_means``) and a bfloat16 q is exact, so the logits keep about float32
accuracy (other q dtypes are split in two as well).
"""

from __future__ import annotations

import os

import torch

MAX_KERNEL_ROWS = 256


def _interpreter_or_cuda(x):
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")


def _token_sq_norms(x, out=None):
    # Contiguous reduction over D, then over heads (one reduction over dims (1, 3) is a slow strided kernel).
    return torch.sum(x.square().sum(dim=3), dim=1, out=out)


def _token_change_torch(q, q_ref, ref_thr, threshold, only_active):
    qf = q.float()
    active = _token_sq_norms(qf - q_ref) >= ref_thr
    thr2 = float(threshold) ** 2
    if only_active:
        q_ref.copy_(torch.where(active[:, None, :, None], qf, q_ref))
        ref_thr.copy_(torch.where(active, _token_sq_norms(qf).clamp_min_(1e-12).mul_(thr2), ref_thr))
    else:
        q_ref.copy_(qf)
        _token_sq_norms(q_ref, out=ref_thr).clamp_min_(1e-12).mul_(thr2)
    return active


def token_change_update(q, q_ref, ref_thr, threshold, *, only_active=False, backend=None):
    """The active mask ``(B, Nq)`` bool; ``q_ref`` and ``ref_thr`` updated in place (module docstring)."""
    b, h, n, d = q.shape
    if q_ref.shape != q.shape or q_ref.dtype != torch.float32 or not q_ref.is_contiguous():
        raise ValueError(f"q_ref must be a contiguous float32 {tuple(q.shape)} tensor, got {q_ref.dtype} "
                         f"{tuple(q_ref.shape)}")
    if tuple(ref_thr.shape) != (b, n) or ref_thr.dtype != torch.float32 or not ref_thr.is_contiguous():
        raise ValueError(f"ref_thr must be a contiguous float32 ({b}, {n}) tensor, got {ref_thr.dtype} "
                         f"{tuple(ref_thr.shape)}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton" or (backend is None and q.is_cuda):
        from .losa_step_triton import token_change_triton

        _interpreter_or_cuda(q)
        return token_change_triton(q, q_ref, ref_thr, float(threshold) ** 2, only_active)
    return _token_change_torch(q, q_ref, ref_thr, threshold, only_active)


def _check(rows, n_live, means, bias):
    if rows.dim() != 4 or means.dim() != 4:
        raise ValueError(f"rows and means must be (B, H, R, D) and (B, H, nkb, D), got {tuple(rows.shape)} and "
                         f"{tuple(means.shape)}")
    b, h, _, d = rows.shape
    if means.shape[0] != b or means.shape[1] != h or means.shape[3] != d:
        raise ValueError(f"means {tuple(means.shape)} do not match rows {tuple(rows.shape)}")
    if means.dtype != torch.float32 or bias.dtype != torch.float32:
        raise TypeError(f"means and bias must be float32, got {means.dtype} and {bias.dtype}")
    if tuple(bias.shape) != (means.shape[2],):
        raise ValueError(f"bias must be (nkb,) = ({means.shape[2]},), got {tuple(bias.shape)}")
    if tuple(n_live.shape) != (b,) or n_live.dtype.is_floating_point:
        raise ValueError(f"n_live must be an integer tensor of shape ({b},), got {n_live.dtype} {tuple(n_live.shape)}")


def _mean_key_score_torch(rows, n_live, means, bias):
    logits = torch.matmul(rows.float(), means.transpose(-1, -2)).add_(bias)
    probs = torch.softmax(logits, dim=-1)  # (B, H, R, nkb)
    live = (torch.arange(rows.shape[2], device=rows.device) < n_live[:, None]).to(probs.dtype)  # (B, R)
    return torch.matmul(live[:, None, None, :], probs)[:, :, 0].add_(bias)


def split_means(means, out=None):
    """float32 means ``(B, H, nkb, D)`` (any strides) as three bfloat16 parts ``(3, B, H, D, nkb)`` whose sum
    is the float32 value (8 + 8 + 8 significand bits): what the CUDA kernel reads. Callers that score many
    times against the same means (LoSA, once per block) make it once and pass it as ``split``."""
    t = means.transpose(-1, -2)
    hi = t.to(torch.bfloat16)
    rest = t - hi.float()
    mid = rest.to(torch.bfloat16)
    parts = torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)])
    return parts if out is None else out.copy_(parts)


def mean_key_score(rows, n_live, means, bias, *, split=None, backend=None):
    """``(B, H, nkb)`` float32 score; see the module docstring. ``split``: :func:`split_means` of ``means``
    (made here when needed and not given). ``backend``: None (Triton on CUDA up to ``MAX_KERNEL_ROWS``
    stacked rows, PyTorch above), "triton" or "torch"."""
    _check(rows, n_live, means, bias)
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    # Above ~256 stacked rows one float32 cuBLAS matmul over every row beat the kernel on an H100 (0.07 vs
    # 0.16 ms per step at a 128k prefix, 128-token blocks; docs/block_methods.md); below it the kernel wins.
    many_rows = rows.shape[2] > MAX_KERNEL_ROWS
    if backend == "triton" or (backend is None and rows.is_cuda and not many_rows):
        from .losa_step_triton import mean_key_score_triton

        _interpreter_or_cuda(rows)
        if split is None:
            split = split_means(means)
        b, h, nkb, d = means.shape
        if tuple(split.shape) != (3, b, h, d, nkb) or split.dtype != torch.bfloat16:
            raise ValueError(f"split must be bfloat16 (3, {b}, {h}, {d}, {nkb}), got {split.dtype} "
                             f"{tuple(split.shape)}")
        return mean_key_score_triton(rows, n_live, split, bias)
    return _mean_key_score_torch(rows, n_live, means, bias)
