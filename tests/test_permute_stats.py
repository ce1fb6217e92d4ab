"""Fused row gather + block statistics, row norms and the top-k selection kernel against PyTorch references.

Without a GPU the Triton kernels run under the interpreter (tests/conftest.py)."""

import dataclasses

import pytest
import torch

from sparsediff.kernels import block_stats
from sparsediff.kernels.block_stats.permute import gather_rows, gather_rows_with_stats, row_norms
from sparsediff.kernels.block_topk import block_topk
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, select_blocks, sort_keys
from sparsediff.methods.ba_att.features import features_from_moments, query_features, segment_order
from sparsediff.methods.ba_att.scores import _select
from sparsediff.methods.ba_att.sort import _sort_keys
from sparsediff.methods.block_select import layout, select_from_scores
from sparsediff.testing.tolerance import ROUNDING, assert_within_baseline, tolerance

# Block statistics and features against float64 (or PyTorch's float32), elementwise: their magnitudes span
# orders (large means, huge rows), and float32 sums over one block's rows stay within a few roundings.
STATS_TOL = tolerance(torch.float32, ulps=ROUNDING)

# These tests pin down the pooled estimator's fused feature path, with the paper's per-row budget.
POOLED = dict(estimator="pooled", allocation="row", local_window=0, fine_block_size=None)


def _perms(b, h, n):
    return torch.stack([torch.stack([torch.randperm(n) for _ in range(h)]) for _ in range(b)])


def _explicit(x, perm):
    return x.gather(2, perm[..., None].expand_as(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, n, d, bs", [
    (torch.float32, 300, 32, 64),  # ragged tail
    (torch.bfloat16, 256, 80, 32),  # non-power-of-two head dim
    (torch.float16, 97, 64, 128),  # one ragged block
])
def test_gather_with_stats_matches_explicit_gather(backend, dtype, n, d, bs, device):
    if backend == "torch":
        device = "cpu"
    k, v = torch.randn(2, 3, n, d, dtype=dtype, device=device), torch.randn(2, 3, n, d, dtype=dtype, device=device)
    perm = _perms(2, 3, n).to(device)
    ks, vs, st = gather_rows_with_stats(k, v, perm, bs, backend=backend)
    ref_k, ref_v = _explicit(k, perm), _explicit(v, perm)
    assert torch.equal(ks, ref_k) and torch.equal(vs, ref_v) and ks.is_contiguous()
    for got, want in zip(st, _moments64(ref_k, bs)):
        torch.testing.assert_close(got.double().cpu(), want, **STATS_TOL)


def test_gather_structured_non_contiguous_int32_perm(device):
    # Keys with a few huge-norm rows, from a (B, N, H, D) layout; perm = norm sort within segments.
    k = torch.randn(1, 200, 2, 16).transpose(1, 2)
    k[:, :, [3, 77, 150]] *= 20
    v = torch.randn(1, 200, 2, 16).transpose(1, 2)
    ref_k, ref_v, perm = sort_keys(k.contiguous(), v.contiguous(), segment=64, start=5)
    k, v, ref_k, ref_v, perm = (t.to(device) for t in (k, v, ref_k, ref_v, perm))
    ks, vs, st = gather_rows_with_stats(k, v, perm.to(torch.int32), 32, backend="triton")
    assert torch.equal(ks, ref_k) and torch.equal(vs, ref_v)
    for got, want in zip(st, _moments64(ref_k, 32)):
        torch.testing.assert_close(got.double().cpu(), want, **STATS_TOL)


