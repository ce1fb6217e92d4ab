"""Video tokens reordered into compact 3-D tiles before block selection, and back after the kernel.

Flattened frame by frame, row by row, a block of 128 video tokens is a thin strip of one frame: its
keys are far apart in two of the three axes, so block statistics blur the locality that selection
needs, and even the exact block oracle keeps less of the attention mass. Reordered so that each block
is a tile of ``tile = (frames, rows, cols)`` latent tokens (VSA, STA and SVG2 do the same), a block's
tokens are neighbours in time and space.

``tile_permutation(grid, tile)`` orders tiles row-major over the grid and tokens inside a tile by
``tile_order`` (compact halves, central tokens where the sampled estimator looks). A grid that the tile
does not divide keeps partial tiles at its far edges (they come out shorter, so a block there spans two
partial tiles); every token appears exactly once, so the result is exact whatever the grid. Global
(text) tokens of joint attention stay first and in place: they are always attended, as rows and as
columns. The method sees tokens in tile order; the output comes back in the caller's order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch

from .._logging import warn_once

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "tiled", "rowmajor")
# Tile shape per block size, (frames, rows, cols): chosen on the probe's video generator (docs/video_layout.md;
# for 128-token blocks 2 x 4 x 16 beat 2 x 8 x 8, 1 x 8 x 16 and 4 x 4 x 8 for BA-Att in 5 of 6 grid/density cells).
DEFAULT_TILES = {16: (1, 4, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (2, 4, 16), 256: (4, 8, 8)}


def check_layout_fields(config) -> None:
    """Validate a config's ``layout`` and ``tile`` fields (called from ``MethodConfig.__post_init__``)."""
    if config.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {config.layout!r}")
    tile = config.tile
    if tile is None:
        return
    if isinstance(tile, str):  # from a spec string: "2x8x8"
        try:
            tile = tuple(int(x) for x in tile.lower().split("x"))
        except ValueError:
            tile = None
    if not isinstance(tile, (tuple, list)) or len(tile) != 3 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in tile):
        raise ValueError(f"tile must be (frames, rows, cols) of positive ints or 'FxHxW', got {config.tile!r}")
    config.tile = tuple(tile)


