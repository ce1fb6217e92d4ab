"""Summary of an ``lm-quality`` folder: ``summary.json``, ``summary.md`` and the per-layer error plot.

Rebuilt from the JSONL records alone, so ``sparsediff eval report --out DIR`` and an interrupted run give the
same summary as a finished one.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from ..methods.base import method_at_density
from .records import read_records


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def attention_summary(records, settings) -> dict:
    """``{(setting, density): {recall, error, density, layers, per_layer_error}}`` (means over layers and heads)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["setting"], r["target_density"])].append(r)
    out = {}
    for key, rows in groups.items():
        rows.sort(key=lambda r: r["layer"])
        out[key] = {"recall": _mean(_mean(r["recall"]) for r in rows), "error": _mean(_mean(r["error"]) for r in rows),
                    "density": _mean(_mean(r["density"]) for r in rows), "layers": len(rows),
                    "per_layer_error": {r["layer"]: _mean(r["error"]) for r in rows}}
    oracle = _oracles(settings)
    for (setting, density), row in out.items():
        ref = out.get((oracle.get(setting), density))
        row["oracle"] = oracle.get(setting)
        row["error_over_oracle"] = row["error"] / ref["error"] if ref and ref["error"] else None
    return out


def _policy(method) -> tuple:
    cfg = method.config
    return getattr(cfg, "allocation", "row"), cfg.window if hasattr(cfg, "window") else 0, cfg.block_size


def oracle_of(settings, block_size) -> dict:
    """``setting -> the oracle setting with the same budget policy`` (allocation, window, block size)."""
    oracles = {_policy(method_at_density(s, 0.5, block_size)): s for s in settings
               if method_at_density(s, 0.5, block_size).config.selector == "oracle"}
    return {s: oracles.get(_policy(method_at_density(s, 0.5, block_size))) for s in settings}


def _oracles(settings) -> dict:
    try:
        return oracle_of(list(settings), None)
    except (ValueError, TypeError):  # a folder written by another version: no oracle column
        return {}


def needle_summary(records) -> dict:
    """``{setting: {found, total, lost_vs_dense, mean_logprob_delta}}`` over the same prompts as dense."""
    dense = {(r["length"], r["depth"]): r for r in records if r["setting"] == "dense"}
    out = {}
    for r in records:
        row = out.setdefault(r["setting"], {"found": 0, "total": 0, "lost_vs_dense": 0, "deltas": []})
        row["found"] += bool(r["found"])
        row["total"] += 1
        base = dense.get((r["length"], r["depth"]))
        if base is not None and r["setting"] != "dense":
            row["lost_vs_dense"] += bool(base["found"]) and not r["found"]
            row["deltas"].append(r["answer_logprob"] - base["answer_logprob"])
    for row in out.values():
        deltas = row.pop("deltas")
        row["mean_logprob_delta"] = _mean(deltas) if deltas else None
    return out


def write_report(out_dir, *, plots=True) -> dict:
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    settings = info.get("settings", [])
    attention = read_records(out_dir / "attention.jsonl")
    ppl = read_records(out_dir / "perplexity.jsonl")
    needles = read_records(out_dir / "needles.jsonl")
    att = attention_summary(attention, settings) if attention else {}
    dense_ppl = next((r["ppl"] for r in ppl if r["setting"] == "dense"), None)
    rows = []
    keys = {(r["setting"], r["target_density"]) for r in ppl if r["setting"] != "dense"} | set(att)
    order = {s: i for i, s in enumerate(settings)}
    for setting, density in sorted(keys, key=lambda k: (-k[1], order.get(k[0], len(order)), k[0])):
        p = next((r for r in ppl if r["setting"] == setting and r["target_density"] == density), None)
        a = att.get((setting, density), {})
        rows.append({
            "setting": setting, "target_density": density,
            "attention_density": a.get("density"), "recall": a.get("recall"), "error": a.get("error"),
            "error_over_oracle": a.get("error_over_oracle"), "oracle": a.get("oracle"),
            "ppl": p and p["ppl"], "ppl_delta": p and dense_ppl and p["ppl"] / dense_ppl - 1,
            "ppl_density": p and p.get("realised_density"), "sparse_layers": p and p.get("sparse_layers"),
            "dense_layers": p and p.get("dense_layers"),
        })
    summary = {"run": info, "dense_ppl": dense_ppl, "rows": rows, "needles": needle_summary(needles) if needles else {},
               "per_layer_error": {f"{s}@{d:g}": v["per_layer_error"] for (s, d), v in att.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary, needles))
    if plots and att:
        plot_layer_errors(att, out_dir / "attention_error.png")
    if plots and dense_ppl and sum(r["ppl"] is not None for r in rows) >= 2:
        plot_perplexity(rows, dense_ppl, out_dir / "perplexity_vs_density.png")
    return summary


