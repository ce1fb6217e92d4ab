"""Quality of sparse attention on a real causal LM (``sparsediff eval lm-quality``).

Every setting runs at every target density on the same real text (:mod:`sparsediff.eval.causal_lm`):

- **attention**: on each layer's q/k/v from one dense pass, per head: the share of the softmax mass the kept
  blocks hold (recall), the relative output error against dense, the realised density. The exact block
  oracle under the same budget policy is the reference line (``error / oracle``).
- **perplexity**: the whole model through ``sparsediff.enable`` (``min_seq_len=0``: every layer should run
  sparse; the record names any layer that did not), with the routing counts and the realised density.
- **needles**: RULER's single needle at several depths in prompts of several lengths, greedy decoding (decode
  steps stay dense, the prompt's prefill is sparse): found or not, and the answer's log-probability.

A setting is a method spec (``ba_att``, ``ba_att_paper``, ``xattention/allocation=global``, ...; grammar in
:func:`sparsediff.methods.base.parse_spec`); ``--densities`` sets its sparsity unless the spec has one.
Output folder: ``run.json``, ``attention.jsonl``, ``perplexity.jsonl``, ``needles.jsonl`` (one record per
unit of work, so re-running the same command resumes), ``summary.json``, ``summary.md``, ``attention_error.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from ..methods.base import method_at_density
from .lm_quality_report import write_report
from .records import RecordWriter

PARTS = ("attention", "perplexity", "needles")
# Per-row budget, no window: selection alone at fixed counts. Then the library's default budget policy.
DEFAULT_SETTINGS = ("oracle", "fixed", "xattention", "ba_att_paper", "ba_att/allocation=row/local_window=0",
                    "oracle/allocation=global/local_window=none", "xattention/allocation=global/local_window=none",
                    "ba_att")
DEFAULT_NEEDLE_SETTINGS = ("ba_att", "ba_att_paper", "xattention")


@dataclasses.dataclass
class LMQualityRun:
    out: str
    model: str = "smollm2"
    text: str = "licenses"
    tokens: int = 4096
    offset: int = 0
    settings: tuple = DEFAULT_SETTINGS
    densities: tuple = (0.5, 0.2)
    block_size: int | None = None
    parts: tuple = PARTS
    layers: tuple | None = None  # attention part only; None = all
    needle_lengths: tuple = (4096, 8192)
    needle_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    needle_settings: tuple = DEFAULT_NEEDLE_SETTINGS
    needle_density: float = 0.5
    device: str | None = None
    dtype: str = "fp32"
    progress: bool = True
    plots: bool = True
    seed: int = 42

    def __post_init__(self):
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {list(self.parts)}")
        for d in (*self.densities, self.needle_density):
            if not 0.0 < float(d) <= 1.0:
                raise ValueError(f"densities must lie in (0, 1], got {d}")
        if self.tokens < 2:
            raise ValueError(f"tokens must be at least 2, got {self.tokens}")
        for spec in (*self.settings, *self.needle_settings):
            method_at_density(spec, 0.5, self.block_size)  # a bad spec fails here, before the model loads
        for d in self.needle_depths:
            if not 0.0 <= float(d) <= 1.0:
                raise ValueError(f"needle depths must lie in [0, 1], got {d}")


# -- attention -------------------------------------------------------------------------------------------------
def attention_record(method, q, k, v, *, scale, layer_name, reference) -> dict:
    """Per-head recall, relative output error and realised density of one method on one layer (causal)."""
    from ..methods.block_select import layout

    ref_out, ref_lse = reference
    method.reset()
    plan = method.plan(q, k, v, causal=True, scale=scale, layer=layer_name)
    out, lse = method.attend(q, plan, causal=True, scale=scale, return_lse=True, compensate=False)
    if method.config.compensate:  # the error includes the pooled terms; recall counts the kept blocks only
        out = method.attend(q, plan, causal=True, scale=scale, return_lse=False)
    recall = torch.exp(lse - ref_lse).nan_to_num(0.0).clamp(max=1.0).mean(dim=(0, 2))
    diff = (out.float() - ref_out).pow(2).sum(dim=(0, 2, 3)).sqrt()
    error = diff / ref_out.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-30)
    lay = layout(q.shape[2], k.shape[2], plan.block_size, q.device, causal=True)
    density = plan.block_count.expand(q.shape[0], q.shape[1], -1).sum(dim=(0, 2)).double() / (
        lay.visible_pairs * q.shape[0])
    return {"recall": _round(recall), "error": _round(error), "density": _round(density)}


def _round(t) -> list:
    return [round(float(x), 6) for x in t]


def causal_reference(q, k, v, scale=None):
    """Dense causal attention ``(out float32, lse float32)`` of one layer: PyTorch's fused CPU kernel (which
    returns the LSE) on CPU, the library's dense path elsewhere."""
    from ..methods.dense import dense_attention

    q, k, v = q.float(), k.float(), v.float()
    if q.device.type != "cpu":
        out, lse = dense_attention(q, k, v, causal=True, scale=scale, return_lse=True)
        return out.float(), lse
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
    return out.float(), lse.float()


