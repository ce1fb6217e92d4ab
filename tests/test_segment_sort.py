"""Norms + in-segment sort in one launch (and the run merge), against the row-norm kernel followed by a
stable descending argsort, bit for bit; the query features of the same launch against query_features.

Without a GPU the Triton kernels run under the interpreter (tests/conftest.py): shapes are small, and
RUN_ROWS is lowered so that short segments still take several runs and the merge."""

import math

import pytest
import torch

from sparsediff.kernels.block_stats import permute as permute_stats
from sparsediff.kernels.block_stats.permute import row_norms
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, segment_sort
from sparsediff.methods.ba_att import features as ba_features
from sparsediff.methods.ba_att.features import query_features
from sparsediff.methods.ba_att.scores import _select
from sparsediff.methods.ba_att.segment_sort import norm_segment_order
from sparsediff.methods.ba_att.sort import _sort_keys

# These tests pin down the pooled estimator's fused feature path, with the paper's per-row budget.
POOLED = dict(estimator="pooled", allocation="row", local_window=0, fine_block_size=None)


def _reference(k, seg):
    b, h, n, _ = k.shape
    nseg = math.ceil(n / seg)
    norms = row_norms(k, backend="triton", pad_to=nseg * seg)
    order = torch.sort(norms.view(b, h, nseg, seg), dim=-1, descending=True, stable=True).indices
    return order.view(b, h, nseg * seg), norms


def _keys(n, d, device, dtype=torch.bfloat16, heads=2, structured=True):
    k = torch.randn(1, heads, n, d, device=device).to(dtype)
    if structured:
        k[:, 0, 5:15] = k[:, 0, 20:21]  # equal norms: lower index first
        k[:, 1, n - 8:] = k[:, 1, n - 9:n - 8]  # ties inside the ragged last segment
        k[:, 1, [3, 40]] *= 30  # a few huge-norm keys
    return k


@pytest.mark.parametrize("n, seg, d, run", [
    (333, 100, 32, 256),  # one run per segment, ragged last segment
    (200, 200, 48, 256),  # one segment of 200 (padded to 256), non-power-of-two head dim
    (390, 390, 32, 64),  # 1560-like scaled down: 7 runs, the last of 6 rows, merged
    (1000, 390, 32, 64),  # three segments of 7 runs, ragged last segment
    (300, 129, 16, 32),  # runs of 64 (a run holds whole 64-row norm tiles), a last run of one row
    (70, 20, 16, 256),  # tiny segments: one 64-wide run each, ragged last one
])
@pytest.mark.parametrize("prefetch, skip_own", [(False, True), (True, False)])
def test_order_equals_norms_then_stable_argsort(n, seg, d, run, prefetch, skip_own, device, monkeypatch):
    # Both chunk schedules of the run programs and both merge searches give the same order.
    monkeypatch.setattr(segment_sort, "RUN_ROWS", run)
    monkeypatch.setattr(segment_sort, "PREFETCH_CHUNKS", prefetch)
    monkeypatch.setattr(segment_sort, "MERGE_SKIP_OWN", skip_own)
    k = _keys(n, d, device)
    ref, norms = _reference(k, seg)
    order, got_norms = norm_segment_order(k, seg, return_norms=True)
    assert order.dtype == torch.int64 and order.shape == ref.shape
    assert torch.equal(order, ref)
    assert torch.equal(got_norms, norms)


def test_nan_first_and_all_equal_segment(device, monkeypatch):
    monkeypatch.setattr(segment_sort, "RUN_ROWS", 32)
    k = torch.randn(1, 2, 160, 16, device=device)
    k[0, 0, 7] = float("nan")  # torch's descending argsort puts NaN first
    k[0, 1, 80:] = 1.0  # one segment of equal norms: index order
    ref, _ = _reference(k, 80)
    assert torch.equal(norm_segment_order(k, 80), ref)
    assert int(ref[0, 0, 0]) == 7 and torch.equal(ref[0, 1, 80:], torch.arange(80, device=ref.device))


def test_strided_keys(device, monkeypatch):
    # Keys from a (B, N, H, D) layout, as a video model passes them.
    monkeypatch.setattr(segment_sort, "RUN_ROWS", 64)
    k = torch.randn(1, 150, 3, 32, device=device).to(torch.float16).transpose(1, 2)
    ref, _ = _reference(k, 100)
    assert torch.equal(norm_segment_order(k, 100), ref)
    assert torch.equal(norm_segment_order(k.contiguous(), 100), ref)


@pytest.mark.parametrize("run, bs, d, cols, warps", [
    (64, 32, 32, None, None), (256, 64, 32, None, None), (64, 128, 128, None, None),
    (64, 128, 128, 64, None), (64, 128, 128, 64, 8), (256, 64, 32, 16, None),  # column-split query tiles
])
def test_query_features_from_the_sort_launch_are_the_same_bits(run, bs, d, cols, warps, device, monkeypatch):
    monkeypatch.setattr(segment_sort, "RUN_ROWS", run)
    monkeypatch.setattr(ba_features, "TILE_COLS", cols)
    monkeypatch.setattr(ba_features, "TILE_WARPS", warps)
    monkeypatch.setattr(segment_sort, "PREFETCH_CHUNKS", cols is not None)
    k = _keys(300, d, device)
    q = torch.randn(1, 4, 250, d, device=device).to(torch.bfloat16)  # GQA, ragged last query block
    q[:, 1] += 3.0
    order, feats = norm_segment_order(k, 150, q=q, block_size=bs, scale=0.17, c=0.0072)
    assert torch.equal(order, _reference(k, 150)[0])
    assert torch.equal(feats, query_features(q, bs, 0.17, 0.0072))


