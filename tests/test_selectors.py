"""Every registered selector returns a valid index form, honours budgets, sinks, diagonal and causality;
baseline scorers match naive references; BlockSparseMethod runs any selector."""

import math

import pytest
import torch

from sparsediff.kernels import index_to_mask
from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref
from sparsediff.kernels.masks import causal_block_mask
from sparsediff.methods import available_selectors, get_selector, register_selector
from sparsediff.methods.ba_att import select_blocks
from sparsediff.methods.baselines import xattention_scores
from sparsediff.methods.block_select import select_from_scores
from sparsediff.methods.block_sparse import BlockSparseConfig, BlockSparseMethod, run_selector
from sparsediff.methods.dense import dense_attention
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance

BS = 32
SELECTORS = ["ba_att", "block_mean", "fixed", "xattention", "oracle"]

# The pooled estimator with the paper's per-row budget and no window: what these tests pin down.
POOLED = dict(estimator="pooled", allocation="row", local_window=0)


def _clustered(n=384, d=32, h=2):
    # Keys scattered around 4 centres; queries in runs of one centre.
    centres = torch.randn(h, 4, d) * 1.5
    q_lab = torch.randint(4, (n // 64,)).repeat_interleave(64)
    k_lab = torch.randint(4, (n,))
    q = centres[:, q_lab] + 0.3 * torch.randn(h, n, d)
    k = centres[:, k_lab] + 0.3 * torch.randn(h, n, d)
    return q[None], k[None], torch.randn(1, h, n, d)


def test_all_builtin_selectors_registered():
    assert set(SELECTORS) <= set(available_selectors())


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("causal", [False, True])
def test_index_form_is_valid(name, causal):
    nq, nk = 200, 300
    q, k = torch.randn(1, 4, nq, 32), torch.randn(1, 2, nk, 32)
    cfg = BlockSparseConfig(selector=name, sparsity=0.6, block_size=BS)
    index, count = get_selector(name)(q, k, cfg, causal=causal)
    nqb, nkb = math.ceil(nq / BS), math.ceil(nk / BS)
    assert index.dtype == count.dtype == torch.int32
    assert index.shape[:3] == (1, 4, nqb) and count.shape == (1, 4, nqb)
    slot = torch.arange(index.shape[-1])
    valid = slot < count[..., None].long()
    assert bool(((index >= 0) & (index < nkb) | ~valid).all())
    assert bool((index[~valid] == 0).all())  # padding is 0
    # Ascending and unique in the valid slots.
    diffs = index[..., 1:] - index[..., :-1]
    assert bool(((diffs > 0) | ~valid[..., 1:]).all())
    mask = index_to_mask(index, count, nkb)
    visible = causal_block_mask(nqb, nkb, nq, nk, BS) if causal else torch.ones(nqb, nkb, dtype=torch.bool)
    assert not bool((mask & ~visible).any())
    assert bool(mask[..., 0].all())  # sink block
    n_vis = visible.sum(-1)
    budget = torch.ceil(0.4 * n_vis.double() - 1e-9).long()
    assert bool((count.long() >= torch.minimum(budget, n_vis)).all())
    if name != "fixed":  # fixed also forces the last key block
        assert bool((count.long() <= torch.maximum(budget, torch.full_like(budget, 3))).all())


def test_block_mean_is_ba_att_with_beta_zero_and_no_outliers():
    q, k, _ = _clustered()
    cfg = BlockSparseConfig(selector="block_mean", sparsity=0.5, block_size=BS)
    a = get_selector("block_mean")(q, k, cfg)
    from sparsediff.methods.ba_att import BAAttConfig

    b = select_blocks(q, k, BAAttConfig(**POOLED, sparsity=0.5, block_size=BS, beta=0.0, outlier_keys=0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_xattention_scores_match_naive_antidiagonals():
    stride, bs, n, d = 4, 16, 70, 8
    q, k = torch.randn(1, 2, n, d, dtype=torch.float64), torch.randn(1, 1, n, d, dtype=torch.float64)
    got = xattention_scores(q, k, block_size=bs, stride=stride, scale=0.5).exp()
    nb = math.ceil(n / bs)
    qp = torch.nn.functional.pad(q, (0, 0, 0, nb * bs - n))
    kp = torch.nn.functional.pad(k, (0, 0, 0, nb * bs - n))
    rows = nb * bs // stride
    for h in range(2):
        sampled = torch.zeros(rows, rows, dtype=torch.float64)
        for a in range(rows):
            for c in range(rows):
                # Anti-diagonal of the stride x stride tile (a, c): query S*a + S-1-i with key S*c + i.
                sampled[a, c] = sum(qp[0, h, stride * a + stride - 1 - i] @ kp[0, 0, stride * c + i]
                                    for i in range(stride))
        logits = sampled * 0.5 / stride
        logits[:, torch.arange(rows) * stride >= n] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        per = bs // stride
        want = probs.view(nb, per, nb, per).sum(dim=(1, 3)) / per
        # float32 scores of float64 inputs, relative (the masses span orders): the float32 reduction level.
        torch.testing.assert_close(got[0, h].double(), want, **tolerance(torch.float32, magnitude=0.0))


def test_fixed_keeps_a_window_around_the_diagonal():
    q, k = torch.randn(1, 1, 512, 16), torch.randn(1, 1, 512, 16)
    cfg = BlockSparseConfig(selector="fixed", sparsity=0.75, block_size=BS, keep_sinks=False)
    mask = index_to_mask(*get_selector("fixed")(q, k, cfg), 16)[0, 0]
    for i in range(2, 14):
        kept = mask[i].nonzero().flatten().tolist()
        assert i in kept and 15 in kept
        window = [j for j in kept if j != 15]
        assert max(window) - min(window) == len(window) - 1  # contiguous around i


def test_oracle_recall_bounds_every_selector():
    q, k, v = _clustered()
    lse_dense = dense_attention(q, k, v, return_lse=True)[1]
    recall = {}
    for name in SELECTORS:
        method = BlockSparseMethod(selector=name, sparsity=0.5, block_size=BS, min_seq_len=0)
        plan = method.plan(q, k, v)
        _, lse = block_sparse_attention_ref(q, k, v, plan.block_index, plan.block_count, block_size=BS)
        recall[name] = torch.exp(lse - lse_dense).mean().item()
    assert all(recall["oracle"] >= r - tolerance(torch.float32, ulps=ROUNDING)["atol"] for r in recall.values())
    assert recall["oracle"] > 0.6


@pytest.mark.parametrize("name", SELECTORS)
def test_block_sparse_method_at_sparsity_zero_is_dense(name):
    q, k, v = torch.randn(1, 4, 150, 32), torch.randn(1, 2, 260, 32), torch.randn(1, 2, 260, 32)
    method = BlockSparseMethod(selector=name, sparsity=0.0, block_size=BS, min_seq_len=0)
    for causal in (False, True):
        dense = lambda q, k, v, causal=causal: dense_attention(q, k, v, causal=causal)
        assert_close_as_pytorch(method(q, k, v, causal=causal), dense, q, k, v)


@register_selector("_test_first_block_only")
def _first_block_only(q, k, config, *, causal=False):
    nqb = math.ceil(q.shape[2] / config.block_size)
    return torch.zeros(1, 1, nqb, 1, dtype=torch.int32), torch.ones(1, 1, nqb, dtype=torch.int32)


def test_global_tokens_added_for_selectors_without_the_keyword():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    cfg = BlockSparseConfig(selector="_test_first_block_only", block_size=BS)
    index, count = run_selector(cfg.selector, q, k, cfg, global_tokens=70)
    mask = index_to_mask(index, count, 8)
    assert bool(mask[..., :3].all())  # key blocks holding tokens 0-69
    assert bool(mask[:, :, :3].all())  # global query blocks see everything
    assert not bool(mask[:, :, 3:, 3:].any())  # nothing else added


def test_select_from_scores_picks_top_blocks():
    scores = torch.randn(2, 3, 5, 10)
    index, count = select_from_scores(scores, nq=5 * BS, nk=10 * BS, block_size=BS, density=0.3,
                                      keep_sinks=False, keep_diagonal=False)
    assert bool((count == 3).all())
    top = scores.topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(index.long(), top)
