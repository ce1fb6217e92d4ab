"""The sparse-vs-dense loop: every method answers the same samples; per-sample JSONL per method
(resumable, shardable), then a summary (JSON + Markdown) with accuracy deltas and speedups vs dense."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from ..methods.base import sparse_share
from .records import RecordWriter, read_records
from .scoring import accuracy, accuracy_by

logger = logging.getLogger(__name__)
BASELINE = "dense"


def parse_methods(text) -> list[str]:
    """"ba_att:0.5,sparsed" -> ["dense", "ba_att:0.5", "sparsed"]: dense always first, once."""
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    return [BASELINE] + [m for i, m in enumerate(items) if m != BASELINE and m not in items[:i]]


def close_run(bar, writers, runner) -> None:
    """End of a run, also on an error: close the progress bar and the result files, and leave the model dense."""
    if bar is not None:
        bar.close()
    for w in writers.values():
        w.close()
    runner.set_method(BASELINE)


def parse_shard(text) -> tuple[int, int]:
    """"i/n" -> (i, n), 0 <= i < n."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must look like i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def method_slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", method).strip("-") or "method"


def results_path(out_dir, method: str, shard=(0, 1)) -> Path:
    suffix = "" if shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"
    return Path(out_dir) / f"{method_slug(method)}{suffix}.jsonl"


def select(samples, limit=None, shard=(0, 1)):
    """The first ``limit`` samples, then every n-th from i: shards partition exactly what one process
    would run, so their outputs merge into the same result."""
    samples = samples[:limit] if limit else samples
    return samples[shard[0]::shard[1]]


def _progress(total, initial, desc, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="answer", disable=not enabled, dynamic_ncols=True)


def run_benchmark(benchmark, runner, methods, out_dir, *, limit=None, shard=(0, 1), batch_size=None,
                  progress=True, skip_errors=False, run_info=None) -> dict:
    """Run ``methods`` (dense first) on the selected samples, skipping what earlier runs finished."""
    methods = parse_methods(methods)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = select(benchmark.samples(), limit, shard)
    if len({s.id for s in samples}) != len(samples):
        raise ValueError(f"{benchmark.name}: sample ids are not unique")
    _write_run_info(out_dir, benchmark, methods, run_info)
    writers = {m: RecordWriter(results_path(out_dir, m, shard)) for m in methods}
    done = sum(s.id in writers[m].done for s in samples for m in methods)
    todo = [s for s in samples if any(s.id not in writers[m].done for m in methods)]
    batch = max(1, batch_size or runner.max_batch_size)
    bar = _progress(len(samples) * len(methods), done, f"{benchmark.name} [{shard[0]}/{shard[1]}]", progress)
    errors = out_dir / "errors.jsonl"
    try:
        for start in range(0, len(todo), batch):
            prepared = []
            for sample in todo[start:start + batch]:
                try:
                    prepared.append(benchmark.prepare(sample))
                except Exception as err:
                    if not skip_errors:
                        raise
                    # Not written to the method files: a later run retries it.
                    logger.error("%s: skipped (%s)", sample.id, err)
                    with open(errors, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"id": sample.id, "error": str(err)}) + "\n")
            for method in methods:
                need = [p for p in prepared if p.sample.id not in writers[method].done]
                if not need:
                    continue
                runner.set_method(method)
                for chunk, routes in _answer_chunks(runner, need, batch):
                    for position, (item, text, latency) in enumerate(chunk):
                        parsed, score = benchmark.score(item.sample, text)
                        writers[method].write({
                            "id": item.sample.id, "method": method, "prediction": text, "parsed": parsed,
                            "answer": item.sample.answer, "score": float(score), "correct": float(score) >= 1.0,
                            "latency_s": round(latency, 6),
                            # The batch's attention calls, on its first record only (summed per method).
                            "routes": routes if position == 0 else {},
                            "meta": {k: item.sample.meta[k] for k in benchmark.group_fields if k in item.sample.meta},
                        })
                    if bar is not None:
                        bar.update(len(chunk))
    finally:
        close_run(bar, writers, runner)
    return write_summary(out_dir, benchmark.name, methods, benchmark.group_fields)


def _route_counts():
    """The transformers hook's route counter, or None where the hooks are not loaded (no transformers model)."""
    import sys

    hook = sys.modules.get("sparsediff.hooks.attention")
    return None if hook is None else hook.route_counts


def _answer_chunks(runner, items, batch):
    """``(answers, routes)`` per batch: routes are the attention calls of that batch by route (sparse, or
    why they ran dense), counted by the transformers hooks; {} when nothing went through them."""
    from .models import time_batch

    for start in range(0, len(items), batch):
        part = items[start:start + batch]
        counts = _route_counts()
        if counts is not None:
            counts.clear()
        texts, latency = time_batch(runner, part)
        counts = _route_counts()
        routes = dict(counts) if counts is not None else {}
        yield [(item, text, latency) for item, text in zip(part, texts)], routes


