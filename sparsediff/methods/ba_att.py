"""BA-Att: block-approximate sparse attention.

Pipeline per call: (1) optionally reorder keys and values inside segments by key L2 norm (attention is
invariant to a joint permutation of keys and values); (2) per-block mean and per-dimension variance of
q and k; (3) score every (query block, key block) pair with the covariance-compensated estimate

    score(i, j) = s·μq_i·μk_j + β·(s²/2)·Σ_d (σ²q μ²k + μ²q σ²k + σ²q σ²k)

computed as one matmul of pooled vectors ``[s·μq, c·σ²q, c·μq²] · [μk, μk² + σ²k, σ²k]ᵀ`` with
``c = β·s²/2``; (4) softmax over key blocks (weighted by tokens per block), keep top-k to a target
density or the smallest set reaching a cumulative mass; (5) the block-sparse kernel.

Under ``causal`` norm sorting is disabled: the kernel masks by key position, and sorting would move
keys across the causal boundary inside a block, changing the result.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import block_sparse_attention, block_stats
from ..kernels.ba_features import query_features, segment_order
from ..kernels.block_sparse import triton_available
from ..kernels.permute_stats import gather_rows_with_stats, gather_sorted_segments, row_norms
from .base import register_method
from .block_select import budget_of, select_from_scores
from .block_sparse import BlockSparseConfig, BlockSparseMethod
from .selectors import register_selector

__all__ = ["BAAttConfig", "BAAttMethod", "ba_attention", "ba_scores", "select_blocks", "sort_keys"]


@dataclasses.dataclass
class BAAttConfig(BlockSparseConfig):
    """BA-Att settings (see the module docstring for the math).

    ``sparsity`` (default 0.5) or ``mass``; ``beta`` weights the variance term (0 = block means only);
    ``norm_sort`` reorders keys by L2 norm inside segments of ``sort_segment`` tokens. ``None`` (the
    default) sorts one frame at a time when the caller passes ``frame_size`` and does not sort
    otherwise: sorting a whole LM-like sequence scatters the local window that dominates its attention
    (measured in docs/ba_att.md: sink recall 0.96 -> 0.69 at 50 % sparsity). ``"sequence"`` sorts the
    whole sequence anyway.
    """

    selector: str = "ba_att"
    beta: float = 0.5
    norm_sort: bool = True
    sort_segment: int | str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0 (the paper uses 0.5), got {self.beta!r}")
        if not isinstance(self.norm_sort, bool):
            raise ValueError(f"norm_sort must be True or False, got {self.norm_sort!r}")
        seg = self.sort_segment
        if seg is not None and seg != "sequence" and (isinstance(seg, bool) or not isinstance(seg, int) or seg < 1):
            raise ValueError(
                f"sort_segment must be None, 'sequence' or a positive int (tokens per segment), got {seg!r}"
            )


def ba_scores(q, k, *, block_size=128, beta=0.5, scale=None):
    """BA-Att block scores ``(B, Hq, nqb, nkb)`` float32 from q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``.

    GQA: each query head is scored against its key/value group's blocks (selection stays per q-head).
    """
    return _scores_from_stats(block_stats(q, block_size), block_stats(k, block_size), beta=beta, scale=scale)


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


def _scores_from_features(q, right, *, block_size, beta=0.5, scale=None, hkv):
    """:func:`ba_scores` from the key-side features ``right = [μk, μk² + σ²k, σ²k]`` ``(B, Hkv, nkb, 3D)``;
    the query side comes straight out of one kernel (no torch ops between the stats and the matmul)."""
    bsz, hq, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left = query_features(q, block_size, scale, beta * scale * scale / 2)
    if not beta:
        left, right = left[..., :d], right[..., :d]
    nqb, nkb = left.shape[2], right.shape[2]
    left = left.reshape(bsz, hkv, (hq // hkv) * nqb, left.shape[-1])
    return torch.matmul(left, right.transpose(-1, -2)).view(bsz, hq, nqb, nkb)


def _scores_from_stats(sq, sk, *, beta=0.5, scale=None):
    """:func:`ba_scores` from block statistics of q ``(B, Hq, nqb, D)`` and k ``(B, Hkv, nkb, D)``."""
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
    return torch.matmul(left, right.transpose(-1, -2)).view(bsz, hq, nqb, nkb)


@register_selector("ba_att")
def select_blocks(q, k, config, *, causal=False, scale=None, global_tokens=0):
    """BA-Att block selection -> ``(block_index, block_count)`` in the kernel's index form.

    Ids refer to ``k`` exactly as passed: this function does not sort. :func:`ba_attention` and
    :class:`BAAttMethod` sort keys first (see :func:`sort_keys`) and select on the sorted keys, so their
    ids refer to the sorted order. ``config`` needs ``block_size`` and ``sparsity`` or ``mass``;
    ``beta``, ``keep_sinks`` and ``keep_diagonal`` default to 0.5 / True / True when absent.
    """
    return _select(q, k, config, causal=causal, scale=scale, global_tokens=global_tokens)


def _select(q, k, config, *, causal=False, scale=None, global_tokens=0, k_stats=None, backend=None):
    """:func:`select_blocks`, reusing the caller's key statistics of ``k`` when given: a :class:`BlockStats`
    or the key-side score features ``(B, Hkv, nkb, 3D)`` from the fused gather."""
    density, mass = budget_of(config)
    bs = config.block_size
    beta = getattr(config, "beta", 0.5)
    if isinstance(k_stats, torch.Tensor) or (k_stats is None and _triton_path(q, bs, backend)):
        right = k_stats if k_stats is not None else query_features(k, bs)
        scores = _scores_from_features(q, right, block_size=bs, beta=beta, scale=scale, hkv=k.shape[1])
    else:
        if k_stats is None:
            k_stats = block_stats(k, bs)
        scores = _scores_from_stats(block_stats(q, bs), k_stats, beta=beta, scale=scale)
    return select_from_scores(
        scores, nq=q.shape[2], nk=k.shape[2], block_size=bs, density=density, mass=mass, causal=causal,
        keep_sinks=getattr(config, "keep_sinks", True), keep_diagonal=getattr(config, "keep_diagonal", True),
        global_tokens=global_tokens,
    )


def sort_keys(k, v, *, segment=None, start=0):
    """Reorder keys and values by key L2 norm (descending) inside consecutive segments of ``segment``
    tokens (None: one segment), leaving the first ``start`` tokens (global tokens) in place.

    Returns ``(k_sorted, v_sorted, perm)`` with ``perm (B, Hkv, Nk)`` int64: ``k_sorted[..., i, :] =
    k[..., perm[i], :]``.
    """
    return _sort_keys(k, v, segment=segment, start=start)[:3]


def _sort_keys(k, v, *, segment=None, start=0, block_size=None, backend=None):
    """:func:`sort_keys` plus the sorted keys' block statistics (None without ``block_size`` or when
    nothing moves). On the Triton path (CUDA) they are the key-side score features ``(B, H, nb, 3D)``
    from the gather kernel, and norms -> in-segment sort -> gather are three launches with no torch ops
    between them; elsewhere a :class:`BlockStats`."""
    bsz, h, n, d = k.shape
    body = n - start
    if body <= 1:
        return k, v, None, None
    seg = body if segment is None else min(int(segment), body)
    nseg = math.ceil(body / seg)
    if block_size is not None and v.shape == k.shape and _triton_path(k, block_size, backend):
        norms = row_norms(k[:, :, start:], backend="triton", pad_to=nseg * seg)
        order = segment_order(norms, seg)
        if order is None:  # long segments: torch's segmented sort is faster than a bitonic tl.sort
            order = norms.view(bsz, h, nseg, seg).argsort(dim=-1, descending=True).view(bsz, h, nseg * seg)
        return gather_sorted_segments(k, v, order, seg, start, block_size)
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
    return k_sorted, v_sorted, perm, stats


@register_method
class BAAttMethod(BlockSparseMethod):
    """BA-Att behind the method API: norm sorting, BA-Att selection, block-sparse kernel."""

    name = "ba_att"
    config_class = BAAttConfig

    def prepare_kv(self, q, k, v, *, causal, frame_size, global_tokens):
        cfg = self.config
        segment = cfg.sort_segment if cfg.sort_segment is not None else frame_size
        if not cfg.norm_sort or causal or segment is None:
            return k, v, None
        segment = None if segment == "sequence" else segment
        # BA-Att's own selector reuses the sorted keys' block statistics from the gather.
        bs = cfg.block_size if cfg.selector == "ba_att" else None
        return _sort_keys(k, v, segment=segment, start=min(global_tokens, k.shape[2]), block_size=bs)

    def select(self, q, k, *, causal, scale, global_tokens, k_stats=None):
        if self.config.selector != "ba_att":
            return super().select(q, k, causal=causal, scale=scale, global_tokens=global_tokens)
        return _select(q, k, self.config, causal=causal, scale=scale, global_tokens=global_tokens, k_stats=k_stats)


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
    plan = method.plan(q, k, v, causal=causal, scale=scale, frame_size=frame_size, global_tokens=global_tokens)
    return block_sparse_attention(
        q, plan.k, plan.v, plan.block_index, plan.block_count, scale=scale, causal=causal,
        block_size=config.block_size, return_lse=return_lse, check_ids=False,
    )
