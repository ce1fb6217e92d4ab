"""sparsediff on diffusers' ``LLaDA2Pipeline`` (block-wise refinement with a LLaDA2-style model).

What the pipeline does (diffusers 0.42): the model is a transformers causal-LM-shaped module
(``inclusionAI/LLaDA2.x``, remote code ``LLaDA2MoeModelLM``) called as
``model(block_x, attention_mask=2-D mask, position_ids=...).logits``. There is no KV cache: every
refinement step recomputes the whole window ``[prompt | finished blocks | active block]`` (Nq = Nk),
and the window grows by ``block_length`` per block. Steps per block vary (threshold commits, editing
post-steps); ``scheduler.set_timesteps(..., block_length=...)`` runs once per call.

What this adapter expects of the model (checked at enable time): attention modules whose class name
ends in ``Attention``, that expose their projections (``query_key_value`` as LLaDA2MoeAttention, or
``q_proj/k_proj/v_proj``), hold a ``config`` and dispatch through transformers'
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=..., ...)`` with
q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)`` and return ``(out (B, N, Hq, D), weights)``; masks are
``None`` (bidirectional) or 4-D (e.g. LLaDA2's block-causal mask). ``enable_llada2`` registers an
attention function, points those configs at it and binds the method to each module:

  * the last ``block_length`` query rows (the active block) go to the method in the block-diffusion
    convention: q = those rows, k/v = all keys (``[prefix | active block]``) — only when the mask lets
    them see every key (bidirectional or block-causal without padding); otherwise the call is SDPA;
  * the other rows (the recomputed prefix) and every call the method would run dense go to
    transformers' SDPA unchanged, so a dense method reproduces the pipeline exactly.

Why not ``sparsediff.hooks.enable_transformers``: its routing sees a full-window call (Nq = Nk) and
would hand all rows to the method, where FlashBlock / LoSA fall back to dense; LLaDA2's block-causal
4-D mask would also send every call to SDPA. The pieces (binding, mask reading, registration) are
reused. Step events come from the pipeline itself: ``scheduler.set_timesteps`` starts a generation,
and a pre-forward hook on the model turns each call into a step, a new window length into a block.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..methods import make_method
from ..methods.masks import to_bool_mask
from ..runtime import step_state
from .attention import BINDING_ATTR
from .enable import _set_implementation, unbind

logger = logging.getLogger(__name__)

ATTN_NAME = "sparsediff_llada2"
STATE_ATTR = "_sparsediff_llada2"
_registered = False


@dataclasses.dataclass
class _Run:
    """Where the pipeline stands, shared by the step hook and the attention bindings."""

    block_length: int | None = None
    total_steps: int | None = None
    window: int | None = None
    block: int = -1
    step: int = 0
    mask_key: tuple | None = None  # (id, data_ptr, shape) of the last mask checked, and the answer
    mask_ok: bool = False


@dataclasses.dataclass
class _Binding:
    method: object
    layer: str
    run: _Run


@dataclasses.dataclass
class _State:
    method: object
    run: _Run
    modules: list
    previous: list
    handles: list


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, llada2_attention)
        AttentionMaskInterface.register(ATTN_NAME, AttentionMaskInterface()["sdpa"])
        _registered = True


def is_attention_module(module) -> bool:
    """The module pattern: an ``...Attention`` class with q/k/v (or fused qkv) projections that reads
    its attention implementation from ``config``."""
    if not type(module).__name__.endswith("Attention") or not hasattr(getattr(module, "config", None),
                                                                       "_attn_implementation"):
        return False
    return hasattr(module, "query_key_value") or all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj"))


def _sees_every_key(run: _Run, mask, n: int) -> bool:
    """True when the active rows attend every key (no mask, or a mask that allows all of them). The
    same mask object reaches every layer of a forward call: checked once (one device sync) per call."""
    if mask is None:
        return True
    key = (id(mask), mask.data_ptr(), tuple(mask.shape))
    if key != run.mask_key:
        rows = to_bool_mask(mask[..., -n:, :]) if mask.dim() == 4 else None
        run.mask_key, run.mask_ok = key, rows is not None and bool(rows.all())
    return run.mask_ok


def llada2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``sparsediff_llada2``; see the module docstring."""
    from transformers import AttentionInterface

    sdpa = AttentionInterface()["sdpa"]
    binding = getattr(module, BINDING_ATTR, None)
    n = binding.run.block_length if isinstance(binding, _Binding) else None
    nq, nk = query.shape[2], key.shape[2]
    if n is None or nq != nk or nq <= n or (dropout and module.training):
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    method = binding.method
    if method.use_dense(query[:, :, -n:], key) or not _sees_every_key(binding.run, attention_mask, n):
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    active = method(query[:, :, -n:], key, value, causal=False, scale=scaling, layer=binding.layer)
    prefix_mask = None if attention_mask is None else attention_mask[..., :-n, :]
    prefix, _ = sdpa(module, query[:, :, :-n], key, value, prefix_mask, scaling=scaling, dropout=dropout, **kwargs)
    return torch.cat([prefix, active.transpose(1, 2).to(prefix.dtype)], dim=1), None


