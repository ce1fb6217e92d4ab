"""LoSA: exact at threshold 0 / sparsity 0, stable tokens reuse cached prefix attention, active tokens
get union-sparse prefix attention, stats, and cache invalidation."""

import pytest
import torch
from test_flashblock import assert_attention, attention, dense_out

from sparsediff.kernels import block_stats
from sparsediff.kernels.merge.reference import merge_attention_ref
from sparsediff.kernels.outlier_keys import outlier_key_features
from sparsediff.methods import denoising_step, make_method, new_block, new_generation
from sparsediff.methods.losa import LoSAConfig, mean_key_union, token_change
from sparsediff.testing.tolerance import ROUNDING, assert_close_as_pytorch, tolerance


def block_call(b=1, hq=4, hkv=2, prefix=128, nq=16, d=16, dtype=torch.float32):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, prefix + nq, d, dtype=dtype)
    return q, k, torch.randn_like(k)


def method(**kw):
    return make_method("losa", **{"min_seq_len": 0, "block_size": 16, "cuda_graphs": False, **kw})


def perturb(q, tokens, rel):
    """Move the given tokens' query vectors (all heads) by exactly ``rel`` relative L2."""
    q = q.clone()
    noise = torch.randn_like(q[:, :, tokens])
    norm_q = q[:, :, tokens].square().sum(dim=(1, 3), keepdim=True).sqrt()
    norm_n = noise.square().sum(dim=(1, 3), keepdim=True).sqrt()
    q[:, :, tokens] += rel * noise * norm_q / norm_n
    return q


