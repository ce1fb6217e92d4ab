"""Long-text tab: answer a long prompt dense and sparse with a diffusion LM (block diffusion, where
FlashBlock and LoSA apply) or a causal LM (BA-Att / SparseD on the prefill).

The diffusion LM runs through the library's block-diffusion loop (``pipelines.block_diffusion``) in
prefix-cache mode, which emits the block and step events the caching methods key on; the methods are
switched in with ``sparsediff.enable`` and out with ``sparsediff.disable``.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import torch

import sparsediff
from sparsediff.eval.ruler import generate_one, tokenizer_counter
from sparsediff.methods import make_method
from sparsediff.testing.tiny_lm import DiffusionGemmaAdapter, has_diffusion_gemma, tiny_diffusion_gemma

from .common import (
    Cancelled,
    DemoInputError,
    check_cancel,
    check_prompt,
    check_sparsity,
    default_device,
    no_progress,
    positive_int,
    resolve_method,
    seconds,
)

DIFFUSION_LM, CAUSAL_LM = "tiny-diffusion-gemma", "tiny-qwen2"
METHODS = {"Dense": "dense", "BA-Att": "ba_att", "SparseD": "sparsed", "FlashBlock": "flashblock", "LoSA": "losa"}
BLOCK_DIFFUSION_ONLY = ("flashblock", "losa")
TINY_OVERRIDES = {"block_size": 16, "min_seq_len": 0}  # tiny contexts are a few hundred tokens

_MODELS: dict = {}
_MODEL_LOCK = threading.Lock()


@dataclasses.dataclass
class TextRequest:
    model: str = DIFFUSION_LM
    context: str = ""
    method: str = "LoSA"
    sparsity: float = 0.5
    threshold: float = 0.05  # LoSA: relative change below which a token is stable
    gen_length: int = 32
    block_length: int = 16
    steps_per_block: int = 4

    def method_name(self) -> str:
        return resolve_method(self.method, METHODS)


@dataclasses.dataclass
class TextResult:
    dense_answer: str
    sparse_answer: str
    summary_markdown: str
    progress_rows: list  # [block, step, dense s, sparse s, tokens left masked, stable share]
    report: dict


# -- models ---------------------------------------------------------------------------------------------

def available_models() -> list[str]:
    return ([DIFFUSION_LM] if has_diffusion_gemma() else []) + [CAUSAL_LM]


def get_model(name: str, device: str):
    """(kind, model, tokenizer), built once; kind is "diffusion" or "causal"."""
    with _MODEL_LOCK:
        if name not in _MODELS:
            _MODELS[name] = _load(name, device)
        return _MODELS[name]


def _load(name: str, device: str):
    from sparsediff.testing.tiny_vlm import tiny_qwen2, tiny_tokenizer

    if name == DIFFUSION_LM:
        if not has_diffusion_gemma():
            raise DemoInputError(f"this transformers has no DiffusionGemma; use {CAUSAL_LM}")
        tok = tiny_tokenizer()
        return "diffusion", tiny_diffusion_gemma(len(tok) + 1).to(device), tok
    if name == CAUSAL_LM:
        model, tok = tiny_qwen2()
        return "causal", model.to(device), tok
    if torch.device(device).type != "cuda":
        raise DemoInputError(f"{name!r} is a full-size model and needs a GPU; on this CPU machine use "
                             f"{' or '.join(available_models())}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
        tok = AutoTokenizer.from_pretrained(name)
        if config.model_type == "diffusion_gemma":
            from transformers import DiffusionGemmaForBlockDiffusion

            model = DiffusionGemmaForBlockDiffusion.from_pretrained(name, dtype=torch.bfloat16)
            return "diffusion", model.to(device).eval(), tok
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
        return "causal", model.to(device).eval(), tok
    except Exception as err:  # noqa: BLE001 -- any loading failure becomes a message
        raise DemoInputError(f"could not load {name!r}: {type(err).__name__}: {err}") from err


def needle_prompt(tokens: int = 1024, seed: int = 0, model: str = DIFFUSION_LM) -> tuple[str, str]:
    """A RULER needle-in-a-haystack prompt of about ``tokens`` tokens and its expected answer."""
    tokens = positive_int(tokens, "context length", minimum=64)
    from sparsediff.testing.tiny_vlm import tiny_tokenizer

    count = tokenizer_counter(tiny_tokenizer())
    # Grow the haystack until the prompt reaches the length (noise sentences are a dozen tokens each).
    n = max(1, tokens // 24)
    prompt, prefix, answers = generate_one("niah_single", n, random.Random(seed))
    while count(prompt + prefix) < tokens and n < 100_000:
        n = int(n * 1.25) + 1
        prompt, prefix, answers = generate_one("niah_single", n, random.Random(seed))
    return prompt + prefix, ", ".join(answers)


# -- the run --------------------------------------------------------------------------------------------

def check_request(req: TextRequest, kind: str) -> None:
    check_prompt(req.context)
    name = req.method_name()
    req.sparsity = check_sparsity(req.sparsity)
    if not isinstance(req.threshold, (int, float)) or req.threshold < 0:
        raise DemoInputError(f"threshold must be a number >= 0, got {req.threshold!r}")
    req.gen_length = positive_int(req.gen_length, "answer length")
    req.block_length = positive_int(req.block_length, "block length")
    req.steps_per_block = positive_int(req.steps_per_block, "steps per block")
    if kind == "causal" and name in BLOCK_DIFFUSION_ONLY:
        raise DemoInputError(f"{req.method} works on block diffusion (a prefix plus an active block); "
                             f"choose {DIFFUSION_LM}, or BA-Att / SparseD for a causal LM")
    if kind == "diffusion":
        if req.gen_length % req.block_length:
            raise DemoInputError(f"answer length ({req.gen_length}) must be a multiple of the block length "
                                 f"({req.block_length})")
        if req.steps_per_block > req.block_length:
            raise DemoInputError(f"steps per block ({req.steps_per_block}) cannot exceed the block length "
                                 f"({req.block_length}): each step commits at least one token")


def make_request_method(req: TextRequest, tiny: bool):
    name = req.method_name()
    overrides = dict(TINY_OVERRIDES) if tiny else {}
    if name in ("ba_att", "sparsed", "losa"):
        overrides["sparsity"] = req.sparsity
    if name == "losa":
        overrides["threshold"] = float(req.threshold)
    if name == "flashblock" and req.sparsity > 0:
        overrides.update(sparse_selector="ba_att", sparsity=req.sparsity)
    try:
        return make_method(name, **overrides)
    except (TypeError, ValueError) as err:
        raise DemoInputError(str(err)) from err


def _diffusion_run(model, tok, prompt_ids, req, cancel, progress, share):
    from sparsediff.pipelines.block_diffusion import generate

    mask_id = model.config.text_config.vocab_size - 1
    steps, last = [], [time.perf_counter()]
    total = req.gen_length // req.block_length * req.steps_per_block
    start, end = share

    def on_step(block, step, x):
        now = time.perf_counter()
        steps.append({"block": block, "step": step, "seconds": now - last[0],
                      "masked": int((x[0, prompt_ids.shape[1]:] == mask_id).sum())})
        last[0] = now
        progress(start + (end - start) * len(steps) / total, desc=f"block {block}, step {step}")
        check_cancel(cancel)

    t0 = time.perf_counter()
    last[0] = t0
    out = generate(DiffusionGemmaAdapter(model), prompt_ids, mask_id=mask_id, gen_length=req.gen_length,
                   block_length=req.block_length, steps_per_block=req.steps_per_block, mode="prefix_cache",
                   on_step=on_step)
    return out[0, prompt_ids.shape[1]:], time.perf_counter() - t0, steps


def _causal_run(model, tok, prompt_ids, req, cancel, progress, share):
    from transformers import StoppingCriteria, StoppingCriteriaList

    steps, last = [], [time.perf_counter()]
    start, end = share

    class Stepper(StoppingCriteria):  # one call per generated token: timing, progress and Stop
        def __call__(self, input_ids, scores, **kwargs):
            now = time.perf_counter()
            steps.append({"block": 0, "step": len(steps), "seconds": now - last[0], "masked": 0})
            last[0] = now
            progress(start + (end - start) * len(steps) / req.gen_length, desc=f"token {len(steps)}")
            return bool(cancel is not None and cancel.is_set())

    t0 = last[0] = time.perf_counter()
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=req.gen_length,
                         min_new_tokens=req.gen_length, do_sample=False, pad_token_id=tok.pad_token_id,
                         stopping_criteria=StoppingCriteriaList([Stepper()]))
    check_cancel(cancel)
    return out[0, prompt_ids.shape[1]:], time.perf_counter() - t0, steps


def run_text(req: TextRequest, *, progress=no_progress, cancel=None, device: str | None = None) -> TextResult:
    """Dense and sparse answers to one long prompt; raises :class:`DemoInputError` for bad inputs."""
    device = device or default_device()
    if req.model not in available_models() and not (req.model and "/" in req.model):
        raise DemoInputError(f"unknown model {req.model!r}: use {' or '.join(available_models())} or a hub id")
    progress(0.02, desc=f"loading {req.model}")
    kind, model, tok = get_model(req.model, device)
    check_request(req, kind)
    method = make_request_method(req, req.model in (DIFFUSION_LM, CAUSAL_LM))
    prompt_ids = tok(req.context, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    run = _diffusion_run if kind == "diffusion" else _causal_run

    with torch.no_grad():
        dense_ids, dense_s, dense_steps = run(model, tok, prompt_ids, req, cancel, progress, (0.05, 0.5))
        # The loop emits block/step events itself, so the hooks' own step tracking stays off.
        from sparsediff.hooks import SparseAttentionConfig

        sparsediff.enable(model, SparseAttentionConfig(method, track_steps=kind != "diffusion"))
        try:
            sparse_ids, sparse_s, sparse_steps = run(model, tok, prompt_ids, req, cancel, progress, (0.5, 0.98))
            method_stats = _stats(method)
        finally:
            sparsediff.disable(model)
            method.reset()
    progress(1.0, desc="done")
    return _result(req, kind, tok, prompt_ids, method, method_stats, dense_ids, sparse_ids, dense_s, sparse_s,
                   dense_steps, sparse_steps)


def _stats(method) -> dict:
    report = method.step_report() if hasattr(method, "step_report") else []
    stable = {(r["block"], r["step"]): 1.0 - r["active_share"] for r in report}
    return {"stable": stable, "stats": {k: v for k, v in method.stats.items() if k != "per_step"}}


def _result(req, kind, tok, prompt_ids, method, method_stats, dense_ids, sparse_ids, dense_s, sparse_s,
            dense_steps, sparse_steps) -> TextResult:
    agree = float((dense_ids == sparse_ids).float().mean()) if dense_ids.shape == sparse_ids.shape else 0.0
    rows = []
    for d, s in zip(dense_steps, sparse_steps):
        stable = method_stats["stable"].get((s["block"], s["step"]))
        rows.append([s["block"], s["step"], round(d["seconds"], 4), round(s["seconds"], 4), s["masked"],
                     None if stable is None else round(stable, 3)])
    blocks = len({r[0] for r in rows})
    lines = [f"**Context**: {prompt_ids.shape[1]} tokens · **model**: {req.model} ({kind} LM)",
             f"**Dense**: {seconds(dense_s)} · **{req.method}**: {seconds(sparse_s)} · "
             f"**speed-up** {dense_s / max(sparse_s, 1e-12):.2f}x",
             f"**Agreement**: {agree:.0%} of answer tokens equal to dense"]
    if kind == "diffusion":
        lines.append(f"**Block diffusion**: {blocks} blocks x {req.steps_per_block} steps of {req.block_length} tokens")
    stable = [v for v in method_stats["stable"].values()]
    if stable:
        lines.append(f"**LoSA**: {sum(stable) / len(stable):.0%} of block tokens stable on average "
                     "(their prefix attention reused)")
    report = {"request": dataclasses.asdict(req), "kind": kind, "context_tokens": int(prompt_ids.shape[1]),
              "dense_seconds": dense_s, "sparse_seconds": sparse_s, "agreement": agree,
              "method": method.describe() | method_stats["stats"], "steps": rows}
    decode = lambda ids: tok.decode(ids.tolist(), skip_special_tokens=True)
    return TextResult(decode(dense_ids), decode(sparse_ids), "  \n".join(lines), rows, report)


__all__ = ["Cancelled", "TextRequest", "TextResult", "available_models", "needle_prompt", "run_text"]