def _write_run_info(out_dir: Path, benchmark, methods, run_info) -> None:
    info = {"benchmark": benchmark.name, "methods": methods, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            **(run_info or {})}
    write_atomic(out_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: shards finishing together never interleave a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- summary ---------------------------------------------------------------------------------------------------
def load_results(out_dir, method: str) -> list[dict]:
    """All records of ``method`` across shard files, one per id."""
    slug = method_slug(method)
    paths = sorted(Path(out_dir).glob(f"{slug}.jsonl")) + sorted(Path(out_dir).glob(f"{slug}.shard-*.jsonl"))
    by_id = {}
    for path in paths:
        for r in read_records(path):
            by_id.setdefault(str(r["id"]), r)
    return list(by_id.values())


def discover_methods(out_dir) -> list[str]:
    """Methods with result files in ``out_dir`` (dense first), read from the records themselves."""
    found = []
    for path in sorted(Path(out_dir).glob("*.jsonl")):
        if path.name in ("errors.jsonl",) or path.name.startswith("ruler_data"):
            continue
        records = read_records(path)
        if records and "method" in records[0] and records[0]["method"] not in found:
            found.append(records[0]["method"])
    return parse_methods(found) if BASELINE in found else found


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(results: dict[str, list[dict]], group_fields=()) -> dict:
    """Per method: accuracy on all its samples and on those the baseline also answered (the fair
    comparison), delta in points, mean latency, and speedup over the baseline on the shared samples."""
    base = {r["id"]: r for r in results.get(BASELINE, [])}
    rows = {}
    for method, records in results.items():
        shared = [r for r in records if r["id"] in base]
        base_shared = [base[r["id"]] for r in shared]
        lat, base_lat = _mean(r["latency_s"] for r in shared), _mean(r["latency_s"] for r in base_shared)
        routes: dict = {}
        for r in records:
            for route, n in (r.get("routes") or {}).items():
                routes[route] = routes.get(route, 0) + n
        rows[method] = {
            "routes": routes, "sparse_share": sparse_share(routes),
            "n": len(records), "accuracy": accuracy(records), "n_shared": len(shared),
            "accuracy_shared": accuracy(shared) if shared else None,
            "delta_vs_dense": accuracy(shared) - accuracy(base_shared) if shared else None,
            "latency_s": _mean(r["latency_s"] for r in records),
            "speedup_vs_dense": base_lat / lat if shared and lat else None,
            "groups": {f: accuracy_by(records, f) for f in group_fields},
        }
    return rows


def write_summary(out_dir, benchmark_name: str, methods=None, group_fields=()) -> dict:
    out_dir = Path(out_dir)
    methods = methods or discover_methods(out_dir)
    rows = summarize({m: load_results(out_dir, m) for m in methods}, group_fields)
    summary = {"benchmark": benchmark_name, "baseline": BASELINE, "methods": rows}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out_dir / "summary.md", markdown_table(summary))
    return summary


def _fmt(value, spec=".2f", suffix=""):
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _ran_sparse(method, row) -> str:
    routes = dict(row.get("routes") or {})
    total = sum(routes.values())
    if method == BASELINE or not total:
        return "–"
    sparse = routes.pop("sparse", 0) + routes.pop("sparse_padded", 0)
    dense = ", ".join(f"{r.removeprefix('dense_')} {n}" for r, n in sorted(routes.items(), key=lambda x: -x[1]))
    return f"{sparse}/{total}" + (f" (dense: {dense})" if dense else "")


_DURATIONS = {"short": 0, "medium": 1, "long": 2}


def _group_order(g: str):
    # Lengths numerically, Video-MME durations short -> long, everything else alphabetically.
    return (not g.isdigit(), int(g) if g.isdigit() else _DURATIONS.get(g, 3), g)


def markdown_table(summary: dict) -> str:
    rows = summary["methods"]
    lines = [f"## {summary['benchmark']}: sparse vs dense", "",
             "| method | n | accuracy (%) | Δ vs dense (pts) | latency / sample (s) | speedup | calls sparse |",
             "|---|---:|---:|---:|---:|---:|---|"]
    flagged = []
    for method, r in rows.items():
        ran, speed = _ran_sparse(method, r), _fmt(r["speedup_vs_dense"], ".2f", "×")
        if method != BASELINE and r.get("sparse_share") == 0:
            speed = f"({speed})"
            flagged.append(method)
        lines.append(f"| {method} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['delta_vs_dense'], '+.2f')} | "
                     f"{_fmt(r['latency_s'], '.3f')} | {speed} | {ran} |")
    lines.append("")
    lines.append("Δ and speedup are computed on the samples both the method and dense have answered.")
    if flagged:
        lines.append(f"No attention call ran sparse for {', '.join(flagged)} (see the dense reasons): their "
                     "answers and times are dense ones, the speed-up in brackets is noise.")
    group_fields = next(iter(rows.values()), {}).get("groups", {}).keys() if rows else []
    for field in group_fields:
        groups = sorted({g for r in rows.values() for g in r["groups"].get(field, {})}, key=_group_order)
        if not groups:
            continue
        lines += ["", f"### accuracy (%) by {field}", "",
                  "| " + field + " | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
        for g in groups:
            cells = [rows[m]["groups"][field].get(g) for m in rows]
            lines.append(f"| {g} | " + " | ".join("–" if c is None else f"{c['accuracy']:.2f} (n={c['n']})"
                                                 for c in cells) + " |")
    return "\n".join(lines) + "\n"
