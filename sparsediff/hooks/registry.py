"""Registration of our attention functions with transformers' public interfaces.

Two registrations per name are needed: ``AttentionInterface`` (the function layers call) and
``AttentionMaskInterface``. Without the second, transformers' mask builders see an unknown name and
pass no mask at all, which silently drops left padding; with SDPA's mask builder registered, we get
exactly the masks SDPA gets (``None`` for plain causal / unpadded bidirectional calls, else a 4-D
boolean mask), so the dense fallback is SDPA itself.
"""

from __future__ import annotations

from ..methods import available_methods
from .attention import make_attention_function

METHOD_NAMES = ("ba_att", "block_sparse", "sparsed", "flashblock", "losa")
# Used by ``enable`` for methods without a name of their own here (user-defined methods).
GENERIC_NAME = "sparsediff"

_registered: set[str] = set()


def register(name: str) -> str:
    """Register ``name`` with transformers (idempotent); returns the name."""
    if name in _registered:
        return name
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, make_attention_function(name))
    AttentionMaskInterface.register(name, AttentionMaskInterface()["sdpa"])
    _registered.add(name)
    return name


def register_available() -> list[str]:
    """Register every built-in method that exists in this install, plus the generic name."""
    names = [name for name in METHOD_NAMES if name in available_methods()]
    for name in names:
        register(name)
    register(GENERIC_NAME)
    return names


def registered_names() -> list[str]:
    return sorted(_registered)


def implementation_name(method_name: str | None) -> str:
    """The ``attn_implementation`` a model gets for a method: its own name when it is a built-in
    one, the generic name otherwise."""
    if method_name is not None and method_name in METHOD_NAMES and method_name in available_methods():
        return register(method_name)
    return register(GENERIC_NAME)
