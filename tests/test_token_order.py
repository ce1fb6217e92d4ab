"""Video tokens held in tile order across a transformer's blocks (``attention_processors.token_order``)."""

import sys
from pathlib import Path

import pytest
import torch

import sparsediff
from sparsediff.attention_processors import token_order
from sparsediff.methods import AttentionMethod
from sparsediff.methods.dense import dense_attention
from sparsediff.testing.tiny import tiny_inputs, tiny_transformer
from sparsediff.testing.tolerance import ROUNDING, tolerance

MODEL_TOL = tolerance(torch.float32, ulps=ROUNDING)
TILED = dict(min_seq_len=0, block_size=16, layout="tiled", tile=(2, 4, 2))
HOSTED = ("wan", "skyreels_v2")  # families whose blocks keep the tile order


def _forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def _run(model, kwargs, method, **overrides):
    sparsediff.enable(model, method, **overrides)
    try:
        return _forward(model, kwargs)
    finally:
        sparsediff.disable(model)


class _Counting:
    """Counts the library's gathers of whole token axes (``index_select`` by an index of ``tokens`` entries, called
    from the layout code) during a forward; ``where`` keeps each one's caller."""

    def __init__(self, monkeypatch, tokens):
        self.calls, self.where = 0, []
        original = torch.Tensor.index_select

        def counted(x, dim, index):
            caller = sys._getframe(1)
            if index.numel() == tokens and x.shape[dim] == tokens and "sparsediff" in caller.f_code.co_filename:
                self.calls += 1
                self.where.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(x, dim, index)

        monkeypatch.setattr(torch.Tensor, "index_select", counted)


@pytest.fixture(scope="module")
def models():
    return {family: tiny_transformer(family) for family in ("wan", "skyreels_v2", "cogvideox")}


@pytest.mark.parametrize("family", HOSTED)
def test_keep_all_with_host_tiles_equals_dense(models, family):
    model = models[family]
    kwargs = tiny_inputs(family, model)
    reference = _forward(model, kwargs)
    torch.testing.assert_close(_run(model, kwargs, "ba_att", sparsity=0.0, **TILED), reference, **MODEL_TOL)


@pytest.mark.parametrize("family", HOSTED)
@pytest.mark.parametrize("selector", ["fixed", "ba_att"])
def test_host_tiles_equal_per_call_tiles(models, family, selector, monkeypatch):
    """Sparse output is the same whether the blocks hold the tile order or each attention call permutes."""
    model = models[family]
    kwargs = tiny_inputs(family, model)
    spec = "block_sparse" if selector == "fixed" else "ba_att"
    extra = dict(selector="fixed") if selector == "fixed" else {}
    hosted = _run(model, kwargs, spec, sparsity=0.5, **extra, **TILED)
    monkeypatch.setenv("SPARSEDIFF_HOST_TILES", "0")
    per_call = _run(model, kwargs, spec, sparsity=0.5, **extra, **TILED)
    torch.testing.assert_close(hosted, per_call, **MODEL_TOL)
    assert not torch.allclose(hosted, _forward(model, kwargs), atol=1e-4)  # it is sparse


class _Seen(AttentionMethod):
    """Dense attention recording the order its keys arrive in (by their first feature) and the layout passed."""

    name = "seen_test"

    def __init__(self, **overrides):
        super().__init__(None, **overrides)
        self.applied, self.frame_sizes = [], []

    def __call__(self, q, k, v, *, applied_layout=None, **kw):
        self.applied.append(applied_layout)
        return super().__call__(q, k, v, applied_layout=applied_layout, **kw)

    def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
        self.frame_sizes.append(frame_size)
        return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def test_permutes_twice_a_forward_not_four_times_a_layer(models, monkeypatch):
    model = models["wan"]
    kwargs = tiny_inputs("wan", model)
    method = _Seen(**TILED)
    counter = _Counting(monkeypatch, tokens=3 * 8 * 8)
    _run(model, kwargs, method)
    hosted = counter.calls
    assert all(a is not None for a in method.applied) and len(method.applied) == 2
    assert method.frame_sizes == [16, 16]  # one tile per sort segment
    # hidden states in and out, the two rotary tables: 4 gathers for the whole forward
    assert hosted == 4, counter.where
    monkeypatch.setenv("SPARSEDIFF_HOST_TILES", "0")
    method.applied.clear()
    counter.calls, counter.where = 0, []
    _run(model, kwargs, method)
    assert all(a is None for a in method.applied) and method.frame_sizes == [16] * 4
    assert counter.calls == 4 * 2, counter.where  # q, k, v in and the output back, in each of the 2 layers


