"""BA-Att: block-approximate sparse attention.

Pipeline per call: (1) optionally reorder keys and values inside segments by key L2 norm (attention is
invariant to a joint permutation of keys and values); (2) estimate each (query block, key block) pair's
share of the attention mass; (3) keep blocks to the budget; (4) the block-sparse kernel.

Two estimators (``BAAttConfig.estimator``):

- ``"sampled"`` (the default): exact softmax rows of ``sample_rows`` query rows per block against every key
  (``kernels.sampled_mass``), averaged per key block. An unbiased estimate of the exact block oracle; measured
  on SmolLM2's real q/k/v it stays within 1.03-1.09x the oracle's output error where pooled means reach
  1.1-1.2x (docs/ba_att.md, "Quality on a real LM").
- ``"pooled"`` (the paper's): per-block mean and per-dimension variance of q and k and the
  covariance-compensated estimate

    score(i, j) = s·μq_i·μk_j + β·(s²/2)·Σ_d (σ²q μ²k + μ²q σ²k + σ²q σ²k)

computed as one matmul of pooled vectors ``[s·μq, c·σ²q, c·μq²] · [μk, μk² + σ²k, σ²k]ᵀ`` with
``c = β·s²/2``; with ``outlier_keys = m > 0`` the m largest-norm keys of each key block are scored one by
one against the pooled query and merged with the Gaussian estimate of the rest of the block (a lone
heavy key, e.g. a globally attended token, is invisible in a block mean); (4) softmax over key blocks
(weighted by tokens per block), keep top-k to a target density or the smallest set reaching a
cumulative mass.

The default budget spreads the kept blocks over heads and query blocks by estimated mass (``allocation=
"global"``) and always keeps one block of local window; :meth:`BAAttConfig.paper` gives the paper's
setting (pooled estimator, the same count per query block, no window).

Under ``causal`` norm sorting is disabled: the kernel masks by key position, and sorting would move
keys across the causal boundary inside a block, changing the result.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..kernels import block_stats, segment_sort
from ..kernels.ba_features import query_features, segment_order
from ..kernels.block_sparse import triton_available
from ..kernels.block_stats.permute import gather_rows_with_stats, gather_sorted_segments, row_norms
from ..kernels.outlier_keys import outlier_key_features
from ..kernels.sampled_mass import sampled_block_mass
from .base import register_method
from .block_select import budget_of, policy_of, select_from_scores
from .block_sparse import BlockSparseConfig, BlockSparseMethod, SparsePlan
from .selectors import register_selector

__all__ = ["BAAttConfig", "BAAttMethod", "ba_attention", "ba_scores", "select_blocks", "sort_keys"]

ESTIMATORS = ("sampled", "pooled")
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@dataclasses.dataclass
class BAAttConfig(BlockSparseConfig):
    """BA-Att settings (see the module docstring for the math).

    ``sparsity`` (default 0.5) and/or ``mass``, spread by ``allocation`` (default ``"global"``) with a
    ``local_window`` (default None: one block) always kept, in blocks of 128 tokens from 8k keys up and of
    ``fine_block_size=64`` below (measured on SmolLM2 at 4k: +4.1 % perplexity at density 0.2 with 64-token
    blocks, +11 % with 128): see :class:`BlockSparseConfig`.
    ``estimator``: ``"sampled"`` (default; ``sample_rows`` exact query rows per block, a power of two for the
    GPU kernel) or ``"pooled"`` (the paper's block statistics; the fields below apply to it).
    :meth:`paper` is the paper's configuration.

    ``beta`` weights the variance term (0 = block means only);
    ``norm_sort`` reorders keys by L2 norm inside segments of ``sort_segment`` tokens; None (default): on for
    the pooled estimator, whose block statistics it sharpens, off for the sampled one, which scores keys
    exactly and only loses the keys' spatial locality to it (video probe, 8 x 32 x 32 tokens, 8 heads, density
    0.2: error 0.688 sorted, 0.131 unsorted; docs/video_layout.md). ``sort_segment`` None (the
    default) sorts one frame at a time when the caller passes ``frame_size`` and does not sort
    otherwise: sorting a whole LM-like sequence scatters the local window that dominates its attention
    (measured in docs/ba_att.md: sink recall 0.96 -> 0.69 at 50 % sparsity). ``"sequence"`` sorts the
    whole sequence anyway.

    ``outlier_keys``: per key block, this many largest-norm keys are scored exactly against the
    block-mean query and added to the block's Gaussian estimate; 0 turns the term off. It recovers
    blocks that hold a single heavy key (vertical stripes of the attention map), whose weight a block
    mean divides by the block size (docs/ba_att.md: stripe recall 0.919 -> 0.972 at 50 % sparsity).
    ``None`` (default): 1 on keys in their own order, 0 on norm-sorted keys, where sorting already packs
    the heavy keys into a few blocks (measured: no change in recall with the term there, at its cost).
    Cost with m = 1: one kernel that reads the keys once (``kernels.outlier_keys``) and an ``(nqb x nkb)``
    matmul of width 2D; m > 1 takes a norm pass, a top-m and a gather in torch ops.
    """

    selector: str = "ba_att"
    allocation: str = "global"
    local_window: int | None = None
    fine_block_size: int | None = 64
    estimator: str = "sampled"
    sample_rows: int = 4
    beta: float = 0.5
    norm_sort: bool | None = None
    sort_segment: int | str | None = None
    outlier_keys: int | None = None

    @classmethod
    def paper(cls, **overrides) -> BAAttConfig:
        """The BA-Att paper's setting: pooled statistics with β = 0.5 and norm sorting, the same share of key
        blocks for every query block, no local window, no outlier-key term (our addition)."""
        settings = dict(estimator="pooled", allocation="row", local_window=0, outlier_keys=0, beta=0.5,
                        norm_sort=True, fine_block_size=None)
        return cls(**(settings | overrides))

    @property
    def sorts_keys(self) -> bool:
        """Whether keys are norm-sorted (``norm_sort``, or by estimator when it is None)."""
        return self.estimator == "pooled" if self.norm_sort is None else self.norm_sort

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        r = self.sample_rows
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.block_size:
            raise ValueError(f"sample_rows must be an int in [1, block_size={self.block_size}] (query rows "
                             f"scored exactly per block), got {r!r}")
        if not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0 (the paper uses 0.5), got {self.beta!r}")
        if self.norm_sort is not None and not isinstance(self.norm_sort, bool):
            raise ValueError(f"norm_sort must be None (by estimator), True or False, got {self.norm_sort!r}")
        seg = self.sort_segment
        if seg is not None and seg != "sequence" and (isinstance(seg, bool) or not isinstance(seg, int) or seg < 1):
            raise ValueError(
                f"sort_segment must be None, 'sequence' or a positive int (tokens per segment), got {seg!r}"
            )
        m = self.outlier_keys
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= self.block_size):
            raise ValueError(
                f"outlier_keys must be None (auto) or an int from 0 (off) to block_size={self.block_size} (keys "
                f"scored exactly per key block), got {m!r}"
            )


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
    """Selection by the fused Triton kernels (CUDA by default; ``backend="triton"`` forces it, e.g. under
    the interpreter in tests)."""
    if backend == "torch":
        return False
    pow2 = block_size > 0 and (block_size & (block_size - 1)) == 0
    return pow2 and (backend == "triton" or (x.is_cuda and triton_available()))


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


def sort_keys(k, v, *, segment=None, start=0):
    """Reorder keys and values by key L2 norm (descending) inside consecutive segments of ``segment``
    tokens (None: one segment), leaving the first ``start`` tokens (global tokens) in place.

    Returns ``(k_sorted, v_sorted, perm)`` with ``perm (B, Hkv, Nk)`` int64: ``k_sorted[..., i, :] =
    k[..., perm[i], :]``.
    """
    return _sort_keys(k, v, segment=segment, start=start)[:3]


def _sort_keys(k, v, *, segment=None, start=0, block_size=None, backend=None, query=None):
    """:func:`sort_keys` plus the sorted keys' block statistics (None without ``block_size`` or when
    nothing moves). On the Triton path (CUDA) they are the key-side score features ``(B, H, nb, 3D)``
    from the gather kernel, and the sort runs with no torch ops: segments up to
    ``segment_sort.MAX_FUSED_SEGMENT`` tokens take norms + sorted runs in one launch (and a merge launch past
    ``segment_sort.RUN_ROWS``), longer ones the norm kernel and a sort; then the gather. Elsewhere a
    :class:`BlockStats`.

    ``query=(q, scale, c)`` (the plan's path) returns a fifth item: the query features
    ``query_features(q, block_size, scale, c)`` when the sort's launch computed them, else None."""
    res = _sort_keys_impl(k, v, segment=segment, start=start, block_size=block_size, backend=backend, query=query)
    return res if query is not None else res[:4]


def _sort_keys_impl(k, v, *, segment, start, block_size, backend, query):
    bsz, h, n, d = k.shape
    body = n - start
    if body <= 1:
        return k, v, None, None, None
    seg = body if segment is None else min(int(segment), body)
    nseg = math.ceil(body / seg)
    if block_size is not None and v.shape == k.shape and _triton_path(k, block_size, backend):
        if seg <= segment_sort.MAX_FUSED_SEGMENT:
            if query is None:
                order, left = segment_sort.norm_segment_order(k[:, :, start:], seg), None
            else:
                q, scale, c = query
                order, left = segment_sort.norm_segment_order(k[:, :, start:], seg, q=q, block_size=block_size,
                                                              scale=scale, c=c)
            return (*gather_sorted_segments(k, v, order, seg, start, block_size), left)
        norms = row_norms(k[:, :, start:], backend="triton", pad_to=nseg * seg)
        order = segment_order(norms, seg)
        if order is None:  # long segments: torch's segmented sort is faster than a bitonic tl.sort
            order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True).view(bsz, h, nseg * seg)
        return (*gather_sorted_segments(k, v, order, seg, start, block_size), None)
    norms = row_norms(k[:, :, start:])
    if nseg * seg != body:
        # Padding sorts last, and only the last segment is padded, so the first `body` entries are real.
        norms = torch.nn.functional.pad(norms, (0, nseg * seg - body), value=-1.0)
    order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True)
    if nseg > 1:
        order = order + torch.arange(0, nseg * seg, seg, device=k.device)[:, None]
    perm = order.view(bsz, h, nseg * seg)
    if nseg * seg != body:
        perm = perm[..., :body]
    if start:
        perm = torch.nn.functional.pad(perm + start, (start, 0))
        perm[..., :start] = torch.arange(start, device=k.device)
    k_sorted, v_sorted, stats = gather_rows_with_stats(
        k, v, perm, block_size or 128, with_stats=block_size is not None)
    return k_sorted, v_sorted, perm, stats, None


