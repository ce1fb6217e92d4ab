"""sparsediff's transformers attention functions on tiny random-weight models (CPU, fp32).

Per model: the keep-all config equals the model's own SDPA path, a sparse config gives finite
outputs and greedy generation runs, enable/disable round-trips exactly, left padding per row.

Inputs: images go through the models' own (PIL) image processors, built offline from arguments.
Videos are patchified here in the processors' layout, because the video processors need
torchvision, which is not installed; tokenizers are not needed (input ids are built directly).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import sparsediff
from sparsediff import hooks
from sparsediff.kernels import block_sparse_attention, causal_block_mask, mask_to_index
from sparsediff.methods import AttentionMethod, MethodConfig, available_methods, make_method
from sparsediff.testing.tolerance import ROUNDING, tolerance

transformers = pytest.importorskip("transformers")
models = transformers.models

BLOCK = 16
# Tiny float32 models (2 layers) with their attention computed another way: logits a few roundings apart.
MODEL_TOL = tolerance(torch.float32, ulps=ROUNDING)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
IMG, VID, VSTART, VEND = 250, 251, 252, 253


def _has(name):
    return hasattr(models, name) and hasattr(transformers, {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "diffusion_gemma": "DiffusionGemmaForBlockDiffusion", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM"}[name])


def needs(name):
    return pytest.mark.skipif(not _has(name), reason=f"this transformers has no {name}")


class StridedSparse(AttentionMethod):
    """A test method doing real block-sparse attention through the kernel: every query block keeps
    the first key block, its own diagonal block and every other block in between (causal-aware)."""

    name = "test_strided"
    config_class = MethodConfig

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        b = self.config.block_size
        nq, nk = q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // b), -(-nk // b)
        keep = torch.zeros(nqb, nkb, dtype=torch.bool)
        keep[:, ::2] = True
        diag = (torch.arange(nqb) * b + (nk - nq)) // b
        keep[torch.arange(nqb), diag.clamp(max=nkb - 1)] = True
        if causal:
            keep &= causal_block_mask(nqb, nkb, nq, nk, b)
        self.stats["density"] = keep.float().mean().item()
        index, count = mask_to_index(keep[None, None])
        return block_sparse_attention(q, k, v, index, count, scale=scale, causal=causal, block_size=b,
                                      return_lse=return_lse)


def keep_all():
    """The config that must reproduce SDPA: BA-Att at sparsity 0 when present, else dense."""
    if "ba_att" in available_methods():
        return make_method("ba_att", sparsity=0.0, min_seq_len=0, block_size=BLOCK)
    return make_method("dense")


# ---------------------------------------------------------------- model and input builders
def qwen2_5_vl():
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        attn_implementation="sdpa")
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen3_vl():
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        attn_implementation="sdpa")
    return transformers.Qwen3VLForConditionalGeneration(cfg).eval()


def llava_onevision():
    cfg = transformers.LlavaOnevisionConfig(
        text_config=dict(TEXT, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=[[28, 28], [28, 56]],
        attn_implementation="sdpa")
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


def _image(h, w, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _patchify_video(frames, patch, temporal=2, merge=2):
    """(T, H, W, 3) uint8 frames -> Qwen-VL ``pixel_values_videos`` and ``video_grid_thw``, in the
    layout of the Qwen2-VL processors (normalised with their CLIP mean/std)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    x = (torch.tensor(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std
    t, c, h, w = x.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * temporal * patch * patch)
    return x, torch.tensor([[gt, gh, gw]])


def _text(n, seed):
    # Drawn on CPU (the same ids on every device), then put where the models are built.
    ids = torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed), device="cpu")
    return ids.to(torch.get_default_device())


