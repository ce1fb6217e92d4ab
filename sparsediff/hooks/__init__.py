"""transformers integration: sparse attention functions registered under method names.

Importing this module registers ``ba_att``, ``block_sparse``, ``sparsed``, ``flashblock`` and
``losa`` (those installed) with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``,
so that ``from_pretrained(..., attn_implementation="ba_att")`` works::

    import sparsediff.hooks  # registers the names
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="ba_att")

``sparsediff.enable(model, BAAttConfig(...))`` instead switches an already loaded model (language
attention only; per-layer configs through :class:`SparseAttentionConfig`), and
``sparsediff.disable(model)`` restores it exactly. See ``docs/transformers.md``.
"""

from .attention import reset_route_counts, route_counts
from .config import SparseAttentionConfig
from .enable import disable_transformers, enable_transformers, enabled_state
from .registry import GENERIC_NAME, METHOD_NAMES, register, register_available, registered_names

register_available()

__all__ = [
    "GENERIC_NAME",
    "METHOD_NAMES",
    "SparseAttentionConfig",
    "disable_transformers",
    "enable_transformers",
    "enabled_state",
    "register",
    "register_available",
    "registered_names",
    "reset_route_counts",
    "route_counts",
]