@register_method
class BAAttMethod(BlockSparseMethod):
    """BA-Att behind the method API: norm sorting, BA-Att selection, block-sparse kernel."""

    name = "ba_att"
    config_class = BAAttConfig

    def _segment(self, causal, frame_size):
        """The sort segment (an int, or None for the whole sequence), or False when nothing is sorted."""
        cfg = self.config
        segment = cfg.sort_segment if cfg.sort_segment is not None else frame_size
        if cfg.sorts_keys and causal and segment is not None:
            _warn_once("BA-Att: norm sorting is off under causal masking (the kernel masks by key position, and "
                       "sorting would move keys across the causal boundary); keys keep their order")
        if not cfg.sorts_keys or causal or segment is None:
            return False
        if segment != "sequence" and segment <= cfg.block_size:
            return False  # segments within one block (a tile of the tiled layout): sorting moves no key across blocks
        return None if segment == "sequence" else segment

    def prepare_kv(self, q, k, v, *, causal, frame_size, global_tokens):
        segment = self._segment(causal, frame_size)
        if segment is False:
            return k, v, None
        # BA-Att's pooled estimator reuses the sorted keys' block statistics from the gather.
        bs = self.config.block_size if self._pooled_selector() else None
        return _sort_keys(k, v, segment=segment, start=min(global_tokens, k.shape[2]), block_size=bs)

    def _pooled_selector(self) -> bool:
        return self.config.selector == "ba_att" and self.config.estimator == "pooled"

    def plan(self, q, k, v, *, causal=False, scale=None, frame_size=None, global_tokens=0, layer=None):
        """As the base class (sort -> select), but with BA-Att's pooled estimator the sort's launch also writes
        the query features (same bits as the selector's own kernel), saving the selector that read of q."""
        cfg = self.config
        segment = self._segment(causal, frame_size)
        if self.for_keys(k.shape[2]) is not self or segment is False or not self._pooled_selector() \
                or not segment_sort.FUSE_QUERY_FEATURES:
            return super().plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size,
                                global_tokens=global_tokens, layer=layer)
        query = (q, *_query_coefficients(q.shape[-1], cfg.beta, scale))
        ks, vs, perm, right, left = _sort_keys(k, v, segment=segment, start=min(global_tokens, k.shape[2]),
                                               block_size=cfg.block_size, query=query)
        index, count = _select(q, ks, cfg, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=right,
                               sorted_keys=right is not None, q_features=left, layer=layer)
        return SparsePlan(ks, vs, index, count, perm, cfg.block_size)

    def select(self, q, k, *, causal, scale, global_tokens, k_stats=None, layer=None):
        if self.config.selector != "ba_att":
            return super().select(q, k, causal=causal, scale=scale, global_tokens=global_tokens, layer=layer)
        # The method passes the sorted keys' statistics exactly when it norm-sorted them (prepare_kv).
        return _select(q, k, self.config, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=k_stats,
                       sorted_keys=k_stats is not None, layer=layer)


def ba_attention(q, k, v, config=None, return_lse=False, *, causal=False, scale=None, frame_size=None,
                 global_tokens=0):
    """BA-Att attention: sort -> stats -> scores -> select -> block-sparse kernel.

    q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``. Unlike the method object, this always runs the
    sparse path (no ``min_seq_len`` or dense-step fallback). Returns ``out`` or ``(out, lse)``.
    """
    config = BAAttConfig() if config is None else config
    if not isinstance(config, BAAttConfig):
        raise TypeError(f"ba_attention takes a BAAttConfig, got {type(config).__name__}")
    method = BAAttMethod(config)
    return method.sparse_attention(q, k, v, causal=causal, scale=scale, layer=None, frame_size=frame_size,
                                   global_tokens=global_tokens, return_lse=return_lse)
