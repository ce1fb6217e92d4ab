"""BA-Att's outlier-key term (``outlier_keys``): config checks, the score against a per-block reference,
planted stripe keys, causal and budget contracts, exactness at sparsity 0, and Triton == PyTorch path."""

import math

import pytest
import torch
from test_flashblock import assert_attention

from sparsediff.eval.fidelity import dense_reference, evaluate, make_probe
from sparsediff.kernels import index_to_mask
from sparsediff.kernels.block_sparse.reference import causal_token_mask
from sparsediff.kernels.masks import causal_block_mask
from sparsediff.methods.ba_att import BAAttConfig, BAAttMethod, ba_attention, ba_scores
from sparsediff.methods.ba_att.scores import _select
from sparsediff.methods.ba_att.sort import _sort_keys
from sparsediff.testing.tolerance import tolerance

PLANTED = (200, 650, 900)  # key blocks 3, 10 and 14 at block size 64

# The pooled estimator with the paper's per-row budget and no window: what these tests pin down.
POOLED = dict(estimator="pooled", allocation="row", local_window=0)


def _planted_stripes(n=1024, d=32, hq=2, hkv=1, seed=0, planted=PLANTED):
    """Rotary locality plus a few keys that every query attends to strongly (vertical stripes); drawn on
    the CPU, returned on the default device (the GPU under SPARSEDIFF_TEST_DEVICE=cuda)."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        q, k, v = _planted_stripes_cpu(n, d, hq, hkv, seed, planted)
    return q.to(device), k.to(device), v.to(device)


def _planted_stripes_cpu(n, d, hq, hkv, seed, planted):
    gen = torch.Generator().manual_seed(seed)
    freqs = (n / 8) ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2 - 1))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs

    def rot(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)

    a = torch.randn(hkv, 1, d, generator=gen, dtype=torch.float64)
    a = a / a.norm() * 8
    q = rot(a.repeat_interleave(hq // hkv, 0) + 0.3 * torch.randn(hq, n, d, generator=gen, dtype=torch.float64))
    k = rot(a + 0.3 * torch.randn(hkv, n, d, generator=gen, dtype=torch.float64))
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    u /= u.norm()
    q += 2 * u
    k[:, list(planted)] += 4 * math.sqrt(d) * u
    v = torch.randn(hkv, n, d, generator=gen, dtype=torch.float64)
    return q[None].float(), k[None].float(), v[None].float()


@pytest.mark.parametrize("value", [-1, 1.0, True, "1", 33])
def test_config_rejects_bad_outlier_keys(value):
    with pytest.raises(ValueError, match="outlier_keys must be None .auto. or an int from 0"):
        BAAttConfig(block_size=32, outlier_keys=value)


def test_config_accepts_range_and_default():
    assert BAAttConfig().outlier_keys is None  # auto: 1 on unsorted keys, 0 on norm-sorted ones
    assert BAAttConfig(block_size=32, outlier_keys=0).outlier_keys == 0
    assert BAAttConfig(block_size=32, outlier_keys=32).outlier_keys == 32


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_scores_match_per_block_mixture(beta):
    # Ragged tail: the last key block holds 6 keys, fewer than m = 8, so it is scored exactly.
    bs, m, scale = 32, 8, 0.3
    q, k = torch.randn(1, 4, 100, 16, dtype=torch.float64), torch.randn(1, 2, 70, 16, dtype=torch.float64)
    got = ba_scores(q, k, block_size=bs, beta=beta, scale=scale, outlier_keys=m)
    base = ba_scores(q, k, block_size=bs, beta=beta, scale=scale, outlier_keys=0).double()
    c = beta * scale**2 / 2
    tol = tolerance(torch.float32)  # float32 scores: exponentials summed and a log taken, in another order
    for h in range(4):
        for i in range(math.ceil(100 / bs)):
            qb = q[0, h, i * bs:(i + 1) * bs]
            mq, vq = qb.mean(0), qb.var(0, unbiased=False)
            for j in range(math.ceil(70 / bs)):
                kb = k[0, h // 2, j * bs:(j + 1) * bs]
                n = kb.shape[0]
                top = kb[kb.norm(dim=-1).argsort(descending=True)[:m]]
                exact = torch.exp(scale * top @ mq + c * top.square() @ vq).sum()
                want = math.log(((n - len(top)) * math.exp(base[0, h, i, j]) + exact) / n)
                assert got[0, h, i, j].item() == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"])


def test_planted_stripe_blocks_are_kept():
    q, k, _ = _planted_stripes()
    stripes = [p // 64 for p in PLANTED]
    kept = {}
    for m in (0, 1):
        index, count = _select(q, k, BAAttConfig(**POOLED, sparsity=0.5, block_size=64, outlier_keys=m))
        assert bool((count == 8).all())  # same budget with and without the term
        kept[m] = index_to_mask(index, count, 16)[..., stripes]
    # Block means dilute a lone heavy key 64-fold: plain BA-Att drops stripe blocks in many rows ...
    assert (~kept[0]).float().mean().item() > 0.25
    # ... the exact score of each block's largest-norm key keeps them in every row of both heads.
    assert bool(kept[1].all())


def test_planted_stripes_raise_recall_at_equal_density():
    p = make_probe("stripes", heads=2, n=1024, dim=32)
    ref = dense_reference(p)
    res = {m: evaluate(BAAttMethod(**POOLED, sparsity=0.5, block_size=64, min_seq_len=0, outlier_keys=m), p, ref)
           for m in (0, 1)}
    assert res[1]["density"] == res[0]["density"]
    assert res[1]["recall"] > res[0]["recall"] + 0.02 and res[1]["rel_l2"] < 0.5 * res[0]["rel_l2"]


def test_causal_never_picks_future_blocks():
    # The heaviest keys sit in the queries' future: they must never be selected.
    q, k, _ = _planted_stripes(n=640, hq=4, hkv=2, planted=(100, 330))
    q = q[:, :, :384]
    k[:, :, 500:640:7] *= 50
    cfg = BAAttConfig(**POOLED, sparsity=0.5, block_size=64, outlier_keys=2)
    index, count = _select(q, k, cfg, causal=True)
    mask = index_to_mask(index, count, 10)
    visible = causal_block_mask(6, 10, 384, 640, 64)
    assert not bool((mask & ~visible).any())
    plain = _select(q, k, cfg.replace(outlier_keys=0), causal=True)[1]
    assert torch.equal(count, plain)  # the term reorders blocks; it never changes the budget


@pytest.mark.parametrize("causal", [False, True])
def test_sparsity_zero_is_dense(causal):
    q, k, v = torch.randn(1, 4, 200, 32), torch.randn(1, 2, 330, 32), torch.randn(1, 2, 330, 32)
    cfg = BAAttConfig(**POOLED, sparsity=0.0, block_size=32, outlier_keys=3, sort_segment=100)
    out, lse = ba_attention(q, k, v, cfg, return_lse=True, causal=causal)
    mask = causal_token_mask(200, 330) if causal else torch.ones(200, 330, dtype=torch.bool)
    assert_attention((out, lse), q, k, v, mask)


@pytest.mark.parametrize("beta, causal, sort", [(0.5, False, False), (0.0, False, False), (0.5, True, False),
                                                (0.5, False, True)])
def test_triton_path_keeps_the_same_blocks(beta, causal, sort):
    q, k, v = _planted_stripes(n=330, hq=4, hkv=2, planted=(40, 150, 260))
    cfg = BAAttConfig(**POOLED, sparsity=0.6, block_size=32, beta=beta, outlier_keys=2)
    stats = None
    if sort:  # sorted keys with the gather's key-side features, as BAAttMethod runs it on CUDA
        k, _, _, stats = _sort_keys(k, v, segment=64, block_size=32, backend="triton")
    ref = _select(q, k, cfg, causal=causal, backend="torch")
    index, count = _select(q, k, cfg, causal=causal, k_stats=stats, backend="triton")
    assert torch.equal(index, ref[0]) and torch.equal(count, ref[1])
    # The term matters on this input, so the equality above covers it.
    off = _select(q, k, cfg.replace(outlier_keys=0), causal=causal, backend="torch")
    assert not torch.equal(index_to_mask(*off, 11), index_to_mask(*ref, 11))


@pytest.mark.parametrize("n,dtype", [(256, torch.float32), (200, torch.bfloat16), (37, torch.float32)])
def test_outlier_key_kernel_matches_torch(n, dtype):
    # One Triton program per key block (here under the interpreter) writes the largest-norm row and its square.
    from sparsediff.kernels.outlier_keys import outlier_key_features

    k = torch.randn(2, 3, n, 16).to(dtype)
    k[0, 1, 5] *= 10  # a planted outlier in block 0
    if n > 70:
        k[1, 0, 70] = k[1, 0, 66] = 9.0  # a tie inside block 1: the first row wins
    want = outlier_key_features(k, 64, backend="torch")
    got = outlier_key_features(k, 64, backend="triton")
    assert got.shape == (2, 3, -(-n // 64), 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(want[0, 1, 0, :16], k[0, 1, 5].float(), rtol=0, atol=0)
    if n > 70:
        torch.testing.assert_close(want[1, 0, 1, :16], k[1, 0, 66].float(), rtol=0, atol=0)
    torch.testing.assert_close(want[..., 16:], want[..., :16].square(), rtol=0, atol=0)


def test_auto_outlier_keys_follow_norm_sorting(monkeypatch):
    # Default None: the term runs on keys in their own order and is skipped on norm-sorted keys.
    import sparsediff.methods.ba_att.scores as ba

    seen = []
    original = ba._with_outlier_keys
    monkeypatch.setattr(ba, "_with_outlier_keys", lambda *a, **kw: seen.append(a[3]) or original(*a, **kw))
    q, k, v = _planted_stripes()
    BAAttMethod(BAAttConfig(**POOLED, block_size=64, min_seq_len=0))(q, k, v)  # no frame: keys unsorted
    BAAttMethod(BAAttConfig(**POOLED, block_size=64, min_seq_len=0))(q, k, v, frame_size=256)  # sorted per frame
    BAAttMethod(BAAttConfig(**POOLED, block_size=64, min_seq_len=0, outlier_keys=2))(q, k, v, frame_size=256)
    assert seen == [1, 0, 2]