def test_small_head_dim_keeps_the_query_features_out(device, monkeypatch):
    # 8-warp query tiles (128 x 128) next to 64 x 16 norm tiles: the launch is not fused (None); 4-warp
    # column-split query tiles share the norm kernel's warps, so they are fused.
    k = _keys(200, 16, device)
    q = torch.randn(1, 2, 200, 128, device=device)
    monkeypatch.setattr(ba_features, "TILE_COLS", None)
    order, feats = norm_segment_order(k, 100, q=q, block_size=128)
    assert feats is None and torch.equal(order, _reference(k, 100)[0])
    monkeypatch.setattr(ba_features, "TILE_COLS", 64)
    order, feats = norm_segment_order(k, 100, q=q, block_size=128, scale=0.2, c=0.01)
    assert torch.equal(order, _reference(k, 100)[0]) and torch.equal(feats, query_features(q, 128, 0.2, 0.01))


def test_sort_keys_and_selection_with_fused_query_features(device, monkeypatch):
    monkeypatch.setattr(segment_sort, "RUN_ROWS", 64)
    q, k, v = (torch.randn(1, h, 330, 32, device=device) for h in (4, 2, 2))
    cfg = BAAttConfig(**POOLED, sparsity=0.6, block_size=32, min_seq_len=0)
    scale = 1 / math.sqrt(32)
    fused = _sort_keys(k, v, segment=130, start=3, block_size=32, backend="triton",
                       query=(q, scale, cfg.beta * scale * scale / 2))
    monkeypatch.setattr(segment_sort, "MAX_FUSED_SEGMENT", 0)  # the norm kernel + torch argsort path
    old = _sort_keys(k, v, segment=130, start=3, block_size=32, backend="triton")
    assert fused[4] is not None and all(torch.equal(a, b) for a, b in zip(fused[:4], old))
    ref = _select(q, old[0], cfg, k_stats=old[3], sorted_keys=True, backend="triton")
    got = _select(q, fused[0], cfg, k_stats=fused[3], sorted_keys=True, backend="triton", q_features=fused[4])
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("segment", [130, 256])
def test_method_plan_equals_the_unfused_plan(segment, device, monkeypatch):
    # On CUDA the plan takes the fused launch; the unfused plan is the previous path (norm kernel, sort,
    # selector's own query features). On CPU both are the PyTorch path.
    q, k, v = (torch.randn(1, 2, 400, 32, device=device) for _ in range(3))
    m = BAAttMethod(BAAttConfig(**POOLED, sparsity=0.5, block_size=32, min_seq_len=0, sort_segment=segment))
    new = m.plan(q, k, v, global_tokens=5)
    monkeypatch.setattr(segment_sort, "FUSE_QUERY_FEATURES", False)
    monkeypatch.setattr(segment_sort, "MAX_FUSED_SEGMENT", 0)
    old = m.plan(q, k, v, global_tokens=5)
    assert all(torch.equal(a, b) for a, b in zip(new[:5], old[:5]))


def _block_structured(b, h, n, d, bs, device, spread):
    # Every block gets its own offset direction: block scores far apart, so selections cannot flip on
    # float32 rounding; plus noise and a few huge-norm keys.
    nb = math.ceil(n / bs)
    offs = torch.randn(b, h, nb, d, device=device) * spread
    x = torch.randn(b, h, nb * bs, d, device=device) + offs.repeat_interleave(bs, dim=2)
    return x[:, :, :n].contiguous()


def test_layouts_keep_the_same_blocks_on_structured_inputs(device, monkeypatch):
    # Column-split query / gather tiles reduce in another order (other float32 bits, checked against
    # float64 in test_permute_stats); on inputs whose block scores are well separated the plan keeps
    # exactly the blocks of the whole-row layout, and the permutation and sorted K, V do not change.
    monkeypatch.setattr(segment_sort, "RUN_ROWS", 64)
    q = _block_structured(1, 4, 520, 64, 64, device, 1.5).to(torch.bfloat16)
    k = _block_structured(1, 2, 520, 64, 64, device, 1.5).to(torch.bfloat16)
    v = torch.randn(1, 2, 520, 64, device=device).to(torch.bfloat16)
    m = BAAttMethod(BAAttConfig(**POOLED, sparsity=0.5, block_size=64, min_seq_len=0, sort_segment=200))
    monkeypatch.setattr(ba_features, "TILE_COLS", None)
    monkeypatch.setattr(permute_stats, "GATHER_COLS", None)
    ref = m.plan(q, k, v, global_tokens=3)
    for cols in (32, 16):
        monkeypatch.setattr(ba_features, "TILE_COLS", cols)
        monkeypatch.setattr(permute_stats, "GATHER_COLS", cols)
        got = m.plan(q, k, v, global_tokens=3)
        assert all(torch.equal(a, b) for a, b in zip(got[:5], ref[:5]))


def test_errors():
    k = torch.randn(1, 2, 50, 16)
    with pytest.raises(ValueError, match="seg must be"):
        norm_segment_order(k, segment_sort.MAX_FUSED_SEGMENT + 1)
    with pytest.raises(ValueError, match="seg must be"):
        norm_segment_order(k, 0)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        norm_segment_order(k[0], 10)
    with pytest.raises(ValueError, match="power of two"):
        norm_segment_order(k, 10, q=torch.randn(1, 2, 50, 16), block_size=24)
