"""``enable_diffusers`` / ``disable_diffusers``: swap a pipeline's or model's attention processors for a
sparsediff processor, and put back exactly the processor objects that were there.

Besides the processors, enabling installs forward hooks per transformer: one publishes the latent
geometry (tokens per frame, for per-frame sorting segments) and, under ``layout="tiled"``, holds the video
tokens in tile order across the blocks (``token_order``); one advances ``step_state`` from the ``timestep``
the pipeline passes (for dense early steps and step-keyed caches). All are removed on disable.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .._logging import warn_once
from ..runtime import step_state
from . import families, token_order
from .processor import GEOMETRY, SparseAttnProcessor, bind, unbind

logger = logging.getLogger(__name__)

_STATE_ATTR = "_sparsediff_state"


@dataclasses.dataclass
class _EnabledState:
    processor: SparseAttnProcessor
    originals: dict
    hooks: list


class StepTracker:
    """Derives the denoising step from the ``timestep`` the pipeline passes to the transformer.

    A step begins when the timestep changes; calls with the same timestep (classifier-free guidance
    run as two calls, Wan 2.2's two experts) belong to one step. A timestep that goes up starts a new
    generation (a new video, a new diffusion-forcing window). Total steps come from the scheduler
    when one is known. One tracker is shared by all transformers of a pipeline.
    """

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.step, self.last, self.generation = -1, None, None

    def __call__(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            return
        value = float(t.float().mean()) if torch.is_tensor(t) else float(t)
        state = step_state.current()
        if self.last is None or value > self.last or state.generation != self.generation:
            step_state.new_generation()
            self.step = 0
        elif value != self.last:
            self.step += 1
        self.last, self.generation = value, state.generation
        timesteps = getattr(self.scheduler, "timesteps", None)
        step_state.set_step(self.step, len(timesteps) if timesteps is not None else None)


def _geometry_hooks(model, config):
    tokens = []

    def pre(module, args, kwargs):
        grid = families.frame_geometry(module, args, kwargs)
        if grid is not None and token_order.checkpointing(module):
            # A checkpointed block recomputes in the backward pass, outside this call: no grid-dependent choice
            # (tiles, per-frame sort segments) may differ between the two passes.
            warn_once(logger, f"{type(module).__name__}: gradient checkpointing is on; the latent grid is not "
                      "passed to the method (no tiles, no per-frame segments)", key=("checkpointing", id(module)))
            grid = None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        device = hidden.device if torch.is_tensor(hidden) else None
        tokens.append((GEOMETRY.set(grid), token_order.begin(module, config, grid, device)))

    def post(module, args, kwargs, output):
        if tokens:
            grid_token, order_token = tokens.pop()
            token_order.HOST_ORDER.reset(order_token)
            GEOMETRY.reset(grid_token)

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True, always_call=True),
            *token_order.install(model, config)]


def transformers_of(obj) -> list:
    """The denoising models of a pipeline (``transformer``, Wan 2.2's ``transformer_2``) or the model itself."""
    if hasattr(obj, "set_attn_processor") and hasattr(obj, "attn_processors"):
        return [obj]
    found = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [m for m in found if m is not None]
    if not found:
        raise TypeError(f"{type(obj).__name__} is neither a diffusers pipeline with a transformer nor a model with "
                        "attention processors; pass the pipeline or its transformer")
    return found


def enable_diffusers(obj, method="ba_att", *, track_steps: bool = True, **overrides):
    """Run ``method`` on the long attention of ``obj`` (pipeline or model); returns ``obj``.

    ``method``: a processor instance (``BAAttProcessor(sparsity=0.8)``) or anything ``make_method`` takes
    (``"ba_att:0.8"``, a config, a method object) plus config ``overrides``. Enabling again replaces the
    previous processor. ``track_steps=False`` leaves ``step_state`` to the caller (``denoising_step``).
    """
    if isinstance(obj, (list, tuple)):
        for item in obj:
            enable_diffusers(item, method, track_steps=track_steps, **overrides)
        return obj
    if isinstance(method, SparseAttnProcessor):
        if overrides:
            raise TypeError("pass config overrides to the processor itself, not to enable()")
        processor = method
    else:
        processor = SparseAttnProcessor(method, **overrides)
    models = transformers_of(obj)
    tracker = StepTracker(getattr(obj, "scheduler", None)) if track_steps else None
    for model in models:
        if getattr(model, _STATE_ATTR, None) is not None:
            disable_diffusers(model)
        originals = model.attn_processors
        names = {f"{n}.processor": m for n, m in model.named_modules() if hasattr(m, "set_processor")}
        for key, original in originals.items():
            bind(names[key], key[: -len(".processor")], original)
        model.set_attn_processor(processor)
        hooks = _geometry_hooks(model, processor.method.config)
        if tracker is not None:
            hooks.append(model.register_forward_pre_hook(tracker, with_kwargs=True))
        setattr(model, _STATE_ATTR, _EnabledState(processor, originals, hooks))
        logger.info("sparsediff: %s on %d attention modules of %s", processor, len(originals), type(model).__name__)
    return obj


def disable_diffusers(obj):
    """Put back the processors ``enable_diffusers`` replaced (the same objects) and remove its hooks."""
    if isinstance(obj, (list, tuple)):
        for item in obj:
            disable_diffusers(item)
        return obj
    for model in transformers_of(obj):
        state = getattr(model, _STATE_ATTR, None)
        if state is None:
            continue
        model.set_attn_processor(dict(state.originals))
        for hook in state.hooks:
            hook.remove()
        for module in model.modules():
            if hasattr(module, "set_processor"):
                unbind(module)
        setattr(model, _STATE_ATTR, None)
    return obj


def enabled_processor(obj) -> SparseAttnProcessor | None:
    """The processor ``enable_diffusers`` put on ``obj``'s (first) transformer, or None."""
    state = getattr(transformers_of(obj)[0], _STATE_ATTR, None)
    return state.processor if state is not None else None
