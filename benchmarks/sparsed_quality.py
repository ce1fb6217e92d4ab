"""SparseD's cached pattern vs selecting blocks at every step: error vs dense per denoising step, on
structured inputs whose heads have different, slowly drifting patterns (CPU, float32, seconds).

    python benchmarks/sparsed_quality.py --out docs/img/sparsed_error.json --plot docs/img/sparsed_error.png

Heads (N tokens, D dims, block b): 0 local window (smooth positional codes), 1 attention sinks (a few
key blocks share a direction every query has), 2 segment clusters (tokens attend their own segment),
3 local + sinks. Over the schedule q, k, v drift by a random walk (relative drift ~``--drift`` at the
last step). Compared at equal density (SparseD's floor(n_kv_blocks * keep) + 1 blocks per query block):
  sparsed      the method: dense for the first 20% of steps, pattern fixed at the switch step
  oracle/step  exact top tiles by mean probability, recomputed at every step (the best a per-step
               selector can do at that budget)
  ba_att/step  BA-Att selection at every step (when registered)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.kernels import block_sparse_attention  # noqa: E402
from sparsediff.kernels.tile_mass import row_lse, tile_mass  # noqa: E402
from sparsediff.methods import available_methods, denoising_step, make_method, new_generation  # noqa: E402
from sparsediff.methods.dense import dense_attention  # noqa: E402
from sparsediff.methods.sparsed import blocks_to_keep, select_from_mass  # noqa: E402


def structured_heads(n, d, gen):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.logspace(-3.2, -1.2, d // 2)[None, :]
    local = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=1) * 2.2
    sink_dir = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0) * 3.5
    sink_keys = torch.zeros(n, d)
    for start in (0, n // 3, 2 * n // 3 + 17):
        sink_keys[start : start + 24] = sink_dir
    seg = torch.randn(8, d, generator=gen)
    seg = 3.0 * seg / seg.norm(dim=-1, keepdim=True)
    seg_codes = seg.repeat_interleave(math.ceil(n / 8), 0)[:n]
    noise = lambda: 0.5 * torch.randn(n, d, generator=gen)
    q = torch.stack([local + noise(), sink_dir.expand(n, d) + noise(), seg_codes + noise(),
                     0.7 * local + 0.7 * sink_dir + noise()])
    k = torch.stack([local + noise(), sink_keys + noise(), seg_codes + noise(), 0.7 * local + sink_keys + noise()])
    return q[None], k[None], torch.randn(1, 4, n, d, generator=gen)


def run(args):
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = structured_heads(args.n, args.dim, gen)
    walk = [torch.zeros_like(x) for x in (q0, k0, v0)]
    per_step = args.drift / math.sqrt(args.steps)
    bs = args.block_size
    nkb = math.ceil(args.n / bs)
    density = blocks_to_keep(nkb, args.keep_ratio) / nkb
    sparsed = make_method("sparsed", keep_ratio=args.keep_ratio, block_size=bs, min_seq_len=0)
    ba = None
    if "ba_att" in available_methods():
        ba = make_method("ba_att", sparsity=1.0 - density, block_size=bs, min_seq_len=0)
    errors = {"sparsed": [], "oracle/step": [], "ba_att/step": []}
    new_generation()
    for step in range(args.steps):
        for w, x in zip(walk, (q0, k0, v0)):
            w += per_step * x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1]) * torch.randn(x.shape, generator=gen)
        q, k, v = (x + w for x, w in zip((q0, k0, v0), walk))
        ref = dense_attention(q, k, v)
        err = lambda out, ref=ref: float((out - ref).norm() / ref.norm())
        with denoising_step(step, args.steps):
            errors["sparsed"].append(err(sparsed(q, k, v, layer="l")))
            _, lse = row_lse(q, k, v, block_size=bs)
            index, count = select_from_mass(tile_mass(q, k, lse, block_size=bs), args.keep_ratio, block_size=bs)
            errors["oracle/step"].append(err(block_sparse_attention(q, k, v, index, count, block_size=bs)))
            if ba is not None:
                errors["ba_att/step"].append(err(ba(q, k, v, layer="l")))
    return {k: v for k, v in errors.items() if v}, density, sparsed.stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--drift", type=float, default=0.3, help="relative random-walk drift at the last step")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    errors, density, stats = run(args)
    switch = math.ceil(0.2 * args.steps)
    # From the step after the switch: at the switch step itself SparseD returns the dense pass.
    summary = {name: {"mean_after_switch": sum(e[switch + 1 :]) / len(e[switch + 1 :]), "last": e[-1]}
               for name, e in errors.items()}
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "density": density, "selections": stats,
              "errors": errors, "summary": summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, e in errors.items():
            ax.plot(range(args.steps), e, label=name)
        ax.axvline(switch - 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("relative L2 error vs dense")
        ax.set_title(f"N={args.n}, density {density:.2f}, drift {args.drift}")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    print(f"density {density:.3f}; selections {stats}")
    print("| selection | mean rel. error after switch | last step |")
    print("|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['mean_after_switch']:.4f} | {s['last']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
