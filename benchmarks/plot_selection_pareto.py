"""Quality against selection time: perplexity cost of each selection setting (CPU, real model) against the GPU
time of its plan as a share of cuDNN dense attention, one panel per density.

    python benchmarks/plot_selection_pareto.py \
        --quality docs/results/lm_quality_smollm2_8k_peers/perplexity.jsonl \
                  docs/results/lm_quality_smollm2_8k_rows2/perplexity.jsonl \
        --selection docs/results/h100_2026-12-07_peers_8bit_selection/bench_selection_final.json --n 32768 \
        --out pareto.png

``--quality``: ``sparsediff eval lm-quality`` perplexity JSONL files of one text and model (their dense lines must
agree). ``--selection``: a ``bench_selection.py`` JSON; a setting is placed where it has a ``plan <setting>``
stage. Settings without a timed plan (the exact oracle, which needs dense scores) are drawn as a reference line.
Prints the table it plots.
"""

from __future__ import annotations

import argparse
import json


def load_quality(paths) -> tuple[float, dict]:
    """Dense perplexity and {(setting, target density): perplexity} from lm-quality JSONL files."""
    dense, ppl = None, {}
    for path in paths:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row["setting"] == "dense":
                    if dense is not None and abs(dense - row["ppl"]) > 1e-3:
                        raise ValueError(f"{path}: dense perplexity {row['ppl']} differs from {dense}: another text?")
                    dense = row["ppl"]
                else:
                    ppl[(row["setting"], row["target_density"])] = row["ppl"]
    if dense is None:
        raise ValueError("no dense line in the quality files")
    return dense, ppl


def load_plan_pct(path, n) -> dict:
    """{setting: plan time as % of cuDNN dense} at ``n`` tokens from a bench_selection.py JSON."""
    with open(path) as f:
        rows = [r for r in json.load(f)["results"] if r["n"] == n]
    if not rows:
        raise ValueError(f"{path} has no results at n={n}")
    return {name[len("plan "):]: s["pct_of_dense"] for name, s in rows[0]["stages"].items() if name.startswith("plan ")}


def points(dense, ppl, plan_pct):
    """Rows (setting, density, plan %, delta ppl %), plan % None where the plan was not timed."""
    return [(setting, d, plan_pct.get(setting), 100 * (p / dense - 1)) for (setting, d), p in sorted(ppl.items())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", nargs="+", required=True)
    parser.add_argument("--selection", required=True)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--out", default="pareto.png")
    args = parser.parse_args(argv)
    dense, ppl = load_quality(args.quality)
    rows = points(dense, ppl, load_plan_pct(args.selection, args.n))
    print(f"| setting | density | plan, % of cuDNN dense at {args.n} | perplexity vs dense |")
    print("|---|---|---|---|")
    for setting, d, pct, delta in rows:
        print(f"| `{setting}` | {d} | {'-' if pct is None else f'{pct:.2f} %'} | {delta:+.2f} % |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({d for _, d, _, _ in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(5.5 * len(densities), 4.2), squeeze=False)
    for ax, density in zip(axes[0], densities):
        for setting, d, pct, delta in rows:
            if d != density:
                continue
            if pct is None:
                ax.axhline(delta, color="gray", linestyle="--", linewidth=1)
                ax.annotate(f"{setting.split('/')[0]} (not timed)", (0.02, delta), xycoords=("axes fraction", "data"),
                            fontsize=8, color="gray", va="bottom")
                continue
            ax.scatter(pct, delta, s=30)
            ax.annotate(setting.replace("/allocation=global/local_window=none", ""), (pct, delta), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("log")  # selection costs span two decades
        ax.set_xlabel(f"selection (plan) time, % of cuDNN dense at {args.n // 1024}k tokens (H100)")
        ax.set_ylabel("perplexity vs dense, %")
        ax.set_title(f"density {density}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
