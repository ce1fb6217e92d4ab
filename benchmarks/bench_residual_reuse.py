"""Residual reuse (``residual_every``) over a drifting denoising sequence: error vs dense per step, and time.

    python benchmarks/bench_residual_reuse.py --out docs/results/residual_reuse_probe/results.json
    python benchmarks/bench_residual_reuse.py --quick --out /tmp/rr.json      # smoke run (small, few steps)

Inputs: the fidelity suite's video generator (``make_probe("video", n=4096, heads=4, dim=64)``, float32, its
tokens in their own order, ``frame_size`` passed as a video host does) made into ``--steps`` denoising steps by
a linear drift

    x_t = x_0 + t * eps * n_x,  x in (q, k, v),

with ``n_x`` one Gaussian draw per tensor, scaled per token to that token's norm, so each step moves every
token by ``eps`` of its norm (relative L2). ``--eps 0.01`` (the default) changes the dense output by ~3 %
between consecutive steps: neighbouring steps of a denoising schedule, slowly drifting. ``--eps-sweep``
repeats plain sparsity and ``residual_every=5`` at 0.8 for other drift rates.

Per method and sparsity: plain sparse attention (the method as is), and residual reuse with
``residual_every = r`` for each ``--every`` (the refresh steps return dense attention). Each call runs inside
``denoising_step(t, steps)``, one layer, as a host calls it. Errors are relative L2 of the output vs dense
attention of the same step's inputs. Also reported, as an ablation: ``reselect`` = the method's plain output
of each step plus the residual of the last refresh step, i.e. residual reuse that selects blocks again every
step instead of keeping the refresh step's plan (what the library does). Times are CPU wall times of one call of each
kind (plain, refresh = sparse + dense with LSE, reuse = cached plan + kernel + addition, and dense SDPA for
reference), run in turn for ``--time-reps`` rounds, each kind's fastest round reported (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsediff.commands.bench import environment  # noqa: E402
from sparsediff.eval.fidelity import make_probe  # noqa: E402
from sparsediff.methods import denoising_step, dense_attention, make_method, new_generation  # noqa: E402
from sparsediff.methods.residual_reuse import residual_bytes  # noqa: E402


def with_sparsity(spec, sparsity):
    """``"ba_att/norm_sort=true"``, 0.8 -> ``"ba_att:0.8/norm_sort=true"`` (the spec grammar, methods/base.py)."""
    head, sep, rest = spec.partition("/")
    return f"{head}:{sparsity}{sep}{rest}"


def git_state():
    """The commit measured and the files under sparsediff/ that differ from it (work in progress)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "sparsediff"], cwd=root, capture_output=True,
                               text=True).stdout.split("\n")
    except OSError:
        return None
    return {"commit": head, "uncommitted": [line[3:] for line in dirty if line.strip()]}


def drifting_steps(probe, steps, eps, seed):
    """``[(q_t, k_t, v_t)]`` for t < steps: a linear drift of ``eps`` of each token's norm per step."""
    gen = torch.Generator().manual_seed(seed)

    def direction(x):
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return noise * x.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)

    dq, dk, dv = direction(probe.q), direction(probe.k), direction(probe.v)
    return [(probe.q + t * eps * dq, probe.k + t * eps * dk, probe.v + t * eps * dv) for t in range(steps)]