def test_config_validation():
    cfg = LoSAConfig()
    assert cfg.threshold > 0 and 0 < cfg.sparsity < 1
    for bad in (dict(threshold=-1), dict(sparsity=1.0), dict(compare_to="x"), dict(selector="nope"),
                dict(union="query"), dict(union_splits=0), dict(union_splits=2.0), dict(union_splits=True)):
        with pytest.raises(ValueError):
            LoSAConfig(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_zero_sparsity_zero_is_dense(dtype):
    m = method(threshold=0.0, sparsity=0.0)
    q0, k, v = block_call(b=2, dtype=dtype)
    for step in range(4):
        q = (q0.float() + 0.3 * step * torch.randn_like(q0.float())).to(dtype)
        with denoising_step(step, 4):
            out = m(q, k, v, layer="l")
        assert_close_as_pytorch(out, dense_out, q, k, v)
    assert all(r["active_share"] == 1.0 for r in m.step_report())


def test_token_change_is_relative_l2_over_heads():
    q = torch.randn(2, 4, 8, 16)
    moved = perturb(q, [1, 5], 0.2)
    change = token_change(moved, q)
    torch.testing.assert_close(change[:, [1, 5]], torch.full((2, 2), 0.2), **tolerance(torch.float32, ulps=ROUNDING))
    assert bool((change[:, [0, 2, 3, 4, 6, 7]] == 0).all())


def test_stable_and_active_split():
    m = method(threshold=0.05, sparsity=0.0)
    q0, k, v = block_call()
    npre = k.shape[2] - q0.shape[2]
    with denoising_step(0, 2):
        m(q0, k, v, layer="l")
    active = [0, 3, 7, 8, 15]
    stable = [t for t in range(16) if t not in active]
    q1 = perturb(perturb(q0, active, 0.5), stable, 0.01)  # stable tokens move a little, below threshold
    with denoising_step(1, 2):
        out = m(q1, k, v, layer="l")

    def split(q0, q1, k, v):  # active tokens: fresh prefix attention; stable ones: the cached one at q0
        inner = attention(q1, k[:, :, npre:], v[:, :, npre:])
        dense = merge_attention_ref(*attention(q1, k[:, :, :npre], v[:, :, :npre]), *inner)[0]
        cached = merge_attention_ref(*attention(q0, k[:, :, :npre], v[:, :, :npre]), *inner)[0]
        return dense[:, :, active], cached[:, :, stable], dense[:, :, stable]

    dense_stable = split(q0, q1, k, v)[2]
    assert_close_as_pytorch((out[:, :, active], out[:, :, stable]), lambda *a: split(*a)[:2], q0, q1, k, v)
    # 1e-5: far above float32 rounding (the errors above are ~1e-7), so the stable rows are really stale.
    assert (out[:, :, stable] - dense_stable).abs().max() > 1e-5  # stale on purpose
    assert m.step_report()[-1]["active_share"] == pytest.approx(5 / 16)


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("union", ["kv_head", "head"])
def test_active_tokens_use_one_shared_union(union, outliers):
    m = method(threshold=0.05, sparsity=0.75, union=union, outlier_keys=outliers)  # 8 prefix blocks -> keep 2
    q0, k, v = block_call()
    npre = k.shape[2] - q0.shape[2]
    with denoising_step(0, 2):
        m(q0, k, v, layer="l")
    active = [2, 9, 10]
    q1 = perturb(q0, active, 0.5)
    with denoising_step(1, 2):
        out = m(q1, k, v, layer="l")
    is_active = torch.zeros(1, 16, dtype=torch.bool)
    is_active[0, active] = True
    per_kv = union == "kv_head"
    peaks = outlier_key_features(k[:, :, :npre], 16)[..., :16] if outliers else None
    union = mean_key_union(q1, is_active, block_stats(k[:, :, :npre], 16).mean, 2, 0.25, per_kv_head=per_kv,
                           keep_sinks=True, key_outliers=peaks, block_size=16)
    assert union.shape == (1, 2 if per_kv else 4, 8)
    if per_kv:  # the group's query heads share their KV head's union
        union = union.repeat_interleave(2, dim=1)
    token_mask = union.repeat_interleave(16, -1)[:, :, None, :]
    assert_close_as_pytorch(out[:, :, active], union_attention, q1[:, :, active], k, v, npre, token_mask)
    rec = m.step_report()[-1]
    assert rec["union_density"] == pytest.approx(0.25) and rec["active_share"] == pytest.approx(3 / 16)


def union_attention(q, k, v, npre, token_mask):
    """Active tokens: the union's blocks of the prefix, merged with the block's own keys."""
    sparse = attention(q, k[:, :, :npre], v[:, :, :npre], token_mask)
    return merge_attention_ref(*sparse, *attention(q, k[:, :, npre:], v[:, :, npre:]))[0]


def test_packed_split_path_matches_reference(monkeypatch):
    # What a GPU runs for a short block: split prefix attention with the KV group's 4 query heads stacked.
    from test_flashblock import force_splits

    force_splits(monkeypatch, n=3)
    m = make_method("losa", min_seq_len=0, block_size=32, threshold=0.05, sparsity=0.5,  # 32 prefix blocks, keep 16
                    cuda_graphs=False)
    q0, k, v = block_call(hq=8, hkv=2, prefix=1024, nq=8)
    npre = 1024
    with denoising_step(0, 2):
        first = m(q0, k, v, layer="l")
    assert_close_as_pytorch(first, dense_out, q0, k, v)
    active = [1, 6]
    q1 = perturb(q0, active, 0.5)
    with denoising_step(1, 2):
        out = m(q1, k, v, layer="l")
    is_active = torch.zeros(1, 8, dtype=torch.bool)
    is_active[0, active] = True
    assert [e.splits for e in m._cache.entries.values()] == [3]  # one tile of stacked rows: >= 2 blocks a split
    union = mean_key_union(q1, is_active, block_stats(k[:, :, :npre], 32).mean, 16, 0.25, per_kv_head=True,
                           keep_sinks=True)
    token_mask = union.repeat_interleave(4, dim=1).repeat_interleave(32, -1)[:, :, None, :]
    assert_close_as_pytorch(out[:, :, active], union_attention, q1[:, :, active], k, v, npre, token_mask)
    stable = [t for t in range(8) if t not in active]

    def cached(q0, q1, k, v):
        ext = attention(q0[:, :, stable], k[:, :, :npre], v[:, :, :npre])
        return merge_attention_ref(*ext, *attention(q1[:, :, stable], k[:, :, npre:], v[:, :, npre:]))[0]

    assert_close_as_pytorch(out[:, :, stable], cached, q0, q1, k, v)


@pytest.mark.parametrize("union", ["kv_head", "head"])
def test_union_splits_do_not_change_the_result(union):
    # Any split count of the active tokens' prefix attention gives the same attention (the splits merge by LSE).
    q0, k, v = block_call(hq=8, hkv=2, prefix=1024, nq=8)
    qs = [q0, perturb(q0, [1, 6], 0.5), perturb(q0, [0, 2, 3], 0.3)]
    outs = {}
    for splits in (None, 2, 5, 64):
        m = make_method("losa", min_seq_len=0, block_size=32, sparsity=0.5, union=union, union_splits=splits,
                        cuda_graphs=False)
        outs[splits] = []
        for step, q in enumerate(qs):
            with denoising_step(step, len(qs)):
                outs[splits].append(m(q, k, v, layer="l"))
        if splits is not None:  # 32 prefix blocks keep 16: more splits than kept blocks are capped
            assert [e.splits for e in m._cache.entries.values()] == [min(splits, 16)]
        assert [r["active_share"] for r in m.step_report()] == [1.0, 0.25, 0.625]  # step 2: tokens 1, 6 move back too
    for splits in (2, 5, 64):
        for got, want in zip(outs[splits], outs[None]):
            # float32 rounding of the LSE merge
            torch.testing.assert_close(got, want, **tolerance(torch.float32, ulps=ROUNDING))


def test_union_splits_at_sparsity_zero_is_dense():
    m = method(threshold=0.0, sparsity=0.0, union_splits=3)
    q0, k, v = block_call(b=2)
    for step in range(3):
        q = q0 + 0.3 * step * torch.randn_like(q0)
        with denoising_step(step, 3):
            out = m(q, k, v, layer="l")
        assert_close_as_pytorch(out, dense_out, q, k, v)
    assert [e.splits for e in m._cache.entries.values()] == [3]


def test_union_follows_the_active_tokens_on_structured_inputs():
    # Active queries point at prefix block 5, stable ones at block 2: only block 5 may be chosen.
    q, k, _ = block_call()
    hot, cold = (4 * torch.nn.functional.normalize(torch.randn(16), dim=0) for _ in range(2))
    k[:, :, 80:96] += hot
    k[:, :, 32:48] += cold
    q[:, :, :4] += hot
    q[:, :, 4:] += cold
    active = torch.zeros(1, 16, dtype=torch.bool)
    active[0, :4] = True
    union = mean_key_union(q, active, block_stats(k[:, :, :128], 16).mean, 1, 0.25)
    assert union.shape == (1, 4, 8) and bool(union[..., 5].all()) and int(union.sum()) == 4
    union_all = mean_key_union(q, torch.ones_like(active), block_stats(k[:, :, :128], 16).mean, 1, 0.25)
    assert bool(union_all[..., 2].all())  # with every token active the stable tokens' block wins
    with_sinks = mean_key_union(q, active, block_stats(k[:, :, :128], 16).mean, 2, 0.25, keep_sinks=True)
    assert bool(with_sinks[..., 0].all() & with_sinks[..., 5].all()) and int(with_sinks.sum()) == 8


def test_outlier_keys_on_the_stripes_generator():
    # A few keys every query attends, at random positions: a block's mean hides its one hot key, its
    # largest-norm key does not.
    from sparsediff.eval.blockdiff_probe import block_run, build_block_method, evaluate_steps
    from sparsediff.eval.fidelity import make_probe

    run = block_run(make_probe("stripes", heads=2, n=4096, dim=32), block=64, steps=4)
    errors = {flag: max(r["rel_l2"] for r in evaluate_steps(build_block_method(f"losa/outlier_keys={flag}", 64),
                                                             run)) for flag in (True, False)}
    assert LoSAConfig().outlier_keys is False
    assert errors[True] < 0.6 * errors[False], errors
    with pytest.raises(ValueError, match="outlier_keys"):
        LoSAConfig(outlier_keys=1)


def test_keep_sinks_on_the_sinks_generator():
    # Four leading keys every query attends: their block's mean key hides them, so the union must keep it.
    from sparsediff.eval.blockdiff_probe import block_run, build_block_method, evaluate_steps
    from sparsediff.eval.fidelity import make_probe

    run = block_run(make_probe("sinks", heads=2, n=2048, dim=32), block=64, steps=4)
    errors = {flag: max(r["rel_l2"] for r in evaluate_steps(build_block_method(f"losa/keep_sinks={flag}", 64), run))
              for flag in (True, False)}
    assert LoSAConfig().keep_sinks is True
    assert errors[True] < 0.5 * errors[False], errors


def test_no_active_tokens_reuses_everything():
    m = method(threshold=0.05)
    q, k, v = block_call()
    with denoising_step(0, 2):
        first = m(q, k, v, layer="l")
    with denoising_step(1, 2):
        second = m(q, k, v, layer="l")
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert m.step_report()[-1]["active_share"] == 0.0 and m.step_report()[-1]["union_density"] == 0.0


def test_compare_to_cached_catches_slow_drift():
    shares = {}
    for mode in ("last_step", "cached"):
        new_generation()
        m = method(threshold=0.1, sparsity=0.0, compare_to=mode)
        q, k, v = block_call()
        drift = 0.07 * (perturb(q, list(range(16)), 1.0) - q)  # one direction: the changes add up
        for step in range(3):
            with denoising_step(step, 3):
                m(q, k, v, layer="l")
            q = q + drift  # 0.07 per step (below threshold), 0.14 over two steps (above)
        shares[mode] = [r["active_share"] for r in m.step_report()]
    assert shares["last_step"] == [1.0, 0.0, 0.0]
    assert shares["cached"][:2] == [1.0, 0.0] and shares["cached"][2] > 0.5


@pytest.mark.parametrize("selector", ["ba_att", "block_mean"])
def test_registered_selector_union(selector):
    m = method(threshold=0.05, sparsity=0.75, selector=selector)
    q0, k, v = block_call()
    with denoising_step(0, 2):
        m(q0, k, v, layer="l")
    with denoising_step(1, 2):
        out = m(q0 + torch.randn_like(q0), k, v, layer="l")
    rec = m.step_report()[-1]
    assert rec["active_share"] == 1.0 and 0 < rec["union_density"] < 1.0
    assert torch.isfinite(out).all()


def test_cache_invalidated_at_new_block_and_generation():
    m = method(threshold=0.05)
    q, k, v = block_call()
    new_block(0)
    with denoising_step(0, 2):
        m(q, k, v, layer="l")
    new_block(1)
    q1, k1, v1 = block_call()
    with denoising_step(1, 2):
        out = m(q1, k1, v1, layer="l")
    assert_close_as_pytorch(out, dense_out, q1, k1, v1)
    assert m.stats["full_refreshes"] == 2
    new_generation()
    with denoising_step(1, 2):
        m(q1, k1, v1, layer="l")
    assert m.stats["full_refreshes"] == 1 and len(m.step_report()) == 1


def test_steady_state_op_count(monkeypatch):
    # Regression bound on launches per cached step (82 before the fused prefix merge, 22-24 after, 25 since
    # the capacity-sized state: window attention and ranked layout; 38 with the union per KV head, whose ids
    # are repeated per query head when the block is too long to stack heads, and contiguous token norms; 46
    # with the active-first order (sort, ranks, one gather, tile counts); 33 with the union scored by one kernel
    # on the active rows, the change test and its references in one kernel and the window gathered in the
    # step; 35 with keep_sinks, whose block-0-first order costs the PyTorch ranking a slice and a concatenation
    # (on CUDA it is inside the ranking kernel); 32 with the ids ranked straight into the per-tile layout, the
    # first cached step 36: it builds the PyTorch path's table of query-block starts for live_rows once;
    # the count includes the test's 6 ops).
    from test_flashblock import force_splits, steady_state_ops

    force_splits(monkeypatch)
    counts = steady_state_ops(make_method("losa", min_seq_len=0, block_size=32, sparsity=0.8, cuda_graphs=False),
                              steps=4)
    assert counts[0] <= 36 and max(counts[1:]) <= 32, counts


# -- CUDA graphs of the cached step (helpers and the CPU stand-in in test_flashblock_graphs) ----------------------

def test_cuda_graphs_flag_validated():
    assert LoSAConfig().cuda_graphs is None  # automatic
    assert LoSAConfig(cuda_graphs=True).cuda_graphs and LoSAConfig(cuda_graphs=False).cuda_graphs is False
    with pytest.raises(ValueError, match="True, False or None"):
        LoSAConfig(cuda_graphs=1)


def test_cuda_graphs_ignored_on_cpu(caplog):
    from test_flashblock_graphs import buffered_blocks, drive

    if torch.zeros(1).is_cuda:
        pytest.skip("checks the CPU behaviour")
    runs = buffered_blocks(blocks=1, steps=4)
    want = drive(method(), runs)
    m = method(cuda_graphs=True)
    with caplog.at_level("WARNING"):
        got = drive(m, runs)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert m._cache.graphs() == [] and not caplog.records


GRAPH_CONFIGS = [dict(), dict(sparsity=0.0), dict(compare_to="cached", threshold=0.1), dict(threshold=0.0),
                 dict(outlier_keys=True)]


@pytest.fixture
def fake_graphs(monkeypatch):
    from test_flashblock_graphs import install_fake_graphs

    return install_fake_graphs(monkeypatch)


@pytest.mark.parametrize("kw", GRAPH_CONFIGS)
def test_cuda_graph_bookkeeping_matches_eager(fake_graphs, monkeypatch, kw):
    # In-place state (row cache, q_ref, thresholds) and device stats behave as in eager.
    from test_flashblock import force_splits
    from test_flashblock_graphs import assert_graphs_match_eager

    force_splits(monkeypatch)
    eager, graphed = assert_graphs_match_eager("losa", dict(min_seq_len=0, block_size=32, **kw), graphs=fake_graphs,
                                               first_step=True)
    assert eager.step_report() == graphed.step_report()


def test_cuda_graphs_skip_the_selector_path(fake_graphs):
    from test_flashblock_graphs import buffered_blocks, drive

    m = method(cuda_graphs=True, selector="block_mean", sparsity=0.75)
    drive(m, buffered_blocks(blocks=1, steps=3))
    # Only the first step of each layer (it runs no selector) is captured.
    assert len(fake_graphs) == 2 and m._cache.graphs() == [e.first.graph for e in m._cache.entries.values()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kw", GRAPH_CONFIGS)
def test_cuda_graphs_match_eager_on_gpu(kw):
    from test_flashblock_graphs import assert_graphs_match_eager

    eager, graphed = assert_graphs_match_eager("losa", dict(min_seq_len=0, **kw), device="cuda", first_step=True,
                                               dtype=torch.bfloat16, blocks=3, steps=6, hq=8, prefix=8192, d=64)
    assert eager.step_report() == graphed.step_report()
    new_generation()
    q, k, v = block_call(prefix=512, d=64, dtype=torch.bfloat16)
    with denoising_step(0, 4):
        graphed(q.cuda(), k.cuda(), v.cuda(), layer="a")
    # The old graphs were released at the new generation; at most the new first step's graph is held (a warm-up
    # that compiles kernels for the new shapes synchronises, and the capture then waits for the next call).
    held = graphed._cache.graphs()
    assert len(held) <= 1 and all(g is graphed._cache.entries["a"].first.graph for g in held)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kw", GRAPH_CONFIGS)
def test_cuda_graphs_survive_blocks_on_gpu(kw):
    # A growing prefix in one persistent buffer: one capture per layer, graph == eager bit for bit.
    runs = growing_run(blocks=4, steps=5, prompt=8000, nq=32, hq=8, d=64, dtype=torch.bfloat16, device="cuda")
    eager, graphed = method(**kw, block_size=128), method(cuda_graphs=True, **kw, block_size=128)
    for (o, lse), (o2, lse2) in zip(drive_growing(eager, runs), drive_growing(graphed, runs)):
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert graphed._cache.captures == 4 and len(graphed._cache.graphs()) == 4  # first and cached step, 2 layers
    assert eager.step_report() == graphed.step_report()


# -- Graphs across blocks: state sized for the KV buffer's capacity ---------------------------------------

def growing_run(blocks=3, steps=5, prompt=200, nq=16, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu",
                grow_at=None, seed=0):
    """One generation as a preallocated KV cache sees it: the prefix grows by ``nq`` per block inside one
    buffer (re-allocated larger once at block ``grow_at``, a growth event); per step new block rows and
    queries of which a quarter move."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):  # drawn on the CPU whatever the default device
        return torch.randn(shape, generator=gen, device="cpu").to(device, dtype)

    cap = prompt + blocks * nq if grow_at is None else prompt + grow_at * nq
    buf = [randn(1, hkv, cap, d), randn(1, hkv, cap, d)]
    plan = []
    for blk in range(blocks):
        if blk == grow_at:
            bigger = [randn(1, hkv, prompt + blocks * nq, d) for _ in range(2)]
            for new, old in zip(bigger, buf):
                new[:, :, :cap] = old
            buf, cap = bigger, bigger[0].shape[2]
        q = randn(1, hq, nq, d)
        steps_ = []
        for _ in range(steps):
            q = q + 0.3 * randn(*q.shape) * (torch.rand(1, 1, nq, 1, generator=gen, device="cpu") < 0.25).to(device)
            steps_.append((q, randn(1, hkv, nq, d), randn(1, hkv, nq, d)))
        plan.append((buf, prompt + blk * nq, steps_))
    return plan


def drive_growing(m, plan):
    outs = []
    for blk, ((k, v), n, steps_) in enumerate(plan):
        new_block(blk)
        for step, (q, kb, vb) in enumerate(steps_):
            k[:, :, n : n + q.shape[2]], v[:, :, n : n + q.shape[2]] = kb, vb
            with denoising_step(step, len(steps_)):
                for layer, sign in (("a", 1), ("b", -1)):
                    outs.append(m(sign * q, k[:, :, : n + q.shape[2]], v[:, :, : n + q.shape[2]], layer=layer,
                                  return_lse=True))
    return outs


@pytest.mark.parametrize("kw", GRAPH_CONFIGS)
@pytest.mark.parametrize("grow_at", [None, 2])
def test_graphs_survive_blocks_one_capture_per_layer(fake_graphs, monkeypatch, kw, grow_at):
    from test_flashblock import force_splits

    force_splits(monkeypatch)
    plan = growing_run(blocks=4, grow_at=grow_at)  # prefix 200, 216, 232, 248: a partial last key block
    eager, graphed = method(block_size=32, **kw), method(block_size=32, cuda_graphs=True, **kw)
    want, got = drive_growing(eager, plan), drive_growing(graphed, plan)
    for (o, lse), (o2, lse2) in zip(want, got):
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert eager.step_report() == graphed.step_report()
    # Two captures per layer per generation (first and cached step; again at the growth), not two per block.
    captures = 4 if grow_at is None else 8
    assert len(fake_graphs) == graphed._cache.captures == captures and len(graphed._cache.graphs()) == 4
    if grow_at is None:  # first steps: captured at block 0, replayed at the 3 later blocks; cached steps:
        # captured at block 0 step 1, replayed at every later cached step
        assert sorted(g.replays for g in fake_graphs) == [3, 3, 4 * (5 - 1) - 1, 4 * (5 - 1) - 1]


@pytest.mark.parametrize("graphs", [False, True])
def test_growing_prefix_exact(fake_graphs, graphs):
    # threshold 0 / sparsity 0 is dense at every step; the default is dense at each block's first step.
    plan = growing_run(blocks=3, steps=3)
    for kw in (dict(threshold=0.0, sparsity=0.0), dict()):
        m = method(block_size=32, cuda_graphs=graphs, **kw)
        outs = iter(drive_growing(m, plan))
        for (k, v), n, steps_ in plan:
            for step, (q, kb, vb) in enumerate(steps_):
                kk, vv = torch.cat([k[:, :, :n], kb], dim=2), torch.cat([v[:, :, :n], vb], dim=2)
                for sign in (1, -1):
                    out, lse = next(outs)
                    if kw or step == 0:
                        assert_attention((out, lse), sign * q, kk, vv)


def test_block_means_follow_the_buffer_within_a_generation():
    # Block means are kept for blocks whose last key did not change: a growing prefix computes its newly full
    # blocks only, and a buffer refilled in place (a new sequence without a new generation) is computed again.
    plan = growing_run(blocks=4, steps=2)  # one buffer; prefix 200, 216, 232, 248 with 32-key blocks
    m = method(block_size=32)

    def check_means(k, n):
        (entry,) = m._cache.entries.values()
        nkb = n // 32
        means = lambda k: (k[:, :, : nkb * 32].unflatten(2, (nkb, 32)).mean(dim=3) * 0.25).mT  # scale 1 / sqrt(16)
        assert_close_as_pytorch(entry.means_t[..., :nkb], means, k)
        assert not entry.means_t[..., nkb:].any()

    for blk, ((k, v), n, steps_) in enumerate(plan):
        new_block(blk)
        q, kb, vb = steps_[0]
        k[:, :, n : n + q.shape[2]], v[:, :, n : n + q.shape[2]] = kb, vb
        with denoising_step(0, len(steps_)):
            m(q, k[:, :, : n + q.shape[2]], v[:, :, : n + q.shape[2]], layer="a")
        check_means(k, n)
    k.normal_()  # the same buffer, refilled
    new_block(len(plan))
    with denoising_step(0, 2):
        m(q, k[:, :, : n + q.shape[2]], v[:, :, : n + q.shape[2]], layer="a")
    check_means(k, n)


def test_split_counts_for_a_gpu(monkeypatch):
    # The split rules as a 132-SM GPU sees them (a stand-in for a CUDA q: GQA 32/8, stacked 4 heads a tile).
    import sparsediff.runtime.split_kv as pa

    class CudaQ:
        is_cuda, device, shape = True, "cuda:0", (1, 32, 32, 128)

    monkeypatch.setattr(pa, "_sm_count", lambda device: 132)
    # LoSA's union, one tile of stacked rows: one wave of 8-program splits, at least 2 kept blocks each
    assert [pa.one_wave_splits(CudaQ(), kept, heads=8) for kept in (26, 102, 205)] == [13, 16, 16]
    # otherwise about four waves, at least 8 kept blocks each (16k / 64k / 128k at 128-token blocks)
    assert [pa.choose_splits(CudaQ(), kept, 8, heads=32) for kept in (26, 103, 205)] == [3, 12, 17]
    # CPU: no split (built on the CPU explicitly: SPARSEDIFF_TEST_DEVICE=cuda makes CUDA the default device)
    assert pa.one_wave_splits(torch.zeros(1, 32, 32, 128, device="cpu"), 205, heads=8) == 1
