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

from ..kernels.block_sparse import PRECISIONS
from ..runtime import step_state
from . import token_layout
from .dense import dense_attention

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MethodConfig:
    """Fields every method's config has (each method's dataclass extends it)."""

    block_size: int = 128
    min_seq_len: int = 1024  # below this many keys: dense attention
    dense_steps: int = 0  # the first denoising steps run dense ...
    dense_step_fraction: float = 0.0  # ... or this share of all steps (whichever reaches further)
    layout: str = "auto"  # video token order: "tiled" (3-D tiles), "rowmajor" (as given), "auto" (row-major for now)
    tile: tuple | None = None  # (frames, rows, cols) of one tile; None: token_layout.default_tile
    residual_every: int = 0  # >= 1: cache dense - sparse every this many steps, reuse it between (residual_reuse)
    plan_every: int = 0  # >= 1: select blocks every this many steps, keep the plan between (block-sparse methods)
    precision: str = "bf16"  # the block-sparse kernel's: "bf16", or 8-bit "int8" / "int8_fp8" (block-sparse methods)

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size!r}")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be an int >= 0, got {self.min_seq_len!r}")
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        if not 0.0 <= float(self.dense_step_fraction) <= 1.0:
            raise ValueError(f"dense_step_fraction must lie in [0, 1], got {self.dense_step_fraction!r}")
        r = self.residual_every
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"residual_every must be an int >= 0 (0: off; r: refresh the cached dense - sparse "
                             f"residual every r denoising steps), got {r!r}")
        p = self.plan_every
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"plan_every must be an int >= 0 (0: select every step; r: select blocks every r "
                             f"denoising steps and keep the plan between), got {p!r}")
        if p and r:
            raise ValueError("set residual_every or plan_every, not both: residual reuse already keeps the plan of "
                             "its refresh step until the next refresh")
        token_layout.check_layout_fields(self)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} (the block-sparse kernel's), "
                             f"got {self.precision!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)


class AttentionMethod:
    """Base class: holds a config and per-generation state; subclasses implement ``sparse_attention``."""

    name = "dense"
    config_class = MethodConfig
    eight_bit = False  # runs the 8-bit block-sparse kernel when config.precision asks (block-sparse methods)

    def __init__(self, config=None, **overrides):
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        if config.precision != "bf16" and not self.eight_bit:
            raise ValueError(f"precision={config.precision!r} is supported by the block-sparse methods (ba_att, "
                             f"block_sparse and its selectors); {self.name} runs 16-bit kernels only")
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

    def residual_planner(self, nk: int):
        """The block-sparse method whose plan residual reuse keeps across steps for ``nk`` keys, or None: the
        method runs its own ``sparse_attention`` on every step (``residual_reuse``)."""
        return None

    def dense_reason(self, q, k, *, causal=False) -> str | None:
        """Why this call would run dense attention (a key of :data:`DENSE_REASONS`), or None when the method
        acts on it. Hosts count and report it; subclasses add the cases they cannot handle."""
        if k.shape[2] < self.config.min_seq_len:
            return "dense_short"
        if step_state.current().is_dense_step(self.config.dense_steps, self.config.dense_step_fraction):
            return "dense_step"
        return None

    def __call__(self, q, k, v, *, causal=False, scale=None, layer=None, frame_size=None, global_tokens=0,
                 return_lse=False, grid=None, applied_layout=None):
        """``grid``: (latent frames, height, width) of the video tokens after the ``global_tokens`` when the host
        knows it (for a cached-prefix call, one grid per frame block of the keys); the config's ``layout`` then
        may reorder them into 3-D tiles (``token_layout``). ``applied_layout``: a :class:`~.token_layout.TokenLayout`
        the host already applied (tokens arrive, and the output leaves, in its order): no permutation here."""
        state = step_state.current()
        if state.generation != self._generation:
            self._generation = state.generation
            self.reset()
        if self.use_dense(q, k):
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        if applied_layout is not None:
            return self._attend_sparse(q, k, v, causal=causal, scale=scale, layer=layer,
                                       frame_size=applied_layout.segment, global_tokens=global_tokens,
                                       return_lse=return_lse)
        tiles = self.token_layout(q, k, causal=causal, grid=grid, global_tokens=global_tokens)
        if tiles is not None:
            q, k, v = tiles.permute_q(q), tiles.permute(k), tiles.permute(v)
            frame_size = tiles.segment
        out = self._attend_sparse(q, k, v, causal=causal, scale=scale, layer=layer, frame_size=frame_size,
                                  global_tokens=global_tokens, return_lse=return_lse)
        if tiles is None:
            return out
        if return_lse:
            return tiles.unpermute(out[0]), tiles.unpermute(out[1])
        return tiles.unpermute(out)

    def token_layout(self, q, k, *, causal, grid, global_tokens):
        """The tiling this call runs under (a :class:`~.token_layout.TokenLayout`), or None for the tokens' own
        order: no grid, a causal or cross call, or ``config.layout`` off."""
        return token_layout.layout_for(self.config, q, k, causal=causal, grid=grid, global_tokens=global_tokens)

    def _attend_sparse(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        """The sparse product of one call (in the layout's token order), with the cached dense - sparse residual
        merged in when ``config.residual_every`` is set, or on a plan kept across steps when ``config.plan_every``
        is (``residual_reuse``)."""
        if self.config.residual_every or self.config.plan_every:
            from .residual_reuse import attend_with_kept_plan, attend_with_residual

            reuse = attend_with_residual if self.config.residual_every else attend_with_kept_plan
            return reuse(self, q, k, v, causal=causal, scale=scale, layer=layer, frame_size=frame_size,
                         global_tokens=global_tokens, return_lse=return_lse)
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

def prefix_block_reason(q, k, causal) -> str | None:
    """Why a block-diffusion method (a bidirectional active block over a cached prefix) cannot act on a call."""
    if causal:
        return "dense_causal"
    if k.shape[2] <= q.shape[2]:
        return "dense_no_prefix"
    return None


# Why a call ran dense attention instead of the method: the keys hosts count routes under.
DENSE_REASONS = {
    "dense_short": "fewer keys than the method's min_seq_len",
    "dense_step": "an early denoising step the config keeps dense",
    "dense_causal": "a causal call, which this block-diffusion method does not handle",
    "dense_no_prefix": "no cached prefix (as many keys as queries), which this block-diffusion method needs",
    "dense_no_steps": "no denoising steps: calls are independent forward passes, so a pattern reused across "
                      "steps would carry one input's pattern to the next",
}


def sparse_share(routes: dict) -> float | None:
    """Share of routed attention calls that ran the method (routes ``"sparse"`` and ``"sparse_padded"``) in a
    ``route -> calls`` count; cross-attention (``"dense_cross"``, dense by design) left out. None before any."""
    total = sum(n for route, n in routes.items() if route != "dense_cross")
    return (routes.get("sparse", 0) + routes.get("sparse_padded", 0)) / total if total else None


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


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"NAME[:SPARSITY][/KEY=VALUE]..."`` -> ``(NAME, overrides)``, the one grammar of method strings.

    ``"ba_att:0.8/estimator=pooled/local_window=0"`` -> ``("ba_att", {"sparsity": 0.8, "estimator": "pooled",
    "local_window": 0})``. Values read as bool (true/false), None, int, float, else str."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}")
    head, *parts = spec.strip().split("/")
    name, sep, arg = head.partition(":")
    overrides = {}
    if sep:
        try:
            overrides["sparsity"] = float(arg)
        except ValueError:
            raise ValueError(f"in {spec!r}, the part after ':' must be a sparsity in [0, 1)") from None
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"in method {spec!r}, {part!r} must look like key=value")
        overrides[key] = _parse_value(value)
    return name, overrides


