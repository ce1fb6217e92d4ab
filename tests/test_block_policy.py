"""Budget policies of block selection: global allocation at a mean density, local window, hybrid top-k + top-p,
per-head densities, the histogram threshold, and per-layer budgets from a calibration file."""

import json
import math

import pytest
import torch

from sparsediff.kernels import index_to_mask
from sparsediff.methods import make_method
from sparsediff.methods.block_select import layout, mass_threshold, select_from_scores
from sparsediff.methods.budgets import LayerBudgets

BACKENDS = ["torch", "triton"]


def _scores(b=2, h=3, nqb=8, nkb=8, spread=None):
    s = torch.randn(b, h, nqb, nkb) * 2
    if spread is not None:  # head `spread` has flat scores: its mass is spread over every block
        s[:, spread] = 0.01 * torch.randn(b, nqb, nkb)
    return s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [0.3, 0.6])
def test_global_allocation_meets_the_mean_density(backend, causal, density):
    bs, n = 16, 128
    scores = _scores(spread=1)
    index, count = select_from_scores(scores, nq=n, nk=n, block_size=bs, density=density, causal=causal,
                                      allocation="global", local_window=0, backend=backend)
    lay = layout(n, n, bs, scores.device, causal=causal, density=density)
    kept = count.sum(dim=(1, 2))
    # Each batch element keeps its budget over all heads (ties in the threshold may add one or two), or only
    # the forced blocks when they alone exceed it.
    want = max(lay.total, int(lay.n_forced.sum())) * 3
    assert bool(((kept >= want) & (kept <= want + 2)).all()), (kept, want)
    mask = index_to_mask(index, count, 8)
    assert not bool((mask & ~lay.visible).any()) and bool(mask[..., lay.forced.expand_as(mask)].all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_allocation_keeps_the_largest_masses(backend):
    bs, n = 16, 96
    scores = _scores(b=1, h=2, nqb=6, nkb=6)
    index, count = select_from_scores(scores, nq=n, nk=n, block_size=bs, density=0.5, allocation="global",
                                      keep_sinks=False, keep_diagonal=False, backend=backend)
    probs = torch.softmax(scores, -1)
    kept = index_to_mask(index, count, 6)
    assert probs[kept].min() >= probs[~kept].max()


def test_density_one_keeps_everything_visible():
    scores = torch.zeros(1, 2, 8, 8)
    scores[..., 3] = -1e4  # mass ~0: kept anyway when everything is asked for
    _, count = select_from_scores(scores, nq=128, nk=128, block_size=16, density=1.0, causal=True,
                                  allocation="global")
    assert count[0, 0].tolist() == list(range(1, 9))


@pytest.mark.parametrize("causal", [False, True])
def test_local_window_forces_neighbour_blocks(causal):
    bs, n = 16, 160
    scores = torch.zeros(1, 1, 10, 10)
    scores[..., 5] = 50.0  # all mass on one column: the window is the only reason to keep neighbours
    index, count = select_from_scores(scores, nq=n, nk=n, block_size=bs, density=0.1, causal=causal,
                                      local_window=bs, keep_sinks=False, backend="torch")
    mask = index_to_mask(index, count, 10)[0, 0]
    for i in range(10):
        assert mask[i, i] and (i == 0 or mask[i, i - 1])
        if not causal and i < 9:
            assert mask[i, i + 1]
        if causal and i < 9:
            assert not mask[i, i + 1]
    assert not bool(mask[0, 2:].any()) if causal else True


def test_window_in_tokens_reaches_as_far_as_it_says():
    lay = layout(256, 256, 16, "cpu", causal=True, keep_sinks=False, local_window=40)
    # Query block 10 starts at position 160: keys down to 120 are in its window, i.e. blocks 7..10.
    assert lay.forced[10].nonzero().flatten().tolist() == [7, 8, 9, 10]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_keeps_the_larger_of_top_k_and_top_p(backend):
    bs, n = 16, 128
    scores = _scores(b=1, h=2)
    kw = dict(nq=n, nk=n, block_size=bs, keep_sinks=False, keep_diagonal=False, backend=backend)
    _, k_count = select_from_scores(scores, density=0.25, **kw)
    _, p_count = select_from_scores(scores, mass=0.8, **kw)
    _, both = select_from_scores(scores, density=0.25, mass=0.8, **kw)
    assert torch.equal(both, torch.maximum(k_count, p_count))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_densities(backend):
    scores = _scores(b=1, h=3)
    _, count = select_from_scores(scores, nq=128, nk=128, block_size=16, density=(0.25, 0.5, 1.0),
                                  keep_sinks=False, keep_diagonal=False, backend=backend)
    assert count[0, :, 0].tolist() == [2, 4, 8]
    with pytest.raises(ValueError, match="per-head densities"):
        select_from_scores(scores, nq=128, nk=128, block_size=16, density=(0.5, 0.5))


@pytest.mark.parametrize("want", [1, 17, 500, 999])
def test_mass_threshold_is_the_wanted_largest(want, device):
    g = torch.Generator().manual_seed(want)
    vals = torch.softmax(torch.randn(3, 1000, generator=g, device="cpu") * 4, -1)
    vals[:, :100] = -1.0  # not candidates
    vals[0, 200:210] = 0.0  # no mass
    vals = vals.to(device)
    want = min(want, 900)
    t = mass_threshold(vals, want)
    assert torch.equal(t, vals.double().sort(dim=-1, descending=True).values[:, want - 1].to(t.dtype))
    n = ((vals >= t[:, None]) & (vals > 0)).sum(-1)  # blocks without mass are never kept anyway
    positive = (vals > 0).sum(-1)
    assert torch.equal(n, positive.clamp(max=want))  # distinct softmax values: no ties


def test_layer_budgets_file_round_trip_and_errors(tmp_path):
    table = LayerBudgets({"a": {"density": 0.3, "heads": [0.2, 0.4]}, "b": 0.6}, default_density=0.5)
    path = tmp_path / "budgets.json"
    table.save(path)
    loaded = LayerBudgets.load(path)
    assert loaded.density("a", default=0.9) == 0.3 and loaded.density("a", default=0.9, heads=True) == (0.2, 0.4)
    assert loaded.density("b", default=0.9) == 0.6 and loaded.density("zzz", default=0.9) == 0.5
    assert json.loads(path.read_text())["format"] == "sparsediff-budgets/1"
    for bad, match in [({"layers": {}}, "non-empty"), ({"layers": {"a": {"density": 1.5}}}, r"\(0, 1\]"),
                       ({"layers": {"a": {}}}, "needs a 'density'"), ({"format": "x", "layers": {"a": 0.5}}, "format")]:
        with pytest.raises(ValueError, match=match):
            LayerBudgets.load(bad)
    with pytest.raises(FileNotFoundError, match="sparsediff calibrate"):
        LayerBudgets.load(tmp_path / "missing.json")


@pytest.mark.parametrize("allocation", ["row", "global"])
def test_per_layer_budgets_reach_the_selection(allocation):
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    budgets = {"layers": {"dense.layer": {"density": 1.0, "heads": [1.0, 1.0]},
                          "sparse.layer": {"density": 0.25, "heads": [0.25, 0.25]}}}
    method = make_method("ba_att", sparsity=0.5, block_size=32, min_seq_len=0, budgets=budgets,
                         allocation=allocation, local_window=0)
    kept = {}
    for layer in ("dense.layer", "sparse.layer", "other.layer"):
        method.reset()
        plan = method.plan(q, k, v, causal=False, layer=layer)
        kept[layer] = int(plan.block_count.sum())
    assert kept["dense.layer"] == 2 * 8 * 8
    assert kept["sparse.layer"] < kept["other.layer"] < kept["dense.layer"]
    assert math.isclose(kept["other.layer"] / 128, 0.5, abs_tol=0.07)
