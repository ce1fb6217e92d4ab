"""Attention fidelity of block-sparse methods against dense attention, on synthetic or captured Q/K/V.

Generators (all seeded, shapes ``(B, H, N, D)``, returned as a :class:`Probe`):

- ``video``: tokens laid out frames x height x width (16 x 16 patches per frame); q and k share a
  per-head content vector rotated by a 3-D rotary position code (time, row, column), so a token
  attends mostly to its spatio-temporal neighbours: the same row band, adjacent rows, the same place
  in adjacent frames. Models video-DiT self-attention after 3-D RoPE.
- ``sinks``: 1-D rotary locality plus a few leading keys with a large component along a direction
  every query shares: attention sinks, as in LMs and DiTs.
- ``stripes``: 1-D locality plus a handful of keys at random positions that every query attends to
  (vertical stripes of the attention map: globally salient tokens).
- ``clustered``: queries and keys drawn around a few cluster centres with different norms; queries
  come in runs of one cluster (an object's region), keys are scattered in random order: each query
  attends to its own cluster, spread over the whole sequence.
- ``random``: i.i.d. normal q, k, v (no structure; nearly uniform attention, a worst case).

Captured Q/K/V (:func:`load_qkv`): a ``.safetensors`` file with tensors ``q``, ``k``, ``v`` (shapes
``(B, H, N, D)`` or ``(H, N, D)``), or several captures as ``<name>.q``, ``<name>.k``, ``<name>.v``.
String metadata, all optional: ``layer``, ``step``, ``frame_size``, ``grid`` (``"FxHxW"``),
``global_tokens``, ``causal`` (``"0"``/``"1"``); per capture as ``<name>.frame_size`` etc. when several are stored.

Metrics (:func:`evaluate`), per head and averaged:
- ``recall``: share of the true softmax mass inside the kept blocks. It equals
  ``exp(lse_sparse - lse_dense)`` per query row, so it comes from the kernels' LSE without
  materialising any attention map, at any N.
- ``rel_l2``: ``||out - out_dense|| / ||out_dense||``; ``cosine``: mean per-token cosine similarity.
- ``density``: kept (query-block, key-block) pairs over visible pairs (causally visible under causal).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import block_sparse_attention, index_to_mask
from ..methods.block_select import layout
from ..methods.dense import dense_attention

GENERATORS = ("video", "sinks", "stripes", "clustered", "random")


@dataclasses.dataclass
class Probe:
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool = False
    frame_size: int | None = None
    global_tokens: int = 0
    grid: tuple[int, int, int] | None = None  # (frames, rows, cols) of the video tokens after the global ones
    meta: dict = dataclasses.field(default_factory=dict)


def _rotate(x, angles):
    """Rotate consecutive pairs of the last dim of ``x (..., N, D)`` by ``angles (N, D/2)``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def _rope_angles(positions, pairs, base):
    """``positions (N,)`` -> ``(N, pairs)`` angles, frequencies from 1 down to ``base ** -1``."""
    freqs = base ** (-torch.arange(pairs, dtype=torch.float64) / max(pairs - 1, 1))
    return positions.double()[:, None] * freqs[None, :]


def _content(gen, b, h, n, d, sharpness, noise):
    """q, k sharing one content vector per head (|a|^2 = sharpness * sqrt(d)) plus independent noise."""
    a = torch.randn(1, h, 1, d, generator=gen, dtype=torch.float64)
    a = a / a.norm(dim=-1, keepdim=True) * math.sqrt(sharpness * math.sqrt(d))
    q = a + noise * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = a + noise * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    return q, k