def method_at_density(spec: str, density: float, block_size: int | None = None) -> AttentionMethod:
    """The method ``spec`` runs at ``density`` (share of key blocks kept), always sparse (``min_seq_len=0``):
    what the probe, the LM-quality runs and calibration compare. The spec's own overrides win; an explicit
    ``block_size`` is the one used (a method's finer blocks for short sequences are turned off)."""
    name, overrides = parse_spec(spec)
    fill = {"sparsity": round(1.0 - float(density), 6), "min_seq_len": 0}
    if block_size is not None:
        fill["block_size"] = block_size
    method = make_method(name, **(fill | overrides))
    fine = getattr(method.config, "fine_block_size", None)
    if block_size is not None and fine and "fine_block_size" not in overrides:
        method = make_method(method.config.replace(fine_block_size=None))
    return method


_PRESETS: dict = {}


def register_preset(name: str, method_name: str, factory) -> None:
    """A named setting of a method (``"ba_att_paper"``): ``factory(**overrides)`` gives its config."""
    _PRESETS[name] = (method_name, factory)


def _presets() -> dict:
    """Named settings of the methods: ``name -> (method name, config factory)``."""
    _load_builtin()
    return _PRESETS


def available_specs() -> list[str]:
    """Every name a spec may start with: methods, presets and block selectors (run as ``block_sparse``)."""
    from .selectors import available_selectors

    return sorted(set(available_methods()) | set(_presets()) | set(available_selectors()))


def make_method(spec, **overrides) -> AttentionMethod:
    """A method from a spec string (:func:`parse_spec`: a method name, a preset such as ``"ba_att_paper"``, or
    a block selector such as ``"xattention"`` run by ``block_sparse``), a config dataclass
    (``BAAttConfig(...)``) or an existing method (returned as is when no overrides)."""
    if isinstance(spec, AttentionMethod):
        return spec if not overrides else type(spec)(spec.config, **overrides)
    _load_builtin()
    if isinstance(spec, str):
        name, parsed = parse_spec(spec)
        overrides = {**parsed, **overrides}
        presets = _presets()
        try:
            if name in presets:
                method_name, factory = presets[name]
                return _METHODS[method_name](factory(**overrides))
            if name in _METHODS:
                return _METHODS[name](**overrides)
            from .selectors import available_selectors

            if name in available_selectors():
                return _METHODS["block_sparse"](selector=name, **overrides)
        except TypeError as err:  # an unknown config field
            raise ValueError(f"in method {spec!r}: {err}") from None
        raise ValueError(f"unknown method {name!r}; available: {available_specs()}")
    for cls in _METHODS.values():
        if type(spec) is cls.config_class:
            return cls(spec, **overrides)
    raise TypeError(f"cannot make a method from {type(spec).__name__}; pass a name, a config or a method")
