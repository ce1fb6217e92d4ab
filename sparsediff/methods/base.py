"""What every method shares: the common config fields, the call convention hosts use, and the
dense fallbacks (short sequences, early denoising steps).

Hosts (diffusers processors, transformers attention functions, generation loops) compute q, k, v
with the model's own code and call a method object:

    out = method(q, k, v, causal=False, layer="blocks.3.attn1", frame_size=1560, global_tokens=0)

q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``. When ``Nk > Nq`` and the call is not causal, the
last ``Nq`` keys are the queries' own tokens and the first ``Nk - Nq`` are a cached prefix (block
diffusion). ``global_tokens`` leading tokens (text in joint attention) are always attended, as rows
and as columns. ``layer`` names the calling layer, for per-layer caches and reports.
"""

from __future__ import annotations

import dataclasses
import logging

from . import step_state
from .dense import dense_attention

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MethodConfig:
    """Fields every method's config has (each method's dataclass extends it)."""

    block_size: int = 128
    min_seq_len: int = 1024  # below this many keys: dense attention
    dense_steps: int = 0  # the first denoising steps run dense ...
    dense_step_fraction: float = 0.0  # ... or this share of all steps (whichever reaches further)

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size!r}")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be an int >= 0, got {self.min_seq_len!r}")
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        if not 0.0 <= float(self.dense_step_fraction) <= 1.0:
            raise ValueError(f"dense_step_fraction must lie in [0, 1], got {self.dense_step_fraction!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)


class AttentionMethod:
    """Base class: holds a config and per-generation state; subclasses implement ``sparse_attention``."""

    name = "dense"
    config_class = MethodConfig

    def __init__(self, config=None, **overrides):
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self._generation = step_state.current().generation
        self.stats: dict = {}

    # -- hooks for subclasses -------------------------------------------------------------------
    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)

    def reset(self) -> None:
        """Drop per-generation state (caches). Called lazily when a new generation starts."""
        self.stats = {}

    # -- the call hosts make --------------------------------------------------------------------
    def use_dense(self, q, k) -> bool:
        cfg = self.config
        if k.shape[2] < cfg.min_seq_len:
            return True
        return step_state.current().is_dense_step(cfg.dense_steps, cfg.dense_step_fraction)

    def __call__(self, q, k, v, *, causal=False, scale=None, layer=None, frame_size=None, global_tokens=0,
                 return_lse=False):
        state = step_state.current()
        if state.generation != self._generation:
            self._generation = state.generation
            self.reset()
        if self.use_dense(q, k):
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        return self.sparse_attention(
            q, k, v, causal=causal, scale=scale, layer=layer, frame_size=frame_size,
            global_tokens=global_tokens, return_lse=return_lse,
        )

    def describe(self) -> dict:
        return {"method": self.name, **self.config.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class DenseMethod(AttentionMethod):
    """Plain dense attention behind the same interface (the baseline in every comparison)."""

    name = "dense"

    def use_dense(self, q, k) -> bool:
        return True


_METHODS: dict[str, type[AttentionMethod]] = {"dense": DenseMethod}


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    _METHODS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import importlib

    for module in ("ba_att", "block_sparse", "sparsed", "flashblock", "losa"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def make_method(spec, **overrides) -> AttentionMethod:
    """A method from a name (``"ba_att"``), a ``"name:sparsity"`` string (``"ba_att:0.8"``), a config
    dataclass (``BAAttConfig(...)``) or an existing method (returned as is when no overrides)."""
    if isinstance(spec, AttentionMethod):
        return spec if not overrides else type(spec)(spec.config, **overrides)
    _load_builtin()
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        if name not in _METHODS:
            raise ValueError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
        if arg:
            try:
                overrides.setdefault("sparsity", float(arg))
            except ValueError:
                raise ValueError(f"in {spec!r}, the part after ':' must be a sparsity in [0, 1)") from None
        return _METHODS[name](**overrides)
    for cls in _METHODS.values():
        if type(spec) is cls.config_class:
            return cls(spec, **overrides)
    raise TypeError(f"cannot make a method from {type(spec).__name__}; pass a name, a config or a method")


