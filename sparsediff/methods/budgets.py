"""Per-layer (and per-head) density budgets from a calibration pass (``sparsediff calibrate``).

A budget file is JSON::

    {"format": "sparsediff-budgets/1", "target_density": 0.2, "default_density": 0.2,
     "layers": {"model.layers.0.self_attn": {"density": 0.31, "heads": [0.4, 0.2, ...]}, ...},
     "meta": {...}}

Keys of ``layers`` are the layer names hosts pass to methods (transformers: the attention module's qualified
name; diffusers processors: the processor's name). ``density`` is the layer's share of visible key blocks;
``heads`` (optional) gives one density per query head, used by ``allocation="row"`` (the global allocation
spreads a layer's budget over its heads by itself). Any config with a ``budgets`` field takes a path, a dict
of that form or a :class:`LayerBudgets`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FORMAT = "sparsediff-budgets/1"


class LayerBudgets:
    """A validated budget table; :meth:`density` looks a layer up."""

    def __init__(self, layers: dict, *, default_density: float | None = None, target_density: float | None = None,
                 meta: dict | None = None, source: str | None = None):
        where = f" in {source}" if source else ""
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"budgets{where}: 'layers' must be a non-empty mapping layer name -> budget")
        self.layers = {}
        for name, entry in layers.items():
            if isinstance(entry, (int, float)):
                entry = {"density": entry}
            if not isinstance(entry, dict) or "density" not in entry:
                raise ValueError(f"budgets{where}: layer {name!r} needs a 'density', got {entry!r}")
            density = _share(entry["density"], f"budgets{where}: layer {name!r} density")
            heads = entry.get("heads")
            if heads is not None:
                if not isinstance(heads, (list, tuple)) or not heads:
                    raise ValueError(f"budgets{where}: layer {name!r} 'heads' must be a list of densities")
                heads = tuple(_share(h, f"budgets{where}: layer {name!r} head density") for h in heads)
            self.layers[str(name)] = (density, heads)
        self.default_density = None if default_density is None else _share(default_density, "default_density")
        self.target_density = target_density
        self.meta = dict(meta or {})
        self.source = source

    @classmethod
    def load(cls, spec) -> LayerBudgets:
        """From a :class:`LayerBudgets`, a dict in the file format or the path of a JSON file."""
        if isinstance(spec, LayerBudgets):
            return spec
        source = None
        if isinstance(spec, (str, Path)):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"budget file {spec} does not exist (make one with `sparsediff calibrate`)")
            try:
                spec = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"budget file {path} is not valid JSON: {err}") from None
            source = str(path)
        if not isinstance(spec, dict):
            raise TypeError(f"budgets must be a path, a dict or a LayerBudgets, got {type(spec).__name__}")
        fmt = spec.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"budgets{' in ' + source if source else ''}: format {fmt!r} is not {FORMAT!r}")
        return cls(spec.get("layers"), default_density=spec.get("default_density"),
                   target_density=spec.get("target_density"), meta=spec.get("meta"), source=source)

    def density(self, layer: str | None, *, default: float, heads: bool = False):
        """The layer's density (its per-head tuple with ``heads=True`` when the table has one); ``default``
        (else the table's ``default_density``) for layers it does not name."""
        entry = self.layers.get(str(layer)) if layer is not None else None
        if entry is None:
            return self.default_density if self.default_density is not None else default
        density, per_head = entry
        return per_head if heads and per_head is not None else density

    def to_dict(self) -> dict:
        layers = {name: ({"density": d} | ({"heads": list(h)} if h else {})) for name, (d, h) in self.layers.items()}
        out = {"format": FORMAT, "target_density": self.target_density, "default_density": self.default_density,
               "layers": layers, "meta": self.meta}
        return out

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def mean_density(self) -> float:
        return sum(d for d, _ in self.layers.values()) / len(self.layers)

    def __repr__(self) -> str:
        return f"LayerBudgets({len(self.layers)} layers, mean density {self.mean_density():.3f})"


def _share(value, what) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)
