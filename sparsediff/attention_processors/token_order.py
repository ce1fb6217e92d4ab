"""Video tokens held in tile order across a transformer's blocks: the tiled layout for two gathers a step.

Applied per attention call, ``layout="tiled"`` permutes q, k and v and un-permutes the output in every
self-attention layer: four gathers of the whole sequence per layer (3 % of a Wan2.1 step on an H100). But every
other op of a DiT block acts per token (norms, modulation, the MLP, cross-attention's queries), and a token
permutation commutes with all of them. So where a family is listed here, the hooks permute the video tokens, and
the per-token block inputs (rotary tables, per-token timestep modulation), once where they enter the first block
and undo it where they leave the last; the attention calls in between already see tiles, and the method runs
without permuting (``applied_layout``). Families not listed keep the per-call permutation; so do calls the hook
cannot vouch for (a block-causal mask, context parallelism, an unexpected shape), with the reason logged.
``SPARSEDIFF_HOST_TILES=0`` turns the fold off (the per-call permutation everywhere).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os

import torch

from .._logging import warn_once
from ..methods.token_layout import TokenLayout, make_layout

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class HostOrder:
    """One transformer call's tiling: ``active`` between the first block's entry and the last block's exit."""

    layout: TokenLayout
    active: bool = False
    cache: dict = dataclasses.field(default_factory=dict)  # per-forward permuted rotary tables and modulation


# The tiling of the transformer call in flight, set by the model's pre-hook (``enable_diffusers``).
HOST_ORDER: contextvars.ContextVar[HostOrder | None] = contextvars.ContextVar("sparsediff_host_order", default=None)


def _rope(x, n, perm):
    """Rotary tables: a tensor or a tuple of tensors with the token axis at dim 1 (cos/sin ``(1, N, 1, D)``) or
    dim 2 (complex ``(1, 1, N, D/2)``)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_rope(t, n, perm) for t in x)
    if not torch.is_tensor(x):
        return x
    for dim in (1, 2):
        if x.dim() > dim and x.shape[dim] == n:
            return x.index_select(dim, perm)
    return x


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """Where a family's transformer blocks take their per-token inputs (positional index, keyword name)."""

    blocks: str  # attribute holding the block list
    temb_token_dim: int  # token axis of a per-token timestep modulation (4-d temb), e.g. Wan 2.2 TI2V
    mask_index: int | None = None  # an attention-mask argument: tiles only when it is None

    def masked(self, args, kwargs) -> bool:
        """Whether the block gets an attention mask (block-causal video: tiled per frame block, per call)."""
        if self.mask_index is None:
            return False
        mask = args[self.mask_index] if len(args) > self.mask_index else kwargs.get("attention_mask")
        return mask is not None

    def permute(self, args, kwargs, perm, cache: dict, first: bool) -> tuple[tuple, dict] | None:
        """One block's arguments with the video tokens in tile order, or None when they cannot be. The model
        hands every block the same rotary tables and modulation, so those are permuted once per forward
        (``cache``, keyed by the original object); the hidden states only at the ``first`` block, the later ones
        get them from the block before."""
        args, kwargs = list(args), dict(kwargs)

        def get(i, name):
            return args[i] if len(args) > i else kwargs.get(name)

        def put(i, name, value):
            if len(args) > i:
                args[i] = value
            elif name in kwargs:
                kwargs[name] = value

        def once(value, fn):
            key = id(value)
            if key not in cache:
                cache[key] = (value, fn(value))  # the original is held so its id stays unique
            return cache[key][1]

        hidden, n = get(0, "hidden_states"), perm.numel()
        if not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[1] != n or self.masked(args, kwargs):
            return None
        temb = get(2, "temb")
        if torch.is_tensor(temb) and temb.dim() == 4:
            if temb.shape[self.temb_token_dim] != n:
                return None
            put(2, "temb", once(temb, lambda t: t.index_select(self.temb_token_dim, perm)))
        rope = get(3, "rotary_emb")
        if rope is not None:
            put(3, "rotary_emb", once(rope, lambda r: _rope(r, n, perm)))
        if first:
            put(0, "hidden_states", hidden.index_select(1, perm))
        return tuple(args), kwargs


