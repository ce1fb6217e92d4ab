"""Unit tests of the transformers attention function: mask reading, routing, config, registration."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import sparsediff
from sparsediff import hooks
from sparsediff.hooks.attention import BINDING_ATTR, LayerBinding, sparse_attention_forward
from sparsediff.hooks.config import SparseAttentionConfig, as_config
from sparsediff.methods import available_methods, make_method
from sparsediff.methods.masks import key_validity, row_slices, to_bool_mask
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance

transformers = pytest.importorskip("transformers")


def causal_padding_mask(valid, nq):
    nk = valid.shape[1]
    pos = torch.arange(nq)[:, None] + (nk - nq)
    return ((torch.arange(nk)[None, :] <= pos)[None] & valid[:, None, :])[:, None]


class FakeAttention(torch.nn.Module):
    """Stands in for a text attention layer: what the function reads from the module."""

    def __init__(self, groups=2, causal=True):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, causal, groups


def reference(q, k, v, mask, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def bind(module, method, **options):
    setattr(module, BINDING_ATTR, LayerBinding(method, "layer0", SparseAttentionConfig(method=method, **options)))
    return module


# ---------------------------------------------------------------- masks
def test_key_validity_reads_causal_padding_and_rejects_other_masks():
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    mask = causal_padding_mask(valid, 10)
    assert torch.equal(key_validity(mask, 10, 10, causal=True), valid)
    assert key_validity(None, 10, 10, causal=True) is None
    # Decode-style end alignment: 4 queries over 10 keys.
    assert torch.equal(key_validity(causal_padding_mask(valid, 4), 4, 10, causal=True), valid)
    # A sliding window is not causal + padding.
    window = mask & (torch.arange(10)[None, :] > torch.arange(10)[:, None] - 4)
    assert key_validity(window, 10, 10, causal=True) is False
    # Bidirectional: every row the same.
    bidir = valid[:, None, None, :].expand(2, 1, 6, 10)
    assert torch.equal(key_validity(bidir, 6, 10, causal=False), valid)
    assert key_validity(mask, 10, 10, causal=False) is False
    assert key_validity(mask[..., :9], 10, 10, causal=True) is False  # wrong shape


def test_additive_masks_convert_and_biases_are_refused():
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, :2] = False
    mask = causal_padding_mask(valid, 8)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(to_bool_mask(additive), mask)
    assert torch.equal(key_validity(additive, 8, 8, causal=True), valid)
    assert to_bool_mask(additive + 0.5) is None


def test_row_slices():
    assert row_slices(torch.tensor([False, True, True])) == slice(1, 3)
    assert torch.equal(row_slices(torch.tensor([True, False, True])), torch.tensor([0, 2]))
    assert row_slices(torch.zeros(3, dtype=torch.bool)).numel() == 0


# ---------------------------------------------------------------- routing
def test_padded_batch_equals_masked_sdpa_and_rows_alone():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 96, 16), torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    valid = torch.ones(2, 96, dtype=torch.bool)
    valid[1, :29] = False
    mask = causal_padding_mask(valid, 96)
    module = bind(FakeAttention(), make_method("dense", min_seq_len=0))
    hooks.reset_route_counts()
    out, weights = sparse_attention_forward(module, q, k, v, mask, default_name="ba_att")
    assert weights is None and out.shape == (2, 96, 4, 16)
    assert hooks.route_counts["sparse_padded"] == 1

    def valid_rows(q, k, v):  # row 0, and row 1 past its padding
        ref = reference(q, k, v, mask, causal=True)
        return ref[0], ref[1, 29:]

    assert_close_as_pytorch((out[0], out[1, 29:]), valid_rows, q, k, v)
    assert torch.all(out[1, :29] == 0)  # query rows on padding see no key
    alone, _ = sparse_attention_forward(module, q[1:, :, 29:], k[1:, :, 29:], v[1:, :, 29:], None,
                                        default_name="ba_att")
    torch.testing.assert_close(out[1, 29:], alone[0], **tolerance(torch.float32, ulps=ROUNDING))


def test_decode_short_and_unsupported_masks_use_sdpa(caplog):
    torch.manual_seed(0)
    module = bind(FakeAttention(), make_method("dense", min_seq_len=64))
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    hooks.reset_route_counts()
    sparse_attention_forward(module, q, k, v, None, default_name="ba_att")
    assert hooks.route_counts["dense_decode"] == 1
    sparse_attention_forward(module, q, k[:, :, :10], v[:, :, :10], None, default_name="ba_att")
    assert hooks.route_counts["dense_short"] == 1
    q = torch.randn(1, 4, 100, 16)
    window = causal_padding_mask(torch.ones(1, 100, dtype=torch.bool), 100)
    window &= torch.arange(100)[None, :] > torch.arange(100)[:, None] - 8
    with caplog.at_level(logging.WARNING, logger="sparsediff.hooks.attention"):
        out, _ = sparse_attention_forward(module, q, k, v, window, default_name="ba_att")
        sparse_attention_forward(module, q, k, v, window, default_name="ba_att")
    assert hooks.route_counts["dense_mask"] == 2
    assert sum("not causal/bidirectional" in r.message for r in caplog.records) == 1  # warned once
    assert_close_as_pytorch(out, lambda q, k, v: reference(q, k, v, window, causal=True), q, k, v)


def test_vision_modules_and_dense_layers_stay_dense():
    module = FakeAttention()
    module.layer_idx = None  # vision towers carry no KV-cache layer index
    q, k, v = torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16)
    hooks.reset_route_counts()
    sparse_attention_forward(module, q, k, v, None, default_name="ba_att")
    assert hooks.route_counts["dense_vision"] == 1
    bind(FakeAttention(), None)
    sparse_attention_forward(bind(FakeAttention(), None), q, k, v, None, default_name="ba_att")
    assert hooks.route_counts["dense_layer"] == 1


# ---------------------------------------------------------------- config and registration
def test_registration_covers_installed_methods():
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in hooks.METHOD_NAMES:
        if name in available_methods():
            assert name in AttentionInterface() and name in AttentionMaskInterface()
    assert hooks.GENERIC_NAME in AttentionInterface()


def test_config_per_layer_and_validation():
    cfg = SparseAttentionConfig(method="dense", layers={0: None, 2: "dense"})
    assert cfg.spec_for(0) is None and cfg.spec_for(1) == "dense" and cfg.spec_for(2) == "dense"
    assert SparseAttentionConfig(layers=lambda i: None if i < 2 else "dense").spec_for(3) == "dense"
    with pytest.raises(TypeError, match="layers"):
        SparseAttentionConfig(layers=3)
    with pytest.raises(ValueError, match="dense_query_len"):
        SparseAttentionConfig(dense_query_len=0)
    assert as_config("dense", min_seq_len=5).method.config.min_seq_len == 5


def test_enable_per_layer_and_exact_restore():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    layers = {1: None}
    if "ba_att" in available_methods():
        layers[2] = make_method("ba_att", sparsity=0.8)
    sparsediff.enable(model, SparseAttentionConfig(method="dense", layers=layers))
    bindings = [m._sparsediff_binding for m in model.modules() if hasattr(m, BINDING_ATTR)]
    assert [b.method is None for b in bindings] == [False, True, False]
    assert bindings[0].layer == "model.layers.0.self_attn"
    assert model.config._attn_implementation == hooks.GENERIC_NAME  # "dense" has no name of its own
    if "ba_att" in available_methods():
        sparsediff.enable(model, "ba_att:0.8")  # replaces the previous setting
        assert model.config._attn_implementation == "ba_att"
    sparsediff.disable(model)
    sparsediff.disable(model)  # no-op the second time
    assert model.config._attn_implementation == "sdpa"
    after = {n: dict(vars(m)) for n, m in model.named_modules()}
    assert after.keys() == before.keys()
    assert all(after[n].keys() == before[n].keys() for n in before)


@pytest.mark.parametrize("spec, causal, route", [
    ("flashblock", True, "dense_causal"),  # block-diffusion methods need a bidirectional block ...
    ("losa", True, "dense_causal"),
    ("flashblock", False, "dense_no_prefix"),  # ... and a cached prefix
    ("sparsed", True, "dense_no_steps"),  # a causal LM's forwards are independent prompts
])
def test_methods_that_cannot_act_route_dense_with_their_reason(spec, causal, route, caplog):
    torch.manual_seed(0)
    module = bind(FakeAttention(causal=causal), make_method(spec, min_seq_len=0, block_size=16))
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    hooks.reset_route_counts()
    with caplog.at_level(logging.WARNING, logger="sparsediff.hooks.attention"):
        out, _ = sparse_attention_forward(module, q, k, v, None, default_name=spec, is_causal=causal)
        sparse_attention_forward(module, q, k, v, None, default_name=spec, is_causal=causal)
    assert dict(hooks.route_counts) == {route: 2}  # never counted as sparse
    assert sum("runs dense SDPA" in r.message for r in caplog.records) <= 1
    assert_close_as_pytorch(out, lambda q, k, v: reference(q, k, v, None, causal=causal), q, k, v)


def test_dense_steps_are_counted_as_such():
    module = bind(FakeAttention(causal=False), make_method("ba_att", min_seq_len=0, block_size=16, dense_steps=2))
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    hooks.reset_route_counts()
    for step in range(4):
        with sparsediff.denoising_step(step, 4):
            sparse_attention_forward(module, q, k, v, None, default_name="ba_att", is_causal=False)
    assert dict(hooks.route_counts) == {"dense_step": 2, "sparse": 2}


def test_norm_sorting_under_causal_masking_warns_once(caplog):
    method = make_method("ba_att", min_seq_len=0, block_size=16, sort_segment="sequence")
    q = torch.randn(1, 2, 64, 16)
    with caplog.at_level(logging.WARNING, logger="sparsediff.methods.ba_att"):
        method(q, q, q, causal=True)
        method(q, q, q, causal=True)
    assert sum("norm sorting is off under causal" in r.message for r in caplog.records) <= 1
    assert method.plan(q, q, q, causal=True).perm is None
