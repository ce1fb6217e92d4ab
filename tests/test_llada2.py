"""diffusers' LLaDA2Pipeline under sparsediff.

The LLaDA2 model (``LLaDA2MoeModelLM``) is remote code that is not available offline, so the tests use
a minimal stand-in with the same module pattern and call signature: ``...Attention`` modules with a
fused ``query_key_value`` projection, a ``dense`` output, ``is_causal = False``, ``layer_idx`` and a
``config`` whose ``_attn_implementation`` selects the function from transformers'
``ALL_ATTENTION_FUNCTIONS``; the model takes ``(input_ids, attention_mask, position_ids)`` and returns
``.logits``, and builds either LLaDA2's block-causal 4-D mask or none (bidirectional).
"""

import types

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
from transformers import AttentionInterface  # noqa: E402

import sparsediff  # noqa: E402
from sparsediff.hooks.llada2 import ATTN_NAME, enabled_method  # noqa: E402
from sparsediff.testing.tolerance import ROUNDING, tolerance  # noqa: E402

VOCAB, MASK, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 40, 39, 64, 4, 2, 16, 8


class TinyLLaDA2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, False
        self.scaling, self.num_key_value_groups = HEAD_DIM ** -0.5, HEADS // KV_HEADS
        self.query_key_value = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.dense = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, hidden, attention_mask):
        b, n, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(b, n, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=-2))
        fn = AttentionInterface()[self.config._attn_implementation]
        out, _ = fn(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.dense(out.reshape(b, n, -1))


class TinyLLaDA2(nn.Module):
    def __init__(self, block_causal=True, layers=2):
        super().__init__()
        self.config = types.SimpleNamespace(_attn_implementation="sdpa")
        self.block_causal = block_causal
        self.embed, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(512, HIDDEN)
        self.attn = nn.ModuleList(TinyLLaDA2Attention(self.config, i) for i in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, 128), nn.GELU(), nn.Linear(128, HIDDEN))
                                 for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.register_buffer("_anchor", torch.empty(0))

    dtype = torch.float32

    @property
    def device(self):
        return self._anchor.device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        n = input_ids.shape[1]
        mask = None
        if self.block_causal:  # LLaDA2's block-diffusion mask: a block sees itself and earlier blocks
            blocks = torch.arange(n) // BLOCK
            mask = (blocks[None, :] <= blocks[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        elif attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, n, -1)
        h = self.embed(input_ids) + self.pos(position_ids)
        for attn, mlp in zip(self.attn, self.mlp):
            h = h + attn(h, mask)
            h = h + mlp(h)
        return types.SimpleNamespace(logits=self.head(h))


def make_pipe(block_causal=True):
    torch.manual_seed(0)
    model = TinyLLaDA2(block_causal).eval()
    pipe = diffusers.LLaDA2Pipeline(model=model, scheduler=diffusers.BlockRefinementScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt_len=20, **kw):
    # Drawn on CPU (the same prompt on every device), then moved to the model.
    ids = torch.randint(0, MASK, (1, prompt_len), generator=torch.Generator().manual_seed(1), device="cpu")
    ids = ids.to(pipe.model.device)
    args = dict(input_ids=ids, use_chat_template=False, gen_length=24, block_length=BLOCK, num_inference_steps=4,
                temperature=0.0, threshold=2.0, minimal_topk=1, editing_threshold=None, eos_early_stop=False,
                mask_token_id=MASK, output_type="seq")
    return pipe(**{**args, **kw}).sequences


def attention_outputs(pipe):
    """Per-layer attention outputs of one forward call over a 40-token window (3 blocks of context)."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in pipe.model.attn]
    ids = torch.randint(0, MASK, (1, 40), generator=torch.Generator().manual_seed(2), device="cpu")
    ids = ids.to(pipe.model.device)  # drawn on CPU: the same window on every device
    pipe.model(ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(40)[None])
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("block_causal", [True, False])
def test_dense_method_reproduces_the_pipeline_exactly(block_causal):
    pipe = make_pipe(block_causal)
    want = generate(pipe)
    sparsediff.enable(pipe, "dense")
    assert pipe.model.config._attn_implementation == ATTN_NAME
    torch.testing.assert_close(generate(pipe), want, rtol=0, atol=0)
    sparsediff.disable(pipe)
    assert pipe.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("spec,kw", [("flashblock", dict(refresh_every=1)),
                                     ("losa", dict(threshold=0.0, sparsity=0.0))])
def test_exact_settings_match_dense(spec, kw):
    pipe = make_pipe()
    want_seq, want_out = generate(pipe), attention_outputs(pipe)
    sparsediff.enable(pipe, spec, min_seq_len=0, block_size=16, **kw)
    with sparsediff.denoising_step(1, 4):  # past any dense window: the method really runs
        got_out = attention_outputs(pipe)
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))  # a few roundings apart
    torch.testing.assert_close(generate(pipe), want_seq, rtol=0, atol=0)
    sparsediff.disable(pipe)


@pytest.mark.parametrize("spec,kw", [("flashblock", {}), ("flashblock", dict(sparse_selector="block_mean")),
                                     ("losa", dict(sparsity=0.5)), ("sparsed", dict(keep_ratio=0.5))])
def test_each_method_runs_and_caches_reset_per_block(spec, kw):
    pipe = make_pipe()
    sparsediff.enable(pipe, spec, min_seq_len=0, block_size=16, **kw)
    method = enabled_method(pipe)
    seen = []

    def record(p, step, t, kwargs):
        seen.append((sparsediff.runtime.step_state.current().block, len(method._cache.entries)))
        return kwargs

    out = generate(pipe, prompt_len=24, callback_on_step_end=record)  # block-aligned: no padding
    assert out.shape == (1, 24) and not (out == MASK).any()
    blocks = [b for b, _ in seen]
    assert blocks == sorted(blocks) and len(set(blocks)) == 3  # windows 32, 40, 48
    assert all(entries <= 2 for _, entries in seen)  # one entry per layer, dropped at each new block
    if spec == "flashblock" and not kw:
        assert method.stats["refreshes"] == 3 * 2 and method.stats["cached_calls"] > 0
    sparsediff.disable(pipe)
    assert enabled_method(pipe) is None and "set_timesteps" not in pipe.scheduler.__dict__


def test_disable_restores_and_padding_falls_back_to_sdpa():
    pipe = make_pipe()
    want = generate(pipe, prompt_len=21)  # 21 + 24 is not block-aligned: the last window has padding
    sparsediff.enable(pipe, "flashblock", min_seq_len=0, block_size=16, refresh_every=1)
    got = generate(pipe, prompt_len=21)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sparsediff.disable(pipe)
    assert all(not hasattr(m, "_sparsediff_binding") for m in pipe.model.attn)
    torch.testing.assert_close(generate(pipe, prompt_len=21), want, rtol=0, atol=0)


def test_model_without_the_pattern_is_refused():
    pipe = make_pipe()
    pipe.model.attn = nn.ModuleList()
    with pytest.raises(TypeError, match="query_key_value"):
        sparsediff.enable(pipe, "flashblock")
