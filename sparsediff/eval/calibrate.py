"""``sparsediff calibrate``: per-layer density budgets from a few prompts, saved for any config to load.

    sparsediff calibrate --model smollm2 --text stdlib --density 0.2 --method ba_att --out budgets.json
    sparsediff calibrate --qkv captures/*.safetensors --density 0.2 --out budgets.json   # any host's captures

For each layer the method runs on that layer's real q/k/v at every density of ``--grid`` and records the mean
relative output error against dense (``--objective error``) or one minus the kept softmax mass (``recall``),
and the density actually realised (forced blocks included). Layer densities are then chosen on the lower convex
hull of each curve, greedily by error saved per unit of density, until the mean realised density reaches
``--density``: the allocation with the least total error at that mean (exact for convex curves). The file also
holds each head's realised density at its layer's budget (used by ``allocation="row"``) and the curves.

Load it with ``BAAttConfig(budgets="budgets.json")``, ``make_method("ba_att", budgets=...)``, any processor's
``budgets=`` keyword or ``sparsediff.enable(model, "ba_att", budgets=...)``; layers it does not name use the
config's ``sparsity``. Measured on SmolLM2 (docs/ba_att.md): the gain over one density for every layer is small
there (the global allocation already adapts inside each layer); it matters where layers differ a lot.
"""

from __future__ import annotations

import sys

import torch

DEFAULT_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
OBJECTIVES = ("error", "recall")


def layer_curve(method_factory, q, k, v, *, causal, scale, layer, grid, objective):
    """``(densities realised, objective values, per-head densities)`` of one layer over ``grid``."""
    from ..methods.block_select import layout
    from ..methods.dense import dense_attention

    ref_out, ref_lse = dense_attention(q.float(), k.float(), v.float(), causal=causal, scale=scale, return_lse=True)
    ref_norm = ref_out.float().pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-30)
    xs, ys, heads = [], [], []
    for density in grid:
        method = method_factory(density)
        plan = method.plan(q, k, v, causal=causal, scale=scale, layer=None)
        out, lse = method.attend(q, plan, causal=causal, scale=scale, return_lse=True)
        lay = layout(q.shape[2], k.shape[2], plan.block_size, q.device, causal=causal)
        per_head = plan.block_count.expand(q.shape[0], q.shape[1], -1).sum(dim=(0, 2)).double() / (
            lay.visible_pairs * q.shape[0])
        if objective == "error":
            err = (out.float() - ref_out.float()).pow(2).sum(dim=(0, 2, 3)).sqrt() / ref_norm
            value = float(err.mean())
        else:
            value = float(1 - torch.exp(lse - ref_lse).nan_to_num(0.0).clamp(max=1.0).mean())
        xs.append(float(per_head.mean()))
        ys.append(value)
        heads.append([round(float(h), 4) for h in per_head])
    return xs, ys, heads


