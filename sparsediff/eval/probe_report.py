"""The fidelity probe's report: the oracle share, the markdown table, and the recall/error and sorting plots."""

from __future__ import annotations

import pathlib

from ..methods.base import method_at_density


def add_oracle_share(rows: list[dict]) -> None:
    """``recall_of_oracle`` on each row: its recall over the ``oracle`` method's (the true block mass, the
    best any selector can keep at that density) on the same probe and target density, when the oracle ran.
    It separates what a selector misses from what block sparsity itself cannot keep."""
    best = {(r["probe"], r["target_density"], r.get("layout")): r["recall"] for r in rows if r["method"] == "oracle"}
    for r in rows:
        oracle = best.get((r["probe"], r["target_density"], r.get("layout")))
        r["recall_of_oracle"] = r["recall"] / oracle if oracle else None


def markdown_table(rows: list[dict]) -> str:
    with_oracle = any(r.get("recall_of_oracle") is not None for r in rows)
    lines = ["| probe | layout | method | target density | density | recall | rel L2 | cosine |"
             + (" recall / oracle |" if with_oracle else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if with_oracle else "")]
    for r in rows:
        line = (f"| {r['probe']} | {r.get('layout') or 'rowmajor'} | {r['method']} | {r['target_density']:.2f} | "
                f"{r['density']:.3f} | "
                f"{r['recall']:.4f} | {r['rel_l2']:.4f} | {r['cosine']:.4f} |")
        if with_oracle:
            share = r.get("recall_of_oracle")
            line += f" {share:.4f} |" if share is not None else " – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_curves(rows, out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for probe in sorted({r["probe"] for r in rows}):
        fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
        lines = sorted({(r["method"], r.get("layout") or "rowmajor") for r in rows if r["probe"] == probe})
        tiled = any(lay == "tiled" for _, lay in lines)
        for method, lay in lines:
            pts = sorted((r["density"], r["recall"], r["rel_l2"]) for r in rows
                         if r["probe"] == probe and r["method"] == method and (r.get("layout") or "rowmajor") == lay)
            # One colour per method; tiled dashed, so the two orders of a method sit side by side.
            style = dict(marker="o", color=f"C{sorted({m for m, _ in lines}).index(method) % 10}",
                         linestyle="--" if lay == "tiled" else "-", label=f"{method} ({lay})" if tiled else method)
            ax_r.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            ax_e.plot([p[0] for p in pts], [p[2] for p in pts], **style)
        ax_r.set(xlabel="density", ylabel="attention-mass recall", title=f"{probe}: recall")
        ax_e.set(xlabel="density", ylabel="relative L2 error", title=f"{probe}: output error", yscale="log")
        ax_r.legend(fontsize=8)
        paths.append(save_figure(fig, out_dir / f"curves_{probe.replace('/', '_')}.png"))
    return paths


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sorting(probe, density: float, block_size: int, out_dir: pathlib.Path) -> pathlib.Path:
    """Block attention mass (head 0) with BA-Att's kept blocks outlined, keys unsorted vs norm-sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fidelity import kept_mask

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, norm_sort in zip(axes, (False, True)):
        method = method_at_density(f"ba_att/norm_sort={norm_sort}", density, block_size)
        if norm_sort and probe.frame_size is None:
            # No frames to sort within: show whole-sequence sorting, which the default would skip.
            method = type(method)(method.config.replace(sort_segment="sequence"))
        kept, mass, _ = kept_mask(method, probe)
        ax.imshow(mass.clamp_min(1e-8).log10().numpy(), cmap="viridis", interpolation="nearest")
        ax.contour(kept.float().numpy(), levels=[0.5], colors="white", linewidths=0.6)
        ax.set(title=f"{probe.name}: keys {'norm-sorted' if norm_sort else 'in order'}",
               xlabel="key block", ylabel="query block")
    fig.suptitle(f"log10 block attention mass, BA-Att kept blocks outlined (density {density:.2f})")
    return save_figure(fig, out_dir / f"sorting_{probe.name.replace('/', '_')}.png")
