"""FlashBlock's CUDA graphs: the cached step and the block's first step, captured and replayed. On CPU a
stand-in graph (``FakeGraph``) reruns the captured function, which checks the bookkeeping; on a GPU the
real graphs must equal eager bit for bit."""

import pytest
import torch
from test_flashblock import assert_attention, block_call, force_splits, method

from sparsediff.methods import denoising_step, make_method, new_block, new_generation
from sparsediff.methods.flashblock import FlashBlockConfig

# -- CUDA graphs of the cached step ---------------------------------------------------------------------

class FakeGraph:
    """Stands in for a CUDA graph on CPU: a replay reruns the captured function on the captured inputs
    and writes the results into the same output tensors, as a real replay does."""

    def __init__(self, fn, args):
        self.fn, self.args, self.outputs, self.replays = fn, args, [], 0

    def replay(self):
        new = self.fn(*self.args)
        if not self.outputs:
            self.outputs.extend(new)
        for o, n in zip(self.outputs, new):
            if isinstance(o, torch.Tensor):
                o.copy_(n)
        self.replays += 1


def install_fake_graphs(monkeypatch):
    """Route ``step_cache.run_step``'s capture through FakeGraph (the bookkeeping runs as on a GPU)."""
    from sparsediff.runtime import step_cache

    if torch.zeros(1).is_cuda:  # CPU inputs would meet the torch path's default-device allocations
        pytest.skip("CPU stand-in for CUDA graphs; on a GPU the tests with real graphs run")

    graphs = []

    def capture(fn, static_q, pinned, share=None):
        graphs.append(FakeGraph(fn, (static_q, *pinned)))
        return graphs[-1], graphs[-1].outputs, 0

    monkeypatch.setattr(step_cache, "graphs_usable", lambda q: True)
    monkeypatch.setattr(step_cache, "_warm_up", lambda fn, q, pinned: fn(q, *pinned))
    monkeypatch.setattr(step_cache, "_capture", capture)
    return graphs


@pytest.fixture
def fake_graphs(monkeypatch):
    return install_fake_graphs(monkeypatch)


def buffered_blocks(blocks=2, steps=5, b=1, hq=4, hkv=2, prefix=256, nq=32, d=16, dtype=torch.float32,
                    device="cpu", seed=0):
    """Inputs held as a KV cache holds them: per block one ``[prefix | block]`` k/v buffer whose block rows
    change each step; a quarter of the block's queries move per step."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):  # drawn on the CPU whatever the default device, then moved
        return torch.randn(shape, generator=gen, device="cpu")

    runs = []
    for blk in range(blocks):
        kv = [randn(b, hkv, prefix + (blk + 1) * nq, d) for _ in range(2)]
        q = randn(b, hq, nq, d)
        per_step = []
        for _ in range(steps):
            q = q + 0.3 * randn(*q.shape) * (torch.rand(1, 1, nq, 1, generator=gen, device="cpu") < 0.25)
            per_step.append([t.to(device, dtype) for t in (q, randn(b, hkv, nq, d), randn(b, hkv, nq, d))])
        runs.append(([t.to(device, dtype) for t in kv], per_step))
    return runs


def drive(m, runs, return_lse=False, moving_kv=False):
    """Two layers per step; ``moving_kv``: a fresh k/v tensor every call (a host without a persistent cache),
    each kept alive so that no two calls share an address (an allocator may hand a freed one out again, and
    then a replay on it is valid)."""
    outs, held = [], []
    for blk, ((k, v), per_step) in enumerate(runs):
        new_block(blk)
        k, v = k.clone(), v.clone()
        for step, (q, kb, vb) in enumerate(per_step):
            k[:, :, -q.shape[2]:], v[:, :, -q.shape[2]:] = kb, vb
            with denoising_step(step, len(per_step)):
                for layer, sign in (("a", 1), ("b", -1)):
                    kk, vv = (k.clone(), v.clone()) if moving_kv else (k, v)
                    held += [kk, vv] if moving_kv else []
                    outs.append(m(sign * q, kk, vv, layer=layer, return_lse=return_lse))
    return outs


def assert_graphs_match_eager(name, kw, device="cpu", dtype=torch.float32, graphs=None, held=2, first_step=False,
                              cached_per_block=None, **shape):
    """Outputs (and LSE) with ``cuda_graphs=True`` equal the eager ones bit for bit over blocks and steps.
    ``first_step``: the method also captures each block's first step (LoSA), one more graph per layer."""
    runs = buffered_blocks(device=device, dtype=dtype, **shape)
    eager = make_method(name, cuda_graphs=False, **kw)
    graphed = make_method(name, cuda_graphs=True, **kw)
    want, got = drive(eager, runs, return_lse=True), drive(graphed, runs, return_lse=True)
    for (o, lse), (o2, lse2) in zip(want, got):
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert len(graphed._cache.graphs()) == held * (2 if first_step else 1)  # per layer, of the last block only
    if graphs is not None and cached_per_block is not None:  # one graph per layer for the whole generation
        assert len(graphs) == 2 and all(g.replays == len(runs) * cached_per_block - 1 for g in graphs)
    elif graphs is not None:  # the fake: captured at step 1 of each block and layer, replayed after
        steps = len(runs[0][1])
        steady = [g for g in graphs if g.replays != 0] if first_step else graphs
        assert len(steady) == 2 * len(runs) and all(g.replays == steps - 2 for g in steady)
        assert len(graphs) == (2 if first_step else 1) * 2 * len(runs)  # first steps: captured, not replayed
    return eager, graphed