def qwen_vl_inputs(model, patch, per_frame_video, text_len=120):
    """Text, one image, text, one 4-frame video, text (Qwen2.5-VL: patch 14; Qwen3-VL: patch 16,
    one vision_start/end pair per temporal frame)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    px = patch * 2
    proc = Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=px * px * 4, max_pixels=px * px * 16)
    image = proc(images=[_image(3 * px, 4 * px, 0)], return_tensors="pt").to(model.device)  # CPU from PIL
    video, video_grid = _patchify_video(np.stack([_image(2 * px, 2 * px, s) for s in range(4)]), patch)
    n_img = int(image["image_grid_thw"].prod()) // 4
    gt, gh, gw = video_grid[0].tolist()
    frame_tokens = gh * gw // 4
    if per_frame_video:
        vid_ids = [torch.tensor([VSTART] + [VID] * frame_tokens + [VEND]) for _ in range(gt)]
    else:
        vid_ids = [torch.tensor([VSTART] + [VID] * (gt * frame_tokens) + [VEND])]
    ids = torch.cat([_text(text_len, 1), torch.tensor([VSTART] + [IMG] * n_img + [VEND]), _text(40, 2),
                     *vid_ids, _text(text_len, 3)])[None]
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image["pixel_values"],
               image_grid_thw=image["image_grid_thw"], pixel_values_videos=video, video_grid_thw=video_grid)
    if per_frame_video:  # Qwen3-VL's M-RoPE reads the modality of each token (0 text, 1 image, 2 video)
        out["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    return out


def llava_inputs(model, text_len=120):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    proc = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                           image_grid_pinpoints=[[28, 28], [28, 56]])
    image = proc(images=[_image(30, 60, 0)], return_tensors="pt").to(model.device)  # CPU from PIL
    # Frames go through the same processor (one 28x28 view each), as the video processor would.
    frames = torch.stack([proc(images=[_image(28, 28, s)], return_tensors="pt")["pixel_values"][0, 0]
                          for s in range(4)])[None].to(model.device)
    with torch.no_grad():  # the token counts follow from the features (anyres packing, pooling)
        # Positional: the pixel argument's name differs between transformers releases.
        n_img = model.get_image_features(image["pixel_values"], image["image_sizes"],
                                         batch_num_images=image["batch_num_images"]).pooler_output[0].shape[0]
        n_vid = model.get_video_features(frames).pooler_output.reshape(-1, 64).shape[0]
    def build(n_vid):
        ids = torch.cat([_text(text_len, 1), torch.full((n_img,), IMG), _text(40, 2), torch.full((n_vid,), VID),
                         _text(text_len, 3)])[None]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image["pixel_values"],
                    image_sizes=image["image_sizes"], batch_num_images=image["batch_num_images"],
                    pixel_values_videos=frames)

    inputs = build(n_vid)
    try:  # some releases append a newline feature to the video in forward; take the count it asks for
        logits(model, inputs)
    except ValueError as err:
        found = re.search(r"tokens: (\d+), features: (\d+)", str(err))
        if found is None:
            raise
        inputs = build(int(found.group(2)))
    return inputs


def qwen_lm(kind):
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**TEXT, attn_implementation="sdpa")
        return transformers.Qwen2ForCausalLM(cfg).eval()
    cfg = transformers.Qwen3Config(**TEXT, head_dim=16, attn_implementation="sdpa")
    return transformers.Qwen3ForCausalLM(cfg).eval()


VLMS = {
    "qwen2_5_vl": (qwen2_5_vl, lambda m: qwen_vl_inputs(m, 14, per_frame_video=False)),
    "qwen3_vl": (qwen3_vl, lambda m: qwen_vl_inputs(m, 16, per_frame_video=True)),
    "llava_onevision": (llava_onevision, llava_inputs),
}


def build_vlm(name):
    build, inputs = VLMS[name]
    torch.manual_seed(0)
    model = build()
    return model, inputs(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def diffusion_gemma():
    text = dict(TEXT, head_dim=16, global_head_dim=16, sliding_window=32, num_experts=2, top_k_experts=1,
                moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    cfg = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=32,
                                            attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()


# Per method: the settings that keep every block (must equal SDPA).
KEEP_ALL = {
    "ba_att": dict(sparsity=0.0), "block_sparse": dict(sparsity=0.0),
    "sparsed": dict(sparsity=0.0, dense_step_fraction=0.0), "flashblock": dict(refresh_every=1),
    "losa": dict(sparsity=0.0, threshold=0.0),
}
SPARSE = {
    "ba_att": dict(sparsity=0.5), "block_sparse": dict(sparsity=0.5),
    "sparsed": dict(sparsity=0.5, dense_step_fraction=0.0), "flashblock": dict(sparse_selector="ba_att", sparsity=0.5),
    "losa": dict(sparsity=0.5),
}
DIFFUSION_METHODS = [pytest.param(name, marks=pytest.mark.skipif(
    name not in available_methods(), reason=f"method {name} not installed")) for name in KEEP_ALL]


@pytest.fixture
def routes():
    hooks.reset_route_counts()
    return hooks.route_counts


# ---------------------------------------------------------------- VLMs (causal prefill)
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in VLMS])
def test_vlm_keep_all_matches_sdpa_and_round_trips(name, routes):
    model, inputs = build_vlm(name)
    ref = logits(model, inputs)
    text_cfg = model.config.get_text_config()
    sparsediff.enable(model, keep_all())
    assert text_cfg._attn_implementation != "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"  # vision tower stays as is
    out = logits(model, inputs)
    assert routes["sparse"] == TEXT["num_hidden_layers"]
    torch.testing.assert_close(out, ref, **MODEL_TOL)
    sparsediff.disable(model)
    assert text_cfg._attn_implementation == "sdpa"
    assert not any(hasattr(m, hooks.attention.BINDING_ATTR) for m in model.modules())
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in VLMS])
def test_vlm_sparse_prefill_and_greedy_generation(name, routes):
    model, inputs = build_vlm(name)
    ref = logits(model, inputs)
    method = StridedSparse(block_size=BLOCK, min_seq_len=0)
    sparsediff.enable(model, method)
    out = logits(model, inputs)
    assert torch.isfinite(out).all()
    assert 0 < method.stats["density"] < 1
    assert not torch.allclose(out, ref, atol=1e-4)  # the sparse path really ran: a change far above rounding
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert routes["dense_decode"] == 3 * TEXT["num_hidden_layers"]  # decode steps after the first token
    if "ba_att" in available_methods():
        sparsediff.enable(model, "ba_att", sparsity=0.5, min_seq_len=0, block_size=BLOCK)
        assert torch.isfinite(logits(model, inputs)).all()
    sparsediff.disable(model)
    assert torch.equal(logits(model, inputs), ref)


# ---------------------------------------------------------------- plain causal LMs (RULER-style text)
@pytest.mark.parametrize("kind", [pytest.param(k, marks=needs(k)) for k in ("qwen2", "qwen3")])
def test_causal_lm_keep_all_and_left_padding(kind, routes):
    torch.manual_seed(0)
    model = qwen_lm(kind)
    lengths = (200, 163)
    rows = [_text(n, seed=i) for i, n in enumerate(lengths)]
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding
        ids[i, -len(row):], mask[i, -len(row):] = row, 1
    batch = dict(input_ids=ids, attention_mask=mask)
    ref = logits(model, batch)
    sparsediff.enable(model, keep_all())
    out = logits(model, batch)
    assert routes["sparse_padded"] == TEXT["num_hidden_layers"]
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, -n:], ref[i, -n:], **MODEL_TOL)

    # Sparse: every row of the padded batch equals that row run alone.
    sparsediff.enable(model, StridedSparse(block_size=BLOCK, min_seq_len=0))
    out = logits(model, batch)
    for i, row in enumerate(rows):
        alone = logits(model, dict(input_ids=row[None]))
        torch.testing.assert_close(out[i, -len(row):], alone[0], **MODEL_TOL)
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, ids.shape[1] + 3)
    sparsediff.disable(model)
    assert model.config._attn_implementation == "sdpa"


@needs("qwen2")
def test_attn_implementation_name_in_from_pretrained(tmp_path, routes):
    torch.manual_seed(0)
    model = qwen_lm("qwen2")
    model.save_pretrained(tmp_path)
    ids = _text(300, 0)[None]
    ref = logits(model, dict(input_ids=ids))
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="ba_att").eval()
    assert loaded.config._attn_implementation == "ba_att"
    out = logits(loaded, dict(input_ids=ids))  # 300 tokens < default min_seq_len: dense SDPA inside
    assert routes["dense_short"] == TEXT["num_hidden_layers"]
    torch.testing.assert_close(out, ref, **MODEL_TOL)


# ---------------------------------------------------------------- DiffusionGemma (bidirectional canvas)
def _dg_batch():
    ids = _text(200, 0).repeat(2, 1)
    ids[1] = _text(200, 1)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding in row 1
    canvas = torch.randint(3, 200, (2, 32), generator=torch.Generator().manual_seed(2), device="cpu")
    canvas = canvas.to(ids.device)  # drawn on CPU: the same canvas on every device
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=canvas,
                decoder_attention_mask=torch.nn.functional.pad(mask, (0, 32), value=1))


@needs("diffusion_gemma")
@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_diffusion_gemma_methods(method, routes):
    model = diffusion_gemma()
    batch = _dg_batch()
    ref = logits(model, batch)
    sparsediff.enable(model, method, min_seq_len=0, block_size=BLOCK, **KEEP_ALL[method])
    torch.testing.assert_close(logits(model, batch), ref, **MODEL_TOL)
    assert routes["sparse"] + routes["sparse_padded"] >= 2  # encoder and decoder went through the method

    sparsediff.enable(model, method, min_seq_len=0, block_size=BLOCK, **SPARSE[method])
    assert torch.isfinite(logits(model, batch)).all()
    with torch.no_grad():
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=64,
                             max_denoising_steps=3)
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape == (2, 200 + 64)
    sparsediff.disable(model)
    assert torch.equal(logits(model, batch), ref)


@needs("diffusion_gemma")
def test_diffusion_gemma_step_tracking():
    from sparsediff.runtime import step_state

    model = diffusion_gemma()
    seen = []

    class Recorder(StridedSparse):
        def sparse_attention(self, q, k, v, **kw):
            if not kw["causal"]:
                state = step_state.current()
                seen.append((state.block, state.step, k.shape[2] - q.shape[2]))
            return super().sparse_attention(q, k, v, **kw)

    sparsediff.enable(model, Recorder(block_size=BLOCK, min_seq_len=0))
    with torch.no_grad():
        model.generate(_text(100, 0)[None], max_new_tokens=64, max_denoising_steps=3)
    layers = TEXT["num_hidden_layers"]
    blocks = [(b, s) for b, s, _ in seen[::layers]]
    # Two canvases of 32 tokens, each denoised for up to 3 steps; the prefix grows by one canvas.
    assert blocks[0] == (0, 0) and blocks[1] == (0, 1)
    assert (1, 0) in blocks
    prefixes = {b: p for b, _, p in seen}
    assert prefixes[1] == prefixes[0] + 32


@needs("diffusion_gemma")
@pytest.mark.parametrize("reuse", ["residual", "plan"])
@pytest.mark.parametrize("method", ["ba_att", "block_sparse"])
def test_diffusion_gemma_residual_reuse(method, reuse, routes):
    """Residual reuse and kept plans through the DLM hooks: generation runs, and the method refreshed and reused
    its cached dense - sparse residuals (or its plans) across the denoising steps of each canvas."""
    model = diffusion_gemma()
    m = make_method(method, min_seq_len=0, block_size=BLOCK, **{f"{reuse}_every": 2}, **SPARSE[method])
    sparsediff.enable(model, m)
    with torch.no_grad():
        out = model.generate(_text(100, 0)[None], max_new_tokens=64, max_denoising_steps=3)
    sparsediff.disable(model)
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape == (1, 100 + 64)
    assert m.stats.get(f"{reuse}_refreshes", 0) > 0 and m.stats.get(f"{reuse}_reuses", 0) > 0, m.stats
    assert routes["sparse"] > 0
