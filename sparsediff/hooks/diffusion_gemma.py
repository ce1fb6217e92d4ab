"""Step tracking for DiffusionGemma's block diffusion, from the model's own forward calls.

How DiffusionGemma attends (transformers 5.x, ``models/diffusion_gemma``): ``generate`` alternates
an *encoder* pass and a denoising loop. The encoder (causal unless
``use_bidirectional_attention="all"``) writes the prompt, and later each committed canvas, into the
KV cache. The *decoder* then denoises a canvas of ``canvas_length`` tokens for up to
``max_denoising_steps`` steps; its attention is bidirectional (``is_causal=False``) over
``cache + canvas`` (keys are the read-only cache concatenated with the canvas, so the canvas is the
last ``Nq`` keys, the convention our methods expect). Sliding-window layers attend fully in the
decoder. Masks: ``None`` without padding, else a 4-D boolean mask (left padding of the prompt, and
unused static-cache slots after the canvas).

Caching methods need to know when a block starts and which denoising step runs; generate does not
say, so pre-forward hooks derive it: an encoder call on an empty cache starts a new generation; a
decoder call whose cache length differs from the previous one starts a new block (step 0), any
other decoder call is the next step of the same block.
"""

from __future__ import annotations

from ..runtime import step_state

_ENCODER_SUFFIX = "EncoderTextModel"
_DECODER_SUFFIX = "DecoderModel"


def _is_diffusion_gemma(name: str) -> bool:
    return name.startswith("DiffusionGemma")


class StepTracker:
    def __init__(self, total_steps=None):
        self.total_steps = total_steps
        self.block = -1
        self.step = 0
        self.prefix = None

    @staticmethod
    def _cache_length(kwargs) -> int:
        cache = kwargs.get("past_key_values")
        if cache is None:
            return 0
        length = cache.get_seq_length()
        return int(length)

    def encoder_pre_hook(self, module, args, kwargs):
        if self._cache_length(kwargs) == 0:
            step_state.new_generation()
            self.block, self.step, self.prefix = -1, 0, None
        step_state.set_step(None)

    def decoder_pre_hook(self, module, args, kwargs):
        prefix = self._cache_length(kwargs)
        if prefix != self.prefix:
            self.prefix = prefix
            self.block += 1
            self.step = 0
            step_state.new_block(self.block)
        else:
            self.step += 1
        step_state.set_step(self.step, self.total_steps)


def install_step_tracking(model) -> list:
    """Hook DiffusionGemma's encoder and decoder; returns the hook handles (empty for other models)."""
    encoders = [m for m in model.modules() if _is_diffusion_gemma(type(m).__name__)
                and type(m).__name__.endswith(_ENCODER_SUFFIX)]
    decoders = [m for m in model.modules() if _is_diffusion_gemma(type(m).__name__)
                and type(m).__name__.endswith(_DECODER_SUFFIX)]
    if not decoders:
        return []
    generation_config = getattr(model, "generation_config", None)
    tracker = StepTracker(getattr(generation_config, "max_denoising_steps", None))
    handles = [m.register_forward_pre_hook(tracker.encoder_pre_hook, with_kwargs=True) for m in encoders]
    handles += [m.register_forward_pre_hook(tracker.decoder_pre_hook, with_kwargs=True) for m in decoders]
    return handles