def test_cuda_graphs_flag_validated():
    assert FlashBlockConfig().cuda_graphs is None  # automatic
    assert FlashBlockConfig(cuda_graphs=False).cuda_graphs is False
    with pytest.raises(ValueError, match="True, False or None"):
        FlashBlockConfig(cuda_graphs="yes")


@pytest.mark.parametrize("kw", [{}, dict(sparse_selector="ba_att", sparsity=0.8)])
def test_cuda_graphs_ignored_on_cpu(kw, caplog):
    if torch.zeros(1).is_cuda:
        pytest.skip("checks the CPU behaviour")
    runs = buffered_blocks(blocks=1, steps=4)
    eager = drive(method(**kw), runs)
    m = method(cuda_graphs=True, **kw)
    with caplog.at_level("WARNING"):
        got = drive(m, runs)
    assert all(torch.equal(a, b) for a, b in zip(eager, got))
    assert m._cache.graphs() == [] and not caplog.records


@pytest.mark.parametrize("kw", [{}, dict(sparse_selector="ba_att", sparsity=0.8), dict(refresh_every=2)])
def test_cuda_graph_bookkeeping_matches_eager(fake_graphs, monkeypatch, kw):
    force_splits(monkeypatch)
    base = dict(min_seq_len=0, block_size=32, **kw)
    plain = "sparse_selector" not in kw
    # Plain mode: entries refreshed in place, one graph per layer for every block (steps 1-4 of 5 cached,
    # or 1 and 3 with refresh_every=2); combined mode: one graph per layer and block.
    cached = (2 if "refresh_every" in kw else 4) if plain else None
    _, graphed = assert_graphs_match_eager("flashblock", base, graphs=fake_graphs, cached_per_block=cached)
    import gc
    import weakref

    refs = [weakref.ref(g) for g in graphed._cache.graphs()]
    fake_graphs.clear()  # the stand-in holds the captured function (and so the entry); a CUDA graph does not
    new_generation() if plain else new_block(99)
    q, k, v = block_call(prefix=256)
    with denoising_step(0, 4):
        graphed(q, k, v, layer="a")
    gc.collect()
    # Released at the new generation (plain mode keeps them across blocks) or the new block (combined).
    assert graphed._cache.graphs() == [] and all(r() is None for r in refs)


