"""What ``sparsediff.enable(model, ...)`` carries for a transformers model: the method, optional
per-layer overrides, and when the attention function steps aside for dense SDPA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..methods import AttentionMethod, MethodConfig, make_method
from ..methods.base import parse_spec


@dataclasses.dataclass
class SparseAttentionConfig:
    """How a transformers model runs its attention under sparsediff.

    Args:
        method: anything ``make_method`` accepts (``"ba_att"``, ``"ba_att:0.8"``, ``BAAttConfig(...)``,
            a method object). Its ``min_seq_len`` decides which calls are long enough to go sparse.
        layers: per-layer overrides, either a mapping ``layer_idx -> spec`` or a callable
            ``layer_idx -> spec``; a spec of ``None`` keeps that layer dense, a layer missing from the
            mapping uses ``method``.
        dense_query_len: causal calls with fewer queries than keys and fewer than this many queries
            (decode steps with a KV cache) run dense SDPA; ``None`` means one query block of the method.
        sparse_vision: also route vision-tower attention through the method (default: vision
            encoders keep dense SDPA, as their sequences are short windows or single images).
        track_steps: for block-diffusion models (DiffusionGemma), feed ``sparsediff``'s step state
            (block and denoising step) from the model's own forward calls, so that caching methods
            (SparseD, FlashBlock, LoSA) know when a block starts.
    """

    method: Any = "ba_att"
    layers: Mapping[int, Any] | Callable[[int], Any] | None = None
    dense_query_len: int | None = None
    sparse_vision: bool = False
    track_steps: bool = True

    def __post_init__(self):
        if self.layers is not None and not (isinstance(self.layers, Mapping) or callable(self.layers)):
            raise TypeError(
                f"layers must be a mapping layer_idx -> spec or a callable, got {type(self.layers).__name__}"
            )
        if self.dense_query_len is not None and (not isinstance(self.dense_query_len, int) or self.dense_query_len < 1):
            raise ValueError(f"dense_query_len must be a positive int or None, got {self.dense_query_len!r}")

    def spec_for(self, layer_idx: int | None):
        """The method spec for one layer (``None`` = dense)."""
        if self.layers is None or layer_idx is None:
            return self.method
        if isinstance(self.layers, Mapping):
            return self.layers.get(layer_idx, self.method)
        return self.layers(layer_idx)


def as_config(method, **overrides) -> SparseAttentionConfig:
    """Normalise what ``enable`` receives: a ``SparseAttentionConfig`` or a bare method spec."""
    if isinstance(method, SparseAttentionConfig):
        if overrides:
            method = dataclasses.replace(method, method=make_method(method.method, **overrides))
        return method
    if overrides:
        method = make_method(method, **overrides)
    return SparseAttentionConfig(method=method)


def method_name(spec) -> str | None:
    """The registered method name behind a spec, without building it when it is a plain string."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return parse_spec(spec)[0]
    if isinstance(spec, AttentionMethod):
        return spec.name
    if isinstance(spec, MethodConfig):
        return make_method(spec).name
    raise TypeError(f"cannot make a method from {type(spec).__name__}; pass a name, a config or a method")
