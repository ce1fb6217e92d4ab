"""Residual reuse (``config.residual_every``): dense at refresh steps, exact on unchanged inputs, closer to
dense than plain sparse on drifting inputs, its schedule, and when the cache is dropped."""

import pytest
import torch

from sparsediff.methods import denoising_step, dense_attention, make_method, new_generation
from sparsediff.methods.base import MethodConfig, parse_spec
from sparsediff.methods.residual_reuse import residual_bytes
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance

SPECS = ["ba_att:0.8", "xattention:0.8", "fixed:0.8", "sparsed:0.8/dense_step_fraction=0"]
N, D = 512, 32
# float64 sparse + cached (dense - sparse) against float64 dense: equal up to the rounding of that sum.
EXACT = tolerance(torch.float64)


def qkv(n=N, dtype=torch.float64, hq=2, hkv=2):
    return torch.randn(1, hq, n, D, dtype=dtype), *(torch.randn(1, hkv, n, D, dtype=dtype) for _ in range(2))


def method(spec, every, **overrides):
    return make_method(f"{spec}/residual_every={every}", min_seq_len=0, block_size=64, **overrides)


def rel(out, ref):
    return float((out - ref).norm() / ref.norm())


def run(m, steps, inputs, **kwargs):
    """The method's output at each step (``inputs``: one (q, k, v) for all steps, or one per step)."""
    outs = []
    for i, step in enumerate(steps):
        q, k, v = inputs[i] if isinstance(inputs, list) else inputs
        with denoising_step(step, 50):
            outs.append(m(q, k, v, layer="blocks.0", **kwargs))
    return outs


def first_sparse_step(m):
    """SparseD answers its first sparse step exactly itself (the switch step): residuals start one later."""
    return 1 if m.name == "sparsed" else 0


@pytest.mark.parametrize("spec", SPECS)
def test_refresh_and_unchanged_steps_equal_dense(spec):
    q, k, v = qkv()
    ref_out, ref_lse = dense_attention(q, k, v, return_lse=True)
    m = method(spec, 5)
    plain = make_method(spec, min_seq_len=0, block_size=64)
    assert rel(run(plain, [3, 4], (q, k, v))[-1], ref_out) > 1e-3  # the budget does drop mass
    for step in range(6):
        with denoising_step(step, 50):
            out, lse = m(q, k, v, layer="blocks.0", return_lse=True)
        torch.testing.assert_close(out, ref_out, **EXACT)
        torch.testing.assert_close(lse, ref_lse, **tolerance(torch.float32, ulps=ROUNDING))  # float32 LSEs
    s0 = first_sparse_step(m)
    assert m.stats["residual_refreshes"] == len([s for s in (s0, s0 + 5) if s < 6])
    assert m.stats["residual_reuses"] == 4


def test_norm_sorted_ba_att_keeps_its_key_order():
    # BA-Att with frame_size sorts keys by norm; the cached plan holds that order (float32: the sort's dtype).
    q, k, v = qkv(dtype=torch.float32)
    m = method("ba_att:0.8/norm_sort=true", 4)
    outs = run(m, range(4), (q, k, v), frame_size=128)
    for out in outs:
        assert_close_as_pytorch(out, dense_attention, q, k, v)
    assert m._residual_cache.layers.entries["blocks.0"].perm is not None


@pytest.mark.parametrize("spec", ["ba_att:0.8", "xattention:0.8", "sparsed:0.8/dense_step_fraction=0"])
def test_drifting_inputs_closer_to_dense_than_plain_sparse(spec):
    q0, k0, v0 = qkv()
    dq, dk, dv = (0.01 * torch.randn_like(t) for t in (q0, k0, v0))
    inputs = [(q0 + t * dq, k0 + t * dk, v0 + t * dv) for t in range(8)]
    refs = [dense_attention(*x) for x in inputs]
    plain = run(make_method(spec, min_seq_len=0, block_size=64), range(8), inputs)
    reused = run(method(spec, 4), range(8), inputs)
    start = 2  # past SparseD's switch step and the first refresh
    err_plain = [rel(o, r) for o, r in zip(plain[start:], refs[start:])]
    err_reused = [rel(o, r) for o, r in zip(reused[start:], refs[start:])]
    assert max(err_reused) < 0.5 * min(err_plain)
    assert err_reused[-1] > 1e-8  # drift since the last refresh shows: not secretly dense


def refresh_steps(m, steps, inputs):
    seen, before = [], 0
    for step in steps:
        with denoising_step(step, 50):
            m(*inputs, layer="blocks.0")
        count = m.stats.get("residual_refreshes", 0)
        if count > before:
            seen.append(step)
        before = count
    return seen


def test_schedule():
    inputs = qkv()
    assert refresh_steps(method("xattention:0.8", 1), range(6), inputs) == list(range(6))  # r = 1: dense every step
    m = method("xattention:0.8", 5, dense_steps=3)
    assert refresh_steps(m, range(16), inputs) == [3, 8, 13]  # s0 = the first sparse step, then every 5
    assert m.stats["residual_reuses"] == 10
    m = method("xattention:0.8", 5)
    assert refresh_steps(m, [0, 2, 4, 6, 8, 10, 12], inputs) == [0, 6, 12]  # skipped steps: 5 steps since


def test_sparsed_switch_step_is_not_a_refresh():
    m = method("sparsed:0.8", 3, dense_steps=2, dense_step_fraction=0.0)
    # steps 0, 1: dense (base class); 2: SparseD's switch step (exact dense pass); 3: first residual refresh.
    assert refresh_steps(m, range(9), qkv()) == [3, 6]