def run_attention(run, captures, writer, bar) -> None:
    for layer, q, k, v, scale in captures:
        todo = [(s, d) for s in run.settings for d in run.densities if _id(s, d, f"L{layer}") not in writer.done]
        if not todo:
            continue
        reference = causal_reference(q, k, v, scale)
        for spec, density in todo:
            start = time.perf_counter()
            method = method_at_density(spec, density, run.block_size)
            rec = attention_record(method, q, k, v, scale=scale, layer_name=f"model.layers.{layer}.self_attn",
                                   reference=reference)
            writer.write({"id": _id(spec, density, f"L{layer}"), "setting": spec, "target_density": density,
                          "layer": layer, **rec, "seconds": round(time.perf_counter() - start, 3)})
            bar.update(1)


@contextlib.contextmanager
def running(model, method):
    """``model`` with ``method`` enabled (fresh state) for the block, the model's own attention after it; None
    leaves the model as it is."""
    from ..api import disable, enable

    if method is None:
        yield
        return
    method.reset()
    enable(model, method)
    try:
        yield
    finally:
        disable(model)


# -- perplexity ------------------------------------------------------------------------------------------------
def perplexity_record(model, ids, method) -> dict:
    """Mean next-token loss of ``model`` on ``ids`` with ``method`` (None: the model's own attention)."""
    from ..hooks import attention as hook
    from ..hooks.enable import attention_modules

    hook.reset_route_counts()
    start = time.perf_counter()
    with running(model, method), torch.no_grad():
        loss = float(model(ids.to(model.device), labels=ids.to(model.device)).loss)
    rec = {"loss": round(loss, 6), "ppl": round(math.exp(loss), 4), "seconds": round(time.perf_counter() - start, 2)}
    if method is not None:
        names = [name for name, _ in attention_modules(model)]
        ran = method.stats.get("sparse_layers", set())
        rec.update(routes=dict(hook.route_counts), realised_density=_maybe_round(method.realised_density()),
                   dense_layers=[n for n in names if n not in ran], sparse_layers=len([n for n in names if n in ran]))
    return rec


def _maybe_round(x):
    return None if x is None else round(x, 4)


def run_perplexity(run, model, ids, writer, bar) -> None:
    if "dense" not in writer.done:
        writer.write({"id": "dense", "setting": "dense", "target_density": 1.0, **perplexity_record(model, ids, None)})
        bar.update(1)
    for spec in run.settings:
        for density in run.densities:
            key = _id(spec, density)
            if key in writer.done:
                continue
            rec = perplexity_record(model, ids, method_at_density(spec, density, run.block_size))
            writer.write({"id": key, "setting": spec, "target_density": density, **rec})
            bar.update(1)