def rel_l2(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def run_method(spec, seq, frame_size, every=0, reuse="residual"):
    """Per step: the output and whether the step was a refresh (``reuse``: "residual" for residual_every,
    "plan" for plan_every)."""
    method = make_method(f"{spec}/{reuse}_every={every}", min_seq_len=0)
    new_generation()
    rows = []
    for t, (q, k, v) in enumerate(seq):
        before = method.stats.get(f"{reuse}_refreshes", 0)
        with denoising_step(t, len(seq)):
            out = method(q, k, v, layer="probe", frame_size=frame_size)
        kind = "plain" if not every else ("refresh" if method.stats.get(f"{reuse}_refreshes", 0) > before else "reuse")
        rows.append({"out": out, "kind": kind})
    return rows, residual_bytes(method) if reuse == "residual" else method.stats.get("plan_bytes", 0)


def reselect_errors(plain, refs, every):
    """The ablation: plain output + the residual of the last refresh step (refreshes at 0, every, ...)."""
    errors = []
    for t, ref in enumerate(refs):
        s0 = (t // every) * every
        out = plain[t]["out"] + (refs[s0] - plain[s0]["out"])
        errors.append(rel_l2(out, ref))
    return errors


def summarise(errors):
    later = errors[1:]  # step 0 is a refresh (dense) for every r
    return {"mean": statistics.fmean(later), "max": max(later), "last": errors[-1]}


def step_times(spec, seq, frame_size, reps):
    """Milliseconds of one call of each kind: plain sparse, residual refresh (sparse + dense with LSE), residual
    reuse (cached plan + kernel + addition), and dense SDPA. The kinds run in turn, ``reps`` rounds, and each
    reports its fastest round, so other work on the machine weighs on all of them alike and least on the result."""
    plain = make_method(spec, min_seq_len=0)
    reuse = make_method(f"{spec}/residual_every=1000", min_seq_len=0)
    q, k, v = seq[0]
    q1, k1, v1 = seq[1]
    new_generation()

    def call(fn, step):
        with denoising_step(step, 1000):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    best = {}
    for i in range(reps + 1):  # round 0: warm-up
        reuse.reset()  # drops the residual: the next call refreshes
        times = {
            "plain": call(lambda: plain(q, k, v, layer="probe", frame_size=frame_size), 2 * i),
            "refresh": call(lambda: reuse(q, k, v, layer="probe", frame_size=frame_size), 2 * i),
            "reuse": call(lambda: reuse(q1, k1, v1, layer="probe", frame_size=frame_size), 2 * i + 1),
            "dense_sdpa": call(lambda: dense_attention(q, k, v), 2 * i),
        }
        assert reuse.stats["residual_refreshes"] == 1 and reuse.stats["residual_reuses"] == 1
        if i:
            best = {key: min(t, best.get(key, t)) for key, t in times.items()}
    return best


def one_drift(probe, args, eps, specs, sparsities, everys, log, plan_everys=()):
    seq = drifting_steps(probe, args.steps, eps, args.seed)
    refs = [dense_attention(q, k, v) for q, k, v in seq]
    consecutive = [rel_l2(refs[t], refs[t - 1]) for t in range(1, len(refs))]
    log(f"eps={eps}: consecutive dense outputs differ by {statistics.fmean(consecutive):.4f} (rel L2, mean)")
    results = []
    for spec in specs:
        for sparsity in sparsities:
            name = with_sparsity(spec, sparsity)
            plain, _ = run_method(name, seq, probe.frame_size)
            plain_err = [rel_l2(r["out"], ref) for r, ref in zip(plain, refs)]
            results.append({"method": spec, "sparsity": sparsity, "every": 0, "errors": plain_err,
                            **summarise(plain_err)})
            log(f"  {name:18s} plain      mean {results[-1]['mean']:.4f}")
            for every in everys:
                rows, nbytes = run_method(name, seq, probe.frame_size, every)
                errors = [rel_l2(r["out"], ref) for r, ref in zip(rows, refs)]
                ablation = reselect_errors(plain, refs, every)
                results.append({"method": spec, "sparsity": sparsity, "every": every, "errors": errors,
                                **summarise(errors), "reselect_errors": ablation,
                                "reselect_mean": summarise(ablation)["mean"],
                                "refresh_steps": [t for t, r in enumerate(rows) if r["kind"] == "refresh"],
                                "residual_bytes": nbytes})
                r = results[-1]
                log(f"  {name:18s} r={every:<3d}      mean {r['mean']:.4f} (reselect {r['reselect_mean']:.4f})")
            for every in plan_everys:  # the plan kept, no residual: only the selection is saved
                rows, nbytes = run_method(name, seq, probe.frame_size, every, reuse="plan")
                errors = [rel_l2(r["out"], ref) for r, ref in zip(rows, refs)]
                results.append({"method": spec, "sparsity": sparsity, "every": every, "reuse": "plan",
                                "errors": errors, **summarise(errors),
                                "refresh_steps": [t for t, r in enumerate(rows) if r["kind"] == "refresh"],
                                "plan_bytes": nbytes})
                log(f"  {name:18s} plan r={every:<3d} mean {results[-1]['mean']:.4f}")
    return {"eps": eps, "consecutive_dense_change": statistics.fmean(consecutive), "rows": results}


def target(rows, spec):
    """The issue's target: r = 5 at sparsity 0.8 no worse than plain sparsity 0.5 (mean error over steps)."""
    pick = {(r["sparsity"], r["every"]): r["mean"] for r in rows if r["method"] == spec and r.get("reuse") != "plan"}
    if (0.8, 5) not in pick or (0.5, 0) not in pick:
        return None
    return {"r5_s0.8": pick[(0.8, 5)], "plain_s0.5": pick[(0.5, 0)], "met": pick[(0.8, 5)] <= pick[(0.5, 0)]}


def table(run) -> str:
    lines = ["| method | sparsity | r | mean rel L2 | max | last step | reselect (ablation) |",
             "|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        every = "plain" if not r["every"] else ("plan kept " if r.get("reuse") == "plan" else "") + str(r["every"])
        resel = f"{r['reselect_mean']:.4f}" if "reselect_mean" in r else "–"
        lines.append(f"| {r['method']} | {r['sparsity']} | {every} | {r['mean']:.4f} | {r['max']:.4f} | "
                     f"{r['last']:.4f} | {resel} |")
    return "\n".join(lines)


def time_table(timings, everys) -> str:
    head = " | ".join(f"mean/step r={e}" for e in everys)
    lines = [f"| method | plain ms | refresh ms | reuse ms | dense SDPA ms | {head} |",
             "|---|---|---|---|---|" + "---|" * len(everys)]
    for name, t in timings.items():
        means = " | ".join(f"{(t['refresh'] + (e - 1) * t['reuse']) / e:.0f}" for e in everys)
        lines.append(f"| {name} | {t['plain']:.0f} | {t['refresh']:.0f} | {t['reuse']:.0f} | {t['dense_sdpa']:.0f} | "
                     f"{means} |")
    return "\n".join(lines)


def plot(run, path, steps):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["method"] for r in run["rows"]))
    sparsities = list(dict.fromkeys(r["sparsity"] for r in run["rows"]))
    fig, axes = plt.subplots(len(specs), len(sparsities), figsize=(5 * len(sparsities), 3.6 * len(specs)),
                             squeeze=False, sharey=True)
    for i, spec in enumerate(specs):
        reference = next((r for r in run["rows"] if r["method"] == spec and r["sparsity"] == 0.5 and not r["every"]),
                         None)
        for j, sparsity in enumerate(sparsities):
            ax = axes[i][j]
            for r in (r for r in run["rows"] if r["method"] == spec and r["sparsity"] == sparsity):
                label = "plain sparse" if not r["every"] else f"{r.get('reuse', 'residual')}_every={r['every']}"
                ax.plot(range(steps), [max(e, 1e-6) for e in r["errors"]], marker="o", ms=3, label=label)
            if reference is not None and sparsity != 0.5:
                ax.axhline(reference["mean"], color="grey", ls="--", lw=1, label="plain sparse 0.5 (mean)")
            ax.set(yscale="log", xlabel="denoising step", ylabel="relative L2 vs dense (refresh: dense, at 1e-6)",
                   title=f"{spec}, sparsity {sparsity}")
            ax.legend(fontsize=7)
    fig.suptitle(f"video probe, drift eps={run['eps']} per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file; the plot goes next to it (.png)")
    p.add_argument("--methods", default="ba_att,ba_att/norm_sort=true,xattention",
                   help="comma-separated specs without sparsity (selectors run block_sparse)")
    p.add_argument("--sparsities", default="0.5,0.8")
    p.add_argument("--every", default="2,5,10", help="residual_every values ('' for none)")
    p.add_argument("--plan-every", default="", help="plan_every values: the plan kept r steps, no residual")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=0.01, help="drift per step, relative to each token's norm")
    p.add_argument("--eps-sweep", default="0.005,0.02", help="other drifts: plain and r=5 at sparsity 0.8 ('' off)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-reps", type=int, default=5, help="timing rounds (each kind's fastest is reported)")
    p.add_argument("--quick", action="store_true", help="n=1024, 6 steps, r=2 only (unless --every), no sweep")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.eps_sweep = 1024, 6, ""
        args.every = "2" if args.every == "2,5,10" else args.every
    torch.set_num_threads(args.threads)
    specs = [s for s in args.methods.split(",") if s]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    everys = [int(s) for s in args.every.split(",") if s]
    plan_everys = [int(s) for s in args.plan_every.split(",") if s]
    probe = make_probe("video", n=args.n, heads=args.heads, dim=args.dim)
    measured = git_state()  # before the run: the code it loaded

    def log(msg):
        print(msg, flush=True)

    main_run = one_drift(probe, args, args.eps, specs, sparsities, everys, log, plan_everys)
    sweeps = [one_drift(probe, args, float(e), specs, [0.5, 0.8] if 0.8 in sparsities else sparsities,
                        [5] if 5 in everys else everys[:1], log, [5] if 5 in plan_everys else plan_everys[:1])
              for e in args.eps_sweep.split(",") if e]
    for run in sweeps:  # the sweep reports plain 0.5, plain 0.8 and r = 5 at 0.8 only
        run["rows"] = [r for r in run["rows"] if not r["every"] or r["sparsity"] == 0.8]
    seq = drifting_steps(probe, 2, args.eps, args.seed)
    timings = {with_sparsity(spec, sp): step_times(with_sparsity(spec, sp), seq, probe.frame_size, args.time_reps)
               for spec in specs for sp in sparsities} if everys else {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(main_run, out.with_suffix(".png"), args.steps)
    report = {
        "environment": environment(), "git": measured, "args": vars(args),
        "probe": {"generator": "video", "n": args.n, "heads": args.heads, "dim": args.dim,
                  "frame_size": probe.frame_size},
        "main": main_run, "eps_sweep": sweeps, "step_ms": timings,
        "target": {spec: target(main_run["rows"], spec) for spec in specs},
        "target_sweep": {str(run["eps"]): {spec: target(run["rows"], spec) for spec in specs} for run in sweeps},
        "plot": png,
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"\neps={args.eps} (consecutive dense change {main_run['consecutive_dense_change']:.4f}), "
          f"mean over steps 1..{args.steps - 1}:")
    print(table(main_run))
    for run in sweeps:
        print(f"\neps={run['eps']} (consecutive dense change {run['consecutive_dense_change']:.4f}):")
        print(table(run))
    if timings:
        print(f"\nCPU ms per call ({torch.get_num_threads()} threads, fastest of {args.time_reps} rounds):")
        print(time_table(timings, everys))
    print("\ntarget (r=5 at 0.8 no worse than plain 0.5):", json.dumps(report["target"]))
    print("wrote", out, png or "(no matplotlib: no plot)")


if __name__ == "__main__":
    main()
