"""Diffusers processors on tiny random-weight transformers of every supported family (float32, CPU)."""

import dataclasses

import pytest
import torch

import sparsediff
from sparsediff.attention_processors import (
    BAAttProcessor,
    CaptureConfig,
    SparseAttnProcessor,
    StepTracker,
    disable_diffusers,
    enable_diffusers,
)
from sparsediff.methods import AttentionMethod, MethodConfig, available_methods, denoising_step
from sparsediff.methods.dense import dense_attention
from sparsediff.runtime import step_state
from sparsediff.testing.tiny import FAMILIES, tiny_inputs, tiny_transformer
from sparsediff.testing.tolerance import ROUNDING, tolerance

KEEP_ALL = dict(sparsity=0.0, min_seq_len=0, block_size=16)
# Tiny float32 models (2 layers, <= 256 tokens) with their attention computed another way: the outputs differ by
# a few roundings (measured: 3 epsilons at most).
MODEL_TOL = tolerance(torch.float32, ulps=ROUNDING)
# family -> (self/joint attention layers that must go through the method, text tokens seen as global)
ROUTED = {
    "wan": ({"blocks.0.attn1", "blocks.1.attn1"}, 0),
    "wan_i2v": ({"blocks.0.attn1", "blocks.1.attn1"}, 0),
    "skyreels_v2": ({"blocks.0.attn1", "blocks.1.attn1"}, 0),
    "hunyuan_video": ({"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}, 6),  # 8 tokens, 2 padded
    "cogvideox": ({"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}, 8),
    "ltx_video": ({"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}, 0),
}
FRAME_SIZE = {"ltx_video": 256}  # LTX tokens are already patches; the others patch 16x16 latents by 2x2
GRID = {"ltx_video": (3, 16, 16)}  # (latent frames, rows, cols) after patching; the others (3, 8, 8)


@dataclasses.dataclass
class RecordingConfig(MethodConfig):
    pass


class RecordingMethod(AttentionMethod):
    """Dense attention that records what the host passed (sparse branch only)."""

    name = "recording_test"
    config_class = RecordingConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.calls, self.grids = [], []

    def token_layout(self, q, k, *, causal, grid, global_tokens):
        self.grids.append(grid)
        return super().token_layout(q, k, causal=causal, grid=grid, global_tokens=global_tokens)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        state = step_state.current()
        self.calls.append(dict(layer=layer, q=tuple(q.shape), k=tuple(k.shape), frame_size=frame_size,
                               global_tokens=global_tokens, step=state.step, total=state.total_steps))
        return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


@dataclasses.dataclass
class GlobalDiagConfig(MethodConfig):
    pass


class GlobalDiagMethod(AttentionMethod):
    """Keeps only global rows/columns and the diagonal 16-token blocks: text rows stay exact."""

    name = "global_diag_test"
    config_class = GlobalDiagConfig

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=k.device)[None, :]
        mask = (i < global_tokens) | (j < global_tokens) | (i // 16 == j // 16)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


@pytest.fixture(scope="module")
def models():
    return {family: tiny_transformer(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_matches_default_and_disable_restores(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    originals = model.attn_processors
    sparsediff.enable(model, "ba_att", **KEEP_ALL)
    assert all(isinstance(p, SparseAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(_forward(model, kwargs), reference, **MODEL_TOL)
    sparsediff.disable(model)
    restored = model.attn_processors
    assert all(restored[name] is originals[name] for name in originals)
    assert torch.equal(_forward(model, kwargs), reference)  # bit-identical


def _forward_with(model, kwargs, method):
    """One forward with ``method`` enabled; the model is restored whatever happens."""
    enable_diffusers(model, method)
    try:
        return _forward(model, kwargs)
    finally:
        disable_diffusers(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_self_and_joint_attention_only(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    method = RecordingMethod(min_seq_len=0, layout="rowmajor")
    out = _forward_with(model, kwargs, method)
    torch.testing.assert_close(out, reference, **MODEL_TOL)
    layers, text = ROUTED[family]
    assert {c["layer"] for c in method.calls} == layers  # cross-attention and refiners never reach the method
    video_tokens = 3 * FRAME_SIZE.get(family, 64)
    for call in method.calls:
        assert call["global_tokens"] == text
        assert call["k"][2] == video_tokens + text
        assert call["frame_size"] == FRAME_SIZE.get(family, 64)
    assert set(method.grids) == {GRID.get(family, (3, 8, 8))}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_layout_is_exact_and_reaches_every_family(models, family):
    """Tiles (with global text tokens kept first) reorder q/k/v and undo it on the output: keep-all equals the
    model's own attention, and the method sees tile-sized sort segments."""
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    method = RecordingMethod(min_seq_len=0, layout="tiled", tile=(2, 4, 2), block_size=16)
    torch.testing.assert_close(_forward_with(model, kwargs, method), reference, **MODEL_TOL)
    assert method.calls and all(c["frame_size"] == 16 for c in method.calls)
    sparsediff.enable(model, "ba_att", layout="tiled", tile=(2, 4, 2), **KEEP_ALL)
    try:
        torch.testing.assert_close(_forward(model, kwargs), reference, **MODEL_TOL)
    finally:
        sparsediff.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_output_finite_and_close(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    sparsediff.enable(model, "ba_att", sparsity=0.5, min_seq_len=0, block_size=16)
    try:
        out = _forward(model, kwargs)
    finally:
        sparsediff.disable(model)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference)  # something was skipped
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.5, rel


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox"])
def test_joint_attention_text_rows_and_columns_attended(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    attn = model.transformer_blocks[0].attn if family == "hunyuan_video" else model.transformer_blocks[0].attn1
    seen = []
    handle = attn.register_forward_hook(lambda m, a, out: seen.append([o.clone() for o in out]))
    try:
        _forward(model, kwargs)
        enable_diffusers(model, GlobalDiagMethod(min_seq_len=0))
        _forward(model, kwargs)
    finally:
        disable_diffusers(model)
        handle.remove()
    (video_dense, text_dense), (video_sparse, text_sparse) = seen
    # the first joint layer sees identical inputs: text rows attend every token in both runs
    valid_text = slice(0, 6) if family == "hunyuan_video" else slice(None)
    torch.testing.assert_close(text_sparse[:, valid_text], text_dense[:, valid_text], **MODEL_TOL)
    # video rows lost their off-diagonal blocks: a change far above float32 rounding
    assert (video_sparse - video_dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox", "ltx_video"])
def test_set_attn_processor_single_instance(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    originals = model.attn_processors
    model.set_attn_processor(BAAttProcessor(**KEEP_ALL))  # one object on every module, no enable()
    try:
        torch.testing.assert_close(_forward(model, kwargs), reference, **MODEL_TOL)
    finally:
        model.set_attn_processor(originals)
    assert torch.equal(_forward(model, kwargs), reference)


def test_processor_construction():
    from sparsediff.methods.ba_att import BAAttConfig

    assert BAAttProcessor().config == BAAttConfig()
    proc = BAAttProcessor(sparsity=0.8, beta=0.5)
    assert (proc.config.sparsity, proc.config.beta) == (0.8, 0.5)
    cfg = BAAttConfig(sparsity=0.3)
    assert BAAttProcessor(cfg).config is cfg
    assert proc.describe()["method"] == "ba_att" and proc.describe()["sparsity"] == 0.8
    with pytest.raises(TypeError):
        BAAttProcessor(MethodConfig())
    with pytest.raises(ValueError):
        BAAttProcessor(sparsity=1.5)


def test_named_processors_with_landed_methods(models):
    from sparsediff.attention_processors import BlockSparseProcessor, FlashBlockProcessor, SparseDProcessor

    model = models["wan"]
    kwargs = tiny_inputs("wan", model)
    reference = _forward(model, kwargs)
    methods = available_methods()
    candidates = [(BlockSparseProcessor, "block_sparse", dict(selector="block_mean", **KEEP_ALL)),
                  (SparseDProcessor, "sparsed", dict(min_seq_len=0, block_size=16)),
                  (FlashBlockProcessor, "flashblock", dict(min_seq_len=0, block_size=16))]
    ran = 0
    for cls, name, overrides in candidates:
        if name not in methods:
            continue
        proc = cls(**{k: v for k, v in overrides.items() if k in cls(min_seq_len=0).config.to_dict()})
        enable_diffusers(model, proc)
        try:
            with denoising_step(3, 4):
                out = _forward(model, kwargs)
        finally:
            disable_diffusers(model)
        assert torch.isfinite(out).all(), name
        assert (out - reference).norm() / reference.norm() < 0.5, name
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("method", ["ba_att", "block_sparse", "sparsed", "flashblock"])
def test_dense_early_steps_for_every_method(models, method):
    if method not in available_methods():
        pytest.skip(f"method {method!r} has not landed")
    model = models["wan"]
    kwargs = tiny_inputs("wan", model)
    reference = _forward(model, kwargs)
    enable_diffusers(model, method, min_seq_len=0, block_size=16, dense_steps=2, track_steps=False)
    try:
        with denoising_step(1, 4):
            early = _forward(model, kwargs)
    finally:
        disable_diffusers(model)
    torch.testing.assert_close(early, reference, **MODEL_TOL)


def test_step_tracker_counts_steps_and_generations():
    tracker = StepTracker()
    seen = []
    for t in [999, 999, 750, 750, 500, 999, 999, 500]:  # CFG as two calls per step, then a new video
        tracker(None, (), {"timestep": torch.tensor([float(t)])})
        state = step_state.current()
        seen.append((state.step, state.generation))
    steps = [s for s, _ in seen]
    assert steps == [0, 0, 1, 1, 2, 0, 0, 1]
    assert seen[4][1] == seen[0][1] and seen[5][1] == seen[0][1] + 1


def test_pipeline_dense_early_steps_and_step_state():
    from sparsediff.pipelines import generate_video
    from sparsediff.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("tiny-wan")
    method = RecordingMethod(min_seq_len=0, dense_step_fraction=0.5)
    generate_video(pipe, SparseAttnProcessor(method), prompt="a cat", num_frames=9, height=32, width=32,
                   num_inference_steps=4, max_sequence_length=8, guidance_scale=3.0)
    assert {c["step"] for c in method.calls} == {2, 3}  # steps 0 and 1 ran dense
    assert {c["total"] for c in method.calls} == {4}
    assert all(not isinstance(p, SparseAttnProcessor) for p in pipe.transformer.attn_processors.values())


def test_block_causal_diffusion_forcing_keep_all_and_blocks():
    model = tiny_transformer("skyreels_v2", num_frame_per_block=2)
    kwargs = tiny_inputs("skyreels_v2", model, frames=4)
    reference = _forward(model, kwargs)
    method = RecordingMethod(min_seq_len=0)
    out = _forward_with(model, kwargs, method)
    torch.testing.assert_close(out, reference, **MODEL_TOL)
    first = [c for c in method.calls if c["layer"].startswith("blocks.0.attn1")]
    assert [c["layer"] for c in first] == ["blocks.0.attn1/block0", "blocks.0.attn1/block1"]
    assert [(c["q"][2], c["k"][2]) for c in first] == [(128, 128), (128, 256)]  # prefix + own frames


def test_capture_writes_qkv(models, tmp_path):
    from safetensors import safe_open

    model = models["wan"]
    kwargs = tiny_inputs("wan", model)
    capture = CaptureConfig(str(tmp_path), layers=("blocks.1.*",), steps=(2,))
    enable_diffusers(model, SparseAttnProcessor("dense", capture=capture), track_steps=False)
    try:
        for step in range(4):
            with denoising_step(step, 4):
                _forward(model, kwargs)
    finally:
        disable_diffusers(model)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["blocks.1.attn1.step2.safetensors"]
    with safe_open(str(tmp_path / files[0]), "pt") as f:
        meta = f.metadata()
        q, k, v = (f.get_tensor(n) for n in ("q", "k", "v"))
    assert q.shape == k.shape == v.shape == (1, 2, 192, 12)  # (B, H, N, D)
    assert meta["layer"] == "blocks.1.attn1" and meta["step"] == "2" and meta["frame_size"] == "64"


def test_enable_rejects_non_diffusers_objects():
    with pytest.raises(TypeError, match="pipeline"):
        enable_diffusers(object(), "dense")


@pytest.mark.parametrize("method", ["flashblock", "ba_att"])
def test_block_causal_frame_blocks_tile_block_by_block(method):
    """Diffusion forcing with tiles: each frame block is tiled on its own grid (its tiles never cross into the
    prefix), queries are the block's own tiles, and keep-all still equals the model's attention."""
    model = tiny_transformer("skyreels_v2", num_frame_per_block=2)
    kwargs = tiny_inputs("skyreels_v2", model, frames=4)
    reference = _forward(model, kwargs)
    recorder = RecordingMethod(min_seq_len=0, layout="tiled", tile=(2, 4, 4), block_size=16)
    torch.testing.assert_close(_forward_with(model, kwargs, recorder), reference, **MODEL_TOL)
    # Latent 4 frames of 8 x 8 tokens, two frames per causal block: every block call gets the grids so far.
    assert [g for g in recorder.grids[:2]] == [[(2, 8, 8)], [(2, 8, 8), (2, 8, 8)]]
    assert all(c["frame_size"] == 32 for c in recorder.calls)  # sort segments: one tile
    keep_all = dict(KEEP_ALL, refresh_every=1) if method == "flashblock" else KEEP_ALL
    sparsediff.enable(model, method, layout="tiled", tile=(2, 4, 4), **keep_all)
    try:
        torch.testing.assert_close(_forward(model, kwargs), reference, **MODEL_TOL)
    finally:
        sparsediff.disable(model)
