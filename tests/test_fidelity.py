"""Fidelity suite: generators, capture format, metrics against explicit references, the probe CLI."""

import dataclasses
import json
import math

import pytest
import torch

from sparsediff.commands import probe as probe_cli
from sparsediff.eval import probe_report
from sparsediff.eval.fidelity import (
    GENERATORS,
    block_mass,
    dense_reference,
    evaluate,
    kept_mask,
    load_qkv,
    make_probe,
    save_qkv,
)
from sparsediff.kernels import index_to_mask
from sparsediff.methods.ba_att import BAAttMethod
from sparsediff.methods.base import method_at_density
from sparsediff.methods.block_sparse import BlockSparseMethod
from sparsediff.testing.tolerance import ROUNDING, tolerance

BS = 64
FP32 = tolerance(torch.float32)
REPORTED = 0.5e-6  # per-head metrics are reported to 6 decimals: half a unit on top of float32's own error
EXACT = tolerance(torch.float32, ulps=ROUNDING)["rtol"]  # lossless metrics: a few float32 roundings


def test_generators_are_seeded_and_shaped():
    for name in GENERATORS:
        a = make_probe(name, heads=2, n=600, dim=24, seed=3)
        b = make_probe(name, heads=2, n=600, dim=24, seed=3)
        c = make_probe(name, heads=2, n=600, dim=24, seed=4)
        assert a.q.shape == a.k.shape == a.v.shape == (1, 2, 600, 24)
        assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and not torch.equal(a.k, c.k)
        assert bool(torch.isfinite(a.q).all() and torch.isfinite(a.k).all())
    assert make_probe("video", n=600, dim=24).frame_size == 256
    with pytest.raises(ValueError, match="unknown generator"):
        make_probe("nope")


def test_video_generator_is_local_in_space_and_time():
    p = make_probe("video", heads=1, n=1024, dim=48)
    probs = torch.softmax(p.q[0, 0].double() @ p.k[0, 0].double().T / math.sqrt(48), dim=-1)
    token = 2 * 256 + 8 * 16 + 8  # frame 2, row 8, column 8
    neighbours = [token, token + 1, token - 1, token + 16, token - 16, token + 256, token - 256]
    assert probs[token, neighbours].sum() > 50 * probs[token].mean() * len(neighbours)


@pytest.mark.parametrize("causal", [False, True])
def test_metrics_match_explicit_computation(causal):
    p = make_probe("stripes", heads=2, n=512, dim=32)
    p.causal = causal
    method = BAAttMethod(sparsity=0.6, block_size=BS, min_seq_len=0, norm_sort=not causal)
    result = evaluate(method, p)
    kept, mass, perm = kept_mask(method, p, head=1)
    # Recall from the explicit per-block mass of head 1 (mass is a mean over each block's queries).
    recall_h1 = (mass.double() * kept).sum(-1).mean().item()
    assert abs(result["per_head"]["recall"][1] - recall_h1) <= FP32["atol"] + REPORTED
    plan = method.plan(p.q, p.k, p.v, causal=causal)
    out = torch.nn.functional.scaled_dot_product_attention(p.q, p.k, p.v, is_causal=causal)
    from sparsediff.kernels.block_sparse.reference import block_sparse_attention_ref

    sparse, _ = block_sparse_attention_ref(p.q, plan.k, plan.v, plan.block_index, plan.block_count,
                                           causal=causal, block_size=BS)
    rel = ((sparse - out).flatten(2).norm(dim=-1) / out.flatten(2).norm(dim=-1))[0]
    per_head = torch.tensor(result["per_head"]["rel_l2"], dtype=torch.float64)
    torch.testing.assert_close(per_head, rel.double(), rtol=FP32["rtol"], atol=FP32["atol"] + REPORTED)
    from sparsediff.kernels.masks import causal_block_mask

    visible = causal_block_mask(8, 8, 512, 512, BS) if causal else torch.ones(8, 8, dtype=torch.bool)
    kept_pairs = index_to_mask(plan.block_index, plan.block_count, 8) & visible
    assert result["density"] == pytest.approx(kept_pairs.sum().item() / (2 * visible.sum().item()))
    assert 0.35 < result["density"] < 0.6


def test_full_density_is_lossless():
    p = make_probe("clustered", heads=2, n=500, dim=32)
    for method in (BAAttMethod(sparsity=0.0, block_size=BS, min_seq_len=0),
                   BlockSparseMethod(selector="xattention", sparsity=0.0, block_size=BS, min_seq_len=0)):
        r = evaluate(method, p)
        assert r["recall"] > 1 - EXACT and r["rel_l2"] < EXACT and r["cosine"] > 1 - EXACT and r["density"] == 1.0


def test_block_mass_rows_sum_to_one():
    p = make_probe("sinks", heads=1, n=300, dim=16)
    mass = block_mass(p.q, p.k, block_size=BS)
    torch.testing.assert_close(mass.sum(-1), torch.ones(5), **tolerance(torch.float32, ulps=ROUNDING))


def test_norm_sorting_gathers_scattered_clusters():
    # Keys of each cluster are scattered; sorting by norm packs them into few blocks.
    p = make_probe("clustered", heads=2, n=1024, dim=32)
    ref = dense_reference(p)
    kw = dict(sparsity=0.5, block_size=BS, min_seq_len=0)
    sorted_recall = evaluate(BAAttMethod(norm_sort=True, sort_segment="sequence", **kw), p, ref)["recall"]
    plain_recall = evaluate(BAAttMethod(norm_sort=False, **kw), p, ref)["recall"]
    fixed_recall = evaluate(BlockSparseMethod(selector="fixed", **kw), p, ref)["recall"]
    assert sorted_recall > plain_recall + 0.2 and sorted_recall > fixed_recall + 0.2


