"""Diffusers attention processors that run a sparsediff method on long self-attention.

A processor holds a method (its config inside) and an optional capture setting, nothing else. On each
call it runs the model family's own diffusers processor (projections, norms, RoPE, output projection
all stay diffusers' code) and routes only that processor's attention product -- the
``torch.nn.functional.scaled_dot_product_attention`` call, reached directly or through diffusers'
``dispatch_attention_fn`` -- to the method, through a ``TorchFunctionMode`` active for the duration of
the call. Nothing global is patched, so a dense model running next to a sparse one is unaffected.

``set_attn_processor`` with one instance puts the same object on every attention module; what differs
per module (its name, the processor it replaced) lives in ``_BINDINGS``, keyed weakly by the module.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import fnmatch
import logging
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._logging import warn_once
from ..methods import head_parallel, make_method
from ..methods.base import AttentionMethod, sparse_share
from ..methods.masks import key_padding, run_per_row
from ..runtime import step_state
from . import families, token_order

logger = logging.getLogger(__name__)

# Latent grid of the transformer call in flight: (latent frames, rows, cols) after patching, set by the
# forward pre-hook that ``enable_diffusers`` installs.
GEOMETRY: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("sparsediff_geometry",
                                                                                       default=None)
# Attention timer of ``attention_timer()``: seconds spent inside routed attention calls.
_TIMER: contextvars.ContextVar[list | None] = contextvars.ContextVar("sparsediff_attn_timer", default=None)


@dataclasses.dataclass
class Binding:
    """What a processor knows about one attention module."""

    name: str
    original: object  # the diffusers processor this one replaced (or the family default)


_BINDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bind(module, name: str, original) -> None:
    _BINDINGS[module] = Binding(name, original)


def unbind(module) -> None:
    _BINDINGS.pop(module, None)


def _binding(attn) -> Binding:
    found = _BINDINGS.get(attn)
    if found is None:
        # Set directly through ``set_attn_processor``: no name and no record of the replaced processor,
        # so use the family's default processor and a name stable for the module's lifetime.
        found = Binding(f"{type(attn).__name__}@{id(attn):x}", families.default_processor(attn))
        _BINDINGS[attn] = found
    return found


@contextlib.contextmanager
def attention_timer():
    """``with attention_timer() as t:`` -- ``t[0]`` accumulates seconds spent in routed attention."""
    box = [0.0]
    token = _TIMER.set(box)
    try:
        yield box
    finally:
        _TIMER.reset(token)


@dataclasses.dataclass
class CaptureConfig:
    """Save post-RoPE q, k, v ``(B, H, N, D)`` of chosen layers and steps to ``.safetensors`` files.

    ``layers``: glob patterns on layer names (``"blocks.1?.attn1"``), None for all routed layers;
    ``steps``: denoising steps to save, None for all. Joint-attention sequences are saved text first,
    with ``global_tokens`` in the metadata (the layout methods see).
    """

    directory: str
    layers: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)) or not str(self.directory):
            raise ValueError(f"capture directory must be a path, got {self.directory!r}")
        if isinstance(self.layers, str):
            self.layers = (self.layers,)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.steps is not None:
            self.steps = tuple(int(s) for s in self.steps)

    def wants(self, layer: str, step: int | None) -> bool:
        if self.steps is not None and step not in self.steps:
            return False
        return self.layers is None or any(fnmatch.fnmatchcase(layer, p) for p in self.layers)


class _SDPARouter(TorchFunctionMode):
    """Sends SDPA calls made inside it to ``route``; every other torch call runs unchanged."""

    def __init__(self, route):
        super().__init__()
        self.route, self.calls = route, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.route(*args, **kwargs)
        return func(*args, **kwargs)


class SparseAttnProcessor:
    """A diffusers attention processor running ``method`` (anything ``make_method`` accepts) on long
    self-attention and joint text+video attention; cross-attention and short sequences stay dense.

    ``SparseAttnProcessor("ba_att", sparsity=0.8)``, ``SparseAttnProcessor(BAAttConfig(...))``,
    ``SparseAttnProcessor(method_object, capture=CaptureConfig("qkv/"))``.
    """

    method_name: str | None = None  # subclasses fix the method

    def __init__(self, method=None, *, capture: CaptureConfig | None = None, **overrides):
        if method is None:
            if self.method_name is None:
                raise TypeError("SparseAttnProcessor needs a method: a name, a config or a method object")
            method = self.method_name
        self.method: AttentionMethod = make_method(method, **overrides)
        if self.method_name is not None and self.method.name != self.method_name:
            raise TypeError(f"{type(self).__name__} runs {self.method_name!r}, got a {self.method.name!r} config")
        self.capture = capture
        # Attention calls of the current generation by route: "sparse", or why one ran dense.
        self.routes: collections.Counter = collections.Counter()
        self._routes_generation = step_state.current().generation

    @property
    def config(self):
        return self.method.config

    # diffusers' context parallelism (``model.enable_parallelism``) looks for these two attributes on each
    # module's processor and hands it the parallel config; the replaced processor, which runs the all-to-all
    # around the attention product, gets it at call time. None: the default (native) attention backend.
    _attention_backend = None
    _parallel_config = None

    def _count(self, route: str) -> None:
        generation = step_state.current().generation
        if generation != self._routes_generation:
            self._routes_generation = generation
            self.routes.clear()
        self.routes[route] += 1

    def sparse_share(self) -> float | None:
        """Share of the current generation's routed (self- and joint-) attention calls that ran the method; None
        before any. Cross-attention calls, dense by design, are counted in ``routes`` but not here."""
        return sparse_share(self.routes)

    def describe(self) -> dict:
        out = {"processor": type(self).__name__, **self.method.describe(), "routes": dict(self.routes),
               "sparse_share": self.sparse_share()}
        if self.capture is not None:
            out["capture"] = dataclasses.asdict(self.capture)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method.config!r})"

    # diffusers' legacy ``Attention.forward`` drops keyword arguments the processor's signature does not
    # name, so ``image_rotary_emb`` is spelled out; newer modules pass it (or ``rotary_emb``) positionally.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        binding = _binding(attn)
        group = self._head_group(binding)
        extra = (image_rotary_emb, *args) if image_rotary_emb is not None or args else ()
        plan = families.call_plan(binding.original, hidden_states, encoder_hidden_states)
        if plan is None:  # cross-attention, text-only refiners, unknown processors: untouched
            self._count("dense_cross")
            return binding.original(attn, hidden_states, encoder_hidden_states, attention_mask, *extra, **kwargs)

        def route(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            return self._route(binding.name, plan, query, key, value, attn_mask, dropout_p, is_causal, scale)

        router = _SDPARouter(route)
        with router, head_parallel.head_group(group):
            out = binding.original(attn, hidden_states, encoder_hidden_states, attention_mask, *extra, **kwargs)
        if router.calls == 0:
            self._count("dense_backend")
            backend = getattr(binding.original, "_attention_backend", None)
            warn_once(logger, f"{binding.name}: attention backend {backend!r} bypasses torch SDPA, so this layer ran "
                      "dense; use the default (native) attention backend for sparse attention",
                      key=("bypass", binding.name))
        return out

    def _head_group(self, binding):
        """Under diffusers' Ulysses context parallelism: hand the replaced processor the parallel config (its
        all-to-all gives the attention product every token of this rank's heads, so methods run unchanged) and
        return the Ulysses process group (methods agree on head-spanning budgets through it); else None."""
        config = self._parallel_config
        cp = getattr(config, "context_parallel_config", None)
        if cp is None or not hasattr(binding.original, "_parallel_config"):
            return None
        if (cp.ring_degree or 1) > 1:
            raise NotImplementedError(
                f"{binding.name}: sparsediff composes with Ulysses context parallelism (ulysses_degree), not ring "
                f"attention (ring_degree={cp.ring_degree}): use ContextParallelConfig(ulysses_degree=...)")
        binding.original._parallel_config = config
        mesh = getattr(cp, "_ulysses_mesh", None)
        return mesh.get_group() if mesh is not None and (cp.ulysses_degree or 1) > 1 else None

    def rank_balance(self) -> dict | None:
        """Under Ulysses: each rank's realised density (kept / visible blocks of its heads) and the slowest rank's
        over the mean, the imbalance a per-head kept density brings (work per rank follows its kept blocks).
        A collective: every rank of the group must call it. None outside context parallelism or before any
        sparse call."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        mesh = getattr(cp, "_ulysses_mesh", None)
        density = getattr(self.method, "realised_density", lambda: None)()
        if mesh is None or density is None:
            return None
        group = mesh.get_group()
        parts = [torch.zeros(1, dtype=torch.float64) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, torch.tensor([density], dtype=torch.float64), group=group)
        per_rank = [float(p) for p in parts]
        mean = sum(per_rank) / len(per_rank)
        return {"per_rank": per_rank, "max_over_mean": max(per_rank) / mean if mean else None}

    # -- the attention product ---------------------------------------------------------------------------
    def _route(self, layer, plan, q, k, v, attn_mask, dropout_p, is_causal, scale):
        if dropout_p:
            self._count("dense_dropout")
            warn_once(logger, f"{layer}: attention dropout is on (training?), running dense", key=("dropout", layer))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale)
        text, text_last = plan.text_tokens, plan.text_last
        if text and text_last:  # methods take global tokens first
            q, k, v = (_text_first(x, text) for x in (q, k, v))
            if attn_mask is not None and attn_mask.shape[-1] == k.shape[2]:
                attn_mask = _text_first_mask(attn_mask, text)
        box = _TIMER.get()
        if box is not None:
            _sync(q)
            start = time.perf_counter()
        out = self._attend(layer, q, k, v, attn_mask, is_causal, scale, text)
        if box is not None:
            _sync(q)
            box[0] += time.perf_counter() - start
        if text and text_last:
            out = torch.cat([out[:, :, text:], out[:, :, :text]], dim=2)
        return out

    def _attend(self, layer, q, k, v, attn_mask, is_causal, scale, text):
        if attn_mask is None:
            return self._run(layer, q, k, v, is_causal, scale, text)
        keep = key_padding(attn_mask, q.shape[0], k.shape[2])
        if keep is not None and bool(keep[:, text:].all()):
            return self._run_padded(layer, q, k, v, keep, is_causal, scale, text)
        blocks = _block_causal_ends(attn_mask, k.shape[2]) if not text and q.shape[2] == k.shape[2] else None
        if blocks is not None:
            return self._run_block_causal(layer, q, k, v, blocks, scale)
        self._count("dense_mask")
        warn_once(logger, f"{layer}: attention mask of shape {tuple(attn_mask.shape)} is neither key padding "
                   "nor block-causal; this layer runs dense", key=("mask", layer))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    def _run(self, layer, q, k, v, causal, scale, text, name=None, segments=None):
        name = name or layer
        grid = _grid(k.shape[2] - text)
        frame_size = grid[1] * grid[2] if grid else None
        if segments is not None:  # a frame block over its cached prefix: one grid per block of the keys
            grid, frame_size = segments, segments[-1][1] * segments[-1][2]
        applied = token_order.applied_layout(q, k, grid, text) if segments is None and not causal else None
        if self.capture is not None:
            saved = (q, k, v) if applied is None else (applied.unpermute(x) for x in (q, k, v))
            self._save(name, *saved, frame_size, text, grid if segments is None else None)
        reason = None if self.method.name == "dense" else self.method.dense_reason(q, k, causal=causal)
        self._count("dense" if self.method.name == "dense" else reason or "sparse")
        out = self.method(q, k, v, causal=causal, scale=scale, layer=name, frame_size=frame_size, global_tokens=text,
                          grid=grid, applied_layout=applied)
        return out.to(q.dtype)

    def _run_padded(self, layer, q, k, v, keep, causal, scale, text):
        # Padded (text) keys are dropped; padded query rows still attend the valid keys, as under SDPA.
        return run_per_row(lambda b, qb, kb, vb, text_b: self._run(layer, qb, kb, vb, causal, scale, text_b),
                           q, k, v, keep, causal=causal, scale=scale, global_tokens=text)

    def _run_block_causal(self, layer, q, k, v, ends, scale):
        # Block-causal video (diffusion forcing): each frame block attends itself and earlier blocks,
        # i.e. a cached prefix plus its own tokens -- the method contract for Nk > Nq.
        grids = _block_grids(ends)
        outs, start = [], 0
        for i, end in enumerate(ends):
            outs.append(self._run(layer, q[:, :, start:end], k[:, :, :end], v[:, :, :end], False, scale, 0,
                                  name=f"{layer}/block{i}", segments=grids[:i + 1] if grids else None))
            start = end
        return torch.cat(outs, dim=2)

    def _save(self, layer, q, k, v, frame_size, text, grid=None):
        step = step_state.current().step
        if not self.capture.wants(layer, step):
            return
        from safetensors.torch import save_file

        os.makedirs(self.capture.directory, exist_ok=True)
        path = os.path.join(self.capture.directory, f"{layer.replace('/', '_')}.step{step}.safetensors")
        tensors = {n: x.detach().contiguous().cpu() for n, x in (("q", q), ("k", k), ("v", v))}
        meta = {"layer": layer, "step": str(step), "frame_size": str(frame_size), "global_tokens": str(text),
                "grid": "x".join(map(str, grid)) if grid else "",
                "generation": str(step_state.current().generation)}
        save_file(tensors, path, metadata=meta)