def _f(x, fmt):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(summary, needle_rows) -> str:
    info = summary["run"]
    lines = [f"# Sparse attention on a real LM: {info.get('model', '?')}", "",
             f"Text `{info.get('text')}` (offset {info.get('offset', 0)}), {info.get('tokens')} tokens, causal; "
             f"block size {info.get('block_size') or 'each method’s default'}; device {info.get('device_name')}, "
             f"torch {info.get('torch')}. Dense perplexity: {_f(summary['dense_ppl'], '.3f')}.", "",
             "Densities are kept over causally visible (query block, key block) pairs, forced blocks included. "
             "`error` is the per-head relative L2 error of the attention output against dense on each layer's "
             "real q/k/v (mean over layers and heads); `/ oracle` divides it by the exact block oracle's under the "
             "same budget policy; recall is the share of the softmax mass in the kept blocks.", "",
             "| setting | target density | density (attention) | recall | error | / oracle | perplexity | Δ ppl | "
             "density (ppl run) | layers sparse |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        delta = "–" if r["ppl_delta"] is None else f"{100 * r['ppl_delta']:+.2f}%"
        dense_layers = r["dense_layers"] or []
        layers = "–" if r["sparse_layers"] is None else (
            f"{r['sparse_layers']}" + (f" (dense: {', '.join(dense_layers[:3])}…)" if dense_layers else " (all)"))
        lines.append(
            f"| `{r['setting']}` | {r['target_density']:g} | {_f(r['attention_density'], '.3f')} | "
            f"{_f(r['recall'], '.4f')} | {_f(r['error'], '.4f')} | {_f(r['error_over_oracle'], '.3f')} | "
            f"{_f(r['ppl'], '.3f')} | {delta} | "
            f"{_f(r['ppl_density'], '.3f')} | {layers} |")
    if summary["needles"]:
        lines += ["", "## Needles (greedy; decode steps dense, prefill sparse)", "",
                  "| setting | found | lost where dense found | mean Δ log p(answer) vs dense |", "|---|---|---|---|"]
        for setting, n in summary["needles"].items():
            lines.append(f"| `{setting}` | {n['found']}/{n['total']} | {n['lost_vs_dense']} | "
                         f"{_f(n['mean_logprob_delta'], '+.3f')} |")
        lines += ["", "| setting | length | depth | found | log p(answer) | prediction |", "|---|---|---|---|---|---|"]
        for r in sorted(needle_rows, key=lambda r: (r["length"], r["depth"], r["setting"])):
            pred = r["prediction"].replace("|", "/").replace("\n", " ")[:40]
            lines.append(f"| `{r['setting']}` | {r['length']} | {r['depth']:g} | {'yes' if r['found'] else 'no'} | "
                         f"{r['answer_logprob']:.3f} | {pred} |")
    return "\n".join(lines) + "\n"


def plot_layer_errors(att, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({d for _, d in att}, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(6.5 * len(densities), 4.2), squeeze=False)
    for ax, density in zip(axes[0], densities):
        for (setting, d), row in sorted(att.items()):
            if d != density:
                continue
            layers = sorted(row["per_layer_error"])
            style = "--" if setting.startswith("oracle") else "-"
            ax.plot(layers, [row["per_layer_error"][i] for i in layers], style, marker=".", label=setting)
        ax.set_title(f"target density {density:g}")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative L2 error vs dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perplexity(rows, dense_ppl, path) -> None:
    """Perplexity against the realised density, one line per setting (the oracle dashed), dense as a line:
    the Pareto view of a run with several densities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        pts = sorted((r["ppl_density"], r["ppl"]) for r in rows
                     if r["setting"] == setting and r["ppl"] is not None and r["ppl_density"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if setting.startswith("oracle") else "-",
                    marker="o", label=setting)
    ax.axhline(dense_ppl, color="black", linewidth=0.8, label=f"dense ({dense_ppl:.3f})")
    ax.set(xlabel="realised density (kept / causally visible blocks)", ylabel="perplexity",
           title="perplexity vs density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
