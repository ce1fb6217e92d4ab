"""Tiny random-weight video models and pipelines for every supported family, built offline from configs.

They run on a CPU in seconds and exercise exactly the code paths of the real models (same diffusers
classes, same processors, same pipelines); only the sizes differ. Used by the tests, by
``sparsediff generate --model tiny-wan`` and by ``benchmarks/bench_video.py --quick``.
"""

from __future__ import annotations

import torch

FAMILIES = ("wan", "wan_i2v", "skyreels_v2", "hunyuan_video", "cogvideox", "ltx_video")
PIPELINE_NAMES = {"tiny-wan": "wan", "tiny-skyreels": "skyreels_v2", "tiny-skyreels-df": "skyreels_v2_df",
                  "tiny-hunyuan": "hunyuan_video", "tiny-cogvideox": "cogvideox", "tiny-ltx": "ltx_video"}
DF_CAUSAL_BLOCK = 2  # latent frames per causal block of tiny-skyreels-df: a few blocks in a short video
TEXT_DIM = 16

TRANSFORMER_CONFIGS = {
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "wan_i2v": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                    out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                    image_dim=8, added_kv_proj_dim=24),
    "skyreels_v2": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
                        rope_max_seq_len=32),
    "hunyuan_video": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                          num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                          text_embed_dim=TEXT_DIM, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
                      text_embed_dim=TEXT_DIM, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
                      patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8),
    "ltx_video": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                      attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM),
}


def _transformer_class(family):
    import diffusers

    return {"wan": diffusers.WanTransformer3DModel, "wan_i2v": diffusers.WanTransformer3DModel,
            "skyreels_v2": diffusers.SkyReelsV2Transformer3DModel,
            "hunyuan_video": diffusers.HunyuanVideoTransformer3DModel,
            "cogvideox": diffusers.CogVideoXTransformer3DModel,
            "ltx_video": diffusers.LTXVideoTransformer3DModel}[family]


def tiny_transformer(family: str, seed: int = 0, **overrides):
    """A random-weight transformer of ``family`` (float32, eval mode)."""
    if family not in TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown family {family!r}; tiny models exist for {sorted(TRANSFORMER_CONFIGS)}")
    torch.manual_seed(seed)
    return _transformer_class(family)(**{**TRANSFORMER_CONFIGS[family], **overrides}).eval()


def tiny_inputs(family: str, model, *, frames=3, height=16, width=16, text_tokens=8, batch=1, seed=0,
                timestep=500.0):
    """Forward kwargs for ``model`` with a latent of ``frames x height x width`` (before patching)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    # Drawn on CPU (the same numbers on every device), then on the default device with the model.
    rand = lambda *shape: torch.randn(*shape, generator=g, device="cpu").to(torch.get_default_device())
    t = torch.full((batch,), float(timestep))
    if family in ("wan", "wan_i2v", "skyreels_v2"):
        kwargs = dict(hidden_states=rand(batch, cfg.in_channels, frames, height, width), timestep=t,
                      encoder_hidden_states=rand(batch, text_tokens, cfg.text_dim))
        if family == "wan_i2v":
            # Wan's I2V processor takes the last 512 context tokens as text (hard-coded there)
            kwargs["encoder_hidden_states"] = rand(batch, 512, cfg.text_dim)
            kwargs["encoder_hidden_states_image"] = rand(batch, 4, cfg.image_dim)
        return kwargs
    if family == "hunyuan_video":
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        mask[:, text_tokens - 2:] = 0  # padded text tokens, as real prompts have
        return dict(hidden_states=rand(batch, cfg.in_channels, frames, height, width), timestep=t,
                    encoder_hidden_states=rand(batch, text_tokens, cfg.text_embed_dim), encoder_attention_mask=mask,
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), guidance=torch.full((batch,), 6000.0))
    if family == "cogvideox":
        return dict(hidden_states=rand(batch, frames, cfg.in_channels, height, width), timestep=t.long(),
                    encoder_hidden_states=rand(batch, cfg.max_text_seq_length, cfg.text_embed_dim))
    if family == "ltx_video":
        return dict(hidden_states=rand(batch, frames * height * width, cfg.in_channels), timestep=t.long(),
                    encoder_hidden_states=rand(batch, text_tokens, cfg.caption_channels),
                    encoder_attention_mask=torch.ones(batch, text_tokens), num_frames=frames, height=height,
                    width=width, rope_interpolation_scale=(1.0, 1.0, 1.0))
    raise ValueError(f"unknown family {family!r}")


# -- offline text stack ---------------------------------------------------------------------------------

def tiny_tokenizer(vocab_words=200, model_max_length=64):
    """A word-level fast tokenizer that needs no download (unknown words map to ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i in range(vocab_words):
        vocab[f"w{i}"] = len(vocab)
    for word in "a the of and in on with cat dog runs walks flies beach city forest sky red blue green".split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _t5_config(cls_config, vocab):
    return cls_config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)