def test_no_step_information_runs_plain_sparse():
    q, k, v = qkv()
    m, plain = method("xattention:0.8", 5), make_method("xattention:0.8", min_seq_len=0, block_size=64)
    torch.testing.assert_close(m(q, k, v, layer="blocks.0"), plain(q, k, v, layer="blocks.0"), rtol=0, atol=0)
    assert "residual_refreshes" not in m.stats and residual_bytes(m) == 0


def test_new_generation_and_reset_drop_the_cache():
    q, k, v = qkv()
    m = method("xattention:0.8", 10)
    run(m, range(3), (q, k, v))
    assert m.stats["residual_refreshes"] == 1 and residual_bytes(m) > 0
    new_generation()
    assert refresh_steps(m, [3, 4], (q, k, v)) == [3]  # the first step of the new generation refreshes
    m.reset()
    assert residual_bytes(m) > 0  # dropped lazily, at the next call
    assert refresh_steps(m, [5], (q, k, v)) == [5] and m.stats["residual_refreshes"] == 1


def test_shape_change_refreshes_and_layers_are_separate():
    m = method("xattention:0.8", 10)
    assert refresh_steps(m, [0, 1], qkv()) == [0]
    assert refresh_steps(m, [2], qkv(n=256)) == [2]
    with denoising_step(3, 50):
        m(*qkv(n=256), layer="blocks.1")
    assert m.stats["residual_refreshes"] == 3
    assert set(m._residual_cache.layers.entries) == {"blocks.0", "blocks.1"}


def test_memory_reported_and_refresh_in_place():
    q, k, v = qkv(hq=4, hkv=2)
    m = method("fixed:0.8", 2)
    run(m, [0], (q, k, v))
    entry = m._residual_cache.layers.entries["blocks.0"]
    residual = 4 * N * (D * q.element_size() + 4)
    assert m.stats["residual_bytes"] == residual_bytes(m) >= residual
    assert residual_bytes(m) - residual == entry.block_index.nbytes + entry.block_count.nbytes
    held = entry.out.data_ptr(), entry.lse.data_ptr(), entry.block_index.data_ptr()
    run(m, [1, 2], qkv(hq=4, hkv=2))  # step 2 refreshes on new values of the same shapes
    entry = m._residual_cache.layers.entries["blocks.0"]
    assert m.stats["residual_refreshes"] == 2 and entry.step == 2
    assert (entry.out.data_ptr(), entry.lse.data_ptr(), entry.block_index.data_ptr()) == held


def test_low_precision_matches_dense_to_its_rounding():
    q, k, v = qkv(dtype=torch.bfloat16)
    ref = dense_attention(q.double(), k.double(), v.double())
    outs = run(method("xattention:0.8", 3), range(3), (q, k, v))
    err_sdpa = rel(dense_attention(q, k, v).double(), ref)
    for out in outs:
        assert out.dtype == torch.bfloat16 and rel(out.double(), ref) < 3 * err_sdpa


def test_config_validation_and_spec_round_trip():
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(ValueError, match=r"residual_every must be an int >= 0 \(0: off"):
            MethodConfig(residual_every=bad)
    with pytest.raises(ValueError, match="residual_every must be an int >= 0"):
        make_method("ba_att:0.8/residual_every=-2")
    for prefix_method in ("flashblock", "losa"):
        with pytest.raises(ValueError, match="residual_every is for full-sequence methods"):
            make_method(f"{prefix_method}/residual_every=5")
    assert parse_spec("ba_att:0.8/residual_every=5") == ("ba_att", {"sparsity": 0.8, "residual_every": 5})
    for spec in ("ba_att:0.8/residual_every=5", "xattention:0.8/residual_every=5", "sparsed:0.8/residual_every=5"):
        m = make_method(spec, min_seq_len=0)
        assert m.config.residual_every == 5 and m.describe()["residual_every"] == 5
        assert make_method(type(m.config)(**m.config.to_dict())).config.residual_every == 5
    assert make_method("ba_att:0.8").config.residual_every == 0


def test_tiled_layout_caches_in_tile_order():
    # A host that passes the latent grid gets tokens reordered into 3-D tiles (token_layout) before the method:
    # the residual lives in that order and the output comes back in the caller's.
    q, k, v = qkv()
    m = method("xattention:0.8", 3, layout="tiled")
    assert m.token_layout(q, k, causal=False, grid=(2, 16, 16), global_tokens=0) is not None
    outs = run(m, range(3), (q, k, v), grid=(2, 16, 16))
    for out in outs:
        torch.testing.assert_close(out, dense_attention(q, k, v), **EXACT)
    assert m.stats["residual_reuses"] == 2


def test_two_calls_per_step_keep_their_own_residuals():
    # Classifier-free guidance as two calls per step (conditional, unconditional) under one layer name.
    cond, uncond = qkv(), qkv()
    m = method("xattention:0.8", 5)
    for step in range(3):
        with denoising_step(step, 50):
            for q, k, v in (cond, uncond):
                torch.testing.assert_close(m(q, k, v, layer="blocks.0"), dense_attention(q, k, v), **EXACT)
    assert set(m._residual_cache.layers.entries) == {"blocks.0", "blocks.0#1"}
    assert m.stats["residual_refreshes"] == 2 and m.stats["residual_reuses"] == 4
