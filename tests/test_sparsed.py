"""SparseD: dense window, one pattern per layer reused, keep-all == dense, resets, per-head patterns,
and the tile-mass kernel (PyTorch path and Triton interpreter) against the full-map reference."""

import logging
import math

import pytest
import torch
from test_flashblock import dense_out

from sparsediff.kernels import index_to_mask
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.kernels.tile_mass import row_lse, tile_mass, tile_mass_ref
from sparsediff.methods import denoising_step, dense_attention, make_method, new_block, new_generation
from sparsediff.methods import sparsed as sparsed_module
from sparsediff.methods.sparsed import SparseDConfig, SparseDMethod, blocks_to_keep
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance


def qkv(b=1, hq=4, hkv=2, n=96, d=16, dtype=torch.float32, nk=None):
    nk = n if nk is None else nk
    q = torch.randn(b, hq, n, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    return q, k, torch.randn(b, hkv, nk, d, dtype=dtype)


def structured_qkv(n=128, d=16, block=16):
    """Head 0 attends its own block (diagonal), head 1 attends block 0 (a sink): patterns must differ."""
    q = torch.randn(1, 2, n, d) * 0.1
    k = torch.randn(1, 2, n, d) * 0.1
    codes = torch.randn(n // block, d)
    codes = 6 * codes / codes.norm(dim=-1, keepdim=True)
    q[0, 0] += codes.repeat_interleave(block, 0)
    k[0, 0] += codes.repeat_interleave(block, 0)
    sink = 6 * torch.nn.functional.normalize(torch.randn(d), dim=0)
    q[0, 1] += sink
    k[0, 1, :block] += sink
    return q, k, torch.randn(1, 2, n, d)


# -- tile mass ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(96, 96), (70, 150)])
def test_tile_mass_matches_reference(backend, causal, nq, nk, device):
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    q, k, v = (x.to(device) for x in qkv(b=2, n=nq, nk=nk, dtype=dtype))
    _, lse = row_lse(q, k, v, causal=causal, block_size=32)
    got = tile_mass(q, k, lse, causal=causal, block_size=32, backend=backend)
    ref = tile_mass_ref(q.cpu(), k.cpu(), causal=causal, block_size=32).to(device)
    assert got.shape == (2, 4, math.ceil(nq / 32), math.ceil(nk / 32)) and got.dtype == torch.float32
    # Tile means are averages of probabilities: compare relative to the largest one, at the inputs' precision
    # (float32 math on bfloat16 inputs stays far inside it).
    assert (got - ref).abs().max() <= tolerance(dtype, magnitude=ref.abs().max().item())["atol"]
    # Each query row's probabilities sum to 1: tile sums over a query block add up to its rows.
    rows = torch.clamp(nq - torch.arange(got.shape[2], device=device) * 32, max=32).float()
    cols = torch.clamp(nk - torch.arange(got.shape[3], device=device) * 32, max=32).float()
    torch.testing.assert_close((got * rows[:, None] * cols).sum(-1), rows.expand_as(got[..., 0]), **tolerance(dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tile_mass_structured_peaks(backend, device):
    q, k, _ = structured_qkv()
    dtype = torch.float32 if backend == "torch" else torch.float16
    q, k = q.to(device, dtype), k.to(device, dtype)
    _, lse = row_lse(q, k, k, block_size=16)
    got = tile_mass(q, k, lse, block_size=16, backend=backend)
    assert torch.equal(got[0, 0].argmax(-1).cpu(), torch.arange(8, device="cpu"))
    assert torch.equal(got[0, 1].argmax(-1).cpu(), torch.zeros(8, dtype=torch.long, device="cpu"))
    ref = tile_mass_ref(q.cpu(), k.cpu(), block_size=16)
    torch.testing.assert_close(got.cpu(), ref, **tolerance(dtype, magnitude=ref.abs().max().item()))


def test_tile_mass_rejects_bad_inputs():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="lse must have shape"):
        tile_mass(q, k, torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="power of two"):
        tile_mass(q, k, torch.zeros(1, 4, 96), block_size=24)


# -- config ------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = SparseDConfig()
    assert (cfg.dense_step_fraction, cfg.keep_ratio, cfg.block_size, cfg.refresh_every) == (0.2, 0.3, 128, None)
    assert SparseDConfig(sparsity=0.75).keep_ratio == pytest.approx(0.25)
    assert make_method("sparsed:0.6").config.keep_ratio == pytest.approx(0.4)
    assert SparseDConfig(sparsity=0.75).replace(keep_ratio=0.5).keep_ratio == 0.5
    for bad in (dict(keep_ratio=0.0), dict(sparsity=1.0), dict(refresh_every=0), dict(dense_step_fraction=2)):
        with pytest.raises(ValueError):
            SparseDConfig(**bad)
    assert blocks_to_keep(10, 0.3) == 4 and blocks_to_keep(10, 1.0) == 10


# -- method ------------------------------------------------------------------------------------------
def method(**kw):
    kw = {"min_seq_len": 0, "block_size": 16, **kw}
    return make_method("sparsed", **kw)


def test_dense_window_is_bit_identical_to_dense():
    m = method(keep_ratio=0.1)
    q, k, v = qkv()
    for step in range(2):  # 0.2 * 10 steps
        with denoising_step(step, 10):
            assert torch.equal(m(q, k, v, layer="l0"), dense_attention(q, k, v))
    assert m.stats["selections"] == 0 and m.cache_bytes() == 0


def test_pattern_computed_once_per_layer_and_reused(monkeypatch):
    calls = []
    real = sparsed_module.tile_mass
    monkeypatch.setattr(sparsed_module, "tile_mass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m = method(keep_ratio=0.25)
    layers = {f"l{i}": qkv() for i in range(3)}
    for step in range(10):
        with denoising_step(step, 10):
            for name, (q, k, v) in layers.items():
                # Later steps see new activations; the pattern must still be the switch step's.
                q = q + 0.3 * step * torch.randn_like(q)
                out = m(q, k, v, layer=name)
                if step == 2:  # switch step: exact dense (pass 1 output)
                    assert_close_as_pytorch(out, dense_out, q, k, v)
                elif step > 2:
                    index, count = m.patterns()[name]
                    sparse = lambda q, k, v, i=index, c=count: block_sparse_attention_ref(q, k, v, i, c, block_size=16,
                                                                                       upcast=False)[0]
                    assert_close_as_pytorch(out, sparse, q, k, v)
    assert len(calls) == 3 and m.stats["selections"] == 3 and m.stats["sparse_calls"] == 3 * 7
    index, count = m.patterns()["l0"]
    assert index.shape[:3] == (1, 4, 6) and bool((count == blocks_to_keep(6, 0.25)).all())
    assert m.cache_bytes() == sum(i.nbytes + c.nbytes for i, c in m.patterns().values()) > 0


def test_pattern_selects_top_tiles_per_head():
    m = method(keep_ratio=0.25)
    q, k, v = qkv(b=2, n=80, nk=112)
    with denoising_step(5, 10):
        m(q, k, v, layer="x")
    index, count = m.patterns()["x"]
    mask = index_to_mask(index, count, 7)
    ref = tile_mass_ref(q, k, block_size=16)
    assert bool((mask.sum(-1) == blocks_to_keep(7, 0.25)).all())
    # A top-k of the exact tile means, up to float32 near-ties: every kept tile weighs at least as
    # much as every dropped one.
    kept_min = ref.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = ref.masked_fill(mask, float("-inf")).amax(-1)
    assert bool((kept_min >= dropped_max - tolerance(torch.float32, magnitude=ref.max().item())["atol"]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_all_equals_dense_at_every_step(dtype):
    m = method(keep_ratio=1.0)
    q, k, v = qkv(dtype=dtype, n=80, nk=112)
    ref_q = q
    for step in range(6):
        with denoising_step(step, 6):
            q = ref_q + 0.1 * step * torch.randn_like(ref_q)
            assert_close_as_pytorch(m(q, k, v, layer="l"), dense_out, q, k, v)


def test_new_generation_and_new_block_reset_cache():
    m = method(keep_ratio=0.2, dense_step_fraction=0.0)
    q, k, v = qkv()
    with denoising_step(0, 4):
        m(q, k, v, layer="l")
    assert m.cache_bytes() > 0 and m.stats["selections"] == 1
    new_generation()
    with denoising_step(0, 4):
        m(q, k, v, layer="l")  # first call of the new generation: reset, then a fresh selection
    assert m.stats["selections"] == 1
    new_block(3)
    with denoising_step(1, 4):
        m(q, k, v, layer="l")
    assert m.stats["selections"] == 2  # the pattern of the previous block was dropped


def test_refresh_every_recomputes():
    m = method(keep_ratio=0.2, dense_step_fraction=0.0, refresh_every=2)
    q, k, v = qkv()
    for step in range(6):
        with denoising_step(step, 6):
            m(q, k, v, layer="l")
    assert m.stats["selections"] == 3  # steps 0, 2, 4


def test_head_specific_patterns_on_structured_inputs():
    m = method(keep_ratio=0.01)  # one key block per query block
    q, k, v = structured_qkv()
    with denoising_step(9, 10):
        m(q, k, v, layer="l")
    index, count = m.patterns()["l"]
    assert bool((count == 1).all())
    assert torch.equal(index[0, 0, :, 0], torch.arange(8, dtype=torch.int32))  # diagonal
    assert torch.equal(index[0, 1, :, 0], torch.zeros(8, dtype=torch.int32))  # sink


def test_global_tokens_are_kept_as_rows_and_columns():
    m = method(keep_ratio=0.01)
    q, k, v = structured_qkv()
    with denoising_step(9, 10):
        m(q, k, v, layer="l", global_tokens=20)
    mask = index_to_mask(*m.patterns()["l"], 8)
    assert bool(mask[..., :2].all()) and bool(mask[..., :2, :].all())


def test_without_step_info_pattern_from_first_call(caplog):
    m = SparseDMethod(min_seq_len=0, block_size=16, keep_ratio=0.2)
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING):
        first = m(q, k, v, layer="l")
        m(q, k, v, layer="l")
        m(q, k, v, layer="l")
    assert m.stats["selections"] == 1 and m.stats["sparse_calls"] == 2
    assert sum("no denoising-step information" in r.message for r in caplog.records) == 1
    assert_close_as_pytorch(first, dense_out, q, k, v)


def test_cached_pattern_error_is_small_on_slowly_changing_inputs():
    # Structured heads keep their pattern across steps: the cached pattern stays close to dense.
    m = method(keep_ratio=0.25)
    q0, k0, v = structured_qkv()
    errs = []
    for step in range(10):
        with denoising_step(step, 10):
            q = q0 + 0.05 * step * torch.randn_like(q0)
            out = m(q, k0, v, layer="l")
            errs.append((out - dense_attention(q, k0, v)).norm() / dense_attention(q, k0, v).norm())
    # Dense steps: relative L2 (an RMS) within a few float32 roundings; cached ones within 10% of dense.
    assert max(errs[:3]) < tolerance(torch.float32, ulps=ROUNDING)["rtol"] and max(errs) < 0.1


def test_causal_budget_counts_visible_blocks_only():
    """Sparsity means the share of causally visible key blocks skipped, as for every method: each query block
    keeps floor(visible x keep) + 1 of its visible blocks, never a future one, and the reported density is over
    visible pairs (it used to count every block, future ones included: ~0.77 of the visible ones at 0.5)."""
    from sparsediff.kernels import causal_block_mask

    m = method(sparsity=0.5)
    q, k, v = qkv(n=512, nk=512)
    with denoising_step(5, 10):
        m(q, k, v, causal=True, layer="c")
    index, count = m.patterns()["c"]
    visible = causal_block_mask(32, 32, 512, 512, 16)
    mask = index_to_mask(index, count, 32)
    assert not bool((mask & ~visible).any())
    n_vis = visible.sum(-1)
    assert torch.equal(mask.sum(-1)[0, 0], torch.minimum(n_vis, (n_vis * 0.5).floor().long() + 1))
    assert m.stats["density"] == pytest.approx(float(mask.sum()) / (float(visible.sum()) * q.shape[1]))
    assert 0.5 < m.stats["density"] < 0.56  # the + 1 per row, not 0.77
