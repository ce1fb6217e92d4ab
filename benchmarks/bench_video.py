"""One denoising step of the Wan2.1-T2V-1.3B transformer (random weights, bf16): dense vs BA-Att.

    python benchmarks/bench_video.py --out bench_video.json                # GPU: 81x480x832 -> 32,760 tokens
    python benchmarks/bench_video.py --quick --out /tmp/bench_video.json   # CPU smoke run, tiny model

The model is ``WanTransformer3DModel`` built from the 1.3B config (30 layers, 12 heads of 128, FFN 8960,
text dim 4096); the latent is 16 x 21 x 60 x 104 (81 frames at 480x832 after the VAE), i.e. 21 frames
of 30 x 52 = 1,560 patches = 32,760 tokens, with 512 text tokens for cross-attention. Rows:

* dense: the model's own processors, SDPA with the cuDNN backend first;
* ba_att@s: ``sparsediff.enable(model, "ba_att", sparsity=s, layout=L)`` (cross-attention stays dense), for each
  token layout ``L`` of ``--layout`` (``rowmajor``: the tokens' own order; ``tiled``: 3-D tiles of one block);
* with ``--precision bf16 int8_fp8``: each sparse row also with the 8-bit block-sparse kernel (``precision=``);
* with ``--residual-every r``: the same at each sparsity with residual reuse (``residual_every=r``) over
  ``--cycles`` refresh cycles inside ``denoising_step``; refresh and reuse steps are timed apart and the row's
  step time is their mean over one cycle, ``(refresh + (r - 1) * reuse) / r``;
* with ``--plan-every r``: likewise with the selection kept r steps (``plan_every=r``, no residual).
  Reuse rows are timed for every ``--method`` spec and ``--precision``, at the last ``--layout``.

Step time is the median of ``--repeat`` forward passes after ``--warmup`` passes (kernel compilation
and autotuning happen there). The attention share comes from a separate pass in which every routed
attention call is synchronised and timed (``attention_timer``); dense attention is timed the same way
through ``DenseProcessor``. ``amdahl`` is the step speed-up that the row's attention speed-up alone would
give at the dense attention share, ``1 / ((1 - a) + a / s)``; the dense row's is the bound ``1 / (1 - a)``.
``layout_ms`` is the tiled layout's own cost per step, timed alone: for Wan the blocks hold the tile order, so
it is the hidden states permuted in and out once per forward plus the rotary tables
(``attention_processors.token_order``); ``per_call_ms`` is what permuting q, k, v and the output in every
self-attention layer would cost (``SPARSEDIFF_HOST_TILES=0``). ``--method`` takes several method specs
(``ba_att ba_att/sample_rows=2 ba_att_paper``). Targets for context: >= 1.5x step speed-up at 0.5, >= 2.3x at
0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import platform
import statistics
import time

import torch

import sparsediff
from sparsediff.attention_processors import DenseProcessor, attention_timer, enabled_processor, token_order
from sparsediff.commands.bench import time_ms
from sparsediff.kernels.block_sparse import PRECISIONS
from sparsediff.methods.base import sparse_share

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (16, 21, 60, 104)  # channels, frames, height, width after the VAE (81 x 480 x 832)


def sdpa_backends(cuda: bool):
    """cuDNN attention first for every SDPA call (dense rows and the dense fallbacks of sparse rows)."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order
        return sdpa_kernel(order)


def build(quick: bool, device, dtype):
    from diffusers import WanTransformer3DModel

    from sparsediff.testing.tiny import TRANSFORMER_CONFIGS

    config = TRANSFORMER_CONFIGS["wan"] if quick else WAN_1_3B
    latent = (16, 3, 16, 16) if quick else LATENT
    text = 16 if quick else 512
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, *latent, generator=g).to(device, dtype),
                  timestep=torch.tensor([500.0], device=device),
                  encoder_hidden_states=torch.randn(1, text, config["text_dim"], generator=g).to(device, dtype))
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    return model, inputs, tokens


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_step(model, inputs, cuda, warmup, repeat) -> float:
    """Median seconds of one transformer forward."""
    times = []
    with torch.inference_mode(), sdpa_backends(cuda):
        for i in range(warmup + repeat):
            sync(cuda)
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            sync(cuda)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_residual_cycle(model, inputs, cuda, every, cycles) -> tuple[float, float]:
    """Median seconds of a refresh step and of a reuse step under residual reuse (one generation)."""
    refresh, reuse = [], []
    total = every * (cycles + 1)
    with torch.inference_mode(), sdpa_backends(cuda), sparsediff.generation():
        for step in range(total):
            with sparsediff.denoising_step(step, total):
                sync(cuda)
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                sync(cuda)
            if step >= every:  # the first cycle compiles and autotunes
                (refresh if step % every == 0 else reuse).append(time.perf_counter() - start)
    return statistics.median(refresh), statistics.median(reuse)