def test_cuda_graph_runs_eager_when_kv_moves(fake_graphs, caplog):
    # Combined mode reads the prefix in place: a fresh k/v tensor per call cannot replay.
    runs = buffered_blocks(blocks=1, steps=4)
    kw = dict(sparse_selector="block_mean", sparsity=0.5)
    want = drive(method(**kw), runs)
    with caplog.at_level("WARNING"):
        got = drive(method(cuda_graphs=True, **kw), runs, moving_kv=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert all(g.replays == 0 for g in fake_graphs)
    assert sum("not at the captured step's address" in r.getMessage() for r in caplog.records) == 1


def test_plain_graphs_replay_when_kv_moves(fake_graphs, caplog):
    # Plain mode copies the block's keys / values into fixed buffers: a host without a persistent cache replays.
    runs = buffered_blocks(blocks=2, steps=4)
    want = drive(method(), runs)
    with caplog.at_level("WARNING"):
        got = drive(method(cuda_graphs=True), runs, moving_kv=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert len(fake_graphs) == 2 and all(g.replays == 2 * 3 - 1 for g in fake_graphs) and not caplog.records



@pytest.mark.parametrize("name, kw", [("flashblock", {}), ("losa", {}),
                                      ("flashblock", dict(sparse_selector="block_mean", sparsity=0.5))])
def test_automatic_graphs(fake_graphs, caplog, name, kw):
    """The default (``cuda_graphs=None``) captures once two calls in a row saw the same buffers, replays after,
    and neither captures nor warns where a host hands fresh k/v every call."""
    runs = buffered_blocks(blocks=2, steps=5)
    base = dict(min_seq_len=0, block_size=32, **kw)
    want = drive(make_method(name, cuda_graphs=False, **base), runs)
    auto = make_method(name, **base)
    assert auto.config.cuda_graphs is None
    with caplog.at_level("WARNING"):
        got = drive(auto, runs)
        moving = make_method(name, **base)
        got_moving = drive(moving, runs, moving_kv=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert all(torch.equal(a, b) for a, b in zip(want, got_moving))
    assert not caplog.records
    assert auto._cache.captures >= 2 and any(g.replays for g in fake_graphs)  # two layers: one graph each, at least
    if name == "flashblock" and not kw:  # fixed buffers of the block's rows: fresh k/v still replay
        assert moving._cache.captures == 2
    else:  # the prefix is read in place: nothing to replay on fresh k/v, so nothing is captured
        assert moving._cache.captures == 0


def test_explicit_graphs_capture_at_once(fake_graphs):
    # True captures at an entry's first cached call; automatic waits for a second call on the same buffers.
    kw = dict(sparse_selector="block_mean", sparsity=0.5)
    for steps, captures in ((2, [2, 0]), (3, [2, 2])):  # step 0 refreshes; 1, 2 are cached calls (two layers)
        modes = [method(cuda_graphs=mode, **kw) for mode in (True, None)]
        for m in modes:
            drive(m, buffered_blocks(blocks=1, steps=steps))
        assert [m._cache.captures for m in modes] == captures


@pytest.mark.parametrize("name", ["flashblock", "losa"])
def test_graphs_step_aside_inside_a_host_capture(fake_graphs, monkeypatch, name):
    # Inside someone else's capture (a host graphing whole steps) the kernels are recorded there, not in our own.
    from sparsediff.runtime import step_cache

    monkeypatch.setattr(step_cache, "capturing", lambda q: True)
    runs = buffered_blocks(blocks=2, steps=4)
    want = drive(make_method(name, min_seq_len=0, block_size=32, cuda_graphs=False), runs)
    m = make_method(name, min_seq_len=0, block_size=32, cuda_graphs=True)
    got = drive(m, runs)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert m._cache.captures == 0 and not fake_graphs

# -- Plain mode on a persistent KV buffer: the first step captured too, cached steps read the buffer ---------

def cache_blocks(blocks=4, steps=5, prompt=200, nq=16, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu",
                 grow_at=None, same_prefix=False, seed=0):
    """One generation as a preallocated KV cache sees it: per block ``(buffer, prefix length, steps)`` with
    ``(q, block keys, block values)`` per step (a quarter of the queries move per step). The prefix grows by
    ``nq`` per block inside one buffer, re-allocated larger at block ``grow_at``. ``same_prefix``: every block
    at prefix ``prompt`` in one buffer of exactly ``prompt + nq`` rows (a benchmark's fresh blocks)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):  # drawn on the CPU whatever the default device, then moved
        return torch.randn(shape, generator=gen, device="cpu").to(device, dtype)

    rows = prompt + (1 if same_prefix else blocks) * nq
    cap = rows if grow_at is None else prompt + grow_at * nq
    buf = [randn(1, hkv, cap, d), randn(1, hkv, cap, d)]
    plan = []
    for blk in range(blocks):
        if blk == grow_at:
            bigger = [randn(1, hkv, rows, d) for _ in range(2)]
            for new, old in zip(bigger, buf):
                new[:, :, :cap] = old
            buf, cap = bigger, rows
        q = randn(1, hq, nq, d)
        per_step = []
        for _ in range(steps):
            q = q + 0.3 * randn(*q.shape) * (torch.rand(1, 1, nq, 1, generator=gen, device="cpu") < 0.25).to(device)
            per_step.append((q, randn(1, hkv, nq, d), randn(1, hkv, nq, d)))
        plan.append((buf, prompt if same_prefix else prompt + blk * nq, per_step))
    return plan


def drive_cache(m, plan, layers=("a", "b"), move_at=None):
    """Two layers per step on the buffer's leading rows; ``move_at`` = (block, step): from then on k / v are
    copies (the buffer moved)."""
    outs = []
    for blk, ((k, v), n, per_step) in enumerate(plan):
        new_block(blk)
        for step, (q, kb, vb) in enumerate(per_step):
            nq = q.shape[2]
            k[:, :, n : n + nq], v[:, :, n : n + nq] = kb, vb
            kk, vv = k[:, :, : n + nq], v[:, :, : n + nq]
            if move_at is not None and (blk, step) >= move_at:
                kk, vv = kk.clone(), vv.clone()
            with denoising_step(step, len(per_step)):
                for i, layer in enumerate(layers):
                    outs.append(m(q if i % 2 == 0 else -q, kk, vv, layer=layer, return_lse=True))
    return outs


def assert_equal_outputs(want, got):
    for (o, lse), (o2, lse2) in zip(want, got, strict=True):
        assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("grow_at", [None, 2])
def test_plain_graphs_on_a_growing_cache(fake_graphs, monkeypatch, caplog, grow_at):
    # Prefix 200, 216, 232, 248 with 32-key blocks: the tail (partial last key block) changes every block.
    force_splits(monkeypatch)
    plan = cache_blocks(grow_at=grow_at)
    eager, graphed = method(block_size=32), method(block_size=32, cuda_graphs=True)
    with caplog.at_level("WARNING"):
        assert_equal_outputs(drive_cache(eager, plan), drive_cache(graphed, plan))
    assert not caplog.records
    # Per layer: the first step and the in-place cached step, captured once (again at the growth).
    assert len(fake_graphs) == graphed._cache.captures == (4 if grow_at is None else 8)
    entries = graphed._cache.entries.values()
    assert len(graphed._cache.graphs()) == 4 and all(e.windowed.graph is None for e in entries)
    if grow_at is None:  # first steps replayed at the 3 later blocks; cached steps at every later one
        assert sorted(g.replays for g in fake_graphs) == [3, 3, 4 * 4 - 1, 4 * 4 - 1]
    assert graphed.stats == eager.stats


def test_plain_graphs_same_buffer_each_block(fake_graphs, monkeypatch):
    # A buffer of exactly [prefix | block] reused by every block: captured once it outlived a block.
    force_splits(monkeypatch)
    plan = cache_blocks(blocks=4, same_prefix=True, prompt=256)
    eager, graphed = method(block_size=32), method(block_size=32, cuda_graphs=True)
    assert_equal_outputs(drive_cache(eager, plan), drive_cache(graphed, plan))
    # Block 0: eager first step, cached steps on copied rows; block 1: both captured on the buffer; then replays.
    windowed, first, in_place = fake_graphs[:2], fake_graphs[2:4], fake_graphs[4:]
    assert len(fake_graphs) == 6 and [g.replays for g in windowed] == [3, 3]
    assert [g.replays for g in first] == [2, 2] and [g.replays for g in in_place] == [3 * 4 - 1] * 2


def test_plain_graphs_fall_back_when_the_buffer_moves(fake_graphs, monkeypatch, caplog):
    # After a graphed first step the host hands over copies: the cached steps copy the block's rows instead.
    force_splits(monkeypatch)
    plan = cache_blocks(blocks=3)
    want = drive_cache(method(block_size=32), plan)
    with caplog.at_level("WARNING"):
        assert_equal_outputs(want, drive_cache(method(block_size=32, cuda_graphs=True), plan, move_at=(1, 2)))
    assert not caplog.records


@pytest.mark.parametrize("prompt", [200, 256, 20])  # a partial last key block, none, no full key block
@pytest.mark.parametrize("graphs", [False, True])
def test_plain_first_step_exact_on_a_growing_cache(fake_graphs, monkeypatch, prompt, graphs):
    # refresh_every=1 is dense at every step; by default each block's first step is.
    force_splits(monkeypatch)
    plan = cache_blocks(blocks=3, steps=3, prompt=prompt)
    for kw in (dict(refresh_every=1), {}):
        outs = iter(drive_cache(method(block_size=32, cuda_graphs=graphs, **kw), plan))
        for (k, v), n, per_step in plan:
            for step, (q, kb, vb) in enumerate(per_step):
                kk, vv = torch.cat([k[:, :, :n], kb], dim=2), torch.cat([v[:, :, :n], vb], dim=2)
                for sign in (1, -1):
                    out, lse = next(outs)
                    if kw or step == 0:
                        assert_attention((out, lse), sign * q, kk, vv)


def test_plain_cached_steps_issue_two_ops_on_a_cache(monkeypatch):
    # Eager cached steps on a buffer with spare rows: the in-block kernel and the merge, no copies.
    from sparsediff.testing.op_counter import OpCounter

    force_splits(monkeypatch)
    m = method(block_size=32)
    plan = cache_blocks(blocks=1, steps=3)
    (k, v), n, per_step = plan[0]
    new_block(0)
    counts = []
    for step, (q, kb, vb) in enumerate(per_step):
        k[:, :, n : n + 16], v[:, :, n : n + 16] = kb, vb
        with denoising_step(step, 3), OpCounter() as c:
            m(q, k[:, :, : n + 16], v[:, :, : n + 16], layer="l")
        counts.append(c.total)
    assert counts[1:] == [2, 2], counts


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda_only
@pytest.mark.parametrize("kw", [{}, dict(sparse_selector="ba_att", sparsity=0.8)])
def test_cuda_graphs_match_eager_on_gpu(kw):
    _, graphed = assert_graphs_match_eager("flashblock", dict(min_seq_len=0, **kw), device="cuda",
                                           dtype=torch.bfloat16, blocks=3, steps=6, hq=8, prefix=8192, d=64)
    held = graphed._cache.graphs()
    # One per layer: plain mode over all 3 blocks; combined mode since the last block dropped its entries.
    assert graphed._cache.captures == 2
    assert sum(g.nbytes for g in held) > sum(g.static_q.nbytes for g in held)  # the memory pool is counted
    assert graphed.cache_bytes() >= sum(g.nbytes for g in held)
    new_generation()
    q, k, v = block_call(prefix=512, d=64, dtype=torch.bfloat16)
    with denoising_step(0, 4):
        graphed(q.cuda(), k.cuda(), v.cuda(), layer="a")
    assert graphed._cache.graphs() == []  # released at a new generation


@cuda_only
@pytest.mark.parametrize("name", ["flashblock", "losa"])
def test_automatic_graphs_on_gpu(name):
    # The default on a GPU: real graphs, captured on the second sighting of a buffer, equal to eager bit for bit.
    plan = cache_blocks(blocks=3, steps=5, prompt=8000, nq=32, hq=8, d=128, dtype=torch.bfloat16, device="cuda")
    eager = make_method(name, min_seq_len=0, block_size=128, cuda_graphs=False)
    auto = make_method(name, min_seq_len=0, block_size=128)
    assert_equal_outputs(drive_cache(eager, plan), drive_cache(auto, plan))
    assert auto._cache.captures >= 4 and len(auto._cache.graphs()) >= 2


@cuda_only
@pytest.mark.parametrize("name", ["flashblock", "losa"])
def test_float32_inputs_on_gpu(name, caplog):
    # float32 takes PyTorch fallbacks on a GPU: whatever of them would synchronise is never captured, the
    # outputs equal eager, and the CUDA random generator still works afterwards.
    plan = cache_blocks(blocks=3, steps=4, prompt=1000, nq=32, hq=8, d=64, dtype=torch.float32, device="cuda")
    eager = make_method(name, min_seq_len=0, block_size=128, cuda_graphs=False)
    for mode in (None, True):
        graphed = make_method(name, min_seq_len=0, block_size=128, cuda_graphs=mode)
        with caplog.at_level("WARNING"):
            assert_equal_outputs(drive_cache(eager, plan), drive_cache(graphed, plan))
        assert not [r for r in caplog.records if "capture failed" in r.getMessage()]
        torch.randn(4, device="cuda")


@cuda_only
def test_a_step_that_synchronises_runs_eager_on_gpu(caplog):
    from sparsediff.runtime import step_cache
    from sparsediff.runtime.step_cache import GraphSlot, LayerCache, run_step

    def step(q, k):  # a host read: cannot be captured
        return (q * float(k.sum()),)

    q, k = torch.randn(4, 8, device="cuda"), torch.randn(16, device="cuda")
    cache, slot = LayerCache("test"), GraphSlot()
    with caplog.at_level("WARNING"):
        for _ in range(3):  # two warm-ups that synchronise, then eager for good
            (out,), replayed = run_step(step, slot, q, (k,), cache, True)
            torch.testing.assert_close(out, q * k.sum())
            assert not replayed
    assert slot.graph is False and cache.captures == 0
    assert any("synchronises with the host" in r.getMessage() for r in caplog.records)
    # A capture that fails anyway (the sync check bypassed) leaves the random generator usable.
    step_cache._warm_up(step, q, (k,))
    with pytest.raises(RuntimeError):  # torch.AcceleratorError: not permitted while capturing
        step_cache._capture(step, q, (k,))
    step_cache._reset_after_failed_capture(q.device)
    torch.randn(4, device="cuda")


@cuda_only
@pytest.mark.parametrize("d,nq,prompt", [(64, 32, 8000), (128, 32, 8192), (128, 128, 8000)])
def test_plain_graphs_on_a_growing_cache_on_gpu(d, nq, prompt):
    # The first step captured once per layer and replayed at every block, bit for bit; 128-key blocks take the
    # Gluon kernel on an H100. Prefix 8000 leaves a partial last key block, 8192 none.
    plan = cache_blocks(blocks=4, steps=5, prompt=prompt, nq=nq, hq=8, d=d, dtype=torch.bfloat16, device="cuda")
    eager, graphed = method(block_size=128), method(block_size=128, cuda_graphs=True)
    got = drive_cache(graphed, plan)
    assert_equal_outputs(drive_cache(eager, plan), got)
    assert graphed._cache.captures == 4 and len(graphed._cache.graphs()) == 4
    for blk, ((k, v), n, per_step) in enumerate(plan):  # each block's first step (replayed from block 1) is dense
        q, kb, vb = per_step[0]
        out, lse = got[blk * 2 * len(per_step)]
        kk, vv = torch.cat([k[:, :, :n], kb], 2), torch.cat([v[:, :, :n], vb], 2)
        assert_attention((out, lse), q, kk, vv)


@cuda_only
def test_plain_graphs_same_buffer_each_block_on_gpu():
    plan = cache_blocks(blocks=4, steps=4, same_prefix=True, prompt=16384, nq=32, hq=8, d=128,
                        dtype=torch.bfloat16, device="cuda")
    eager, graphed = method(block_size=128), method(block_size=128, cuda_graphs=True)
    assert_equal_outputs(drive_cache(eager, plan), drive_cache(graphed, plan))
    assert graphed._cache.captures == 6  # per layer: cached step on copies (block 0), first and in-place (block 1)


@cuda_only
def test_plain_graphs_share_one_memory_pool_on_gpu():
    # Eight layers' first-step graphs hold about one graph's work memory (the split partials), not eight.
    plan = cache_blocks(blocks=2, steps=2, prompt=32768, nq=32, hq=32, hkv=8, d=128, dtype=torch.bfloat16,
                        device="cuda")
    one, eight = (method(block_size=128, cuda_graphs=True) for _ in range(2))
    drive_cache(one, plan, layers=("a",))
    drive_cache(eight, plan, layers=tuple("abcdefgh"))
    assert one._cache.captures == 2 and eight._cache.captures == 16
    single = sum(g.nbytes for g in one._cache.graphs())
    assert single > 8 * 2**20  # the split partials of a 32k prefix: several MiB
    assert sum(g.nbytes for g in eight._cache.graphs()) < 2 * single


@cuda_only
def test_branch_stream_forks_only_inside_a_capture_on_gpu():
    # LoSA's captured cached step runs its window attention on this stream: a parallel branch of the graph.
    from sparsediff.runtime import step_cache

    q = torch.zeros(4, device="cuda")
    assert step_cache.branch_stream(q) is None  # eager: one stream
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    branch = torch.empty_like(q)  # made before the capture, as LoSA's window buffers are
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            main = torch.cuda.current_stream()
            side = step_cache.branch_stream(q)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                torch.add(q, 1, out=branch)
            main.wait_stream(side)
            out = branch * 2
        finally:
            graph.capture_end()
    assert side != main
    q.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.full((4,), 8.0, device="cpu"))