def _sync(x) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _text_first(x, text):
    return torch.cat([x[:, :, -text:], x[:, :, :-text]], dim=2)


def _text_first_mask(mask, text):
    # Masks are (B or 1, H or 1, Nq or 1, Nk): reorder the key axis, and the query axis when present.
    mask = torch.cat([mask[..., -text:], mask[..., :-text]], dim=-1)
    if mask.shape[-2] > 1:
        mask = torch.cat([mask[..., -text:, :], mask[..., :-text, :]], dim=-2)
    return mask


_BLOCK_CACHE: dict = {}


def _block_causal_ends(mask, n):
    """Block ends when ``mask`` is block-causal (bool, block i sees blocks <= i), else None (cached per
    mask tensor: the transformer builds one per forward and passes it to every layer)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (n, n):
        return None
    key = (mask.data_ptr(), tuple(mask.shape), mask._version)
    if key not in _BLOCK_CACHE:
        _BLOCK_CACHE.clear()
        m = mask[0, 0]
        ends = m.sum(-1)
        expected = torch.arange(n, device=m.device)[None, :] < ends[:, None]
        ok = bool((m == expected).all()) and bool((mask == m).all()) and bool((ends[1:] >= ends[:-1]).all())
        ok = ok and bool((ends > torch.arange(n, device=m.device)).all())
        _BLOCK_CACHE[key] = sorted(set(ends.tolist())) if ok else None
    return _BLOCK_CACHE[key]


def _block_grids(ends) -> list[tuple[int, int, int]] | None:
    """The latent grid of each frame block of a block-causal call (blocks of whole frames), else None."""
    grid = GEOMETRY.get()
    if grid is None or not all(grid) or ends[-1] != grid[0] * grid[1] * grid[2]:
        return None
    per_frame, grids, start = grid[1] * grid[2], [], 0
    for end in ends:
        if (end - start) % per_frame:
            return None
        grids.append(((end - start) // per_frame, grid[1], grid[2]))
        start = end
    return grids


def _grid(video_tokens: int) -> tuple[int, int, int] | None:
    """The call's latent grid when its video tokens fill it (self-attention over the whole clip), else None."""
    grid = GEOMETRY.get()
    if grid is None or not all(grid) or video_tokens != grid[0] * grid[1] * grid[2]:
        return None
    return grid


class BAAttProcessor(SparseAttnProcessor):
    """BA-Att (block-approximate sparse attention): ``BAAttProcessor(sparsity=0.8, beta=0.5)``."""

    method_name = "ba_att"


class SparseDProcessor(SparseAttnProcessor):
    """SparseD: dense early steps, then per-head block patterns fixed at the switch step."""

    method_name = "sparsed"


class FlashBlockProcessor(SparseAttnProcessor):
    """FlashBlock: caches the attention to earlier frame blocks (block-causal video, diffusion forcing)."""

    method_name = "flashblock"


class BlockSparseProcessor(SparseAttnProcessor):
    """Any registered block selector + the block-sparse kernel: ``BlockSparseProcessor(selector="xattention")``."""

    method_name = "block_sparse"


class DenseProcessor(SparseAttnProcessor):
    """Dense attention through the same route (a timing and capture baseline)."""

    method_name = "dense"
