"""``enable_transformers`` / ``disable_transformers``: switch a loaded model's language attention to
a sparsediff method and back, exactly.

What changes: the ``_attn_implementation`` of the configs that the language model's attention
layers read (text sub-configs of VLMs and of DiffusionGemma; the model config of plain LMs), and a
binding attribute on each of those attention modules (method, layer name, options). Vision towers
keep their implementation unless ``sparse_vision=True``. ``disable`` puts back every previous value.
"""

from __future__ import annotations

import dataclasses

from ..methods import make_method
from .attention import BINDING_ATTR, LayerBinding, is_language_attention
from .config import SparseAttentionConfig, as_config
from .registry import implementation_name

STATE_ATTR = "_sparsediff_state"


@dataclasses.dataclass
class EnabledState:
    options: SparseAttentionConfig
    implementation: str
    previous: list  # (config object, previous _attn_implementation)
    modules: list
    handles: list


def attention_modules(model, include_vision: bool = False):
    """``(qualified name, module)`` of every attention layer that dispatches through transformers'
    attention interface (it holds a ``config`` it reads the implementation from)."""
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or not hasattr(module, "config"):
            continue
        if not hasattr(module, "is_causal") and getattr(module, "layer_idx", None) is None:
            continue  # wrappers (e.g. "...SdpaAttention" mixins) without the dispatch themselves
        if is_language_attention(module) or include_vision:
            yield name, module


def _set_implementation(config, value) -> None:
    # A dict with only "" sets this config and leaves its sub-configs as they are.
    config._attn_implementation = {"": value} if getattr(config, "sub_configs", None) else value


def enable_transformers(model, method="ba_att", **overrides):
    """Run ``model``'s language attention through ``method``.

    ``method`` is a :class:`SparseAttentionConfig` or anything ``make_method`` accepts; ``overrides``
    go to the method's config. Calling it again replaces the previous setting. Returns ``model``.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        disable_transformers(model)
    options = as_config(method, **overrides)
    base = make_method(options.method) if options.method is not None else None
    built = {}

    def method_for(layer_idx):
        spec = options.spec_for(layer_idx)
        if spec is options.method:
            return base
        if spec is None:
            return None
        key = id(spec)
        if key not in built:
            built[key] = make_method(spec)
        return built[key]

    name = implementation_name(base.name if base is not None else None)
    modules, configs = [], {}
    for qualname, module in attention_modules(model, include_vision=options.sparse_vision):
        binding = LayerBinding(method_for(getattr(module, "layer_idx", None)), qualname, options)
        setattr(module, BINDING_ATTR, binding)
        modules.append(module)
        configs[id(module.config)] = module.config
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention layer that dispatches through transformers' "
            "AttentionInterface; sparsediff cannot switch it"
        )
    previous = []
    for config in configs.values():
        previous.append((config, config._attn_implementation))
        _set_implementation(config, name)

    handles = []
    if options.track_steps:
        from .diffusion_gemma import install_step_tracking

        handles = install_step_tracking(model)
    setattr(model, STATE_ATTR, EnabledState(options, name, previous, modules, handles))
    return model


def unbind(state) -> None:
    """Remove an enabled state's hooks and layer bindings and put back the attention implementations."""
    for handle in state.handles:
        handle.remove()
    for module in state.modules:
        if hasattr(module, BINDING_ATTR):
            delattr(module, BINDING_ATTR)
    for config, value in reversed(state.previous):
        _set_implementation(config, value)


def disable_transformers(model):
    """Undo :func:`enable_transformers`; a no-op on a model that was never enabled. Returns ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    unbind(state)
    delattr(model, STATE_ATTR)
    return model


def enabled_state(model) -> EnabledState | None:
    return getattr(model, STATE_ATTR, None)
