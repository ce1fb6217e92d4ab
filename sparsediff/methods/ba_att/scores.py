"""BA-Att's block scores (the pooled covariance estimate, outlier keys, the sampled-row mass) and block selection."""

from __future__ import annotations

import math

import torch

from ...kernels import block_stats
from ...kernels.backend import choose_backend
from ...kernels.block_stats.permute import row_norms
from ...kernels.outlier_keys import outlier_key_features
from ...kernels.sampled_mass import sampled_block_mass
from ..block_select import budget_of, policy_of, select_from_scores
from ..selectors import register_selector
from .features import query_features


def ba_scores(q, k, *, block_size=128, beta=0.5, scale=None, outlier_keys=1):
    """BA-Att block scores ``(B, Hq, nqb, nkb)`` float32 from q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``.

    GQA: each query head is scored against its key/value group's blocks (selection stays per q-head).
    ``outlier_keys`` adds the exact term of each block's largest-norm keys (see :class:`BAAttConfig`; 0: off).
    """
    return _scores_from_stats(block_stats(q, block_size), block_stats(k, block_size), beta=beta, scale=scale,
                              k=k, outlier_keys=outlier_keys, block_size=block_size)


_coef_cache: dict = {}


def _coefficients(d, scale, c, device):
    key = (d, scale, c, str(device))
    if key not in _coef_cache:
        if len(_coef_cache) > 64:
            _coef_cache.clear()
        _coef_cache[key] = torch.tensor([scale] * d + [c] * (2 * d), dtype=torch.float32).to(device)
    return _coef_cache[key]


def _triton_path(x, block_size, backend=None):
    """Selection by the fused Triton kernels (the backend rule of ``kernels.backend``; power-of-two blocks)."""
    pow2 = block_size > 0 and (block_size & (block_size - 1)) == 0
    return pow2 and choose_backend(backend, x, op="BA-Att selection") == "triton"


def _query_coefficients(d, beta, scale):
    """``(s, c)`` of the query features: s = scale (default 1/sqrt(D)), c = β·s²/2."""
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return scale, beta * scale * scale / 2


