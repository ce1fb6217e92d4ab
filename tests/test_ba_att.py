"""BA-Att: config checks, scores against a per-block reference, exactness at sparsity 0 (with and
without norm sorting), causal / global-token / GQA contracts, and the method API."""

import math

import pytest
import torch
from test_flashblock import assert_attention

from sparsediff.kernels import index_to_mask
from sparsediff.kernels.block_sparse.reference import (
    block_sparse_attention_ref,
    causal_token_mask,
)
from sparsediff.kernels.masks import causal_block_mask
from sparsediff.methods import make_method
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, ba_attention, ba_scores, select_blocks, sort_keys
from sparsediff.methods.block_select import diagonal_blocks
from sparsediff.methods.dense import dense_attention
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, assert_within_baseline, tolerance

BS = 32

# The pooled estimator with the paper's per-row budget and no window: what these tests pin down.
POOLED = dict(estimator="pooled", allocation="row", local_window=0)


def _qkv(b=1, hq=4, hkv=2, nq=300, nk=300, d=32, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


def _structured(n=512, d=32, h=2):
    # Local windows + a sink + a few stripes, scattered over the sequence.
    pos = torch.arange(n, dtype=torch.float64)
    freqs = (n / 8) ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2 - 1))
    ang = pos[:, None] * freqs
    a = torch.randn(h, 1, d // 2, 2, dtype=torch.float64) * 1.6

    def rot(x):
        x1, x2 = x[..., 0], x[..., 1]
        return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)

    q = rot(a + 0.3 * torch.randn(h, n, d // 2, 2, dtype=torch.float64))
    k = rot(a + 0.3 * torch.randn(h, n, d // 2, 2, dtype=torch.float64))
    u = torch.randn(d, dtype=torch.float64)
    u /= u.norm()
    q += 2 * u
    k[:, [0, 1, 97, 301]] += 3 * math.sqrt(d) * u
    v = torch.randn(h, n, d, dtype=torch.float64)
    return q[None].float(), k[None].float(), v[None].float()


def _on_plan(plan, causal=False):
    """PyTorch's attention over the plan's (sorted) keys and kept blocks, in the inputs' own dtype."""
    return lambda q, k, v: block_sparse_attention_ref(q, k, v, plan.block_index, plan.block_count, causal=causal,
                                                      block_size=BS, upcast=False)[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0.5, mass=1.5), "mass must lie"),
    (dict(estimator="means"), "estimator must be"),
    (dict(sample_rows=0), "sample_rows"),
    (dict(allocation="heads"), "allocation must be"),
    (dict(local_window=-1), "local_window"),
    (dict(sparsity=1.0), "sparsity must lie"),
    (dict(mass=0.0), "mass must lie"),
    (dict(beta=-1.0), "beta must be"),
    (dict(beta=float("nan")), "beta must be"),
    (dict(sort_segment=0), "sort_segment"),
    (dict(selector="nope"), "unknown selector"),
    (dict(block_size=100), "power of two"),
    (dict(stride=7), "stride"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BAAttConfig(**kwargs)


def test_config_defaults_and_make_method():
    cfg = BAAttConfig()
    assert (cfg.sparsity, cfg.mass, cfg.beta, cfg.norm_sort, cfg.block_size) == (0.5, None, 0.5, None, 128)
    # Keys are norm-sorted for the pooled estimator (the paper's), not for the sampled default.
    assert not cfg.sorts_keys and BAAttConfig.paper().sorts_keys and BAAttConfig(estimator="pooled").sorts_keys
    assert BAAttConfig(norm_sort=True).sorts_keys and not BAAttConfig(estimator="pooled", norm_sort=False).sorts_keys
    with pytest.raises(ValueError, match="norm_sort"):
        BAAttConfig(norm_sort="yes")
    assert BAAttConfig(mass=0.9).sparsity is None
    method = make_method("ba_att:0.8")
    assert isinstance(method, BAAttMethod) and method.config.sparsity == 0.8
    assert isinstance(make_method(BAAttConfig(beta=1.0)), BAAttMethod)


def test_scores_match_per_block_formula():
    q, k, _ = _qkv(hq=4, hkv=2, nq=100, nk=70, d=16, dtype=torch.float64)
    beta, scale = 0.7, 0.3
    got = ba_scores(q, k, block_size=BS, beta=beta, scale=scale, outlier_keys=0)
    want = torch.empty_like(got, dtype=torch.float64)
    for h in range(4):
        for i in range(math.ceil(100 / BS)):
            qb = q[0, h, i * BS:(i + 1) * BS]
            for j in range(math.ceil(70 / BS)):
                kb = k[0, h // 2, j * BS:(j + 1) * BS]
                mq, mk = qb.mean(0), kb.mean(0)
                vq, vk = qb.var(0, unbiased=False), kb.var(0, unbiased=False)
                var = (vq * mk**2 + mq**2 * vk + vq * vk).sum()
                want[0, h, i, j] = scale * mq @ mk + beta * scale**2 / 2 * var
    # float32 scores (block statistics are float32) of float64 inputs: a few roundings from the float64 formula.
    torch.testing.assert_close(got.double(), want, **tolerance(torch.float32, ulps=ROUNDING))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("norm_sort", [False, True])
def test_sparsity_zero_is_dense(dtype, causal, norm_sort):
    q, k, v = _qkv(nq=200, nk=330, dtype=dtype)  # GQA, Nq != Nk, ragged tails
    cfg = BAAttConfig(**POOLED, sparsity=0.0, block_size=BS, norm_sort=norm_sort, sort_segment=100)
    out, lse = ba_attention(q, k, v, cfg, return_lse=True, causal=causal)
    mask = causal_token_mask(200, 330) if causal else torch.ones(200, 330, dtype=torch.bool)
    # Tolerance follows the dtype: a small multiple of PyTorch's own low-precision error.
    assert_attention((out, lse), q, k, v, mask)


def test_sort_keys_is_a_segmentwise_permutation():
    k, v = torch.randn(2, 3, 250, 16), torch.randn(2, 3, 250, 16)
    ks, vs, perm = sort_keys(k, v, segment=64, start=10)
    assert torch.equal(perm[..., :10], torch.arange(10).expand(2, 3, 10))
    body = perm[..., 10:] - 10
    seg_of = torch.arange(240) // 64
    assert torch.equal(body // 64, seg_of.expand_as(body))  # nothing leaves its segment
    assert torch.equal(body.sort(-1).values, torch.arange(240).expand_as(body))
    norms = ks[..., 10:, :].norm(dim=-1)
    for s in range(0, 240, 64):
        seg = norms[..., s:s + 64]
        assert bool((seg[..., :-1] >= seg[..., 1:]).all())
    assert torch.equal(ks, k.gather(2, perm[..., None].expand_as(k)))
    assert torch.equal(vs, v.gather(2, perm[..., None].expand_as(v)))
    q = torch.randn(2, 3, 90, 16)
    # Permuted keys cost no more than PyTorch's own float32 error on the keys in order.
    assert_within_baseline(dense_attention(q, ks, vs), dense_attention(q.double(), k.double(), v.double()),
                           dense_attention(q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_output_matches_reference_on_plan(causal):
    q, k, v = _structured()
    method = BAAttMethod(sparsity=0.5, block_size=BS, min_seq_len=0, sort_segment=128, norm_sort=True)
    plan = method.plan(q, k, v, causal=causal)
    assert (plan.perm is None) == causal  # sorting is off under causal
    out = method(q, k, v, causal=causal)
    assert_close_as_pytorch(out, _on_plan(plan, causal), q, plan.k, plan.v)


def test_causal_never_selects_future_and_keeps_budget():
    q, k, _ = _qkv(nq=256, nk=384)
    cfg = BAAttConfig(**POOLED, sparsity=0.5, block_size=BS)
    index, count = select_blocks(q, k, cfg, causal=True)
    mask = index_to_mask(index, count, 12)
    visible = causal_block_mask(8, 12, 256, 384, BS)
    assert not bool((mask & ~visible).any())
    want = torch.ceil(0.5 * visible.sum(-1).double()).long().clamp(min=2)  # sink + diagonal forced
    assert torch.equal(count[0, 0].long(), torch.minimum(want, visible.sum(-1)))
    assert bool(mask[..., 0].all())  # sink
    assert bool((mask | ~diagonal_blocks(256, 384, BS)).all())  # diagonal


def test_global_tokens_rows_and_columns_always_attended():
    q, k, v = _qkv(nq=320, nk=320)
    cfg = BAAttConfig(**POOLED, sparsity=0.8, block_size=BS, keep_sinks=False, keep_diagonal=False)
    index, count = select_blocks(q, k, cfg, global_tokens=40)
    mask = index_to_mask(index, count, 10)
    assert bool(mask[..., :2].all())  # key blocks 0-1 hold tokens 0-39
    assert bool(mask[:, :, :2].all())  # query blocks 0-1 see every key block
    # With sorting, global tokens stay in front and the output still matches its reference.
    method = BAAttMethod(cfg.replace(sparsity=0.5, sort_segment="sequence"), min_seq_len=0)
    plan = method.plan(q, k, v, global_tokens=40)
    assert torch.equal(plan.perm[..., :40], torch.arange(40).expand(1, 2, 40))
    out = method(q, k, v, global_tokens=40)
    assert_close_as_pytorch(out, _on_plan(plan), q, plan.k, plan.v)


def test_sorting_needs_a_segment():
    """Without frame_size or sort_segment nothing is sorted (whole-sequence sorting is opt-in)."""
    q, k, v = _qkv(nq=320, nk=320)
    method = BAAttMethod(BAAttConfig(**POOLED, sparsity=0.5, block_size=BS), min_seq_len=0)
    assert method.plan(q, k, v).perm is None
    assert method.plan(q, k, v, frame_size=64).perm is not None
    assert method.plan(q, k, v, causal=True, frame_size=64).perm is None
    with pytest.raises(ValueError, match="sort_segment"):
        BAAttConfig(sort_segment="frames")


def test_mass_threshold_keeps_shortest_prefix():
    q, k, _ = _structured()
    cfg = BAAttConfig(**POOLED, mass=0.9, block_size=BS, keep_sinks=False, keep_diagonal=False)
    index, count = select_blocks(q, k, cfg)
    probs = torch.softmax(ba_scores(q, k, block_size=BS, beta=0.5), dim=-1)  # equal-sized blocks
    kept = index_to_mask(index, count, 16)
    kept_mass = (probs * kept).sum(-1)
    slack = tolerance(torch.float32)["atol"]  # float32 sums of probabilities, in another order than the selector's
    assert bool((kept_mass >= 0.9 - slack).all())
    # Dropping the smallest kept block must fall below the threshold (the set is minimal).
    smallest = probs.masked_fill(~kept, float("inf")).min(-1).values
    assert bool((kept_mass - smallest < 0.9 + slack).all())
    full = BAAttConfig(**POOLED, mass=1.0, block_size=BS)
    assert bool((select_blocks(q, k, full)[1] == 16).all())


def test_method_dense_fallback_and_beats_fixed_pattern():
    q, k, v = _structured()
    dense = dense_attention(q, k, v)
    short = BAAttMethod(sparsity=0.9, block_size=BS)  # min_seq_len 1024 > 512 tokens: dense
    torch.testing.assert_close(short(q, k, v), dense, rtol=0, atol=0)
    from sparsediff.methods.block_sparse import BlockSparseMethod

    err = {}
    for name, method in {
        "ba_att": BAAttMethod(sparsity=0.5, block_size=BS, min_seq_len=0, norm_sort=False),
        "fixed": BlockSparseMethod(selector="fixed", sparsity=0.5, block_size=BS, min_seq_len=0),
    }.items():
        err[name] = ((method(q, k, v) - dense).norm() / dense.norm()).item()
    assert err["ba_att"] < err["fixed"]
    # Same budget, scattered salient keys: the data-driven choice must clearly beat the prior.
    assert err["ba_att"] < 0.75 * err["fixed"]


def test_norm_sorted_float64_with_frames_is_exact_at_sparsity_zero():
    # Norms of float64 keys are taken in float64 (a float32 request would be a narrowing the norm op refuses).
    q, k, v = (torch.randn(1, 2, 256, 32, dtype=torch.float64) for _ in range(3))
    method = BAAttMethod(sparsity=0.0, block_size=64, min_seq_len=0, norm_sort=True)
    out = method(q, k, v, frame_size=128)
    assert method.plan(q, k, v, frame_size=128).perm is not None  # the keys were sorted
    torch.testing.assert_close(out, dense_attention(q, k, v), **tolerance(torch.float64))
