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
