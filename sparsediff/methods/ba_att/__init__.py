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

from .config import ESTIMATORS, BAAttConfig
from .method import BAAttMethod, ba_attention
from .scores import ba_scores, select_blocks
from .sort import sort_keys

__all__ = ["ESTIMATORS", "BAAttConfig", "BAAttMethod", "ba_attention", "ba_scores", "select_blocks", "sort_keys"]
