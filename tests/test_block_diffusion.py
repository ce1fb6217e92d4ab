"""The reference block-diffusion loop: unmasking schedule, step/block events, prefix-cache mode
equal to recomputing the prefix, exactness of the caching methods inside it, memory freed after; and,
when transformers has it, a tiny random-weight DiffusionGemma driven through sparsediff's hooks."""

import pytest
import torch
from torch import nn

from sparsediff.methods import make_method
from sparsediff.pipelines.block_diffusion import PrefixCache, generate, transfer_schedule
from sparsediff.runtime import step_state
from sparsediff.testing.tiny_lm import DiffusionGemmaAdapter
from sparsediff.testing.tolerance import ROUNDING, tolerance

VOCAB, MASK = 48, 47


class TinyDLM(nn.Module):
    """A random bidirectional transformer whose attention runs through a sparsediff method."""

    def __init__(self, method, dim=32, heads=4, kv_heads=2, layers=2, max_len=512):
        super().__init__()
        self.method, self.heads, self.kv_heads, self.hd = method, heads, kv_heads, dim // heads
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, (heads + 2 * kv_heads) * self.hd) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB)
        self.events = []

    def forward(self, ids, cache=None):
        s = step_state.current()
        self.events.append((s.generation, s.block, s.step, ids.shape[1], cache.committing if cache else None))
        offset = cache.length if cache is not None else 0
        h = self.embed(ids) + self.pos(torch.arange(offset, offset + ids.shape[1]))
        b, n, _ = h.shape
        for i, (qkv, out, norm) in enumerate(zip(self.qkv, self.out, self.norm)):
            q, k, v = qkv(norm(h)).view(b, n, -1, self.hd).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            if cache is not None:
                k, v = cache.kv(i, k, v)
            a = self.method(q, k, v, layer=f"layers.{i}")
            h = h + out(a.transpose(1, 2).reshape(b, n, -1))
        return self.head(h)


def model_with(spec, **kw):
    torch.manual_seed(1)
    method = make_method(spec, **{"min_seq_len": 0, "block_size": 16, **kw}) if spec != "dense" else make_method(spec)
    return TinyDLM(method).eval(), method


# Drawn on the CPU (the same ids whatever the default device), then put where TinyDLM is: the default device.
PROMPT = torch.randint(0, MASK, (2, 40), generator=torch.Generator("cpu").manual_seed(3), device="cpu").to(
    torch.get_default_device())


def test_transfer_schedule_sums_to_masked():
    sched = transfer_schedule(torch.tensor([16, 13, 0]), 5)
    assert sched.sum(1).tolist() == [16, 13, 0]
    assert sched[1].tolist() == [3, 3, 3, 2, 2]


@pytest.mark.parametrize("mode", ["full", "prefix_cache"])
def test_loop_unmasks_on_schedule_and_emits_events(mode):
    model, _ = model_with("dense")
    seen = []
    x = generate(model, PROMPT, mask_id=MASK, gen_length=48, block_length=16, steps_per_block=4, mode=mode,
                 on_step=lambda b, i, x: seen.append((b, i, int((x == MASK).sum()))))
    assert torch.equal(x[:, :40], PROMPT) and not bool((x == MASK).any())
    assert [m for _, _, m in seen] == [2 * (48 - 4 * (j + 1)) for j in range(12)]  # 4 tokens per step and row
    steps = [(blk, st) for _, blk, st, _, committing in model.events if not committing]
    assert steps == [(b, i) for b in range(3) for i in range(4)]
    gens = {g for g, *_ in model.events}
    assert len(gens) == 1 and step_state.current().step is None
    if mode == "prefix_cache":
        commits = [(blk, st, n) for _, blk, st, n, committing in model.events if committing]
        assert commits == [(-1, 0, 40)] + [(b, 4, 16) for b in range(3)]


def test_prefix_cache_equals_block_causal_recompute():
    # With the prompt committed to the cache, the block's logits equal one cache-free pass over
    # [prompt | block] in which prompt tokens see only the prompt and block tokens see everything.
    model, _ = model_with("dense")
    cache = PrefixCache(72)
    cache.committing = True
    model(PROMPT, cache=cache)
    cache.commit(40)
    block = torch.randint(0, VOCAB, (2, 16))
    cache.committing = False
    got = model(block, cache=cache)
    # A tiny float32 model, its prefix attention from the cache: logits a few roundings apart.
    want = blockwise_reference(model, PROMPT, block)
    torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))
    assert cache.nbytes() == 2 * 2 * (2 * 2 * 72 * 8 * 4)  # 2 layers x (k, v) x (B, Hkv, capacity, D) fp32


