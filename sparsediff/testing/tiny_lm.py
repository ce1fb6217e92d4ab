"""A tiny random-weight DiffusionGemma and the adapter that drives it with the block-diffusion loop.

Used by the demo's default text model and the tests: it builds offline in a second and runs on CPU.
"""

from __future__ import annotations

import torch


def has_diffusion_gemma() -> bool:
    import transformers

    return hasattr(transformers, "DiffusionGemmaForBlockDiffusion")


def tiny_diffusion_gemma(vocab_size: int, *, seed: int = 0, max_positions: int = 8192, sliding_window: int = 64):
    """A 2-layer DiffusionGemma (one sliding, one full attention layer; GQA 4/2; a 2-expert MoE)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, head_dim=16,
                global_head_dim=16, sliding_window=sliding_window, num_experts=2, top_k_experts=1,
                moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=16, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


class DiffusionGemmaAdapter:
    """Drives DiffusionGemma in the loop's prefix-cache mode: commit passes run its encoder (writing
    the KV cache), denoising steps run its decoder over the block (reading it)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.past = model, DynamicCache(config=model.config.text_config)

    def __call__(self, ids, cache):
        if cache.committing:
            self.model.model.encoder(input_ids=ids, past_key_values=self.past)
            return None
        return self.model(decoder_input_ids=ids, past_key_values=self.past).logits