def _scores_from_features(q, right, *, block_size, beta=0.5, scale=None, hkv, k=None, outlier_keys=0, left=None):
    """:func:`ba_scores` from the key-side features ``right = [μk, μk² + σ²k, σ²k]`` ``(B, Hkv, nkb, 3D)``;
    the query side comes straight out of one kernel (no torch ops between the stats and the matmul), or is
    ``left``, the same features from the sort's launch."""
    bsz, hq, _, d = q.shape
    if left is None:
        left = query_features(q, block_size, *_query_coefficients(d, beta, scale))
    if not beta:
        left, right = left[..., :d], right[..., :d]
    nqb, nkb = left.shape[2], right.shape[2]
    left = left.reshape(bsz, hkv, (hq // hkv) * nqb, left.shape[-1])
    scores = torch.matmul(left, right.transpose(-1, -2)).view(bsz, hq, nqb, nkb)
    return _with_outlier_keys(scores, left, k, outlier_keys, block_size=block_size, with_var=bool(beta))


def _scores_from_stats(sq, sk, *, beta=0.5, scale=None, k=None, outlier_keys=0, block_size=None):
    """:func:`ba_scores` from block statistics of q ``(B, Hq, nqb, D)`` and k ``(B, Hkv, nkb, D)`` (the
    outlier term also needs the keys ``k`` and their ``block_size``)."""
    bsz, hq, nqb, d = sq.mean.shape
    hkv, nkb = sk.mean.shape[1], sk.mean.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if beta:
        c = beta * scale * scale / 2
        # One scaling by a cached (3d,) coefficient vector: fewer tiny kernels on the hot path.
        left = torch.cat([sq.mean, sq.var, sq.mean.square()], dim=-1).mul_(_coefficients(d, scale, c, sq.mean.device))
        right = torch.cat([sk.mean, torch.addcmul(sk.var, sk.mean, sk.mean), sk.var], dim=-1)
    else:
        left, right = scale * sq.mean, sk.mean
    # Query heads of one kv group share the key side: fold them into the rows of one matmul.
    left = left.view(bsz, hkv, (hq // hkv) * nqb, left.shape[-1])
    scores = torch.matmul(left, right.transpose(-1, -2)).view(bsz, hq, nqb, nkb)
    return _with_outlier_keys(scores, left, k, outlier_keys, block_size=block_size, with_var=bool(beta))


_outlier_cache: dict = {}


def _outlier_constants(nk, block_size, m, device):
    """Per key block: ``log((n - m') / n)`` (weight of the Gaussian rest), ``-log n`` (weight of one exact
    key), which of the m outlier slots hold a real key (only a ragged last block can have fewer) and the
    block's first token (to turn in-block indices into token indices)."""
    key = (nk, block_size, m, str(device))
    if key not in _outlier_cache:
        if len(_outlier_cache) > 64:
            _outlier_cache.clear()
        nkb = math.ceil(nk / block_size)
        count = torch.full((nkb,), float(block_size), dtype=torch.float64)
        count[-1] = nk - (nkb - 1) * block_size
        real = torch.arange(m, dtype=torch.float64)[None, :] < count[:, None]  # (nkb, m)
        rest = (count - real.sum(-1)).clamp_min(0)
        first = torch.arange(0, nkb * block_size, block_size)[:, None]
        _outlier_cache[key] = tuple(
            t.to(device) for t in ((rest / count).log().float(), (-count.log()).float(), real, first)
        )
    return _outlier_cache[key]


def _with_outlier_keys(scores, left, k, m, *, block_size, with_var):
    """Merge the exact term of each key block's ``m`` largest-norm keys into BA-Att's block scores.

    ``scores (B, Hq, nqb, nkb)`` are per-token log-estimates of exp(s·q·k) (selection adds log(tokens));
    ``left (B, Hkv, G·nqb, F)`` is the query side of the score matmul, ``[s·μq, c·σ²q, ...]`` (or ``s·μq``
    alone when β = 0). With o = s·μq·k* + c·σ²q·k*² per outlier key k* (the same second-order term, with
    the key known exactly), the block's estimate becomes ``((n - m)·exp(score) + Σ exp(o)) / n``.
    Both score paths (Triton features and PyTorch stats) call this, so they keep the same blocks.
    """
    if not m:
        return scores
    bsz, hq, nqb, nkb = scores.shape
    hkv, nk, d = k.shape[1], k.shape[2], k.shape[3]
    rest_w, one_w, real, first = _outlier_constants(nk, block_size, m, scores.device)
    if m == 1:  # the default: one kernel writes each block's largest-norm key and its square
        right = outlier_key_features(k, block_size)
        right = right if with_var else right[..., :d]
        exact = torch.matmul(left[..., : right.shape[-1]], right.transpose(-1, -2)).view(bsz, hq, nqb, nkb)
        return torch.logaddexp(scores + rest_w, exact + one_w)
    # Padding norms are -1, so a ragged last block ranks its real keys first.
    if k.dtype == torch.float64:  # row_norms returns float32 and refuses to narrow float64 inputs
        norms = torch.nn.functional.pad(k.norm(dim=-1), (0, nkb * block_size - nk), value=-1.0)
    else:
        norms = row_norms(k, pad_to=nkb * block_size)
    norms = norms.view(bsz, hkv, nkb, block_size)
    top = (norms.topk(m, dim=-1).indices + first).clamp_max(nk - 1).view(bsz, hkv, nkb * m, 1)
    keys = k.gather(2, top.expand(-1, -1, -1, d)).float()
    right = torch.cat([keys, keys.square()], dim=-1) if with_var else keys
    exact = torch.matmul(left[..., : right.shape[-1]], right.transpose(-1, -2))
    exact = exact.view(bsz, hq, nqb, nkb, m).masked_fill(~real, float("-inf"))
    return torch.logaddexp(scores + rest_w, torch.logsumexp(exact, dim=-1) + one_w)


@register_selector("ba_att")
def select_blocks(q, k, config, *, causal=False, scale=None, global_tokens=0, layer=None):
    """BA-Att block selection -> ``(block_index, block_count)`` in the kernel's index form.

    Ids refer to ``k`` exactly as passed: this function does not sort. :func:`ba_attention` and
    :class:`BAAttMethod` sort keys first (see :func:`sort_keys`) and select on the sorted keys, so their
    ids refer to the sorted order. ``config`` needs ``block_size`` and ``sparsity`` or ``mass``;
    ``estimator`` defaults to ``"pooled"`` when absent (a plain config); ``beta``, ``outlier_keys``,
    ``keep_sinks`` and ``keep_diagonal`` default to 0.5 / 1 / True / True. ``outlier_keys=None`` means 1 here
    (this function cannot tell whether ``k`` was sorted); :class:`BAAttMethod` uses 0 on keys it sorted.
    """
    return _select(q, k, config, causal=causal, scale=scale, global_tokens=global_tokens, layer=layer)


def _select(q, k, config, *, causal=False, scale=None, global_tokens=0, k_stats=None, backend=None,
            sorted_keys=False, q_features=None, layer=None):
    """:func:`select_blocks`, reusing the caller's key statistics of ``k`` when given: a :class:`BlockStats`
    or the key-side score features ``(B, Hkv, nkb, 3D)`` from the fused gather (then ``q_features``, when
    given, are the query side from the sort's launch). ``sorted_keys``: k was norm-sorted (sets the automatic
    ``outlier_keys``)."""
    density, mass = budget_of(config, layer)
    bs = config.block_size
    select = dict(nq=q.shape[2], nk=k.shape[2], density=density, mass=mass, causal=causal,
                  global_tokens=global_tokens, **policy_of(config))
    if getattr(config, "estimator", "pooled") == "sampled":
        mass_est = sampled_block_mass(q, k, block_size=bs, rows=config.sample_rows, scale=scale, causal=causal)
        return select_from_scores(torch.log(mass_est), weight_by_count=False, **select)
    beta = getattr(config, "beta", 0.5)
    outliers = getattr(config, "outlier_keys", None)
    if outliers is None:
        outliers = 0 if sorted_keys else 1
    if isinstance(k_stats, torch.Tensor) or (k_stats is None and _triton_path(q, bs, backend)):
        right = k_stats if k_stats is not None else query_features(k, bs)
        scores = _scores_from_features(q, right, block_size=bs, beta=beta, scale=scale, hkv=k.shape[1], k=k,
                                       outlier_keys=outliers, left=q_features if k_stats is not None else None)
    else:
        if k_stats is None:
            k_stats = block_stats(k, bs)
        scores = _scores_from_stats(block_stats(q, bs), k_stats, beta=beta, scale=scale, k=k, outlier_keys=outliers,
                                    block_size=bs)
    return select_from_scores(scores, **select)


