"""Per-layer caches tied to one block of one generation, shared by SparseD, FlashBlock and LoSA.

The base class already calls ``reset()`` when a new generation starts; this adds what the
step-caching methods also need: dropping entries when ``step_state.block`` changes (block
diffusion), naming layers when a host passes no ``layer=``, warning once, and counting the bytes
held on the device.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from . import step_state

logger = logging.getLogger(__name__)


class LayerCache:
    def __init__(self, owner: str):
        self.owner = owner
        self.entries: dict = {}
        self.block = step_state.current().block
        self._mark, self._index = None, -1
        self._warned: set[str] = set()

    def clear(self) -> None:
        self.entries = {}
        self._mark, self._index = None, -1

    def sync(self, state) -> bool:
        """Drop every entry when the block changed since the last call; True if it did."""
        if state.block != self.block:
            self.block = state.block
            self.clear()
            return True
        return False

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s: %s", self.owner, message)

    def key(self, layer, state):
        """``layer`` when given; otherwise the call's order within the current step."""
        if layer is not None:
            return layer
        if state.step is None:
            self.warn_once("no layer name and no step information: all layers share one cache entry. "
                           "Pass layer= from the host or wrap steps in sparsediff.denoising_step().")
            return "<shared>"
        mark = (state.block, state.step)
        if mark != self._mark:
            self._mark, self._index = mark, -1
        self._index += 1
        return f"<call {self._index}>"

    def nbytes(self) -> int:
        total = 0
        for entry in self.entries.values():
            # Not dataclasses.astuple: it deep-copies tensors.
            values = ([getattr(entry, f.name) for f in dataclasses.fields(entry)]
                      if dataclasses.is_dataclass(entry) else entry)
            total += sum(t.nbytes for t in values if isinstance(t, torch.Tensor))
        return total


def stale(entry_step, step, every) -> bool:
    """Whether a cache entry made at ``entry_step`` must be recomputed at ``step``."""
    if step is None or entry_step is None:
        return False
    if step < entry_step:  # a schedule restarted without a new generation or block
        return True
    return every is not None and step - entry_step >= every


class OpCounter:
    """Counts the device operations one call issues, as a proxy for kernel launches on a GPU.

    ``with OpCounter() as c: method(q, k, v)`` then ``c.total`` / ``c.ops``. Counted: every aten op that
    computes (views, reshapes, detach and empty allocations launch nothing and are skipped); each
    attention-kernel and merge call counts as one launch whatever its CPU fallback does inside.
    Used by the tests as an upper bound on the steady-state path of FlashBlock and LoSA.
    """

    _FREE = {"view", "_unsafe_view", "expand", "slice", "select", "transpose", "t", "unsqueeze", "squeeze",
             "permute", "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided", "lift_fresh",
             "split", "unbind", "_reshape_alias", "reshape", "narrow", "split_with_sizes", "view_as", "unfold"}

    def __init__(self):
        self.ops: dict[str, int] = {}
        self._paused = 0
        self._mode = None
        self._patches = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def _count(self, name):
        if not self._paused:
            self.ops[name] = self.ops.get(name, 0) + 1

    def _opaque(self, name, fn):
        def wrapper(*args, **kwargs):
            self._count(name)
            self._paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._paused -= 1
        return wrapper

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from ..kernels import block_sparse, merge, prefix_merge

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in OpCounter._FREE:
                    counter._count(name)
                return func(*args, **(kwargs or {}))

        for module, attr, label in ((block_sparse, "block_sparse_attention_torch", "<attention kernel>"),
                                    (merge, "_merge_torch", "<merge kernel>"),
                                    (prefix_merge, "_merge_prefix_torch", "<merge kernel>")):
            original = getattr(module, attr)
            self._patches.append((module, attr, original))
            setattr(module, attr, self._opaque(label, original))
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for module, attr, original in reversed(self._patches):
            setattr(module, attr, original)
        self._patches = []
        return False
