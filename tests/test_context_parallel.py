"""Diffusers' Ulysses context parallelism with sparsediff processors: two CPU processes (gloo), a tiny Wan.

Each rank holds every token of half the heads after the all-to-all, so a method runs unchanged per rank; the
global allocation gathers the candidate masses of both ranks so the kept blocks are those of one process.
"""

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from sparsediff.testing.tolerance import ROUNDING, tolerance  # noqa: E402

# A tiny float32 model, its heads split over two ranks: the same per-head math, a few roundings apart.
MODEL_TOL = tolerance(torch.float32, ulps=ROUNDING)
SETTINGS = {
    "keep_all": dict(method="ba_att", sparsity=0.0, min_seq_len=0, block_size=16),
    "ba_att": dict(method="ba_att", sparsity=0.6, min_seq_len=0, block_size=16, fine_block_size=None),
    "xattention": dict(method="block_sparse", selector="xattention", sparsity=0.6, min_seq_len=0, block_size=16),
    "sparsed": dict(method="sparsed", sparsity=0.6, min_seq_len=0, block_size=16, dense_step_fraction=0.25),
    "ba_att_residual": dict(method="ba_att", sparsity=0.6, min_seq_len=0, block_size=16, fine_block_size=None,
                            residual_every=2),
}
STEPS = 4  # a short denoising loop: SparseD's dense first step and pattern, the residual's refresh and reuse


def _forward(model, kwargs):
    """The last step's output of a ``STEPS``-step loop on the same latents (what a step-aware method sees)."""
    from sparsediff.runtime import step_state

    step_state.new_generation()
    for step in range(STEPS):
        with step_state.denoising_step(step, STEPS), torch.no_grad():
            out = model(**kwargs, return_dict=False)[0]
    return out


def _outputs(model, kwargs, settings):
    import sparsediff

    outs = {}
    for name, cfg in settings.items():
        cfg = dict(cfg)
        sparsediff.enable(model, cfg.pop("method"), **cfg)
        outs[name] = _forward(model, kwargs)
        sparsediff.disable(model)
    return outs


def _rank(rank, rendezvous, path, ring):
    # A file rendezvous: no port to pick, so runs side by side cannot collide.
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.accelerator.device_count = lambda: 1  # diffusers picks the device as rank % devices; a CPU has none
    from diffusers import ContextParallelConfig

    import sparsediff
    from sparsediff.testing.tiny import tiny_inputs, tiny_transformer

    torch.manual_seed(0)
    model = tiny_transformer("wan")
    kwargs = tiny_inputs("wan", model)
    with torch.no_grad():
        dense = model(**kwargs, return_dict=False)[0]
    single = _outputs(model, kwargs, SETTINGS)  # before parallelism: one process, all heads
    result = {"dense": dense, "single": single}
    if ring:
        sparsediff.enable(model, "ba_att", sparsity=0.5, min_seq_len=0, block_size=16)
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
        try:
            with torch.no_grad():
                model(**kwargs, return_dict=False)
            result["error"] = None
        except NotImplementedError as err:
            result["error"] = str(err)
    else:
        processors = {}
        for name, cfg in SETTINGS.items():
            cfg = dict(cfg)
            processors[name] = sparsediff.SparseAttnProcessor(cfg.pop("method"), **cfg)
        # Parallelism is enabled once, with a processor in place; the others are swapped in afterwards and
        # get the parallel config the same way (diffusers sets it on the processor objects it finds).
        sparsediff.enable(model, processors["keep_all"])
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        config = processors["keep_all"]._parallel_config
        parallel = {}
        for name, proc in processors.items():
            proc._parallel_config = config
            model.set_attn_processor(proc) if name != "keep_all" else None
            parallel[name] = _forward(model, kwargs)
            parallel[name + "_routes"] = dict(proc.routes)
            parallel[name + "_balance"] = proc.rank_balance()
        result["parallel"] = parallel
    if rank == 0:
        torch.save(result, path)
    torch.distributed.destroy_process_group()


def _run(tmp_path, ring=False):
    path = str(tmp_path / "result.pt")
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), path, ring), nprocs=2)
    return torch.load(path)


def test_ulysses_gives_the_single_process_output(tmp_path):
    result = _run(tmp_path)
    single, parallel = result["single"], result["parallel"]
    torch.testing.assert_close(parallel["keep_all"], result["dense"], **MODEL_TOL)
    for name in ("ba_att", "xattention", "sparsed", "ba_att_residual"):
        if name != "ba_att_residual":  # same latents every step: sparse + the cached residual is dense again
            assert (single[name] - result["dense"]).abs().max() > 1e-4  # sparse for real
        torch.testing.assert_close(parallel[name], single[name], **MODEL_TOL)
        assert parallel[name + "_routes"].get("sparse", 0) > 0
        balance = parallel[name + "_balance"]
        if name != "sparsed":  # SparseD keeps no realised density
            assert len(balance["per_rank"]) == 2 and balance["max_over_mean"] >= 1.0
    # Per-row budgets give every head the same count; the global one moves blocks between heads (and ranks).
    assert parallel["xattention_balance"]["max_over_mean"] == pytest.approx(1.0)
    assert parallel["keep_all_balance"]["per_rank"] == [1.0, 1.0]


def test_ring_attention_is_refused_with_a_clear_error(tmp_path):
    result = _run(tmp_path, ring=True)
    assert result["error"] and "ulysses_degree" in result["error"]