def _umt5(vocab):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(_t5_config(UMT5Config, vocab)).eval()


def _t5(vocab):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(_t5_config(T5Config, vocab)).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_pipeline(name: str, seed: int = 0):
    """A whole random-weight pipeline: ``"tiny-wan"``, ``"tiny-skyreels"``, ``"tiny-skyreels-df"`` (SkyReels-V2
    diffusion forcing: block-causal, where FlashBlock applies), ``"tiny-hunyuan"``, ``"tiny-cogvideox"`` or
    ``"tiny-ltx"``."""
    import diffusers

    family = PIPELINE_NAMES.get(name, name)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    if family == "wan":
        return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=_umt5(vocab), vae=_wan_vae(),
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
                                     transformer=tiny_transformer("wan", seed))
    if family == "skyreels_v2":
        return diffusers.SkyReelsV2Pipeline(tokenizer=tokenizer, text_encoder=_umt5(vocab), vae=_wan_vae(),
                                            scheduler=diffusers.UniPCMultistepScheduler(flow_shift=5.0,
                                                                                        use_flow_sigmas=True,
                                                                                        prediction_type="flow_prediction"),
                                            transformer=tiny_transformer("skyreels_v2", seed))
    if family == "skyreels_v2_df":
        return diffusers.SkyReelsV2DiffusionForcingPipeline(**tiny_pipeline("tiny-skyreels", seed).components)
    if family == "cogvideox":
        vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                               norm_num_groups=2, temporal_compression_ratio=4).eval()
        return diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_t5(vocab), vae=vae,
                                           transformer=tiny_transformer("cogvideox", seed),
                                           scheduler=diffusers.CogVideoXDDIMScheduler())
    if family == "ltx_video":
        ones = (1, 1, 1, 1, 1)
        vae = diffusers.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8,
                                              block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                              layers_per_block=ones, decoder_layers_per_block=ones,
                                              spatio_temporal_scaling=(True, True, False, False),
                                              decoder_spatio_temporal_scaling=(True, True, False, False),
                                              decoder_inject_noise=(False, False, False, False, False),
                                              upsample_residual=(False, False, False, False),
                                              upsample_factor=(1, 1, 1, 1), timestep_conditioning=False,
                                              patch_size=1, patch_size_t=1, encoder_causal=True,
                                              decoder_causal=False).eval()
        return diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                     text_encoder=_t5(vocab), tokenizer=tokenizer,
                                     transformer=tiny_transformer("ltx_video", seed))
    if family == "hunyuan_video":
        return _tiny_hunyuan_pipeline(tokenizer, seed)
    raise ValueError(f"no tiny pipeline {name!r}; choose from {sorted(PIPELINE_NAMES)}")


def _tiny_hunyuan_pipeline(tokenizer, seed):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    vocab = len(tokenizer)
    llama = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                                        eos_token_id=1, pad_token_id=0)).eval()
    vae = diffusers.AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                              block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                              spatial_compression_ratio=8, temporal_compression_ratio=4,
                                              mid_block_add_attention=True).eval()
    return diffusers.HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer,
                                          transformer=tiny_transformer("hunyuan_video", seed), vae=vae,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=clip, tokenizer_2=tiny_tokenizer(model_max_length=77))


# Small call defaults per tiny pipeline (frames, height, width) that every VAE accepts; diffusion forcing
# needs whole causal blocks (13 frames: 4 latent frames, two blocks).
# (frames, height, width) of `sparsediff generate` on the tiny models: large enough that self-attention spans
# about 20 blocks of the tiny method block size (16), so a budget of 50 % really skips blocks; a few seconds on CPU.
TINY_CALL_DEFAULTS = {"wan": (17, 128, 128), "skyreels_v2": (17, 128, 128), "skyreels_v2_df": (13, 128, 128),
                      "cogvideox": (9, 64, 64), "ltx_video": (9, 64, 64), "hunyuan_video": (17, 128, 128)}