def lower_hull(xs, ys):
    """Indices of the lower convex hull of the points, by increasing x (ties: the lowest y)."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    hull = []
    for i in order:
        if hull and xs[hull[-1]] == xs[i]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(curves: dict, target: float) -> dict:
    """``{layer: index into its curve}`` with mean realised density at most ``target`` (at least each layer's
    cheapest point) and the least summed objective reachable by greedy steps on the convex hulls."""
    hulls = {name: lower_hull(c["density"], c["value"]) for name, c in curves.items()}
    pos = dict.fromkeys(hulls, 0)

    def x(name, p):
        return curves[name]["density"][hulls[name][p]]

    def y(name, p):
        return curves[name]["value"][hulls[name][p]]

    total = sum(x(name, 0) for name in hulls)
    while True:
        steps = [((y(n, p) - y(n, p + 1)) / (x(n, p + 1) - x(n, p)), n) for n, p in pos.items()
                 if p + 1 < len(hulls[n])]
        if not steps:
            break
        _, name = max(steps)
        grow = x(name, pos[name] + 1) - x(name, pos[name])
        if (total + grow) / len(hulls) > target + 1e-9:
            # The best step overshoots: take the best one that still fits, if any.
            fitting = [(g, n) for g, n in steps if (total + x(n, pos[n] + 1) - x(n, pos[n])) / len(hulls)
                       <= target + 1e-9]
            if not fitting:
                break
            _, name = max(fitting)
            grow = x(name, pos[name] + 1) - x(name, pos[name])
        total += grow
        pos[name] += 1
    return {name: hulls[name][p] for name, p in pos.items()}


def calibrate(layers, method_spec: str, target: float, *, grid=DEFAULT_GRID, objective="error", block_size=None,
              progress=True, meta=None):
    """``layers``: iterable of ``(name, q, k, v, causal, scale)``. Returns a :class:`LayerBudgets`."""
    from tqdm.auto import tqdm

    from ..methods.base import method_at_density
    from ..methods.budgets import LayerBudgets

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"the target density must lie in (0, 1], got {target}")
    method_at_density(method_spec, 0.5, block_size)  # a bad spec fails before any work
    curves = {}
    layers = list(layers)
    for name, q, k, v, causal, scale in tqdm(layers, desc="calibrating layers", disable=not progress):
        xs, ys, heads = layer_curve(lambda d: method_at_density(method_spec, d, block_size), q, k, v, causal=causal,
                                    scale=scale, layer=name, grid=grid, objective=objective)
        curves[name] = {"target": list(grid), "density": xs, "value": ys, "heads": heads}
    choice = allocate(curves, target)
    table = {name: {"density": round(curves[name]["target"][i], 6), "heads": curves[name]["heads"][i]}
             for name, i in choice.items()}
    realised = sum(curves[name]["density"][i] for name, i in choice.items()) / len(choice)
    uniform = [min(range(len(c["target"])), key=lambda i: abs(c["density"][i] - target)) for c in curves.values()]
    info = dict(meta or {}, method=method_spec, objective=objective, grid=list(grid), realised_density=realised,
                mean_value=sum(curves[n]["value"][i] for n, i in choice.items()) / len(choice),
                uniform_mean_value=sum(c["value"][i] for c, i in zip(curves.values(), uniform)) / len(curves),
                curves=curves)
    return LayerBudgets(table, target_density=target, meta=info)


def _lm_layers(args):
    from .causal_lm import capture_qkv, load_causal_lm, text_tokens

    model, tokenizer = load_causal_lm(args.model, dtype="fp32", device=args.device)
    ids = text_tokens(tokenizer, args.text, args.tokens, args.offset)
    captures, _ = capture_qkv(model, ids)
    for i, q, k, v, scale in captures:
        yield f"model.layers.{i}.self_attn", q, k, v, True, scale


def _qkv_layers(paths):
    from .fidelity import load_qkv

    for path in paths:
        for probe in load_qkv(path):
            name = probe.meta.get("layer") or probe.name
            yield name, probe.q.float(), probe.k.float(), probe.v.float(), probe.causal, None


def add_arguments(parser) -> None:
    src = parser.add_argument_group("what to calibrate on (a causal LM and text, or captured q/k/v)")
    src.add_argument("--model", default="smollm2", help="causal LM: 'smollm2', a hub id, a folder or a .gguf file")
    src.add_argument("--text", default="stdlib", help="'stdlib', 'licenses' or a text file (default: stdlib, "
                     "other text than lm-quality's default)")
    src.add_argument("--tokens", type=int, default=4096)
    src.add_argument("--offset", type=int, default=0)
    src.add_argument("--qkv", nargs="+", default=None,
                     help=".safetensors captures (diffusers processors' CaptureConfig, sparsediff probe's format); "
                          "layer names from their 'layer' metadata")
    parser.add_argument("--method", default="ba_att", help="the method spec the budgets are for")
    parser.add_argument("--density", type=float, required=True, help="target mean density (1 - sparsity)")
    parser.add_argument("--objective", default="error", choices=OBJECTIVES)
    parser.add_argument("--grid", default=",".join(map(str, DEFAULT_GRID)), help="densities tried per layer")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True, help="the budget JSON file to write")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    try:
        grid = tuple(sorted(float(x) for x in args.grid.split(",") if x.strip()))
        if not grid or not all(0.0 < g <= 1.0 for g in grid):
            raise ValueError(f"--grid densities must lie in (0, 1], got {args.grid!r}")
        if args.qkv:
            layers, meta = _qkv_layers(args.qkv), {"qkv": args.qkv}
        else:
            layers = _lm_layers(args)
            meta = {"model": args.model, "text": args.text, "tokens": args.tokens, "offset": args.offset}
        budgets = calibrate(layers, args.method, args.density, grid=grid, objective=args.objective,
                            block_size=args.block_size, progress=not args.no_progress, meta=meta)
    except (ValueError, FileNotFoundError) as err:
        print(f"sparsediff calibrate: error: {err}", file=sys.stderr)
        return 2
    budgets.source = str(args.out)
    budgets.save(args.out)
    info = budgets.meta
    print(f"wrote {args.out}: {len(budgets.layers)} layers, mean realised density {info['realised_density']:.3f} "
          f"(target {args.density}); mean {args.objective} {info['mean_value']:.4f} vs "
          f"{info['uniform_mean_value']:.4f} with one density for every layer")
    for name, (density, _) in budgets.layers.items():
        print(f"  {name:40s} density {density:.3f}")
    if info["realised_density"] > args.density + 0.01:
        print(f"note: the always-kept blocks (sink, diagonal, local window) alone exceed density {args.density} at "
              "this length; calibrate on longer text, or use a smaller block_size or local_window", file=sys.stderr)
    return 0