def test_gather_without_stats_and_errors(device):
    k, v = torch.randn(1, 2, 50, 16, device=device), torch.randn(1, 2, 50, 16, device=device)
    perm = _perms(1, 2, 50).to(device)
    ks, vs, st = gather_rows_with_stats(k, v, perm, 16, backend="triton", with_stats=False)
    assert st is None and torch.equal(ks, _explicit(k, perm)) and torch.equal(vs, _explicit(v, perm))
    assert all(torch.equal(a, b) for a, b in zip(gather_rows(k, v, perm), (ks, vs)))
    with pytest.raises(ValueError, match="perm"):
        gather_rows_with_stats(k, v, perm[..., :10], 16)
    with pytest.raises(ValueError, match="power-of-two"):
        gather_rows_with_stats(k, v, perm, 24, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_row_norms(backend, device):
    x = torch.randn(2, 3, 130, 48, dtype=torch.bfloat16, device=device)
    if backend == "torch":
        x = x.cpu()
    assert_within_baseline(row_norms(x, backend=backend), x.double().norm(dim=-1), x.float().norm(dim=-1))


def test_sort_keys_with_stats_equals_sorted_block_stats():
    k, v = torch.randn(1, 2, 333, 32), torch.randn(1, 2, 333, 32)
    ks, vs, perm, st = _sort_keys(k, v, segment=100, start=7, block_size=32, backend="torch")
    ref_k, ref_v, ref_perm = sort_keys(k, v, segment=100, start=7)
    assert torch.equal(perm, ref_perm) and torch.equal(ks, ref_k) and torch.equal(vs, ref_v)
    assert torch.equal(perm[..., :7], torch.arange(7).expand(1, 2, 7))
    ref = block_stats(ks, 32)
    assert all(torch.equal(a, b) for a, b in zip(st, ref))  # the same PyTorch path


def test_plan_reuses_sorted_stats_gqa():
    # The method's internal path (stats from the gather) selects what the public selector selects on
    # the sorted keys; GQA: 4 query heads on 2 kv heads.
    q, k, v = torch.randn(1, 4, 320, 32), torch.randn(1, 2, 320, 32), torch.randn(1, 2, 320, 32)
    cfg = BAAttConfig(**POOLED, sparsity=0.6, block_size=32, min_seq_len=0, sort_segment=64)
    plan = BAAttMethod(cfg).plan(q, k, v)
    # The method knows it sorted the keys (automatic outlier_keys: off); the public selector takes keys as
    # given (automatic: on), so it is told.
    ref_index, ref_count = select_blocks(q, plan.k, dataclasses.replace(cfg, outlier_keys=0))
    assert torch.equal(plan.block_index, ref_index) and torch.equal(plan.block_count, ref_count)


@pytest.mark.parametrize("nq, nk, causal, density, gt", [
    (320, 320, False, 0.3, 0), (300, 300, True, 0.5, 0), (200, 456, True, 0.2, 40), (1000, 1000, False, 0.5, 70),
])
def test_block_topk_matches_torch_selection(nq, nk, causal, density, gt, device):
    bs = 32
    scores = torch.randn(2, 3, -(-nq // bs), -(-nk // bs), device=device)
    kw = dict(nq=nq, nk=nk, block_size=bs, density=density, causal=causal, global_tokens=gt)
    ref = select_from_scores(scores, backend="torch", **kw)
    out = select_from_scores(scores, backend="triton", **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_block_topk_extra_forced_ties_and_no_log_count(device):
    bs, nq, nk = 16, 96, 160
    scores = torch.randint(0, 3, (1, 2, 6, 10), device=device).float()  # many ties
    extra = torch.zeros(6, 10, dtype=torch.bool, device=device)
    extra[:, 7] = True
    kw = dict(nq=nq, nk=nk, block_size=bs, density=0.25, extra_forced=extra, weight_by_count=False)
    ref_index, ref_count = select_from_scores(scores, backend="torch", **kw)
    index, count = select_from_scores(scores, backend="triton", **kw)
    assert torch.equal(count, ref_count)
    for row in range(6):
        for h in range(2):
            c = int(count[0, h, row])
            got, want = index[0, h, row, :c].long().cpu(), ref_index[0, h, row, :c].long().cpu()
            assert bool((got[1:] > got[:-1]).all()) and {0, 7} <= set(got.tolist())
            # Same multiset of kept scores (ties may pick different ids), zeros after the count.
            s = scores[0, h, row].cpu()
            assert torch.equal(s[got.cpu()].sort().values, s[want.cpu()].sort().values)
            assert not bool(index[0, h, row, c:].any())
    lay = layout(nq, nk, bs, device, density=0.25)
    with pytest.raises(ValueError):
        block_topk(scores, lay.visible[:3], lay.forced, lay.budget, lay.max_kept)


@pytest.mark.parametrize("dtype, n, d, bs, programs", [
    (torch.float32, 300, 48, 64, 3),  # ragged tail, non-power-of-two head dim, strided tile loop
    (torch.bfloat16, 256, 32, 32, None),  # one tile per program
])
def test_query_and_key_features_match_block_stats(dtype, n, d, bs, programs, device):
    x = torch.randn(2, 3, n, d, device=device).to(dtype)
    x[:, 1] += 4.0  # large means: the two-pass variance must not cancel
    got_q = query_features(x, bs, 0.125, 0.01, programs=programs).cpu()
    got_k = query_features(x, bs, programs=programs).cpu()
    torch.testing.assert_close(got_q, _features32(x, bs, 0.125, 0.01), **STATS_TOL)
    torch.testing.assert_close(got_k, _features32(x, bs), **STATS_TOL)


def test_segment_order_is_stable_descending_argsort(device):
    norms = torch.rand(2, 3, 4 * 100, device=device)
    norms[..., -30:] = -1.0  # padding of a ragged last segment
    norms[0, 0, :10] = 0.5  # ties keep index order
    norms[1, 2, 100:200] = 0.0
    ref = torch.sort(norms.view(2, 3, 4, 100), dim=-1, descending=True, stable=True).indices.view(2, 3, 400)
    assert torch.equal(segment_order(norms, 100), ref)


@pytest.mark.parametrize("n, seg, start, structured", [
    (333, 100, 7, False), (512, 128, 0, True), (200, 300, 0, False), (700, 300, 5, False),  # last: torch argsort
])
def test_fused_sort_path_equals_torch_path(n, seg, start, structured, device):
    k, v = torch.randn(1, 2, n, 32, device=device), torch.randn(1, 2, n, 32, device=device)
    if structured:
        k[:, :, [3, 77, 150, 400]] *= 20  # a few huge-norm keys
    fast = _sort_keys(k, v, segment=seg, start=start, block_size=32, backend="triton")
    ref = _sort_keys(k.cpu(), v.cpu(), segment=seg, start=start, block_size=32, backend="torch")
    for got, want in zip(fast[:3], ref[:3]):
        assert torch.equal(got.cpu(), want)
    assert fast[2].dtype == torch.int64
    torch.testing.assert_close(fast[3].cpu(), features_from_moments(ref[3].mean, ref[3].var), **STATS_TOL)


@pytest.mark.parametrize("beta, causal", [(0.5, False), (0.0, False), (0.5, True)])
def test_fused_selection_equals_torch_selection_gqa(beta, causal, device):
    q, k, v = torch.randn(1, 4, 330, 32), torch.randn(1, 2, 330, 32), torch.randn(1, 2, 330, 32)
    cfg = BAAttConfig(**POOLED, sparsity=0.6, block_size=32, min_seq_len=0, beta=beta)
    ks, _, _, right = _sort_keys(k.to(device), v.to(device), segment=64, block_size=32, backend="triton")
    ref = _select(q.cpu(), ks.cpu(), cfg, causal=causal, backend="torch")
    for stats in (right, None):  # features from the gather, or computed from k by the selector
        index, count = _select(q.to(device), ks, cfg, causal=causal, k_stats=stats, backend="triton")
        assert torch.equal(index.cpu(), ref[0]) and torch.equal(count.cpu(), ref[1])


def test_row_norms_padded(device):
    x = torch.randn(1, 2, 70, 24, device=device)
    out = row_norms(x, backend="triton", pad_to=100)
    assert out.shape == (1, 2, 100) and bool((out[..., 70:] == -1).all())
    assert_within_baseline(out[..., :70].cpu(), x.cpu().double().norm(dim=-1), x.cpu().norm(dim=-1))
    assert torch.equal(row_norms(x.cpu(), backend="torch", pad_to=100)[..., 70:],
                       torch.full((1, 2, 30), -1.0, device="cpu"))


@pytest.mark.parametrize("dtype, n, d, bs", [
    (torch.bfloat16, 520, 128, 128),  # ragged tail, the 128x128 tile of the GPU profile
    (torch.float32, 300, 48, 64),  # non-power-of-two head dim
    (torch.float16, 97, 64, 32),
])
def test_feature_grids_give_the_same_bits(dtype, n, d, bs, device, monkeypatch):
    # The persistent pipelined grid (any size, any depth) and the one-tile-per-program grid share one
    # tile layout, so their features are the same bits.
    from sparsediff.methods.ba_att import features as ba_features

    x = torch.randn(2, 3, n, d, device=device).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    x[:, 1] += 3.0
    monkeypatch.setattr(ba_features, "PROGRAMS_PER_SM", None)  # the default
    refs = [query_features(x, bs, scale, c) for scale, c in ((None, None), (0.125, 0.01))]
    for per_sm, stages in ((1, 1), (2, 3), (3, 4)):
        monkeypatch.setattr(ba_features, "PROGRAMS_PER_SM", per_sm)
        monkeypatch.setattr(ba_features, "FEATURE_STAGES", stages)
        assert torch.equal(query_features(x, bs), refs[0])
        assert torch.equal(query_features(x, bs, 0.125, 0.01), refs[1])
        assert torch.equal(query_features(x, bs, 0.125, 0.01, programs=5), refs[1])


def test_sorted_gather_block_order_does_not_change_results(device, monkeypatch):
    from sparsediff.kernels.block_stats import permute as permute_stats
    from sparsediff.kernels.block_stats.permute import gather_sorted_segments

    k, v = torch.randn(2, 3, 300, 32, device=device), torch.randn(2, 3, 300, 32, device=device)
    norms = row_norms(k[:, :, 4:], backend="triton", pad_to=300)
    order = norms.view(2, 3, 3, 100).argsort(dim=-1, descending=True).view(2, 3, 300)
    monkeypatch.setattr(permute_stats, "GATHER_REVERSE", False)
    fwd = gather_sorted_segments(k, v, order, 100, 4, 64)
    assert torch.equal(fwd[0], _explicit(k, fwd[2])) and torch.equal(fwd[1], _explicit(v, fwd[2]))
    monkeypatch.setattr(permute_stats, "GATHER_REVERSE", True)
    rev = gather_sorted_segments(k, v, order, 100, 4, 64)
    assert all(torch.equal(a, b) for a, b in zip(rev, fwd))


def _moments64(x, bs):
    """float64 reference of block_stats: per-block mean, variance and mean row norm."""
    b, h, n, d = x.shape
    nb = -(-n // bs)
    xp = torch.nn.functional.pad(x.double().cpu(), (0, 0, 0, nb * bs - n))
    cnt = torch.full((nb,), float(bs), dtype=torch.float64, device="cpu")
    cnt[-1] = n - (nb - 1) * bs
    rows = torch.arange(nb * bs, device="cpu").view(nb, bs) < n
    xb = xp.view(b, h, nb, bs, d)
    mean = xb.sum(3) / cnt[:, None]
    var = ((xb - mean[:, :, :, None]) * rows[..., None]).square().sum(3) / cnt[:, None]
    return mean, var, xb.norm(dim=-1).sum(3) / cnt


def _features64(x, bs, scale=None, c=None):
    """float64 reference of query_features / the gather's key features."""
    mean, var, _ = _moments64(x, bs)
    return features_from_moments(mean, var, scale, c)


def _features32(x, bs, scale=None, c=None):
    """PyTorch's float32 features."""
    st = block_stats(x.float().cpu(), bs, backend="torch")
    return features_from_moments(st.mean, st.var, scale, c)


@pytest.mark.parametrize("cols, warps", [(None, None), (64, None), (32, 8), (16, 2)])
@pytest.mark.parametrize("dtype, n, d, bs", [
    (torch.bfloat16, 300, 128, 128),  # ragged tail, the Wan tile
    (torch.float16, 97, 80, 32),  # one ragged block, non-power-of-two head dim
])
def test_feature_tile_layouts_against_float64(cols, warps, dtype, n, d, bs, device, monkeypatch):
    # Any column split / warp count: features within float32 rounding of a float64 reference, on inputs
    # with large means (two-pass variance) and a few huge rows; the grids of one layout agree bit for bit.
    from sparsediff.methods.ba_att import features as ba_features

    monkeypatch.setattr(ba_features, "TILE_COLS", cols)
    monkeypatch.setattr(ba_features, "TILE_WARPS", warps)
    x = torch.randn(1, 3, n, d, device=device)
    x[:, 1] += 4.0
    x[:, 2, [5, 60]] *= 30
    x = x.to(dtype)
    for scale, c in ((None, None), (0.09, 0.004)):
        want = _features64(x, bs, scale, c)
        got = query_features(x, bs, scale, c)
        torch.testing.assert_close(got.double().cpu(), want, **STATS_TOL)
        assert torch.equal(query_features(x, bs, scale, c, programs=3), got)


@pytest.mark.parametrize("cols, warps", [(None, None), (16, None), (8, 2)])
def test_sorted_gather_column_split(cols, warps, device, monkeypatch):
    # Column-split sorted gather: the same K, V, permutation; key features against float64.
    from sparsediff.kernels.block_stats import permute as permute_stats
    from sparsediff.kernels.block_stats.permute import gather_sorted_segments

    k, v = torch.randn(2, 3, 300, 24, device=device), torch.randn(2, 3, 300, 24, device=device)
    k[:, 1] += 5.0
    norms = row_norms(k[:, :, 4:], backend="triton", pad_to=300)
    order = norms.view(2, 3, 3, 100).argsort(dim=-1, descending=True).view(2, 3, 300)
    monkeypatch.setattr(permute_stats, "GATHER_COLS", None)
    monkeypatch.setattr(permute_stats, "GATHER_WARPS", None)
    ref = gather_sorted_segments(k, v, order, 100, 4, 64)
    monkeypatch.setattr(permute_stats, "GATHER_COLS", cols)
    monkeypatch.setattr(permute_stats, "GATHER_WARPS", warps)
    got = gather_sorted_segments(k, v, order, 100, 4, 64)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], ref[:3]))
    assert torch.equal(got[0], _explicit(k, got[2])) and torch.equal(got[1], _explicit(v, got[2]))
    torch.testing.assert_close(got[3].double().cpu(), _features64(got[0], 64), **STATS_TOL)
