"""LoSA's configuration."""

from __future__ import annotations

import dataclasses

from ...runtime import step_cache
from ..base import MethodConfig
from ..selectors import get_selector


@dataclasses.dataclass
class LoSAConfig(MethodConfig):
    """LoSA settings (our defaults; the change is measured on q, see the module docstring)."""

    threshold: float = 0.05  # relative L2 change of q below which a token is stable
    sparsity: float = 0.8  # share of prefix key blocks skipped by active tokens
    selector: str | None = None  # None: built-in mean-key scoring; else a registered selector name
    compare_to: str = "last_step"  # or "cached": change since the step its prefix attention was computed
    union: str = "kv_head"  # one union of key blocks per KV head (shared by its query heads) or per "head"
    keep_sinks: bool = True  # the prefix's first key block is always in the union (attention sinks)
    outlier_keys: bool = False  # score blocks by their largest-norm key too (finds single hot keys: stripes)
    cuda_graphs: bool | None = None  # replay each layer's steps as CUDA graphs; None: when they can (CUDA)
    union_splits: int | None = None  # key chunks of the active tokens' prefix attention; None: chosen for the GPU

    def __post_init__(self):
        super().__post_init__()
        if self.plan_every:
            raise ValueError("plan_every is for the full-sequence block-sparse methods (ba_att, block_sparse); "
                             "LoSA selects its blocks per token from its own cache")
        if self.residual_every:
            raise ValueError("residual_every is for full-sequence methods (ba_att, block_sparse, sparsed); LoSA caches "
                             "its own prefix attention per token")
        if self.union_splits is not None and (
                isinstance(self.union_splits, bool) or not isinstance(self.union_splits, int) or self.union_splits < 1):
            raise ValueError(f"union_splits must be None or an int >= 1, got {self.union_splits!r}")
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        step_cache.validate_mode(self.cuda_graphs)
        if not isinstance(self.outlier_keys, bool):
            raise ValueError(f"outlier_keys must be a bool, got {self.outlier_keys!r}")
        if self.compare_to not in ("last_step", "cached"):
            raise ValueError(f"compare_to must be 'last_step' or 'cached', got {self.compare_to!r}")
        if self.union not in ("kv_head", "head"):
            raise ValueError(f"union must be 'kv_head' or 'head', got {self.union!r}")
        if self.selector is not None:
            get_selector(self.selector)