def _step_hook(run: _Run):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        window = ids.shape[1] if ids is not None else None
        if window != run.window:
            run.window, run.block, run.step = window, run.block + 1, 0
            step_state.new_block(run.block)
        else:
            run.step += 1
        step_state.set_step(run.step, run.total_steps)
    return hook


def _schedule_hook(scheduler, run: _Run):
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps, *args, **kwargs):
        step_state.new_generation()
        run.block_length = kwargs.get("block_length") or getattr(scheduler.config, "block_length", None)
        run.total_steps, run.window, run.block, run.step = num_inference_steps, None, -1, 0
        return original(num_inference_steps, *args, **kwargs)

    scheduler.set_timesteps = set_timesteps  # an instance attribute: removed again by disable


def enable_llada2(pipe, method="flashblock", **overrides):
    """Run ``pipe.model``'s attention for the active block through ``method``; returns ``pipe``."""
    if getattr(pipe, STATE_ATTR, None) is not None:
        disable_llada2(pipe)
    model = pipe.model
    modules = [(name, m) for name, m in model.named_modules() if is_attention_module(m)]
    if not modules:
        raise TypeError(
            f"{type(model).__name__} has no attention module sparsediff can route: expected '...Attention' "
            "modules with query_key_value or q_proj/k_proj/v_proj that dispatch through transformers' "
            "ALL_ATTENTION_FUNCTIONS[config._attn_implementation]"
        )
    _register()
    method = make_method(method, **overrides)
    run = _Run()
    configs = {}
    for name, module in modules:
        setattr(module, BINDING_ATTR, _Binding(method, name, run))
        configs[id(module.config)] = module.config
    previous = [(c, c._attn_implementation) for c in configs.values()]
    for config in configs.values():
        _set_implementation(config, ATTN_NAME)
    _schedule_hook(pipe.scheduler, run)
    handles = [model.register_forward_pre_hook(_step_hook(run), with_kwargs=True)]
    setattr(pipe, STATE_ATTR, _State(method, run, [m for _, m in modules], previous, handles))
    logger.info("sparsediff: %s on %d attention modules of %s", method, len(modules), type(model).__name__)
    return pipe


def disable_llada2(pipe):
    """Undo :func:`enable_llada2` exactly; a no-op when it was not enabled. Returns ``pipe``."""
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return pipe
    pipe.scheduler.__dict__.pop("set_timesteps", None)
    unbind(state)
    state.method.reset()
    setattr(pipe, STATE_ATTR, None)
    return pipe


def enabled_method(pipe):
    """The method ``enable_llada2`` bound to ``pipe``, or None."""
    state = getattr(pipe, STATE_ATTR, None)
    return state.method if state is not None else None
