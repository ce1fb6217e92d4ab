"""One denoising step of the Wan2.1-T2V-1.3B transformer (random weights, bf16): dense vs BA-Att.

    python benchmarks/bench_video.py --out bench_video.json                # GPU: 81x480x832 -> 32,760 tokens
    python benchmarks/bench_video.py --quick --out /tmp/bench_video.json   # CPU smoke run, tiny model

The model is ``WanTransformer3DModel`` built from the 1.3B config (30 layers, 12 heads of 128, FFN 8960,
text dim 4096); the latent is 16 x 21 x 60 x 104 (81 frames at 480x832 after the VAE), i.e. 21 frames
of 30 x 52 = 1,560 patches = 32,760 tokens, with 512 text tokens for cross-attention. Rows:

* dense: the model's own processors, SDPA with the cuDNN backend first;
* ba_att@s: ``sparsediff.enable(model, "ba_att", sparsity=s)`` (cross-attention stays dense).

Step time is the median of ``--repeat`` forward passes after ``--warmup`` passes (kernel compilation
and autotuning happen there). The attention share comes from a separate pass in which every routed
attention call is synchronised and timed (``attention_timer``); dense attention is timed the same way
through ``DenseProcessor``. Targets for context: >= 1.5x step speed-up at 0.5, >= 2.3x at 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time

import torch

import sparsediff
from sparsediff.attention_processors import DenseProcessor, attention_timer

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

    from sparsediff.pipelines.tiny import TRANSFORMER_CONFIGS

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


def attention_seconds(model, inputs, cuda) -> float:
    with torch.inference_mode(), sdpa_backends(cuda), attention_timer() as box:
        model(**inputs, return_dict=False)
    return box[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--method", default="ba_att")
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
        sparsediff.enable(model, args.method, sparsity=sparsity, **method_kwargs)
        step = time_step(model, inputs, cuda, args.warmup, args.repeat)
        attn = attention_seconds(model, inputs, cuda)
        sparsediff.disable(model)
        rows.append({"method": args.method, "sparsity": sparsity, "step_s": step, "attention_s": attn})
    for row in rows:
        row["attention_share"] = row["attention_s"] / row["step_s"] if row["step_s"] else 0.0
        row["step_speedup"] = dense_step / row["step_s"]
        row["attention_speedup"] = dense_attn / row["attention_s"] if row["attention_s"] else 0.0

    result = {"benchmark": "bench_video", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "environment": env, "tokens": tokens, "quick": args.quick, "warmup": args.warmup,
              "repeat": args.repeat, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nJSON: {args.out}\n")
    print(f"{'method':<20}{'sparsity':>9}{'step (s)':>11}{'attn (s)':>11}{'attn share':>12}{'step x':>9}{'attn x':>9}")
    for r in rows:
        print(f"{r['method']:<20}{r['sparsity']:>9.2f}{r['step_s']:>11.4f}{r['attention_s']:>11.4f}"
              f"{100 * r['attention_share']:>11.1f}%{r['step_speedup']:>9.2f}{r['attention_speedup']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