# transformer class -> its blocks' inputs. Only classes whose blocks are the whole per-token path between the
# patch embedding and the output head (VACE adds row-major control hints between blocks: not listed).
TOKEN_ORDER_FAMILIES = {
    "WanTransformer3DModel": BlockInputs("blocks", temb_token_dim=1),
    "SkyReelsV2Transformer3DModel": BlockInputs("blocks", temb_token_dim=2, mask_index=4),
}


def enabled() -> bool:
    return os.environ.get("SPARSEDIFF_HOST_TILES", "1") != "0"


def install(model, config) -> list:
    """Hooks that hold ``model``'s video tokens in tile order across its blocks when ``config.layout`` is
    ``"tiled"``; [] where the family is not listed. Returns the hook handles."""
    spec = TOKEN_ORDER_FAMILIES.get(type(model).__name__)
    blocks = getattr(model, spec.blocks, None) if spec is not None else None
    if config.layout != "tiled" or not blocks:
        return []
    first, last = blocks[0], blocks[-1]

    def enter(module, args, kwargs):
        order = HOST_ORDER.get()
        if order is None or (module is first) == order.active:  # not tiling, or already tiling at the first block
            return None
        moved = spec.permute(args, kwargs, order.layout.perm, order.cache, first=module is first)
        if moved is None:
            if module is not first:
                raise RuntimeError(f"{type(model).__name__}: a block's inputs changed shape mid-forward while its "
                                   "tokens were held in tile order; set SPARSEDIFF_HOST_TILES=0")
            if not spec.masked(args, kwargs):  # a block-causal mask is the expected case of diffusion forcing
                warn_once(logger, f"{type(model).__name__}: the block inputs do not match the latent grid, so the "
                          "tokens keep their order across the blocks and each attention call tiles on its own",
                          key=("host_order", type(model).__name__))
            return None
        order.active = True
        return moved

    def leave(module, args, kwargs, output):
        order = HOST_ORDER.get()
        if order is None or not order.active:
            return None
        order.active = False
        order.cache.clear()
        if torch.is_tensor(output):
            return output.index_select(1, order.layout.inverse)
        return (output[0].index_select(1, order.layout.inverse), *output[1:])

    return [block.register_forward_pre_hook(enter, with_kwargs=True) for block in blocks] + [
        last.register_forward_hook(leave, with_kwargs=True, always_call=True)]


def begin(model, config, grid, device):
    """At the start of a transformer call: the contextvar token of its tiling (None where it does not apply)."""
    if (grid is None or config.layout != "tiled" or type(model).__name__ not in TOKEN_ORDER_FAMILIES
            or not enabled() or _context_parallel(model)):
        return HOST_ORDER.set(None)
    return HOST_ORDER.set(HostOrder(make_layout(grid, config.block_size, config.tile, 0, device)))


def _context_parallel(model) -> bool:
    # diffusers' context parallelism splits the blocks' inputs along the tokens: each call tiles on its own.
    return getattr(model, "_parallel_config", None) is not None


def checkpointing(model) -> bool:
    """Gradient checkpointing in a grad-enabled call: blocks recompute in the backward pass, outside the call."""
    return torch.is_grad_enabled() and bool(getattr(model, "gradient_checkpointing", False))


def applied_layout(q, k, grid, text: int) -> TokenLayout | None:
    """The tiling the host already applied to this attention call's tokens, or None."""
    order = HOST_ORDER.get()
    if order is None or not order.active or text or grid != order.layout.grid:
        return None
    n = order.layout.perm.numel()
    return order.layout if q.shape[2] == n and k.shape[2] == n else None