# -- needles ---------------------------------------------------------------------------------------------------
def needle_prompt(tokenizer, record) -> tuple[torch.Tensor, str]:
    """``(prompt ids (1, n), the text generation continues from)`` with the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["input"]}], tokenize=False,
                                             add_generation_prompt=True) + record["answer_prefix"].lstrip()
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        text = record["input"] + record["answer_prefix"]
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids, text


def needle_record(model, tokenizer, record, method, max_new_tokens=16) -> dict:
    from .scoring import string_match_all

    ids, _ = needle_prompt(tokenizer, record)
    answer = " " + record["outputs"][0]
    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    start = time.perf_counter()
    with running(model, method), torch.no_grad():
        device = model.device
        full = torch.cat([ids, answer_ids], dim=1).to(device)
        logits = model(full).logits[0, ids.shape[1] - 1:-1].float()
        logprob = float(torch.log_softmax(logits, -1).gather(-1, answer_ids.to(device).T).sum())
        gen = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return {"prediction": text.strip()[:200], "found": string_match_all(text, record["outputs"]) >= 1.0,
            "answer_logprob": round(logprob, 4), "prompt_tokens": int(ids.shape[1]),
            "seconds": round(time.perf_counter() - start, 2)}


def run_needles(run, model, tokenizer, records, writer, bar) -> None:
    for record in records:
        for spec in ("dense", *run.needle_settings):
            key = _id(spec, run.needle_density if spec != "dense" else 1.0, record["id"])
            if key in writer.done:
                continue
            method = None if spec == "dense" else method_at_density(spec, run.needle_density, run.block_size)
            rec = needle_record(model, tokenizer, record, method)
            writer.write({"id": key, "setting": spec, "target_density": 1.0 if spec == "dense" else run.needle_density,
                          "length": record["length"], "depth": record["depth"], "answer": record["outputs"][0], **rec})
            bar.update(1)


# -- the run ---------------------------------------------------------------------------------------------------
def _id(spec, density, *rest) -> str:
    return "|".join([spec, f"{float(density):g}", *map(str, rest)])


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def run_lm_quality(run: LMQualityRun) -> dict:
    """Run the parts of ``run`` that earlier runs into the same folder did not finish; write the summary."""
    from . import ruler
    from .causal_lm import capture_qkv, load_causal_lm, text_tokens

    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_causal_lm(run.model, dtype=run.dtype, device=run.device)
    ids = text_tokens(tokenizer, run.text, run.tokens, run.offset)
    info = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(run).items()}
    info.update(benchmark="lm-quality", device_name=_device_name(model.device), torch=torch.__version__,
                python=platform.python_version(), layers=len(model.model.layers) if hasattr(model, "model") else None)
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    if "attention" in run.parts:
        with RecordWriter(out / "attention.jsonl") as writer:
            n_layers = len(run.layers) if run.layers else info["layers"]
            total = len(run.settings) * len(run.densities) * n_layers
            bar = _bar(total, "attention (layer x setting x density)", run.progress)
            bar.update(len(writer.done))
            if len(writer.done) < total:
                captures, _ = capture_qkv(model, ids, layers=run.layers)
                run_attention(run, captures, writer, bar)
                del captures
            bar.close()
    if "perplexity" in run.parts:
        with RecordWriter(out / "perplexity.jsonl") as writer:
            bar = _bar(1 + len(run.settings) * len(run.densities), "perplexity", run.progress)
            bar.update(len(writer.done))
            run_perplexity(run, model, ids, writer, bar)
            bar.close()
    if "needles" in run.parts:
        records = ruler.needle_records(run.needle_lengths, run.needle_depths,
                                       count=ruler.tokenizer_counter(tokenizer), seed=run.seed)
        with RecordWriter(out / "needles.jsonl") as writer:
            bar = _bar(len(records) * (1 + len(run.needle_settings)), "needles", run.progress)
            bar.update(len(writer.done))
            run_needles(run, model, tokenizer, records, writer, bar)
            bar.close()
    return write_report(out, plots=run.plots)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