def _local_1d(gen, b, h, n, d, sharpness=10.0, noise=0.35):
    q, k = _content(gen, b, h, n, d, sharpness, noise)
    angles = _rope_angles(torch.arange(n), d // 2, base=n / 8)
    return _rotate(q, angles), _rotate(k, angles)


def make_probe(name, *, batch=1, heads=4, n=4096, dim=64, seed=0, dtype=torch.float32, grid=None) -> Probe:
    """A seeded synthetic probe (see the module docstring for what each generator models). Drawn on the
    CPU (the same numbers whatever the default device), returned on the default device. ``grid``
    (frames, rows, cols) sets the video generator's latent grid (default: 16 x 16 frames, ``n`` tokens)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; available: {', '.join(GENERATORS)}")
    if grid is not None:
        if name != "video":
            raise ValueError(f"grid applies to the video generator only, not {name!r}")
        if len(grid) != 3 or min(int(x) for x in grid) < 1:
            raise ValueError(f"grid must be (frames, rows, cols) of positive ints, got {grid!r}")
        grid = tuple(int(x) for x in grid)
        n = math.prod(grid)
    if dim % 2 or dim < 6:
        raise ValueError(f"dim must be even and >= 6 (rotary pairs over 3 axes), got {dim}")
    device = torch.get_default_device()
    with torch.device("cpu"):
        probe = _draw_probe(name, batch, heads, n, dim, seed, dtype, grid)
    if device.type != "cpu":
        probe = dataclasses.replace(probe, q=probe.q.to(device), k=probe.k.to(device), v=probe.v.to(device))
    return probe


def _draw_probe(name, batch, heads, n, dim, seed, dtype, grid=None) -> Probe:
    gen = torch.Generator().manual_seed(seed * 1000 + GENERATORS.index(name))
    b, h, d = batch, heads, dim
    v = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    frame_size = None
    if name == "video":
        frames, rows, cols = grid or (math.ceil(n / 256), 16, 16)
        frame_size = rows * cols
        pos = torch.arange(frames * frame_size)[:n]
        t, row, col = pos // frame_size, (pos % frame_size) // cols, pos % cols
        if n == frames * frame_size:
            grid = (frames, rows, cols)
        q, k = _content(gen, b, h, n, d, sharpness=20.0, noise=0.3)
        per_axis = d // 6
        angles = torch.cat([_rope_angles(t, per_axis, base=max(frames, 2)), _rope_angles(row, per_axis, base=rows),
                            _rope_angles(col, per_axis, base=cols)], dim=-1)
        angles = torch.nn.functional.pad(angles, (0, d // 2 - angles.shape[-1]))  # leftover pairs: unrotated
        q, k = _rotate(q, angles), _rotate(k, angles)
    elif name == "random":
        q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    elif name in ("sinks", "stripes"):
        q, k = _local_1d(gen, b, h, n, d)
        u = torch.randn(1, h, 1, d, generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=-1, keepdim=True)
        q = q + 2.0 * u  # every query shares a component along u ...
        if name == "sinks":
            salient = torch.arange(min(4, n))
        else:
            salient = torch.randperm(n, generator=gen)[: max(4, n // 512)]
        k[:, :, salient] += 6.0 * math.sqrt(d) / 2.0 * u  # ... that a few keys carry strongly
    else:  # clustered
        clusters = 8
        centres = torch.randn(1, h, clusters, d, generator=gen, dtype=torch.float64)
        centres = centres / centres.norm(dim=-1, keepdim=True)
        radius = torch.linspace(2.0, 4.0, clusters, dtype=torch.float64)[None, None, :, None] * d**0.25
        centres = centres * radius
        # Queries come in runs of one cluster (a region of one object); keys are scattered.
        run = 64
        q_labels = torch.randint(clusters, (math.ceil(n / run),), generator=gen).repeat_interleave(run)[:n]
        k_labels = torch.randint(clusters, (n,), generator=gen)
        q = centres[:, :, q_labels] + 0.3 * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
        k = centres[:, :, k_labels] + 0.3 * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    return Probe(name, q.to(dtype), k.to(dtype), v.to(dtype), frame_size=frame_size, grid=grid,
                 meta={"seed": seed})


def load_qkv(path, *, device="cpu", dtype=None) -> list[Probe]:
    """Captured probes from a ``.safetensors`` file (format in the module docstring)."""
    from safetensors import safe_open

    probes = []
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        names = sorted({key.rsplit(".", 1)[0] if "." in key else "" for key in keys})
        for name in names:
            prefix = f"{name}." if name else ""
            missing = [x for x in "qkv" if prefix + x not in keys]
            if missing:
                raise ValueError(f"{path}: capture {name or '(top level)'} lacks tensor(s) {missing}; need q, k and v")
            q, k, v = (f.get_tensor(prefix + x) for x in "qkv")
            q, k, v = (t[None] if t.dim() == 3 else t for t in (q, k, v))
            if dtype is not None:
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

            def field(key, default=None, prefix=prefix):
                return meta.get(prefix + key, meta.get(key, default))

            frame, grid = field("frame_size"), field("grid")
            grid = tuple(int(x) for x in grid.split("x")) if grid else None
            probes.append(Probe(
                name=name or str(path), q=q, k=k, v=v, causal=field("causal", "0") in ("1", "true", "True"),
                frame_size=int(frame) if frame not in (None, "", "None") else None,
                global_tokens=int(field("global_tokens", 0)), grid=grid,
                meta={key: field(key) for key in ("layer", "step") if field(key) is not None},
            ))
    return probes


def save_qkv(path, q, k, v, **metadata) -> None:
    """Write one capture in the format :func:`load_qkv` reads (metadata values become strings)."""
    from safetensors.torch import save_file

    tensors = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}
    save_file(tensors, str(path), metadata={key: str(val) for key, val in metadata.items() if val is not None})


@dataclasses.dataclass
class DenseReference:
    out: torch.Tensor  # float32 (B, H, Nq, D)
    lse: torch.Tensor  # float32 (B, H, Nq)


def dense_reference(probe: Probe) -> DenseReference:
    q, k, v = (t.float() for t in (probe.q, probe.k, probe.v))
    out, lse = dense_attention(q, k, v, causal=probe.causal, return_lse=True)
    return DenseReference(out, lse)


def evaluate(method, probe: Probe, reference: DenseReference | None = None, tiles=None) -> dict:
    """Fidelity of one block-sparse method (a ``BlockSparseMethod``, e.g. BA-Att) on one probe; with a
    ``tiles`` (a :class:`~sparsediff.methods.token_layout.TokenLayout`) the method sees the tokens in tile order.
    The metrics are means over query rows, so they do not depend on the order they are computed in."""
    reference = dense_reference(probe) if reference is None else reference
    q, k, v = probe.q, probe.k, probe.v
    frame_size = probe.frame_size
    if tiles is not None:
        q, k, v = tiles.permute_q(q), tiles.permute(k), tiles.permute(v)
        reference = DenseReference(tiles.permute_q(reference.out), tiles.permute_q(reference.lse))
        frame_size = tiles.segment
    kwargs = dict(causal=probe.causal, frame_size=frame_size, global_tokens=probe.global_tokens)
    plan = method.plan(q, k, v, **kwargs)
    out, lse = block_sparse_attention(
        q, plan.k, plan.v, plan.block_index, plan.block_count, causal=probe.causal,
        block_size=plan.block_size or method.config.block_size, return_lse=True, check_ids=False,
    )
    out = out.float()
    # Share of the dense softmax mass that the kept keys hold, per query row.
    recall = torch.exp(lse - reference.lse).nan_to_num(0.0).clamp(max=1.0)
    diff = (out - reference.out).flatten(2).norm(dim=-1)
    rel_l2 = diff / reference.out.flatten(2).norm(dim=-1).clamp_min(1e-30)
    cosine = torch.nn.functional.cosine_similarity(out, reference.out, dim=-1, eps=1e-30)
    lay = layout(q.shape[2], k.shape[2], plan.block_size or method.config.block_size, q.device, causal=probe.causal)
    kept = plan.block_count.expand(q.shape[0], q.shape[1], -1).sum(-1).double()
    density = kept / lay.n_visible.sum().double()
    per_head = {
        "recall": recall.mean(dim=(0, 2)), "rel_l2": rel_l2.mean(dim=0),
        "cosine": cosine.mean(dim=(0, 2)), "density": density.mean(dim=0),
    }
    result = {key: float(val.mean()) for key, val in per_head.items()}
    result["per_head"] = {key: [round(float(x), 6) for x in val] for key, val in per_head.items()}
    return result


def block_mass(q, k, *, head=0, batch=0, block_size=128, causal=False) -> torch.Tensor:
    """True attention mass per (query block, key block) of one head, ``(nqb, nkb)``, averaged over
    the block's queries; computed in chunks of query blocks (for plots on moderate N)."""
    group = q.shape[1] // k.shape[1]
    qh, kh = q[batch, head].double(), k[batch, head // group].double()
    nq, nk = qh.shape[0], kh.shape[0]
    nqb, nkb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    scale = 1.0 / math.sqrt(q.shape[-1])
    dev = qh.device  # not the default device: probes may live elsewhere
    out = torch.zeros(nqb, nkb, dtype=torch.float64, device=dev)
    rows_per_chunk = block_size * max(1, 2**24 // (block_size * nk))
    for start in range(0, nq, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, nq), device=dev)
        scores = qh[rows] @ kh.T * scale
        if causal:
            scores = scores.masked_fill(torch.arange(nk, device=dev)[None, :] > rows[:, None] + nk - nq,
                                        float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nn.functional.pad(probs, (0, nkb * block_size - nk)).view(len(rows), nkb, block_size).sum(-1)
        out.index_add_(0, rows // block_size, probs)
    counts = torch.full((nqb,), float(block_size), dtype=torch.float64, device=dev)
    counts[-1] = nq - (nqb - 1) * block_size
    return (out / counts[:, None]).float()


def kept_mask(method, probe: Probe, *, head=0, batch=0):
    """``(kept bool (nqb, nkb), block mass (nqb, nkb), perm)`` of one head, keys in the order the
    method uses (sorted when it sorts)."""
    plan = method.plan(probe.q, probe.k, probe.v, causal=probe.causal, frame_size=probe.frame_size,
                       global_tokens=probe.global_tokens)
    block_size = plan.block_size or method.config.block_size
    nkb = math.ceil(probe.k.shape[2] / block_size)
    idx = plan.block_index[min(batch, plan.block_index.shape[0] - 1), min(head, plan.block_index.shape[1] - 1)]
    cnt = plan.block_count[min(batch, plan.block_count.shape[0] - 1), min(head, plan.block_count.shape[1] - 1)]
    mass = block_mass(probe.q, plan.k, head=head, batch=batch, block_size=block_size,
                      causal=probe.causal)
    return index_to_mask(idx, cnt, nkb), mass, plan.perm
