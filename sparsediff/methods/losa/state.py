"""The per-layer state LoSA keeps across the steps of a block (sized for the KV buffer's capacity)."""

from __future__ import annotations

import dataclasses

import torch

from ...runtime.step_cache import GraphSlot


@dataclasses.dataclass(eq=False)
class _Prefix:
    """A layer's state, sized for the KV buffer's capacity and kept across blocks: a new block
    rewrites it in place (``_begin_block``, ``_first``), so a captured step stays valid until the capacity, q's shape
    or the dtype change. Only the full key blocks of the prefix go through the block-sparse kernel;
    its last partial block (the ``tail``) and the active block are the small ``window``, attended
    densely at every step."""

    out: torch.Tensor  # (B, Hq, Nq, D) prefix attention per token, updated in place for active rows
    lse: torch.Tensor  # (B, Hq, Nq) float32
    q_ref: torch.Tensor  # float32 q the change is measured against
    ref_thr: torch.Tensor  # (B, Nq) (threshold * |q_ref|)^2: a token is active when |q - q_ref|^2 >= ref_thr
    means_t: torch.Tensor  # (B, Hkv, D, nkb_cap) float32 block means * scale; zero past the prefix
    last_keys: torch.Tensor  # (B, Hkv, nkb_cap, D) each block's last key when its mean was computed (NaN: not yet)
    outliers_t: torch.Tensor | None  # outlier_keys: (B, Hkv, D, nkb_cap) the blocks' largest-norm keys * scale
    means_split: torch.Tensor | None  # CUDA: means_t as three bfloat16 parts (3, B, Hkv, D, nkb_cap), the kernel's
    bias: torch.Tensor  # (nkb_cap,) float32: 0 on the prefix's full blocks, -1e30 past them
    index: torch.Tensor | None  # sparsity 0: every block id, laid out once (per query tile, as count_tiles)
    count: torch.Tensor  # (1, 1, splits) int32 kept blocks per split
    count_tiles: torch.Tensor  # (1, 1, splits * tiles) the same per query tile of the active-first rows
    dense_index: torch.Tensor  # every block id of the capacity, laid out for the first step's splits
    dense_count: torch.Tensor  # (1, 1, dense_splits) int32: the prefix's full blocks per split
    all_active: torch.Tensor  # (B, Nq) True: the first step writes every row of the row cache
    win_idx: torch.Tensor  # (block_size + Nq,) int64 KV rows of the window: tail | active block, then padding
    win_bias: torch.Tensor  # (block_size + Nq,) 0 on the window's valid rows, -inf on its padding
    inner_out: torch.Tensor | None  # CUDA: the window attention's float32 output (B, Hq, Nq, D) when captured
    inner_lse: torch.Tensor | None  # and its LSE (B, Hq, Nq)
    n_dev: torch.Tensor  # () int64 the prefix length: the first step derives the values above from it
    count_table: torch.Tensor  # (nkb_cap + 1, splits) int32 kept blocks per split for each prefix block count
    dense_table: torch.Tensor  # (nkb_cap + 1, dense_splits) int32 likewise with every block kept
    splits: int
    tiles: int  # query tiles of the active-first stacked rows (ceil(Nq * group / block_size))
    dense_splits: int
    keep_cap: int  # ranks computed per step: the keep of the full capacity
    signature: tuple
    epoch: int = -1  # the cache epoch (block) this state was refreshed for
    n_prefix: int = -1
    ratio: float = 0.0  # kept / prefix blocks, for the step report
    graph: object = None  # the steady-state step's CUDA graph (step_cache.run_step); kept across blocks
    first: GraphSlot = dataclasses.field(default_factory=GraphSlot)  # the first step's graph, likewise


