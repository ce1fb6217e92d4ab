"""BA-Att's configuration: estimator, budget policy, norm sorting, and the paper's preset."""

from __future__ import annotations

import dataclasses
import logging
import math

from ..base import register_preset
from ..block_sparse import BlockSparseConfig

ESTIMATORS = ("sampled", "pooled")
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BAAttConfig(BlockSparseConfig):
    """BA-Att settings (see the module docstring for the math).

    ``sparsity`` (default 0.5) and/or ``mass``, spread by ``allocation`` (default ``"global"``) with a
    ``local_window`` (default None: one block) always kept, in blocks of 128 tokens from 8k keys up and of
    ``fine_block_size=64`` below (measured on SmolLM2 at 4k: +4.1 % perplexity at density 0.2 with 64-token
    blocks, +11 % with 128): see :class:`BlockSparseConfig`.
    ``estimator``: ``"sampled"`` (default; ``sample_rows`` exact query rows per block, a power of two for the
    GPU kernel; ``fine_sample_rows`` of them per fine block, default 8: on SmolLM2 at 4k, 8 rows per 64-token
    block gave +0.23 % / +3.64 % perplexity at density 0.5 / 0.2 against +0.50 % / +4.13 % with 4,
    docs/results/lm_quality_smollm2_4k_b64_sample_rows_ppl) or ``"pooled"`` (the paper's block statistics;
    the fields below apply to it).
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
    fine_sample_rows: int | None = 8
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

    def fine_overrides(self) -> dict:
        """The fine-block twin samples ``fine_sample_rows`` rows per block (None: ``sample_rows``)."""
        return {} if self.fine_sample_rows is None else {"sample_rows": self.fine_sample_rows}

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
        f = self.fine_sample_rows
        fine = self.fine_block_size or self.block_size
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= fine):
            raise ValueError(f"fine_sample_rows must be None (sample_rows) or an int in [1, {fine}] (query rows "
                             f"scored exactly per fine block), got {f!r}")
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


register_preset("ba_att_paper", "ba_att", BAAttConfig.paper)
