"""How many key chunks a split (flash-decoding) attention call runs, from the GPU's multiprocessor count."""

from __future__ import annotations

import math

from ..kernels.backend import sm_count as _sm_count


def choose_splits(q, num_kv_blocks: int, min_blocks_per_split: int = 4, heads: int | None = None) -> int:
    """Enough programs for about 4 waves on this GPU, at least ``min_blocks_per_split`` blocks each.
    ``heads``: programs per split and batch row (query heads / :func:`pack_factor`; default q's heads)."""
    if not q.is_cuda:
        return 1
    sms = _sm_count(q.device)
    want = math.ceil(4 * sms / (q.shape[0] * (q.shape[1] if heads is None else heads)))
    return max(1, min(want, num_kv_blocks // min_blocks_per_split))


def one_wave_splits(q, num_kv_blocks: int, heads: int, min_blocks_per_split: int = 2) -> int:
    """As many splits as one wave of programs holds (``heads`` programs per split and batch row), at least
    ``min_blocks_per_split`` blocks each; 1 on CPU."""
    if not q.is_cuda:
        return 1
    return max(1, min(_sm_count(q.device) // (q.shape[0] * heads), num_kv_blocks // min_blocks_per_split))
