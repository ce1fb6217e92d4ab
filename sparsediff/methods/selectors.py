"""Registry of block selectors: functions ``(q, k, config, *, causal=False) -> (block_index, block_count)``.

A selector sees q ``(B, Hq, Nq, D)`` and k ``(B, Hkv, Nk, D)`` and returns the kernel's index form
(``sparsediff.kernels.block_sparse_attention``). Any host can run any registered selector by name.
"""

from __future__ import annotations

from collections.abc import Callable

Selector = Callable[..., tuple]
_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str):
    def wrap(fn: Selector) -> Selector:
        if name in _SELECTORS and _SELECTORS[name] is not fn:
            raise ValueError(f"a selector named {name!r} is already registered")
        _SELECTORS[name] = fn
        return fn

    return wrap


def get_selector(name: str) -> Selector:
    _load_builtin()
    if name not in _SELECTORS:
        raise ValueError(f"unknown selector {name!r}; registered: {sorted(_SELECTORS)}")
    return _SELECTORS[name]


def available_selectors() -> list[str]:
    _load_builtin()
    return sorted(_SELECTORS)


def _load_builtin() -> None:
    # Importing the method modules registers their selectors.
    import importlib

    for module in ("ba_att", "baselines"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise
