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
logits and once more to the score, so that those blocks get no mass and rank last. On CUDA two kernels
work on chunks of key blocks (a few heads of a few live rows leave too few programs otherwise): the first
writes each live row's max and normaliser per chunk, the second combines them and sums the live rows'
probabilities per block. Both skip the query tiles past ``n_live`` at a fixed launch shape (CUDA-graph
safe), so their cost follows the number of live rows, and the logits never reach memory. They multiply on
bfloat16 tensor cores: the float32 means are split into three bfloat16 parts (``split_means``) and a bfloat16
q is exact, so the logits keep about float32 accuracy (other q dtypes are split in two as well).

``rank_blocks``: the ``keep`` best key-block ids of a score ``(B, H, nkb)``, best first, exactly as a stable
descending ``torch.sort`` orders them (ties by lower index, NaN first, -0.0 equal to +0.0), laid out for
``splits`` query blocks as ``prefix_attention.strided_layout`` does (rank ``r`` to split ``r % splits``,
slot ``r // splits``, padding block 0). On CUDA one kernel counts each element's rank (the elements before
it in that order) and scatters it: 8 rows of ~1000 scores are too few for a radix sort to pay off.

``window_attention``: float32 attention of q ``(B, Hq, Nq, D)`` to the KV rows ``idx`` ``(W,)`` of k, v
``(B, Hkv, C, D)`` with an additive key mask ``bias`` ``(W,)`` (0 or -inf): ``(out float32, lse)``. On CUDA one
kernel gathers the rows and attends (online softmax over the window); in PyTorch a gather, a conversion and
five ops. The kernel is not bit-equal to the PyTorch path (other summation order), only close to float32
rounding.
"""

from __future__ import annotations

import math

import torch

from ...kernels.backend import check_triton, choose_backend


def _use_triton(backend, x) -> bool:
    """Whether a ``backend`` of None / "triton" / "torch" runs the Triton kernel for ``x`` (``kernels.backend``)."""
    return choose_backend(backend, x, op="LoSA step") == "triton"


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
    if _use_triton(backend, q):
        from .step_triton import token_change_triton

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


def block_logits(rows, means, outliers=None, block_size=1):
    """float32 logits of ``rows`` ``(B, H, R, D)`` against each key block ``(B, H, nkb, D)``: its mean key
    (``means``, times the softmax scale), or with ``outliers`` (the block's largest-norm key, times the scale)
    ``logaddexp(q.mean, q.outlier - log(block_size))``: the block's log-sum of exponentials up to a constant
    all blocks share, seen through its mean and its one outlier key (BA-Att's outlier term), so that a
    single key every query attends is not averaged away."""
    logits = torch.matmul(rows.float(), means.transpose(-1, -2))
    if outliers is None:
        return logits
    peak = torch.matmul(rows.float(), outliers.transpose(-1, -2)).sub_(math.log(block_size))
    return torch.logaddexp(logits, peak)


def _mean_key_score_torch(rows, n_live, means, bias, outliers=None, block_size=1):
    logits = block_logits(rows, means, outliers, block_size).add_(bias)
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


def mean_key_score(rows, n_live, means, bias, *, split=None, backend=None, outliers=None, block_size=1):
    """``(B, H, nkb)`` float32 score; see the module docstring. ``split``: :func:`split_means` of ``means``
    (made here when needed and not given). ``backend``: None (Triton on CUDA, PyTorch elsewhere), "triton",
    "logits" or "torch". "logits": the float32 logits of every row in one matmul (as the PyTorch path), then
    one Triton kernel for the live rows' softmax mass (``live_mass_triton``; summed per row tile, so not
    bit-equal to the PyTorch path).
    ``outliers``: each block's largest-norm key times the scale, shaped as ``means``, scored with it as
    :func:`block_logits` says (``block_size`` keys per block); the "logits" path on CUDA whatever the rows."""
    _check(rows, n_live, means, bias)
    if outliers is not None:
        if outliers.shape != means.shape or outliers.dtype != torch.float32:
            raise ValueError(f"outliers must be float32 {tuple(means.shape)} as means, got {outliers.dtype} "
                             f"{tuple(outliers.shape)}")
        if backend == "triton":
            raise ValueError("backend='triton' scores block means only; outliers need 'logits' or 'torch'")
        if choose_backend(backend, rows, op="mean_key_score", extra=("logits",)) != "torch":
            from .step_triton import live_mass_triton

            return live_mass_triton(block_logits(rows, means, outliers, block_size), n_live, bias.float())
        return _mean_key_score_torch(rows, n_live, means, bias, outliers, block_size)
    backend = choose_backend(backend, rows, op="mean_key_score", extra=("logits",))
    if backend == "logits":
        from .step_triton import live_mass_triton

        return live_mass_triton(torch.matmul(rows.float(), means.transpose(-1, -2)), n_live, bias.float())
    if backend == "triton":
        from .step_triton import mean_key_score_triton

        if split is None:
            split = split_means(means)
        b, h, nkb, d = means.shape
        if tuple(split.shape) != (3, b, h, d, nkb) or split.dtype != torch.bfloat16:
            raise ValueError(f"split must be bfloat16 (3, {b}, {h}, {d}, {nkb}), got {split.dtype} "
                             f"{tuple(split.shape)}")
        return mean_key_score_triton(rows, n_live, split, bias)
    return _mean_key_score_torch(rows, n_live, means, bias)


def _rank_blocks_torch(score, keep, splits, first=False, repeat=1):
    index = _ranked_layout(score, keep, splits, first)
    return index.repeat_interleave(repeat, dim=2) if repeat > 1 else index


def _ranked_layout(score, keep, splits, first):
    if first:  # block 0, then the others in order
        rest = torch.sort(score[..., 1:], dim=-1, descending=True, stable=True).indices + 1
        index = torch.cat([torch.zeros_like(rest[..., :1]), rest], dim=-1)[:, :, None, :keep].to(torch.int32)
    else:
        index = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :, None, :keep].to(torch.int32)
    if splits == 1:
        return index
    chunk = -(-keep // splits)
    index = torch.nn.functional.pad(index, (0, splits * chunk - keep))
    return index.view(*index.shape[:2], chunk, splits).transpose(-1, -2).contiguous()


def rank_blocks(score, keep, splits=1, *, first=False, repeat=1, backend=None):
    """int32 ``(B, H, splits, ceil(keep / splits))`` ranked block ids of ``score`` (module docstring).
    ``first``: block 0 ranks first whatever its score (attention sinks), the others follow in order.
    ``repeat``: each split's row written ``repeat`` times in a row, ``(B, H, splits * repeat, ...)``: the layout
    of a split attention whose query blocks are ``repeat`` tiles per split (no copy afterwards)."""
    if score.dim() != 3 or score.dtype != torch.float32:
        raise ValueError(f"score must be a float32 (B, H, nkb) tensor, got {score.dtype} {tuple(score.shape)}")
    if not 1 <= keep <= score.shape[2] or not 1 <= splits or not 1 <= repeat:
        raise ValueError(f"need 1 <= keep <= nkb = {score.shape[2]}, splits >= 1 and repeat >= 1, got keep={keep}, "
                         f"splits={splits}, repeat={repeat}")
    if _use_triton(backend, score):
        from .step_triton import rank_blocks_triton

        return rank_blocks_triton(score, keep, splits, first, repeat)
    return _rank_blocks_torch(score, keep, splits, first, repeat)


def _step_lengths_torch(n_dev, block_size, nq, count_table, dense_table, bias, count, count_tiles, dense_count,
                        win_idx, win_bias):
    nkb = torch.div(n_dev, block_size, rounding_mode="floor")
    block_ids = torch.arange(bias.numel(), device=bias.device)
    bias.copy_(torch.where(block_ids < nkb, 0.0, -1e30))
    count.view(-1).copy_(count_table.index_select(0, nkb.view(1))[0])
    count_tiles.view(count.numel(), -1).copy_(count.view(-1, 1))
    dense_count.view(-1).copy_(dense_table.index_select(0, nkb.view(1))[0])
    start, last = nkb * block_size, n_dev + (nq - 1)
    rows = torch.arange(win_idx.numel(), device=win_idx.device)
    torch.minimum(rows + start, last, out=win_idx)
    win_bias.copy_(torch.where(rows <= last - start, 0.0, float("-inf")))


def step_lengths(n_dev, block_size, nq, count_table, dense_table, bias, count, count_tiles, dense_count, win_idx,
                 win_bias, *, backend=None):
    """A prefix length's state, written in place from ``n_dev`` (int64 0-d, the prefix length on the device;
    ``nkb = n_dev // block_size`` full key blocks): ``bias`` ``(nkb_cap,)`` float32, 0 on blocks ``< nkb`` and
    -1e30 past them; ``count`` ``(..., S)`` int32 = ``count_table[nkb]`` (``(nkb_cap + 1, S)``), ``count_tiles``
    each of them ``T`` times in a row (``S * T``), ``dense_count`` = ``dense_table[nkb]``; the window (the
    prefix's partial last block and the ``nq`` block rows): ``win_idx`` ``(W,)`` int64 rows from ``nkb *
    block_size``, clamped at the last row, ``win_bias`` 0 on the valid ones and -inf past them. One kernel on
    CUDA, a dozen ops in PyTorch."""
    ints = (count_table, dense_table, count, count_tiles, dense_count)
    if n_dev.numel() != 1 or n_dev.dtype != torch.int64 or any(t.dtype != torch.int32 for t in ints):
        raise ValueError("n_dev must be one int64 and the count tables and counts int32")
    if count_tiles.numel() % count.numel() or count_table.shape[1] != count.numel():
        raise ValueError(f"count ({count.numel()}) must match count_table {tuple(count_table.shape)} and divide "
                         f"count_tiles ({count_tiles.numel()})")
    if win_idx.dtype != torch.int64 or win_bias.dtype != torch.float32 or bias.dtype != torch.float32:
        raise ValueError("win_idx must be int64, win_bias and bias float32")
    if _use_triton(backend, bias):
        from .first_triton import step_lengths_triton

        if not all(t.is_contiguous() for t in (*ints, bias, win_idx, win_bias)):
            raise ValueError("step_lengths' kernel writes contiguous tensors in place")
        return step_lengths_triton(n_dev, block_size, nq, count_table, dense_table, bias, count, count_tiles,
                                   dense_count, win_idx, win_bias)
    return _step_lengths_torch(n_dev, block_size, nq, count_table, dense_table, bias, count, count_tiles,
                               dense_count, win_idx, win_bias)


def _block_means_torch(k, n_dev, block_size, scale, means_t, split, last_keys):
    nkb_cap = means_t.shape[3]
    means = k[:, :, : nkb_cap * block_size].unflatten(2, (nkb_cap, block_size)).mean(dim=3, dtype=torch.float32)
    means = means.mul_(scale).transpose(-1, -2)
    full = torch.arange(nkb_cap, device=k.device) < torch.div(n_dev, block_size, rounding_mode="floor")
    means = torch.where(full, means, 0.0)  # rows past the prefix may hold anything, even NaN
    if last_keys is not None:
        rows = k[:, :, block_size - 1 : nkb_cap * block_size : block_size]  # each block's last key
        keep = full & (rows == last_keys).all(dim=-1)  # NaN (not computed yet) equals nothing
        means = torch.where(keep[:, :, None, :], means_t, means)
        last_keys.copy_(torch.where(full[:, None], rows, float("nan")))
    means_t.copy_(means)
    if split is not None:
        split_means(means_t.transpose(-1, -2), out=split)


def prefix_block_means(k, n_dev, block_size, scale, means_t, split=None, *, last_keys=None, backend=None):
    """The prefix's block mean keys times ``scale``, written in place: ``means_t`` ``(B, H, D, nkb_cap)``
    float32 (transposed, as :func:`mean_key_score` reads them) gets the mean of k's rows ``[j * block_size, (j +
    1) * block_size)`` for the full blocks ``j < n_dev // block_size`` and 0 for the others, whose rows are not
    read (they may hold anything, even NaN); ``split`` (optional, ``(3, B, H, D, nkb_cap)`` bfloat16) its
    :func:`split_means` parts. k ``(B, H, C, D)`` with ``C >= nkb_cap * block_size``. One kernel on CUDA
    (a program per head and 8 blocks), a float32 mean and a few ops in PyTorch.

    ``last_keys`` (optional, ``(B, H, nkb_cap, D)`` in k's dtype, NaN where no mean was computed yet): each
    block's last key when its mean was computed, updated in place. A full block whose last key is unchanged
    keeps its mean and parts, and the kernel reads only that row of it; the others are computed. A KV cache that
    appends keeps every earlier block, so a growing prefix computes only its newly full blocks. A key depends on
    the tokens before it, so a block's last key changes with any token up to it. A host that edits keys of a
    block in place but keeps its last one unchanged would keep that block's stale mean."""
    b, h, c, d = k.shape
    nkb_cap = means_t.shape[-1]
    if tuple(means_t.shape) != (b, h, d, nkb_cap) or means_t.dtype != torch.float32 or c < nkb_cap * block_size:
        raise ValueError(f"means_t must be float32 ({b}, {h}, {d}, nkb_cap) with nkb_cap * {block_size} <= {c}, "
                         f"got {means_t.dtype} {tuple(means_t.shape)}")
    if split is not None and (tuple(split.shape) != (3, b, h, d, nkb_cap) or split.dtype != torch.bfloat16):
        raise ValueError(f"split must be bfloat16 (3, {b}, {h}, {d}, {nkb_cap}), got {split.dtype} "
                         f"{tuple(split.shape)}")
    if last_keys is not None and (tuple(last_keys.shape) != (b, h, nkb_cap, d) or last_keys.dtype != k.dtype):
        raise ValueError(f"last_keys must be {k.dtype} ({b}, {h}, {nkb_cap}, {d}), got {last_keys.dtype} "
                         f"{tuple(last_keys.shape)}")
    if n_dev.numel() != 1 or n_dev.dtype != torch.int64:
        raise ValueError("n_dev must be one int64 (the prefix length)")
    if _use_triton(backend, k):
        from .first_triton import block_means_triton

        outs = (means_t, split, last_keys)
        if k.stride(3) != 1 or not all(t is None or t.is_contiguous() for t in outs):
            raise ValueError("prefix_block_means' kernel needs k with unit stride over D and contiguous outputs")
        return block_means_triton(k, n_dev, block_size, scale, means_t, split, last_keys)
    return _block_means_torch(k, n_dev, block_size, scale, means_t, split, last_keys)


def _window_attention_torch(q, k, v, idx, bias, scale):
    bsz, hq, nq, d = q.shape
    hkv, w = k.shape[1], idx.shape[0]
    wk, wv = k.index_select(2, idx).float(), v.index_select(2, idx).float()
    logits = torch.baddbmm(bias, q.float().reshape(bsz * hkv, (hq // hkv) * nq, d),
                           wk.reshape(bsz * hkv, w, d).transpose(1, 2), alpha=scale)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.bmm(torch.exp(logits - lse[..., None]), wv.reshape(bsz * hkv, w, d))
    return out.view(bsz, hq, nq, d), lse.view(bsz, hq, nq)


def window_attention(q, k, v, idx, bias, scale, *, backend=None, out=None):
    """``(out float32 (B, Hq, Nq, D), lse (B, Hq, Nq))`` of q over the rows ``idx`` of k, v (module docstring).
    ``out``: a pair of contiguous float32 tensors of those shapes to write them into (and return)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q (B, Hq, Nq, D) and k, v (B, Hkv, C, D) do not match: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if out is not None:
        b, hq, nq, d = q.shape
        ok = (len(out) == 2 and tuple(out[0].shape) == (b, hq, nq, d) and tuple(out[1].shape) == (b, hq, nq)
              and all(t.dtype == torch.float32 and t.is_contiguous() and t.device == q.device for t in out))
        if not ok:
            raise ValueError(f"out must be contiguous float32 ({b}, {hq}, {nq}, {d}) and ({b}, {hq}, {nq}) tensors "
                             f"on {q.device}")
    if idx.dim() != 1 or idx.dtype != torch.int64 or bias.shape != idx.shape or bias.dtype != torch.float32:
        raise ValueError(f"idx must be int64 (W,) and bias float32 (W,), got {idx.dtype} {tuple(idx.shape)} and "
                         f"{bias.dtype} {tuple(bias.shape)}")
    if _use_triton(backend, q):
        from .step_triton import window_attention_triton

        if k.stride(3) != 1 or v.stride(3) != 1 or not idx.is_contiguous() or not bias.is_contiguous():
            raise ValueError("window_attention's kernel needs k, v with unit stride over D and contiguous idx, bias")
        return window_attention_triton(q, k, v, idx, bias, scale, out)
    o, lse = _window_attention_torch(q, k, v, idx, bias, scale)
    if out is None:
        return o, lse
    out[0].copy_(o)
    out[1].copy_(lse)
    return out


def active_first_order(q, active, num_kv_heads, block_size):
    """One kernel for ``prefix_attention.active_first_rows`` plus LoSA's step statistics (CUDA or the
    interpreter): ``(stacked, rank, n_rows, stat)``, the first three equal to ``active_first_rows``'s
    fields, ``stat`` ``(B, Nq + 1)`` bool = ``active`` and, last, whether the row has an active token."""
    bad_mask = active.dtype != torch.bool or active.dim() != 2 or q.dim() != 4 or active.shape != q.shape[::2]
    if q.dim() != 4 or q.shape[1] % num_kv_heads or bad_mask:
        raise ValueError(f"need q (B, Hq, Nq, D) with Hq divisible by {num_kv_heads} and a bool (B, Nq) mask, got "
                         f"{tuple(q.shape)} and {active.dtype} {tuple(active.shape)}")
    from .step_triton import active_first_triton

    check_triton(q, "active_first_order")
    return active_first_triton(q, active, num_kv_heads, block_size)