def test_capture_round_trip(tmp_path):
    q, k, v = torch.randn(1, 2, 100, 16), torch.randn(1, 1, 100, 16), torch.randn(1, 1, 100, 16)
    save_qkv(tmp_path / "one.safetensors", q, k, v, layer="blocks.3.attn1", step=7, frame_size=50, causal=1)
    (probe,) = load_qkv(tmp_path / "one.safetensors")
    assert torch.equal(probe.q, q.cpu()) and torch.equal(probe.k, k.cpu()) and torch.equal(probe.v, v.cpu())
    assert probe.frame_size == 50 and probe.causal and probe.meta == {"layer": "blocks.3.attn1", "step": "7"}
    from safetensors.torch import save_file

    save_file({"a.q": q[0].clone(), "a.k": k[0].clone(), "a.v": v[0].clone(), "b.q": q, "b.k": k, "b.v": v},
              str(tmp_path / "two.safetensors"), metadata={"b.global_tokens": "16"})
    probes = load_qkv(tmp_path / "two.safetensors")
    assert [p.name for p in probes] == ["a", "b"] and probes[0].q.shape == (1, 2, 100, 16)
    assert probes[1].global_tokens == 16 and probes[0].global_tokens == 0
    save_file({"x.q": q, "x.k": k}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        load_qkv(tmp_path / "bad.safetensors")


def test_probe_cli_writes_report(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    probe_cli.add_arguments(parser)
    args = parser.parse_args(["--generators", "video,clustered", "--methods", "ba_att,fixed,ba_att/beta=0",
                              "--densities", "0.25,0.5", "--n", "512", "--heads", "1", "--dim", "24",
                              "--block-size", "64", "--out", str(tmp_path)])
    assert probe_cli.run(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    # The video probe (a 2 x 16 x 16 grid) runs row-major and tiled; the clustered one has no grid.
    assert len(data["rows"]) == (2 + 1) * 3 * 2
    assert {r["method"] for r in data["rows"]} == {"ba_att", "fixed", "ba_att/beta=0"}
    assert {(r["probe"], r["layout"]) for r in data["rows"]} == {
        ("video", "rowmajor"), ("video", "tiled"), ("clustered", "rowmajor")}
    report = (tmp_path / "results.md").read_text()
    assert "| video | rowmajor | ba_att |" in report and "| video | tiled | ba_att |" in report
    for name in ("curves_video.png", "curves_clustered.png", "sorting_video.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with pytest.raises(ValueError, match="key=value"):
        method_at_density("ba_att/beta", 0.5, 64)


def test_probe_report_gives_recall_as_a_share_of_the_oracle(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    probe_cli.add_arguments(parser)
    args = parser.parse_args(["--generators", "stripes", "--methods", "oracle,ba_att,fixed", "--densities", "0.5",
                              "--n", "512", "--heads", "1", "--dim", "24", "--block-size", "64", "--out",
                              str(tmp_path), "--no-plots"])
    assert probe_cli.run(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["oracle"]["recall_of_oracle"] == pytest.approx(1.0)
    for name in ("ba_att", "fixed"):
        assert rows[name]["recall_of_oracle"] == pytest.approx(rows[name]["recall"] / rows["oracle"]["recall"])
    # At the same number of kept blocks per query block the oracle keeps the most mass.
    assert rows["ba_att"]["density"] == pytest.approx(rows["oracle"]["density"])
    assert rows["ba_att"]["recall_of_oracle"] <= 1.0 + EXACT  # float32 recalls
    assert "recall / oracle" in (tmp_path / "results.md").read_text()
    # Without the oracle in the run the column is left out.
    plain = [{"probe": "p", "method": "fixed", "target_density": 0.5, "density": 0.5, "recall": 0.9,
              "rel_l2": 0.1, "cosine": 0.99}]
    probe_report.add_oracle_share(plain)
    assert plain[0]["recall_of_oracle"] is None and "oracle" not in probe_report.markdown_table(plain)


def test_probe_cli_grid_tile_and_layouts(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    probe_cli.add_arguments(parser)
    args = parser.parse_args(["--generators", "video", "--grid", "3x8x12", "--tile", "1x4x4", "--layouts", "tiled",
                              "--methods", "oracle,ba_att", "--densities", "0.5", "--heads", "1", "--dim", "24",
                              "--block-size", "16", "--out", str(tmp_path), "--no-plots"])
    assert probe_cli.run(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["layout"] for r in rows} == {"tiled"} and all(r["n"] == 3 * 8 * 12 for r in rows)
    assert all(tuple(r["grid"]) == (3, 8, 12) and tuple(r["tile"]) == (1, 4, 4) for r in rows)
    with pytest.raises(SystemExit):
        parser.parse_args(["--grid", "3x8"])
    assert "FxHxW" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--layouts", "zorder"])


def test_capture_grid_round_trip_and_tiled_metrics_match_a_permuted_probe(tmp_path):
    from sparsediff.methods.token_layout import make_layout

    p = make_probe("video", heads=2, dim=24, grid=(2, 8, 16))
    save_qkv(tmp_path / "g.safetensors", p.q, p.k, p.v, grid="2x8x16")
    (loaded,) = load_qkv(tmp_path / "g.safetensors")
    assert loaded.grid == (2, 8, 16)
    tiles = make_layout(p.grid, 32)
    method = method_at_density("oracle", 0.5, 32)
    via_tiles = evaluate(method, p, tiles=tiles)
    permuted = dataclasses.replace(p, q=tiles.permute(p.q), k=tiles.permute(p.k), v=tiles.permute(p.v))
    direct = evaluate(method, permuted)
    for key in ("recall", "rel_l2", "density"):
        assert via_tiles[key] == pytest.approx(direct[key], rel=EXACT)  # the same sums in another order