def layout_seconds(model, inputs, cuda, block_size) -> dict:
    """Seconds per step of the tiled layout alone, both ways it runs: ``per_call`` permutes q, k, v and
    un-permutes the output in every self-attention layer; ``held`` (families whose blocks hold the tile order,
    ``attention_processors.token_order``) permutes the hidden states in and out once per forward, and the
    rotary tables once."""
    from sparsediff.methods.token_layout import make_layout

    b, _, f, h, w = inputs["hidden_states"].shape
    p = model.config.patch_size
    grid = (f // p[0], h // p[1], w // p[2])
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    n, device, dtype = grid[0] * grid[1] * grid[2], inputs["hidden_states"].device, inputs["hidden_states"].dtype
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(b, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
    hidden = torch.randn(b, n, heads * dim, generator=g).to(device, dtype)
    rope = [torch.randn(1, n, 1, dim, generator=g).to(device) for _ in range(2)]  # float32 cos / sin tables
    tiles = make_layout(grid, block_size, device=q.device)

    def per_call():
        qs, _, _ = tiles.permute_q(q), tiles.permute(k), tiles.permute(v)
        return tiles.unpermute(qs)

    def held():
        tiled = hidden.index_select(1, tiles.perm)
        for table in rope:
            table.index_select(1, tiles.perm)
        return tiled.index_select(1, tiles.inverse)

    device = "cuda" if cuda else "cpu"
    return {"per_call": time_ms(per_call, device) / 1e3 * len(model.blocks), "held": time_ms(held, device) / 1e3}


def what_ran(model) -> dict:
    """The last pass's routed calls by route (sparse, or dense and why), the share that ran sparse, and the
    kept density: a speed-up is only read next to these."""
    processor = enabled_processor(model)
    routes = dict(processor.routes)
    density = getattr(processor.method, "realised_density", lambda: None)()
    return {"routes": routes, "sparse_share": sparse_share(routes), "kept_density": density}


def attention_seconds(model, inputs, cuda) -> float:
    with torch.inference_mode(), sdpa_backends(cuda), attention_timer() as box:
        model(**inputs, return_dict=False)
    return box[0]


def reuse_row(model, inputs, cuda, args, kind, every, sparsity, method_kwargs, method, precision="bf16") -> dict:
    """One method spec and precision at the last layout with ``{kind}_every=every`` (residual reuse or a kept
    plan), timed over refresh cycles: the row's step time is ``(refresh + (r - 1) * reuse) / r``."""
    layout = args.layout[-1]
    extra = {} if precision == "bf16" else {"precision": precision}
    # Steps come from denoising_step here (the timestep input never changes between timed passes).
    sparsediff.enable(model, method, sparsity=sparsity, layout=layout, track_steps=False,
                      **{f"{kind}_every": every}, **extra, **method_kwargs)
    refresh, reuse = time_residual_cycle(model, inputs, cuda, every, args.cycles)
    stats = dict(enabled_processor(model).method.stats)
    ran = what_ran(model)
    sparsediff.disable(model)
    label = method if precision == "bf16" else f"{method} {precision}"
    row = {"method": f"{label}+{kind}/{every}", "precision": precision, "sparsity": sparsity, "layout": layout,
           "step_s": (refresh + (every - 1) * reuse) / every, "refresh_step_s": refresh, "reuse_step_s": reuse,
           "attention_s": 0.0, f"{kind}_refreshes": stats.get(f"{kind}_refreshes", 0),
           f"{kind}_reuses": stats.get(f"{kind}_reuses", 0), **ran}
    nbytes = stats.get("residual_bytes" if kind == "residual" else "plan_bytes", 0)
    row[f"{kind}_mib"] = nbytes / 2**20
    print(f"  {row['method']} {sparsity} {layout}: refresh {refresh:.4f} s, reuse {reuse:.4f} s", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--method", nargs="+", default=["ba_att"],
                        help="method specs to time (e.g. ba_att ba_att/sample_rows=2 ba_att_paper)")
    parser.add_argument("--layout", nargs="+", default=["rowmajor", "tiled"], choices=["rowmajor", "tiled", "auto"],
                        help="token layouts to time each sparse row under")
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS),
                        help="block-sparse kernel precisions to time each sparse row with")
    parser.add_argument("--residual-every", type=int, default=0, help="also time residual reuse every r steps")
    parser.add_argument("--plan-every", type=int, default=0, help="also time plans kept r steps (plan_every=r)")
    parser.add_argument("--cycles", type=int, default=2, help="timed refresh cycles of residual reuse / kept plans")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="bench_video.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    method_kwargs = dict(block_size=16, min_seq_len=0) if args.quick else {}
    import diffusers

    env = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "sparsediff": sparsediff.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": str(dtype)}
    if cuda:
        import triton

        env["triton"] = triton.__version__
        env["cudnn"] = torch.backends.cudnn.version()
    print(" ".join(f"{k}={v}" for k, v in env.items()))

    model, inputs, tokens = build(args.quick, device, dtype)
    print(f"Wan2.1-1.3B architecture{' (tiny config)' if args.quick else ''}: {tokens} video tokens, "
          f"latent {tuple(inputs['hidden_states'].shape)}")
    rows = []
    dense_step = time_step(model, inputs, cuda, args.warmup, args.repeat)
    sparsediff.enable(model, DenseProcessor())
    dense_attn = attention_seconds(model, inputs, cuda)
    sparsediff.disable(model)
    rows.append({"method": "dense (cuDNN SDPA)", "sparsity": 0.0, "step_s": dense_step, "attention_s": dense_attn})
    for sparsity in args.sparsity:
        for method, layout, precision in itertools.product(args.method, args.layout, args.precision):
            extra = {} if precision == "bf16" else {"precision": precision}
            sparsediff.enable(model, method, sparsity=sparsity, layout=layout, **extra, **method_kwargs)
            step = time_step(model, inputs, cuda, args.warmup, args.repeat)
            attn = attention_seconds(model, inputs, cuda)
            ran = what_ran(model)
            sparsediff.disable(model)
            label = method if precision == "bf16" else f"{method} {precision}"
            rows.append({"method": label, "precision": precision, "sparsity": sparsity, "layout": layout,
                         "step_s": step, "attention_s": attn, **ran})
            print(f"  {label} {sparsity} {layout}: step {step:.4f} s, attention {attn:.4f} s", flush=True)
        for kind, every in (("residual", args.residual_every), ("plan", args.plan_every)):
            if every:  # every method spec and precision, at the last layout
                for method, precision in itertools.product(args.method, args.precision):
                    rows.append(reuse_row(model, inputs, cuda, args, kind, every, sparsity, method_kwargs, method,
                                          precision))
    for row in rows:
        row["attention_share"] = row["attention_s"] / row["step_s"] if row["step_s"] else 0.0
        row["step_speedup"] = dense_step / row["step_s"]
        row["attention_speedup"] = dense_attn / row["attention_s"] if row["attention_s"] else 0.0
        share = min(dense_attn / dense_step, 1.0)
        speed = row["attention_speedup"]
        # None where it does not apply (strict JSON): attention is the whole step, or not timed (residual rows).
        if row["sparsity"] == 0:
            row["amdahl"] = 1 / (1 - share) if share < 1 else None
        else:
            row["amdahl"] = 1 / ((1 - share) + share / speed) if speed else None
    block = 16 if args.quick else 128
    layout_s = layout_seconds(model, inputs, cuda, block)
    held = token_order.enabled() and type(model).__name__ in token_order.TOKEN_ORDER_FAMILIES
    used = layout_s["held" if held else "per_call"]
    layout_cost = {"layout_ms_per_step": 1e3 * used, "pct_of_dense_step": 100 * used / dense_step,
                   "mode": "held across the blocks" if held else "per attention call",
                   "per_call_ms_per_step": 1e3 * layout_s["per_call"], "held_ms_per_step": 1e3 * layout_s["held"]}
    print(f"tiled layout alone ({layout_cost['mode']}): {1e3 * used:.2f} ms per step "
          f"({layout_cost['pct_of_dense_step']:.2f}% of a dense step; per attention call it would be "
          f"{1e3 * layout_s['per_call']:.2f} ms)")

    result = {"benchmark": "bench_video", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "environment": env, "tokens": tokens, "quick": args.quick, "warmup": args.warmup,
              "repeat": args.repeat, "layout_cost": layout_cost, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    print(f"\nJSON: {args.out}\n")
    print(f"{'method':<28}{'sparsity':>9}{'layout':>10}{'step (s)':>11}{'attn (s)':>11}{'attn share':>12}"
          f"{'step x':>9}{'attn x':>9}{'amdahl':>9}{'sparse':>8}")
    for r in rows:
        print(f"{r['method']:<28}{r['sparsity']:>9.2f}{r.get('layout', '-'):>10}{r['step_s']:>11.4f}"
              f"{r['attention_s']:>11.4f}{100 * r['attention_share']:>11.1f}%{r['step_speedup']:>9.2f}"
              f"{r['attention_speedup']:>9.2f}{'-' if r['amdahl'] is None else format(r['amdahl'], '.2f'):>9}"
              f"{'-' if r.get('sparse_share') is None else format(r['sparse_share'], '.0%'):>8}")
    dense_rows = [r for r in rows if r.get("sparse_share") is not None and r["sparse_share"] < 1]
    for r in dense_rows:  # say so when a sparse row did not run sparse everywhere
        print(f"note: {r['method']} {r['sparsity']} {r.get('layout')}: routes {r['routes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