def test_families_not_listed_and_rowmajor_keep_per_call_permutation(models):
    model = models["cogvideox"]
    kwargs = tiny_inputs("cogvideox", model)
    method = _Seen(**TILED)
    _run(model, kwargs, method)
    assert method.applied and all(a is None for a in method.applied)
    wan = models["wan"]
    method = _Seen(min_seq_len=0, block_size=16, layout="rowmajor")
    _run(wan, tiny_inputs("wan", wan), method)
    assert all(a is None for a in method.applied)
    assert token_order.HOST_ORDER.get() is None  # nothing left behind after the forward


def test_per_token_timestep_and_rope_follow_the_tokens():
    """Wan 2.2 TI2V passes a per-token modulation (4-d temb); it is permuted with the tokens."""
    spec = token_order.TOKEN_ORDER_FAMILIES["WanTransformer3DModel"]
    n, perm = 6, torch.tensor([2, 0, 1, 5, 3, 4])
    hidden = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 4)
    temb = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 6, 4)
    rope = (torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 1, 8),) * 2
    args, _ = spec.permute((hidden, None, temb, rope), {}, perm, {}, first=True)
    assert args[0][0, :, 0].tolist() == perm.tolist()
    assert args[2][0, :, 0, 0].tolist() == perm.tolist()
    assert all(t[0, :, 0, 0].tolist() == perm.tolist() for t in args[3])
    assert spec.permute((hidden[:, :5], None, temb, rope), {}, perm, {}, first=True) is None  # not the grid's tokens
    sky = token_order.TOKEN_ORDER_FAMILIES["SkyReelsV2Transformer3DModel"]
    mask = torch.ones(1, 1, n, n, dtype=torch.bool)
    assert sky.permute((hidden, None, temb, rope, mask), {}, perm, {}, first=True) is None  # block-causal: per call


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_diffusion_forcing(frames_per_block, caplog):
    """SkyReels-V2 diffusion forcing: per-frame timesteps give a per-token modulation (permuted with the tokens);
    with frame blocks of 2 the transformer also passes a block-causal mask, and then the blocks keep the row-major
    order and each frame block is tiled inside the processor. Keep-all equals dense either way."""
    model = tiny_transformer("skyreels_v2", num_frame_per_block=frames_per_block)
    kwargs = tiny_inputs("skyreels_v2", model, frames=4)
    kwargs["timestep"] = torch.tensor([[900.0, 900.0, 500.0, 500.0]])
    kwargs["enable_diffusion_forcing"] = True
    reference = _forward(model, kwargs)
    torch.testing.assert_close(_run(model, kwargs, "ba_att", sparsity=0.0, **TILED), reference, **MODEL_TOL)
    seen = _Seen(**TILED)
    _run(model, kwargs, seen)
    held = [a is not None for a in seen.applied]
    assert seen.applied and all(held) == (frames_per_block == 1) and any(held) == (frames_per_block == 1)
    assert "do not match the latent grid" not in caplog.text  # a block-causal mask is no surprise: no warning


def test_gradient_checkpointing_runs_without_grid_choices(caplog):
    """Recomputed blocks run outside the transformer call: neither tiles nor per-frame segments may apply."""
    model = tiny_transformer("wan")
    model.enable_gradient_checkpointing()
    kwargs = tiny_inputs("wan", model)
    method = _Seen(**TILED)
    sparsediff.enable(model, method)
    try:
        model(**kwargs, return_dict=False)[0].sum().backward()
    finally:
        sparsediff.disable(model)
    assert method.applied and all(a is None for a in method.applied)
    assert set(method.frame_sizes) == {None}
    assert "gradient checkpointing is on" in caplog.text


def test_capture_saves_tokens_in_the_callers_order(models, tmp_path):
    from safetensors.torch import load_file

    from sparsediff.attention_processors import CaptureConfig, SparseAttnProcessor

    model = models["wan"]
    kwargs = tiny_inputs("wan", model)
    saved = {}
    for host in ("1", "0"):
        out = tmp_path / host
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEDIFF_HOST_TILES", host)
            _run(model, kwargs, SparseAttnProcessor("ba_att", sparsity=0.0, capture=CaptureConfig(str(out)),
                                                    **TILED))
        saved[host] = {p.name: load_file(p) for p in sorted(out.iterdir())}
    assert saved["1"].keys() == saved["0"].keys() and saved["1"]
    for name, tensors in saved["1"].items():
        for key in ("q", "k", "v"):
            torch.testing.assert_close(tensors[key], saved["0"][name][key], **MODEL_TOL)
