"""Error vs dense per step of FlashBlock / LoSA on the fidelity suite (``sparsediff probe --block-diffusion``)."""

import argparse
import json

import pytest
import torch

from sparsediff.commands import probe as probe_cli
from sparsediff.eval.blockdiff_probe import block_run, build_block_method, evaluate_steps, evolve
from sparsediff.eval.fidelity import make_probe
from sparsediff.testing.tolerance import ROUNDING, tolerance

# Relative L2 error (an RMS) and 1 - cosine of a float32 result that recomputes dense attention: a few roundings.
EXACT = tolerance(torch.float32, ulps=ROUNDING)["rtol"]


def test_evolve_moves_the_chosen_share_by_the_given_amounts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4000, 16, device="cpu")
    y = evolve(x, 0.25, gen, big=0.3, small=0.01)
    change = ((y - x).norm(dim=-1) / x.norm(dim=-1))[0, 0]
    moved = change > 0.1
    assert 0.22 < float(moved.float().mean()) < 0.28  # the same tokens move in every head
    assert torch.equal(moved, ((y - x).norm(dim=-1) / x.norm(dim=-1))[0, 1] > 0.1)
    # y - x cancels: its float32 rounding, relative to the step, grows as 1 / step.
    for rows, step in ((moved, 0.3), (~moved, 0.01)):
        torch.testing.assert_close(change[rows], torch.full_like(change[rows], step),
                                   **tolerance(torch.float32, ulps=ROUNDING / step, magnitude=step))


def test_block_run_layout_and_errors():
    probe = make_probe("sinks", heads=2, n=640, dim=16)
    run = block_run(probe, block=128, steps=4)
    assert run.n_prefix == 512 and len(run.steps) == 4 and run.kv[0].shape == probe.k.shape
    q0, k0, v0 = run.steps[0]  # the first step is the probe's own last block
    assert torch.equal(q0, probe.q[:, :, 512:]) and torch.equal(k0, probe.k[:, :, 512:])
    assert not torch.equal(run.steps[1][0], q0)
    with pytest.raises(ValueError, match="block must lie"):
        block_run(probe, block=640)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        block_run(probe, steps=1)
    with pytest.raises(ValueError, match="active_frac must lie"):
        block_run(probe, active_frac=1.5)
    with pytest.raises(ValueError, match="'flashblock' or 'losa'"):
        build_block_method("ba_att", 64)
    with pytest.raises(ValueError, match="key=value"):
        build_block_method("losa/threshold", 64)


@pytest.mark.parametrize("generator", ["video", "sinks"])
def test_errors_per_step(generator):
    run = block_run(make_probe(generator, heads=2, n=1024, dim=16), block=64, steps=4)
    for spec in ("flashblock/refresh_every=1", "losa/threshold=0/sparsity=0"):  # dense to rounding at every step
        rows = evaluate_steps(build_block_method(spec, 64), run)
        assert len(rows) == 4 and max(r["rel_l2"] for r in rows) < EXACT, (spec, rows)
        assert min(r["cosine"] for r in rows) > 1 - EXACT
    flash = evaluate_steps(build_block_method("flashblock", 64), run)
    assert flash[0]["rel_l2"] < EXACT  # the block's first step computes the prefix attention
    assert all(r["rel_l2"] > 1e-3 for r in flash[1:])  # later steps reuse it while the queries move
    losa = evaluate_steps(build_block_method("losa", 64), run)
    assert losa[0]["rel_l2"] < EXACT and losa[0]["active_share"] == 1.0
    assert all(0.0 < r["active_share"] < 1.0 for r in losa[1:])  # a quarter of the tokens move per step
    assert all(0.0 < r["union_density"] < 1.0 for r in losa[1:])


def test_probe_cli_block_diffusion(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    probe_cli.add_arguments(parser)
    args = parser.parse_args(["--block-diffusion", "--generators", "video,stripes", "--methods",
                              "flashblock,losa/sparsity=0.5", "--n", "768", "--heads", "1", "--dim", "24",
                              "--block-size", "64", "--block", "64", "--steps", "3", "--out", str(tmp_path)])
    assert probe_cli.run(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["steps"] == 3 and len(data["rows"]) == 2 * 2 * 3
    assert {r["method"] for r in data["rows"]} == {"flashblock", "losa/sparsity=0.5"}
    assert all("active_share" in r for r in data["rows"] if r["method"].startswith("losa"))
    assert "| stripes | losa/sparsity=0.5 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "blocksteps_video.png").stat().st_size > 1000
    bad = parser.parse_args(["--block-diffusion", "--methods", "ba_att", "--out", str(tmp_path)])
    assert probe_cli.run(bad) == 2
    assert "'flashblock' or 'losa'" in capsys.readouterr().err
