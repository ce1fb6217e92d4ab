"""Error vs dense attention per denoising step of the block-diffusion methods (FlashBlock, LoSA), on the
fidelity suite's generators or captured Q/K/V.

A probe's ``N`` tokens become one block-diffusion call sequence: the first ``N - block`` keys / values are
the cached prefix, the last ``block`` tokens the active block. The block is denoised over ``steps`` steps
in which its queries, keys and values move with a synthetic process (:func:`evolve`): each step a random
``active_frac`` share of its tokens moves by ``big`` (relative L2) and the rest by ``small``, standing in for
the tokens being unmasked. Each method sees the calls a host makes (q = the block, k / v =
``[prefix | block]``, one layer, inside ``denoising_step``) and is compared with dense attention of the same
call: relative L2 error and cosine per step, plus LoSA's own share of active tokens and union density.

    sparsediff probe --block-diffusion --generators video,sinks,stripes,clustered,random \\
        --methods flashblock,losa,flashblock/sparse_selector=ba_att/sparsity=0.8 --out blockprobe/
"""

from __future__ import annotations

import dataclasses

import torch

from ..methods import denoising_step, make_method, new_block, new_generation
from ..methods.dense import dense_attention
from .fidelity import Probe

DEFAULT_METHODS = "flashblock,losa,flashblock/sparse_selector=ba_att/sparsity=0.8"


def evolve(x, frac, gen, big=0.3, small=0.01):
    """The next step's tensor ``(B, H, N, D)``: a random ``frac`` share of the tokens moves by ``big``
    (relative L2 per token), the others by ``small``."""
    n = x.shape[2]
    moving = torch.rand(n, device=x.device, generator=gen) < frac
    noise = torch.randn(x.shape, device=x.device, dtype=torch.float32, generator=gen)
    scale = torch.where(moving, big, small)[None, None, :, None]
    xf = x.float()
    noise = noise * xf.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (xf + scale * noise).to(x.dtype)


@dataclasses.dataclass
class BlockRun:
    """One block's calls: a KV buffer ``[prefix | block]`` and per step the block's (q, k, v)."""

    name: str
    kv: tuple  # (k, v) buffers (B, H, N, D); the block rows are overwritten at each step
    steps: list  # [(q, kb, vb)] per step
    n_prefix: int


def block_run(probe: Probe, *, block=128, steps=8, active_frac=0.25, big=0.3, small=0.01, seed=0) -> BlockRun:
    """The probe's last ``block`` tokens as the active block over ``steps`` evolving steps."""
    n = probe.k.shape[2]
    if probe.q.shape[2] != n:
        raise ValueError(f"block-diffusion probes need as many queries as keys, got {probe.q.shape[2]} and {n}")
    if not 0 < block < n:
        raise ValueError(f"block must lie in (0, {n}) for a probe of {n} tokens, got {block}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a first step and cached steps), got {steps}")
    if not 0.0 <= active_frac <= 1.0 or big < 0 or small < 0:
        raise ValueError(f"active_frac must lie in [0, 1] and big, small be >= 0, got {active_frac}, {big}, {small}")
    gen = torch.Generator(device=probe.q.device).manual_seed(seed)
    q, kb, vb = (t[:, :, n - block:].clone() for t in (probe.q, probe.k, probe.v))
    per_step = [(q, kb, vb)]
    for _ in range(steps - 1):
        q, kb, vb = (evolve(t, active_frac, gen, big, small) for t in (q, kb, vb))
        per_step.append((q, kb, vb))
    return BlockRun(probe.name, (probe.k.clone(), probe.v.clone()), per_step, n - block)


def _metrics(out, ref) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-30).mean())
    return rel, cos


def evaluate_steps(method, run: BlockRun) -> list[dict]:
    """Per step: ``rel_l2`` and ``cosine`` of the method's output vs dense attention of the same call, and
    for LoSA its measured ``active_share`` and ``union_density``. Runs in a fresh generation."""
    k, v = run.kv
    new_generation()
    new_block(0)
    rows = []
    for i, (q, kb, vb) in enumerate(run.steps):
        k[:, :, run.n_prefix:], v[:, :, run.n_prefix:] = kb, vb
        with denoising_step(i, len(run.steps)):
            out = method(q, k, v, layer="probe")
        rel, cos = _metrics(out, dense_attention(q, k, v))
        rows.append({"step": i, "rel_l2": rel, "cosine": cos})
    if hasattr(method, "step_report"):
        for row, rep in zip(rows, method.step_report()):
            row["active_share"], row["union_density"] = rep["active_share"], rep["union_density"]
    return rows


def build_block_method(spec: str, block_size: int):
    """``"losa/threshold=0.1"`` -> a method (``min_seq_len=0``); overrides after slashes as in ``probe``."""
    from ..methods.base import parse_spec

    name, overrides = parse_spec(spec)
    if name not in ("flashblock", "losa"):
        raise ValueError(f"block-diffusion probes run 'flashblock' or 'losa' (with overrides), got {name!r}")
    return make_method(name, **{"min_seq_len": 0, "block_size": block_size, **overrides})


def summary_table(rows: list[dict]) -> str:
    """One line per (probe, method): error at the first cached step, the last step and the worst."""
    lines = ["| probe | method | rel L2 step 1 | rel L2 last step | max rel L2 | min cosine | LoSA active share |",
             "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["probe"], r["method"]) for r in rows))
    for probe, method in keys:
        rs = sorted((r for r in rows if r["probe"] == probe and r["method"] == method), key=lambda r: r["step"])
        shares = [r["active_share"] for r in rs[1:] if "active_share" in r]
        share = f"{sum(shares) / len(shares):.2f}" if shares else "–"
        lines.append(f"| {probe} | {method} | {rs[1]['rel_l2']:.4f} | {rs[-1]['rel_l2']:.4f} | "
                     f"{max(r['rel_l2'] for r in rs):.4f} | {min(r['cosine'] for r in rs):.4f} | {share} |")
    return "\n".join(lines) + "\n"


def plot_steps(rows, out_dir) -> list:
    import matplotlib

    from .probe_report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for probe in dict.fromkeys(r["probe"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(r["method"] for r in rows if r["probe"] == probe):
            rs = sorted((r["step"], r["rel_l2"]) for r in rows if r["probe"] == probe and r["method"] == method)
            ax.plot([s for s, _ in rs], [max(e, 1e-8) for _, e in rs], marker="o", label=method)
        ax.set(xlabel="denoising step of the block", ylabel="relative L2 error vs dense", yscale="log",
               title=f"{probe}: block diffusion")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out_dir / f"blocksteps_{probe.replace('/', '_')}.png"))
    return paths