def default_tile(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """The tile of ``block_size`` tokens for ``grid``: the measured shape, with frames (then rows) moved to
    the other axes where the grid is thinner than the tile."""
    if block_size in DEFAULT_TILES:
        tf, th, tw = DEFAULT_TILES[block_size]
    else:  # powers of two outside the table: as cubic as possible, frames first
        e = int(math.log2(block_size))
        tf, th, tw = 2 ** (e // 3), 2 ** ((e + 1) // 3), 2 ** ((e + 2) // 3)
    frames, rows, cols = grid
    while tf > 1 and tf > frames:  # a clip shorter than the tile: spend the frames on space
        tf //= 2
        if th <= tw:
            th *= 2
        else:
            tw *= 2
    while th > 1 and th > rows:
        th //= 2
        tw *= 2
    return tf, th, tw


@functools.lru_cache(maxsize=16)
def tile_order(tile) -> torch.Tensor:
    """The order of a tile's tokens (as row-major offsets inside the tile), ``(volume,)``.

    Order inside a block is free for block-sparse attention, so it is chosen for two readers: (1) each
    power-of-two run of positions is a compact sub-box (the tile is halved along its longest axis,
    recursively), so finer blocks (BA-Att's 64-token blocks inside a 128-token tile) are compact too; (2) the
    last position of each eighth of the tile holds that eighth's most central token, because the sampled-rows
    estimator scores the last row of each of its S runs exactly: in row-major order those rows would all sit on one
    corner of the tile (16 x 16 x 16 probe, 4 sampled rows per 4 x 4 x 8 tile, 50 % sparsity: error 0.074 with
    row-major order inside the tile, 0.033 with this one)."""
    with torch.device("cpu"):
        return _tile_order(tile)


def _tile_order(tile) -> torch.Tensor:
    sizes = list(tile)
    coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in sizes), indexing="ij"), -1).view(-1, 3)

    def bisect(lo, hi):
        extent = [h - lo_ for lo_, h in zip(lo, hi)]
        if max(extent) == 1:
            return [(lo[0] * sizes[1] + lo[1]) * sizes[2] + lo[2]]
        axis = max(range(3), key=lambda a: (extent[a], a))  # longest axis, columns first on ties
        mid = lo[axis] + extent[axis] // 2
        left_hi, right_lo = list(hi), list(lo)
        left_hi[axis], right_lo[axis] = mid, mid
        return bisect(lo, left_hi) + bisect(right_lo, hi)

    order = bisect([0, 0, 0], sizes)
    # One level of runs (an eighth of the tile): a swap inside a run keeps every coarser run a box, and the
    # ends of these runs are the rows sampled at up to 8 rows per tile-sized block (4 per half-tile block).
    run = max(1, len(order) // 8)
    for r, start in enumerate(range(0, len(order), run)):
        members = order[start:start + run]
        # The run's centre, nudged a quarter token per axis by the run's index bits: where the centre falls
        # between tokens, successive runs pick different sides (frames follow bit 1, so 4 samples span them too).
        nudge = torch.tensor([(r >> 1) & 1, (r >> 2) & 1, r & 1], dtype=torch.float64) * 0.5 - 0.25
        target = coords[members].double().mean(0) + nudge
        best = start + int(torch.argmin((coords[members].double() - target).square().sum(-1)))
        order[best], order[start + run - 1] = order[start + run - 1], order[best]
    return torch.tensor(order)


@functools.lru_cache(maxsize=64)
def _permutation(grid, tile, prefix, device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.device("cpu"):
        perm, inverse = _cpu_permutation(grid, tile, prefix)
    return perm.to(device), inverse.to(device)


def _cpu_permutation(grid, tile, prefix):
    frames, rows, cols = grid
    tf, th, tw = tile
    nf, nh, nw = -(-frames // tf), -(-rows // th), -(-cols // tw)
    index = torch.full((nf * tf, nh * th, nw * tw), -1, dtype=torch.long)
    index[:frames, :rows, :cols] = torch.arange(frames * rows * cols).view(frames, rows, cols)
    order = index.view(nf, tf, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(nf * nh * nw, -1)
    order = order[:, tile_order(tile)].reshape(-1)
    order = order[order >= 0] + prefix
    perm = torch.cat([torch.arange(prefix), order])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


def tile_permutation(grid, tile, prefix: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` over ``prefix + F*H*W`` tokens: ``x[..., perm, :]`` is in tile order and
    ``y[..., inverse, :]`` undoes it. The ``prefix`` (global) tokens stay first."""
    grid, tile = tuple(int(x) for x in grid), tuple(int(x) for x in tile)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (frames, rows, cols) of positive ints, got {grid}")
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"tile must be (frames, rows, cols) of positive ints, got {tile}")
    return _permutation(grid, tile, int(prefix), torch.device(device) if device else torch.get_default_device())


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """One call's tiling: ``permute`` k and v (token axis 2), ``permute_q`` the queries, ``unpermute`` the
    output and LSE. The queries share the keys' order, or, in a cached-prefix call (block-causal video), are
    the last segment's tokens in that segment's tile order."""

    grid: tuple  # (frames, rows, cols), or one such grid per segment of the keys
    tile: tuple[int, int, int]
    perm: torch.Tensor
    inverse: torch.Tensor
    q_perm: torch.Tensor | None = None  # None: the queries are the keys' tokens
    q_inverse: torch.Tensor | None = None

    @property
    def segment(self) -> int:
        """Tokens per tile: the segment inside which a method may reorder keys (BA-Att's norm sort)."""
        return math.prod(self.tile)

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(2, self.perm)

    def permute_q(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(2, self.perm if self.q_perm is None else self.q_perm)

    def unpermute(self, x: torch.Tensor) -> torch.Tensor:
        """Query-side tensors (output, LSE) back to the caller's order."""
        return x.index_select(2, self.inverse if self.q_inverse is None else self.q_inverse)


def make_layout(grid, block_size: int, tile=None, global_tokens: int = 0, device=None) -> TokenLayout:
    """The tiling of a ``grid`` of video tokens after ``global_tokens`` leading tokens."""
    grid = tuple(int(x) for x in grid)
    tile = tuple(tile) if tile is not None else default_tile(grid, block_size)
    perm, inverse = tile_permutation(grid, tile, global_tokens, device)
    return TokenLayout(grid, tile, perm, inverse)


def make_segment_layout(grids, block_size: int, tile=None, device=None) -> TokenLayout:
    """Keys made of consecutive segments (frame blocks of block-causal video), each tiled on its own grid, and
    queries that are the last segment: each block's tiles stay inside the block, so the prefix a cached-prefix
    method keeps is tiled the same way at every call. Cached: every layer and step of a generation asks again.
    ``device`` defaults to the default device, as :func:`make_layout`'s."""
    return _segment_layout(tuple(tuple(int(x) for x in g) for g in grids), block_size,
                           None if tile is None else tuple(tile),
                           torch.device(device) if device else torch.get_default_device())


@functools.lru_cache(maxsize=64)
def _segment_layout(grids, block_size, tile, device) -> TokenLayout:
    tile = tile if tile is not None else default_tile(grids[-1], block_size)
    perms, offset = [], 0
    for g in grids:
        # A short block gets the tile shrunk to its frames, as default_tile does for a short clip.
        t = tile if tile[0] <= g[0] else default_tile(g, math.prod(tile))
        perms.append(tile_permutation(g, t, 0, device)[0] + offset)
        offset += math.prod(g)
    perm = torch.cat(perms)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    q_perm = perms[-1] - (offset - math.prod(grids[-1]))
    q_inverse = torch.empty_like(q_perm)
    q_inverse[q_perm] = torch.arange(q_perm.numel(), device=q_perm.device)
    return TokenLayout(tuple(grids), tile, perm, inverse, q_perm, q_inverse)


def _is_grid(grid) -> bool:
    return isinstance(grid, (tuple, list)) and len(grid) == 3 and all(isinstance(x, int) for x in grid)


def layout_for(config, q, k, *, causal: bool, grid, global_tokens: int) -> TokenLayout | None:
    """The tiling a method call runs under, or None (tokens in the caller's order).

    ``grid``: the (frames, rows, cols) of the video tokens after the global ones, or for a cached-prefix call a
    sequence of such grids, one per segment of the keys, the queries being the last segment.
    Tiles apply with ``layout="tiled"``. ``"auto"`` (the default) keeps the
    row-major order for now: on the probe's video generator tiles won only on many small frames (16 x 16 x 16:
    oracle error 0.039 -> 0.017 at density 0.5) and lost on wide ones (5 x 30 x 52: 0.012 -> 0.017; BA-Att
    0.016 -> 0.039), and no real video model has been measured yet (docs/video_layout.md). Causal calls (LMs)
    and calls whose queries are not the keys' tokens (cross-attention) keep their order."""
    mode = config.layout
    if mode in ("rowmajor", "auto") or causal:
        return None
    if grid is None:
        if mode == "tiled":
            warn_once(logger, "layout='tiled' but the host passed no latent grid (frames, height, width); tokens keep "
                       "their order")
        return None
    if not _is_grid(grid):  # segments: a cached prefix of earlier blocks, then the queries' block
        grids = [tuple(g) for g in grid]
        if (global_tokens or not grids or not all(_is_grid(g) for g in grids)
                or k.shape[2] != sum(math.prod(g) for g in grids) or q.shape[2] != math.prod(grids[-1])):
            warn_once(logger, f"layout: segment grids {grids} do not match this call's {k.shape[2]} keys and "
                       f"{q.shape[2]} queries; tokens keep their order")
            return None
        return make_segment_layout(grids, config.block_size, config.tile, q.device)
    video = math.prod(grid)
    if q.shape[2] != k.shape[2] or k.shape[2] - global_tokens != video:
        warn_once(logger, f"layout: grid {tuple(grid)} ({video} tokens) does not match this call's {k.shape[2]} keys "
                   f"({global_tokens} global) with {q.shape[2]} queries; tokens keep their order")
        return None
    return make_layout(grid, config.block_size, config.tile, global_tokens, q.device)