def blockwise_reference(model, prompt, block):
    """Block-causal reference without a cache: prompt tokens see the prompt, block tokens see all."""
    seq = torch.cat([prompt, block], 1)
    b, n = seq.shape
    p = prompt.shape[1]
    h = model.embed(seq) + model.pos(torch.arange(n))
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[:p, p:] = False
    for qkv, out, norm in zip(model.qkv, model.out, model.norm):
        q, k, v = qkv(norm(h)).view(b, n, -1, model.hd).transpose(1, 2).split(
            [model.heads, model.kv_heads, model.kv_heads], dim=1)
        k = k.repeat_interleave(model.heads // model.kv_heads, 1)
        v = v.repeat_interleave(model.heads // model.kv_heads, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + out(a.transpose(1, 2).reshape(b, n, -1))
    return model.head(h)[:, p:]


@pytest.mark.parametrize("spec,kw,mode", [
    ("flashblock", dict(refresh_every=1), "prefix_cache"),
    ("losa", dict(threshold=0.0, sparsity=0.0), "prefix_cache"),
    ("sparsed", dict(keep_ratio=1.0), "full"),
])
def test_keep_everything_methods_generate_like_dense(spec, kw, mode):
    dense_model, _ = model_with("dense")
    want = generate(dense_model, PROMPT, mask_id=MASK, gen_length=32, block_length=16, steps_per_block=4, mode=mode)
    model, method = model_with(spec, **kw)
    got = generate(model, PROMPT, mask_id=MASK, gen_length=32, block_length=16, steps_per_block=4, mode=mode,
                   methods=[method])
    assert torch.equal(got, want)
    assert method.cache_bytes() == 0  # freed on return


@pytest.mark.parametrize("spec,kw,mode", [
    ("flashblock", {}, "prefix_cache"),
    ("losa", dict(threshold=0.05, sparsity=0.5), "prefix_cache"),
    ("sparsed", dict(keep_ratio=0.3), "full"),
])
def test_caching_methods_run_in_the_loop(spec, kw, mode):
    model, method = model_with(spec, **kw)
    caches, entries, stats = [], [], []
    def trace(b, i, x):
        caches.append(method.cache_bytes())
        entries.append(len(method._cache.entries))
        stats.append(dict(method.stats))
    generate(model, PROMPT, mask_id=MASK, gen_length=32, block_length=16, steps_per_block=4, mode=mode,
             methods=[method], on_step=trace)
    assert max(caches) > 0 and method.cache_bytes() == 0  # freed on return
    assert max(entries) == 2  # one entry per layer, dropped at each new block
    if spec == "sparsed":  # step 0 of each block is dense, step 1 selects once per layer, 2-3 reuse
        assert stats[-1]["selections"] == 4 and stats[-1]["sparse_calls"] == 2 * 2 * 2
    if spec == "flashblock":  # external attention once per layer and block, commit pass included
        assert stats[-1]["refreshes"] == 2 * 2 and stats[-1]["cached_calls"] == 2 * 2 * 3 + 2


def test_rejects_bad_arguments():
    model, _ = model_with("dense")
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(model, PROMPT, mask_id=MASK, gen_length=30, block_length=16)
    with pytest.raises(ValueError, match="mode"):
        generate(model, PROMPT, mask_id=MASK, mode="x")
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(4).kv(0, torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2))


# -- DiffusionGemma (transformers) ------------------------------------------------------------------
def tiny_diffusion_gemma():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip("this transformers has no DiffusionGemma (transformers.models.diffusion_gemma)")
    pytest.importorskip("sparsediff.hooks")
    from sparsediff.testing.tiny_lm import tiny_diffusion_gemma as build

    try:
        return build(VOCAB, max_positions=512, sliding_window=32)
    except Exception as err:  # the config schema of this model moves between transformers releases
        pytest.skip(f"cannot build a tiny DiffusionGemma with this transformers: {err}")


def test_diffusion_gemma_through_hooks():
    import sparsediff
    from sparsediff.hooks.config import SparseAttentionConfig

    model = tiny_diffusion_gemma()
    prompt = PROMPT[:1]
    run = lambda: generate(DiffusionGemmaAdapter(model), prompt, mask_id=MASK, gen_length=32, block_length=16,
                           steps_per_block=4, mode="prefix_cache")
    want = run()
    # The loop emits the step events itself, so the hooks' own step tracking stays off.
    exact = make_method("flashblock", refresh_every=1, min_seq_len=0, block_size=16)
    sparsediff.enable(model, SparseAttentionConfig(exact, track_steps=False))
    try:
        assert torch.equal(run(), want)
    finally:
        sparsediff.disable(model)
    cached = make_method("flashblock", min_seq_len=0, block_size=16)
    sparsediff.enable(model, SparseAttentionConfig(cached, track_steps=False))
    try:
        out = run()
    finally:
        sparsediff.disable(model)
    assert not bool((out == MASK).any()) and cached.stats["cached_calls"] > 0


def test_docs_block_diffusion_example_runs(capsys):
    import ast
    import pathlib
    import re

    tiny_diffusion_gemma()  # skips where this transformers has no DiffusionGemma
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "block_methods.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "tiny_diffusion_gemma(" in b]
    assert blocks, "docs/block_methods.md lost its runnable block-diffusion example"
    with torch.device("cpu"):  # the example is a CPU run (CPU generator, CPU model) whatever the default device
        exec(compile(blocks[0], "block_methods.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert float(out[0].rsplit(" ", 1)[-1]) > 0.5  # random weights: most tokens as dense at sparsity 0.5
    rows = [ast.literal_eval(line) for line in out[1:]]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["active_share"] == 1.0
    assert all(0 < r["active_share"] <= 1 and 0 < r["union_density"] <= 1 for r in rows)


def test_equal_confidence_commits_the_earlier_positions():
    from sparsediff.pipelines.block_diffusion import _unmask

    block = torch.full((1, 6), MASK)
    logits = torch.zeros(1, 6, VOCAB)
    logits[..., 5] = 3.0  # every position predicts token 5 with the same confidence
    for count in (1, 2, 4):
        out = _unmask(block, logits, torch.tensor([count]), MASK, 0.0, None)
        assert out[0].tolist() == [5] * count + [MASK] * (6 - count)
