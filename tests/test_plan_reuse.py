"""Plan reuse across steps (``config.plan_every``): the refresh step equals plain sparse attention, the steps
between run the kernel on the kept blocks, its schedule, validation, and what it saves (no selection)."""

import pytest
import torch

from sparsediff.methods import denoising_step, make_method, new_generation
from sparsediff.testing.tolerance import tolerance

N, D = 2048, 32  # 32 key blocks: the budget reaches past the forced (sink, local) blocks
EXACT = tolerance(torch.float64)
SPECS = ["ba_att:0.8", "xattention:0.8", "ba_att_paper:0.8"]


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then on the default device
    return tuple(torch.randn(1, 2, N, D, dtype=torch.float64, generator=g, device="cpu").to(torch.get_default_device())
                 for _ in range(3))


def kept(spec, every, **overrides):
    return make_method(f"{spec}/plan_every={every}", min_seq_len=0, block_size=64, **overrides)


def plain(spec):
    return make_method(spec, min_seq_len=0, block_size=64)


def at(m, step, q, k, v, **kw):
    with denoising_step(step, 50):
        return m(q, k, v, layer="blocks.0", **kw)


@pytest.mark.parametrize("spec", SPECS)
def test_refresh_steps_select_and_reuse_steps_keep_the_blocks(spec):
    first, later = qkv(0), qkv(1)
    m, ref = kept(spec, 3), plain(spec)
    torch.testing.assert_close(at(m, 0, *first), at(ref, 0, *first), **EXACT)  # refresh: plain sparse
    # Reuse: the step-0 blocks on new inputs, i.e. what the kernel gives on the kept plan, not a new selection.
    reused = at(m, 1, *later)
    planner = m.residual_planner(N)
    plan = planner.plan(*first[:2], first[2])
    q, k, v = later
    if plan.perm is not None:
        from sparsediff.kernels.block_stats.permute import gather_rows

        k, v = gather_rows(k, v, plan.perm)
    from sparsediff.methods.sparse_plan import SparsePlan

    expected = planner.attend(q, SparsePlan(k, v, plan.block_index, plan.block_count, plan.perm, plan.block_size),
                              causal=False, scale=None, return_lse=False)
    torch.testing.assert_close(reused, expected, **EXACT)
    assert not torch.allclose(reused, at(ref, 1, *later))  # a fresh selection would differ on new inputs
    at(m, 2, *later)
    torch.testing.assert_close(at(m, 3, *later), at(ref, 3, *later), **EXACT)  # refresh again at step 3
    assert m.stats["plan_refreshes"] == 2 and m.stats["plan_reuses"] == 2
    assert m.stats["plan_bytes"] > 0


def test_reuse_steps_skip_the_selection(monkeypatch):
    m = kept("ba_att:0.8", 4)
    planner = m.residual_planner(N)
    calls = []
    original = type(planner).plan

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(planner), "plan", counted)
    for step in range(8):
        at(m, step, *qkv(step))
    assert len(calls) == 2  # steps 0 and 4


def test_without_steps_every_call_selects_and_a_new_generation_drops_plans(caplog):
    m = kept("ba_att:0.8", 5)
    q, k, v = qkv()
    torch.testing.assert_close(m(q, k, v, layer="blocks.0"), plain("ba_att:0.8")(q, k, v), **EXACT)
    assert "plan_refreshes" not in m.stats
    assert "plan_every=5 has no effect: calls carry no denoising step" in caplog.text  # said, not silent
    at(m, 0, q, k, v)
    at(m, 1, q, k, v)
    assert m.stats["plan_reuses"] == 1
    new_generation()
    at(m, 2, q, k, v)
    assert m.stats["plan_refreshes"] == 1 and "plan_reuses" not in m.stats  # reset with the generation


def test_lse_and_layers_kept_apart():
    m = kept("ba_att:0.8", 5)
    a, b = qkv(0), qkv(1)
    with denoising_step(0, 50):
        m(*a, layer="blocks.0")
        m(*b, layer="blocks.1")
    with denoising_step(1, 50):
        out, lse = m(*a, layer="blocks.0", return_lse=True)
    ref_out, ref_lse = plain("ba_att:0.8")(*a, return_lse=True)
    torch.testing.assert_close(out, ref_out, **EXACT)  # blocks.0 kept its own plan (same inputs: same result)
    torch.testing.assert_close(lse, ref_lse, **EXACT)


def test_validation():
    with pytest.raises(ValueError, match="plan_every must be an int >= 0"):
        make_method("ba_att", plan_every=-1)
    with pytest.raises(ValueError, match="not both"):
        make_method("ba_att", plan_every=2, residual_every=2)
    for spec in ("sparsed", "flashblock", "losa"):
        with pytest.raises(ValueError, match="plan_every is for"):
            make_method(spec, plan_every=2)
    assert make_method("ba_att:0.5/plan_every=3").config.plan_every == 3


def test_video_processor_keeps_plans_per_layer_with_tiles():
    """Through the diffusers processor on a tiny Wan, tokens held in tile order across the blocks: each layer
    selects at steps 0 and 2 and reuses its plan at 1 and 3."""
    pytest.importorskip("diffusers")
    import sparsediff
    from sparsediff.attention_processors import enabled_processor
    from sparsediff.testing.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("wan")
    kwargs = tiny_inputs("wan", model)
    sparsediff.enable(model, "ba_att", sparsity=0.5, min_seq_len=0, block_size=16, layout="tiled", tile=(2, 4, 2),
                      plan_every=2, track_steps=False)
    try:
        with torch.no_grad(), sparsediff.generation():
            outs = []
            for step in range(4):
                with denoising_step(step, 4):
                    outs.append(model(**kwargs, return_dict=False)[0])
        stats = enabled_processor(model).method.stats
    finally:
        sparsediff.disable(model)
    assert stats["plan_refreshes"] == 4 and stats["plan_reuses"] == 4  # 2 layers x (2 refreshes, 2 reuses)
    # The same inputs every step: a kept plan is the plan a fresh selection makes, so every step agrees.
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_a_method_without_a_plan_says_plan_every_does_nothing(caplog):
    from sparsediff.methods import AttentionMethod
    from sparsediff.methods.dense import dense_attention

    class NoPlan(AttentionMethod):
        name = "no_plan_test"

        def sparse_attention(self, q, k, v, *, causal, scale, layer, frame_size, global_tokens, return_lse):
            return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)

    m = NoPlan(plan_every=3, min_seq_len=0)
    q, k, v = qkv()
    torch.testing.assert_close(at(m, 0, q, k, v), dense_attention(q, k, v), **EXACT)
    assert "no_plan_test computes no block-sparse plan" in caplog.text
