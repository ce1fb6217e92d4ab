"""The attention function transformers calls for ``attn_implementation="ba_att"`` (and the other
method names): it decides per call whether the method runs or dense SDPA does, and adapts layouts.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``
with query ``(B, Hq, Nq, D)``, key/value ``(B, Hkv, Nk, D)`` (after the KV cache update) and expects
``(out (B, Nq, Hq, D), weights or None)``. Routing, in order:

1. vision towers, layers configured as dense, dropout in training, biases / softcap / sinks / paged
   caches -> transformers' own SDPA function (exactly the reference path);
2. fewer keys than the method's ``min_seq_len`` -> SDPA;
3. causal decode (``Nq < Nk`` and ``Nq < dense_query_len``) -> SDPA;
4. a call the method cannot act on (``method.dense_reason``: a dense early step; a causal call for the
   block-diffusion methods; SparseD on a causal model without denoising steps) -> SDPA, with one warning
   naming the reason for the cases a user may not expect;
5. the mask is plain causal / bidirectional plus key padding -> the method, per row on the row's
   valid tokens when there is padding; any other mask -> SDPA (one warning; silent for sliding
   windows, which are local by design).

``route_counts`` counts every call under its route: ``sparse`` / ``sparse_padded`` when the method ran,
else the ``dense_*`` reason (``methods.base.DENSE_REASONS`` and the host's own: vision, layer, unsupported,
decode, mask).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from .._logging import warn_once
from ..methods import AttentionMethod, make_method
from ..methods.base import DENSE_REASONS
from ..methods.masks import key_validity, run_per_row
from .config import SparseAttentionConfig

logger = logging.getLogger(__name__)

BINDING_ATTR = "_sparsediff_binding"
_VISION_HINTS = ("vision", "siglip", "clip", "vit", "audio")

# How calls were routed since the last reset: cheap counters for reports and tests.
route_counts: collections.Counter = collections.Counter()
_default_methods: dict[str, AttentionMethod] = {}


def reset_route_counts() -> None:
    route_counts.clear()


@dataclasses.dataclass
class LayerBinding:
    """What one attention module runs: its method (None = dense), a stable layer name, options."""

    method: AttentionMethod | None
    layer: str
    options: SparseAttentionConfig

    @property
    def dense_query_len(self) -> int:
        if self.options.dense_query_len is not None:
            return self.options.dense_query_len
        return self.method.config.block_size if self.method is not None else 1


def is_language_attention(module) -> bool:
    """Text attention layers carry a ``layer_idx`` (for the KV cache); vision towers' do not, or
    their config says vision."""
    model_type = getattr(getattr(module, "config", None), "model_type", "") or ""
    if any(hint in model_type for hint in _VISION_HINTS):
        return False
    return getattr(module, "layer_idx", None) is not None


def default_binding(name: str, module) -> LayerBinding:
    """Used when a model was loaded with ``attn_implementation=name`` and never passed to
    ``sparsediff.enable``: one default-configured method per name, shared by all layers."""
    if name not in _default_methods:
        _default_methods[name] = make_method(name)
    layer = f"{type(module).__name__}.{getattr(module, 'layer_idx', None)}"
    return LayerBinding(_default_methods[name], layer, SparseAttentionConfig(method=name))


def _sdpa(module, query, key, value, attention_mask, route, **kwargs):
    from transformers import AttentionInterface

    route_counts[route] += 1
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _unsupported_feature(module, dropout, kwargs) -> str | None:
    if dropout and module.training:
        return "dropout"
    for name in ("position_bias", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        return "paged cache"
    return None


def sparse_attention_forward(module, query, key, value, attention_mask, *, default_name, scaling=None,
                             dropout=0.0, **kwargs):
    """Route one attention call; see the module docstring."""
    sdpa_kwargs = dict(kwargs, scaling=scaling, dropout=dropout)
    binding = getattr(module, BINDING_ATTR, None)
    if binding is None:
        if not is_language_attention(module):
            return _sdpa(module, query, key, value, attention_mask, "dense_vision", **sdpa_kwargs)
        binding = default_binding(default_name, module)
    method = binding.method
    if method is None:
        return _sdpa(module, query, key, value, attention_mask, "dense_layer", **sdpa_kwargs)
    feature = _unsupported_feature(module, dropout, kwargs)
    if feature is not None:
        warn_once(logger, f"sparsediff: {feature} is not supported by sparse attention; using dense SDPA")
        return _sdpa(module, query, key, value, attention_mask, "dense_unsupported", **sdpa_kwargs)

    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    nq, nk = query.shape[2], key.shape[2]
    reason = method.dense_reason(query, key, causal=bool(is_causal))
    if reason == "dense_short":
        return _sdpa(module, query, key, value, attention_mask, "dense_short", **sdpa_kwargs)
    if is_causal and nq < nk and nq < binding.dense_query_len:
        return _sdpa(module, query, key, value, attention_mask, "dense_decode", **sdpa_kwargs)
    if reason is not None:
        if reason != "dense_step":  # dense early steps are the config's own choice
            warn_once(logger, f"sparsediff: {method.name} runs dense SDPA on these calls: {DENSE_REASONS[reason]}")
        return _sdpa(module, query, key, value, attention_mask, reason, **sdpa_kwargs)

    if attention_mask is None and is_causal and 1 < nq < nk:
        # Prefill into an empty static cache: the slots past Nq hold no tokens yet (SDPA crops too).
        key, value, nk = key[:, :, :nq], value[:, :, :nq], nq
    valid = key_validity(attention_mask, nq, nk, is_causal)
    if valid is False:
        if kwargs.get("sliding_window") is None:
            warn_once(logger,
                f"sparsediff: {type(module).__name__} received a mask that is not causal/bidirectional plus "
                "padding (e.g. image-bidirectional blocks or packed sequences); using dense SDPA for such calls"
            )
        return _sdpa(module, query, key, value, attention_mask, "dense_mask", **sdpa_kwargs)
    if valid is not None and bool(valid.all()):
        valid = None

    call = dict(causal=bool(is_causal), scale=scaling, layer=binding.layer)
    if valid is None:
        route_counts["sparse"] += 1
        out = method(query, key, value, **call)
    else:
        route_counts["sparse_padded"] += 1
        out = run_per_row(lambda b, qb, kb, vb, _: method(qb, kb, vb, **dict(call, layer=f"{call['layer']}[row {b}]")),
                          query, key, value, valid, causal=call["causal"], scale=call["scale"])
    return out.transpose(1, 2).contiguous(), None


def make_attention_function(name: str):
    """The function registered under ``name`` in transformers' AttentionInterface."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return sparse_attention_forward(
            module, query, key, value, attention_mask, default_name=name, scaling=scaling, dropout=dropout, **kwargs
        )

    attention.__name__ = f"sparsediff_{name}_attention"
    attention.__qualname__ = attention.__name__
    return attention

