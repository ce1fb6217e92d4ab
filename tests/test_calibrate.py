"""``sparsediff calibrate``: convex-hull allocation on synthetic curves, a run on captured q/k/v files, and a
small run on the real SmolLM2 weights whose budget file loads into a method."""

import json

import pytest
import torch

from sparsediff.cli import main
from sparsediff.eval.calibrate import allocate, calibrate, lower_hull
from sparsediff.eval.fidelity import make_probe, save_qkv
from sparsediff.methods import make_method
from sparsediff.methods.budgets import LayerBudgets
from sparsediff.testing.tolerance import ROUNDING, tolerance


def test_lower_hull_drops_points_above_the_hull():
    xs, ys = [0.1, 0.2, 0.3, 0.4], [1.0, 0.95, 0.3, 0.2]
    assert lower_hull(xs, ys) == [0, 2, 3]


def test_allocation_spends_density_where_error_falls_fastest():
    curves = {"steep": {"density": [0.1, 0.3, 0.5], "value": [0.9, 0.2, 0.1]},
              "flat": {"density": [0.1, 0.3, 0.5], "value": [0.2, 0.18, 0.17]}}
    choice = allocate(curves, 0.2)
    assert choice == {"steep": 1, "flat": 0}
    assert allocate(curves, 0.5) == {"steep": 2, "flat": 2}
    assert allocate(curves, 0.05) == {"steep": 0, "flat": 0}  # nothing cheaper exists


def test_calibrate_on_captured_qkv_files(tmp_path):
    paths = []
    for i, name in enumerate(("sinks", "stripes")):
        p = make_probe(name, heads=2, n=512, dim=32, seed=i)
        path = tmp_path / f"{name}.safetensors"
        save_qkv(path, p.q, p.k, p.v, layer=f"blocks.{i}.attn1")
        paths.append(str(path))
    out = tmp_path / "budgets.json"
    assert main(["calibrate", "--qkv", *paths, "--density", "0.5", "--block-size", "32", "--grid",
                 "0.25,0.5,0.75,1.0", "--out", str(out), "--no-progress"]) == 0
    table = LayerBudgets.load(out)
    assert set(table.layers) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert abs(table.meta["realised_density"] - 0.5) < 0.1
    uniform = table.meta["uniform_mean_value"]  # the same float64 values, summed over another choice
    assert table.meta["mean_value"] <= uniform + tolerance(torch.float64, ulps=ROUNDING, magnitude=abs(uniform))["atol"]
    assert len(table.density("blocks.0.attn1", default=1.0, heads=True)) == 2


def test_calibrate_rejects_bad_input(tmp_path, capsys):
    assert main(["calibrate", "--qkv", str(tmp_path / "none.safetensors"), "--density", "0.5",
                 "--out", str(tmp_path / "b.json")]) == 2
    assert main(["calibrate", "--density", "0.5", "--grid", "0,2", "--out", str(tmp_path / "b.json")]) == 2
    assert "grid" in capsys.readouterr().err
    with pytest.raises(ValueError, match="objective"):
        calibrate([], "ba_att", 0.5, objective="mse")


def test_calibrate_on_the_real_model(tmp_path, real_captures):
    layers = [(f"model.layers.{i}.self_attn", q, k, v, True, None) for i, (q, k, v) in real_captures.items()]
    table = calibrate(layers, "ba_att", 0.5, grid=(0.3, 0.5, 0.7, 1.0), block_size=32, progress=False)
    assert abs(table.meta["realised_density"] - 0.5) < 0.1
    table.save(tmp_path / "b.json")
    method = make_method("ba_att", block_size=32, min_seq_len=0, budgets=str(tmp_path / "b.json"))
    q, k, v = real_captures[0]
    name = "model.layers.0.self_attn"
    plan = method.plan(q, k, v, causal=True, layer=name)
    want = table.density(name, default=0.5)
    assert abs(float(plan.block_count.sum()) / (9 * 136) - max(want, 0.3)) < 0.15
    assert json.loads((tmp_path / "b.json").read_text())["meta"]["method"] == "ba_att"
    assert torch.isfinite(method(q, k, v, causal=True, layer=name)).all()
