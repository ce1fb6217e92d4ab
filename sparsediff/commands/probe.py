"""``sparsediff probe``: attention fidelity of block-sparse methods vs dense attention.

    sparsediff probe --generators video,sinks,stripes,clustered,random \\
        --methods ba_att,block_mean,fixed,xattention --densities 0.1,0.25,0.5 --out probe_out/
    sparsediff probe --qkv captured.safetensors --methods ba_att,xattention --out probe_out/
    sparsediff probe --block-diffusion --methods flashblock,losa --out blockprobe/   # error per step
    sparsediff probe --generators video --grid 8x32x32 --methods oracle,ba_att --out tiles/  # row-major vs tiled

A method is a selector name (``ba_att`` runs the BA-Att method with norm sorting; the others run
``BlockSparseMethod(selector=...)``) with optional config overrides after slashes, e.g.
``ba_att/beta=0/norm_sort=false``. Writes ``results.json``, ``results.md`` and PNG plots to ``--out``.
Probes with a latent grid (the video generator, captures with ``grid`` metadata) run under each of
``--layouts`` (row-major and 3-D tiles, :mod:`sparsediff.methods.token_layout`), side by side.
``--block-diffusion`` evaluates FlashBlock / LoSA instead: each probe's last ``--block`` tokens are an
active block denoised over ``--steps`` steps, and the error vs dense is reported per step
(:mod:`sparsediff.eval.blockdiff_probe`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys

import torch

from ..eval.probe_report import add_oracle_share, markdown_table, plot_curves, plot_sorting
from ..methods.base import available_specs, method_at_density, parse_spec
from .args import densities

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "ba_att,block_mean,fixed,xattention"
BLOCK_METHODS = "flashblock,losa,flashblock/sparse_selector=ba_att/sparsity=0.8"


def add_arguments(parser) -> None:
    parser.add_argument("--generators", default="video,sinks,stripes,clustered,random",
                        help="comma-separated synthetic generators (ignored with --qkv)")
    parser.add_argument("--qkv", default=None, help="a .safetensors capture of q, k, v instead of generators")
    parser.add_argument("--methods", type=method_specs, default=None,
                        help="comma-separated methods; overrides after slashes: ba_att/beta=0/norm_sort=false "
                             f"(default: {DEFAULT_METHODS}; with --block-diffusion: {BLOCK_METHODS})")
    parser.add_argument("--densities", type=densities, default="0.1,0.25,0.5",
                        help="comma-separated target densities (1 - sparsity), each in (0, 1]")
    parser.add_argument("--n", type=int, default=4096, help="tokens per sequence (generators)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--grid", type=grid_arg, default=None,
                        help="FxHxW latent grid of the video generator (default: 16 x 16 frames of --n tokens)")
    parser.add_argument("--layouts", type=layout_list, default=["rowmajor", "tiled"],
                        help="token orders compared on probes with a grid (video, captures with a grid): "
                             "rowmajor (as given) and/or tiled (3-D tiles of --block-size tokens)")
    parser.add_argument("--tile", type=grid_arg, default=None,
                        help="FxHxW tile of the tiled layout (default: token_layout.default_tile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="probe_out", help="output folder")
    parser.add_argument("--no-plots", action="store_true")
    blocks = parser.add_argument_group("block diffusion (FlashBlock, LoSA): error vs dense per denoising step")
    blocks.add_argument("--block-diffusion", action="store_true",
                        help="treat each probe's last --block tokens as the active block of a block-diffusion step")
    blocks.add_argument("--block", type=int, default=128, help="active block tokens")
    blocks.add_argument("--steps", type=int, default=8, help="denoising steps of the block")
    blocks.add_argument("--active-frac", type=float, default=0.25,
                        help="share of the block's tokens that move a lot (relative change 0.3) per step")


def method_specs(text: str) -> list[str]:
    """``--methods``: comma-separated specs whose names the library knows (dense is the reference, not a method
    to probe); overrides are checked when the methods are built, before the probe runs."""
    names = [n for n in available_specs() if n != "dense"]
    specs = [m.strip() for m in text.split(",") if m.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"give at least one method: {', '.join(names)}")
    for spec in specs:
        try:
            name, _ = parse_spec(spec)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}; available: {', '.join(names)}")
    return specs


def grid_arg(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"expected FxHxW with three positive ints (e.g. 8x32x32), got {text!r}")
    return grid


def layout_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ("rowmajor", "tiled")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"layouts are rowmajor and/or tiled, got {text!r}")
    return names


def run(args) -> int:
    from tqdm import tqdm

    from ..eval.fidelity import dense_reference, evaluate, load_qkv, make_probe

    densities = args.densities
    methods = args.methods or (BLOCK_METHODS if args.block_diffusion else DEFAULT_METHODS).split(",")
    try:  # bad overrides and methods --block-diffusion cannot run stop here, before any work
        if args.block_diffusion:
            from ..eval.blockdiff_probe import build_block_method

            for spec in methods:
                build_block_method(spec, args.block_size)
        else:
            for spec in methods:
                method_at_density(spec, densities[0], args.block_size)
    except (TypeError, ValueError) as err:
        print(f"sparsediff probe: {err}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    if args.qkv:
        probes = load_qkv(args.qkv, device=args.device, dtype=dtype)
    else:
        probes = [make_probe(g.strip(), heads=args.heads, n=args.n, dim=args.dim, seed=args.seed, dtype=dtype,
                             grid=args.grid if g.strip() == "video" else None)
                  for g in args.generators.split(",") if g.strip()]
        for p in probes:
            p.q, p.k, p.v = (t.to(args.device) for t in (p.q, p.k, p.v))
    if args.block_diffusion:
        return run_block_diffusion(args, probes, methods, out_dir)
    from ..methods.token_layout import make_layout

    def layouts_of(probe):
        if probe.grid is None or probe.causal or probe.q.shape[2] != probe.k.shape[2]:
            return [("rowmajor", None)]
        tiles = make_layout(probe.grid, args.block_size, args.tile, probe.global_tokens, probe.q.device)
        return [(name, tiles if name == "tiled" else None) for name in args.layouts]

    rows = []
    runs = sum(len(layouts_of(p)) for p in probes) * len(methods) * len(densities)
    with tqdm(total=runs, desc="probe", unit="run") as bar:
        for probe in probes:
            reference = dense_reference(probe)
            for name, tiles in layouts_of(probe):
                for spec in methods:
                    for density in densities:
                        result = evaluate(method_at_density(spec, density, args.block_size), probe, reference, tiles)
                        rows.append({"probe": probe.name, "layout": name, "method": spec, "target_density": density,
                                     **result, "n": probe.k.shape[2], "grid": probe.grid,
                                     "tile": tiles.tile if tiles else None, "meta": probe.meta})
                        bar.update()
    add_oracle_share(rows)
    config = {key: getattr(args, key) for key in ("n", "heads", "dim", "block_size", "seed", "dtype", "grid", "layouts",
                                                  "tile")}
    (out_dir / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    table = markdown_table(rows)
    (out_dir / "results.md").write_text(table)
    print(table)
    if not args.no_plots:
        paths = plot_curves(rows, out_dir)
        middle = densities[len(densities) // 2]
        for probe in probes:
            if math.ceil(probe.k.shape[2] / args.block_size) <= 256:  # heatmaps of moderate size only
                paths.append(plot_sorting(probe, middle, args.block_size, out_dir))
        print("plots:", ", ".join(str(p) for p in paths))
    return 0


def run_block_diffusion(args, probes, methods, out_dir: pathlib.Path) -> int:
    from tqdm import tqdm

    from ..eval.blockdiff_probe import block_run, build_block_method, evaluate_steps, plot_steps, summary_table

    built = {spec: build_block_method(spec, args.block_size) for spec in methods}  # bad specs fail first
    rows = []
    for probe in tqdm(probes, desc="block-diffusion probe", unit="probe"):
        run = block_run(probe, block=args.block, steps=args.steps, active_frac=args.active_frac, seed=args.seed)
        for spec, method in built.items():
            rows += [{"probe": probe.name, "method": spec, **r} for r in evaluate_steps(method, run)]
    config = {key: getattr(args, key) for key in ("n", "heads", "dim", "block_size", "seed", "dtype", "block",
                                                  "steps", "active_frac")}
    (out_dir / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    table = summary_table(rows)
    (out_dir / "results.md").write_text(table)
    print(table)
    if not args.no_plots:
        print("plots:", ", ".join(str(p) for p in plot_steps(rows, out_dir)))
    return 0
