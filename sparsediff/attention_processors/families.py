"""Model families: which diffusers processor does what, and where the text tokens sit.

A family is recognised by the class of the processor our processor replaces, so every model that
reuses a family's processor (Wan 2.1/2.2 T2V and I2V, VACE; SkyReels-V2 incl. diffusion forcing;
HunyuanVideo T2V, I2V and FramePack; LTX-Video; CogVideoX 1.0/1.5) is covered without a per-model list.

* ``self``: the processor does self-attention when called without ``encoder_hidden_states`` (sparse)
  and cross-attention to text or image tokens otherwise (left dense).
* ``joint_first`` / ``joint_last``: one attention over text and video tokens concatenated, text first
  (CogVideoX) or last (HunyuanVideo); text rows and columns are passed to methods as global tokens.
"""

from __future__ import annotations

import dataclasses

# processor class name -> how its attention is laid out
PROCESSOR_LAYOUT = {
    "WanAttnProcessor": "self",
    "WanAttnProcessor2_0": "self",
    "SkyReelsV2AttnProcessor": "self",
    "SkyReelsV2AttnProcessor2_0": "self",
    "LTXVideoAttnProcessor": "self",
    "LTXVideoAttentionProcessor2_0": "self",
    "HunyuanVideoAttnProcessor2_0": "joint_last",
    "CogVideoXAttnProcessor2_0": "joint_first",
    "FusedCogVideoXAttnProcessor2_0": "joint_first",
}

# transformer class -> family name (reports, tiny models, the support table)
FAMILY_OF_MODEL = {
    "WanTransformer3DModel": "wan",
    "WanVACETransformer3DModel": "wan",
    "SkyReelsV2Transformer3DModel": "skyreels_v2",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "HunyuanVideoFramepackTransformer3DModel": "hunyuan_video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "LTXVideoTransformer3DModel": "ltx_video",
}


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """How one attention call maps to the method: ``text_tokens`` global tokens, first or last."""

    text_tokens: int = 0
    text_last: bool = False


def call_plan(original, hidden_states, encoder_hidden_states) -> CallPlan | None:
    """The plan for one call of ``original``'s attention, or None to leave the call to it untouched."""
    layout = PROCESSOR_LAYOUT.get(type(original).__name__)
    if layout == "self":
        return CallPlan() if encoder_hidden_states is None else None
    if layout in ("joint_first", "joint_last") and encoder_hidden_states is not None:
        return CallPlan(encoder_hidden_states.shape[1], layout == "joint_last")
    return None


def default_processor(attn):
    """The processor a module runs by default, for processors set without ``enable_diffusers``.

    Newer modules declare it (``_default_processor_cls``). Legacy ``Attention`` modules do not record
    the processor their block gave them; HunyuanVideo's and CogVideoX's are told apart by their
    query norm (RMSNorm vs LayerNorm), the rest get the legacy default.
    """
    cls = getattr(type(attn), "_default_processor_cls", None)
    if cls is not None:
        return cls()
    from diffusers.models import attention_processor as ap

    if not isinstance(attn, ap.Attention):
        raise TypeError(f"{type(attn).__name__} is not a diffusers attention module")
    norm = type(getattr(attn, "norm_q", None)).__name__
    if getattr(attn, "add_q_proj", None) is not None or (norm == "RMSNorm" and getattr(attn, "pre_only", False)):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return HunyuanVideoAttnProcessor2_0()
    if norm == "LayerNorm":
        return ap.CogVideoXAttnProcessor2_0()
    return ap.AttnProcessor2_0()


def model_family(model) -> str:
    return FAMILY_OF_MODEL.get(type(model).__name__, type(model).__name__)


def frame_geometry(model, args, kwargs) -> tuple[int, int, int] | None:
    """(latent frames, rows, cols) of the video tokens of one transformer call, after patching."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None or not hasattr(hidden, "shape"):
        return None
    cfg = getattr(model, "config", {})
    patch = cfg.get("patch_size", 1) or 1
    ph, pw = (patch[-2], patch[-1]) if isinstance(patch, (tuple, list)) else (patch, patch)
    pt = patch[0] if isinstance(patch, (tuple, list)) else (cfg.get("patch_size_t") or 1)
    if hidden.dim() == 5:
        # (B, C, F, H, W) for most families, (B, F, C, H, W) for CogVideoX
        frames = hidden.shape[1] if model_family(model) == "cogvideox" else hidden.shape[2]
        height, width = hidden.shape[-2:]
    elif hidden.dim() == 3 and all(kwargs.get(n) is not None for n in ("num_frames", "height", "width")):
        frames, height, width = kwargs["num_frames"], kwargs["height"], kwargs["width"]  # LTX: packed tokens
    else:
        return None
    return (int(frames) + pt - 1) // pt, int(height) // ph, int(width) // pw
