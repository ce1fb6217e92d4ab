"""``sparsediff.enable(obj, method)`` / ``sparsediff.disable(obj)`` for every supported host.

``obj`` is a diffusers pipeline or model (attention processors are swapped) or a transformers model
(its attention implementation is switched); ``method`` is anything ``make_method`` accepts: a name
(``"ba_att"``, ``"ba_att:0.8"``), a config dataclass, or a method object. Both calls are reversible:
``disable`` restores exactly what ``enable`` replaced.
"""

from __future__ import annotations


def _is_transformers_model(obj) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(obj, PreTrainedModel)


def _is_llada2_pipeline(obj) -> bool:
    # By class name: diffusers' LLaDA2Pipeline, without importing diffusers or transformers to ask.
    return any(cls.__name__ == "LLaDA2Pipeline" for cls in type(obj).__mro__)


def enable(obj, method="ba_att", **overrides):
    """Make ``obj``'s long attention sparse with ``method``; returns ``obj``."""
    if _is_llada2_pipeline(obj):  # a diffusers pipeline around a transformers LM: the transformers adapter
        from .hooks.llada2 import enable_llada2

        return enable_llada2(obj, method, **overrides)
    if _is_transformers_model(obj):
        from .hooks import enable_transformers

        return enable_transformers(obj, method, **overrides)
    from .attention_processors import enable_diffusers

    return enable_diffusers(obj, method, **overrides)


def disable(obj):
    """Undo :func:`enable`, restoring the original attention exactly; returns ``obj``."""
    if _is_llada2_pipeline(obj):
        from .hooks.llada2 import disable_llada2

        return disable_llada2(obj)
    if _is_transformers_model(obj):
        from .hooks import disable_transformers

        return disable_transformers(obj)
    from .attention_processors import disable_diffusers

    return disable_diffusers(obj)
