"""Per-layer caches tied to one block of one generation, shared by SparseD, FlashBlock and LoSA.

The base class already calls ``reset()`` when a new generation starts; this adds what the
step-caching methods also need: dropping entries when ``step_state.block`` changes (block
diffusion), naming layers when a host passes no ``layer=``, warning once, counting the bytes
held on the device, and replaying a layer's steady-state step as a CUDA graph (``run_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import torch

from . import step_state

logger = logging.getLogger(__name__)


class LayerCache:
    def __init__(self, owner: str):
        self.owner = owner
        self.entries: dict = {}
        self.block = step_state.current().block
        self.epoch = 0  # counts block changes: entries kept across blocks compare it to refresh in place
        self.captures = 0  # CUDA graphs captured since the last clear (a generation)
        self._mark, self._index = None, -1
        self._warned: set[str] = set()
        self.sightings: dict[int, tuple] = {}  # automatic graphs: id(entry) -> the last call's graph key
        self.sync_strikes: dict[int, int] = {}  # id(entry) -> warm-ups that synchronised with the host

    def clear(self) -> None:
        self.entries = {}
        self.captures = 0
        self.sightings, self.sync_strikes = {}, {}
        self._mark, self._index = None, -1

    def sync(self, state, clear: bool = True) -> bool:
        """At a block change since the last call, drop every entry (``clear``) or only advance ``epoch``
        (entries that refresh themselves in place, keeping their graphs); True if the block changed."""
        if state.block != self.block:
            self.block = state.block
            self.epoch += 1
            if clear:
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
            total += sum(t.nbytes for t in values if isinstance(t, (torch.Tensor, StepGraph, GraphSlot)))
        return total

    def graphs(self) -> list:
        """The CUDA graphs held (each layer entry's step graph and those of its ``GraphSlot`` fields, in field
        order); they go with their entries."""
        held = []
        for e in self.entries.values():
            for f in dataclasses.fields(e) if dataclasses.is_dataclass(e) else ():
                g = getattr(e, f.name)
                g = g.graph if isinstance(g, GraphSlot) else g
                if isinstance(g, StepGraph):
                    held.append(g)
        return held


def stale(entry_step, step, every) -> bool:
    """Whether a cache entry made at ``entry_step`` must be recomputed at ``step``."""
    if step is None or entry_step is None:
        return False
    if step < entry_step:  # a schedule restarted without a new generation or block
        return True
    return every is not None and step - entry_step >= every


# -- CUDA graphs of the steady-state step -------------------------------------------------------------
# A cached step of FlashBlock / LoSA is ~2-25 small kernels plus Python around them; at long prefixes
# that launch time, not GPU work, sets its wall time. ``run_step`` calls the step's function eagerly,
# or captures it once per cache entry (a layer within a block) and replays it: one code path either way.


@dataclasses.dataclass(eq=False)
class StepGraph:
    """One captured step: a replay reads ``static_q`` (refilled per call) and the pinned tensors in place
    and writes ``outputs`` (overwritten by the next replay)."""

    graph: object
    static_q: torch.Tensor
    key: tuple  # q's layout and the pinned tensors' addresses / layouts at capture
    outputs: tuple | list
    nbytes: int  # the graph's private memory pool (reserved at capture) plus static_q


@dataclasses.dataclass(eq=False)
class GraphSlot:
    """Holds a second graph of one cache entry (``run_step`` reads and sets ``graph``)."""

    graph: object = None

    @property
    def nbytes(self) -> int:
        return self.graph.nbytes if isinstance(self.graph, StepGraph) else 0


_streams: dict = {}


def graphs_usable(q) -> bool:
    return q.is_cuda


def capturing(q) -> bool:
    """Whether q's stream is being captured by someone else's CUDA graph (a host graphing whole steps):
    then a step runs its kernels directly, into that graph, instead of capturing its own."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


_branches: dict = {}


def branch_stream(q):
    """Inside a CUDA graph capture of q's stream (a step's own or a host's), a second stream for work that what
    follows does not need yet: captured on it, that work is a parallel branch of the graph (the caller forks
    with ``wait_stream`` and joins before reading its results, which go into buffers made before the capture so
    that their memory is never handed to the other stream). None when not capturing: eager work stays on one
    stream, at no host cost."""
    if not (q.is_cuda and capturing(q)):
        return None
    stream = prepare_branch(q.device)
    current = torch.cuda.current_stream(q.device)
    while stream == current or stream == _streams.get(q.device):  # another one from PyTorch's pool
        stream = _branches[q.device] = torch.cuda.Stream(q.device)
    return stream


def prepare_branch(device):
    """The branch stream of ``device``, made now. LoSA calls it when it builds a layer's state, which is usually
    before any capture, so that PyTorch's stream pool is set up outside captures."""
    stream = _branches.get(device)
    if stream is None:
        stream = _branches[device] = torch.cuda.Stream(device)
    return stream


def validate_mode(value) -> None:
    """The methods' ``cuda_graphs`` setting: True, False or None (automatic)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"cuda_graphs must be True, False or None (automatic: on for CUDA inputs), got {value!r}")


def graph_key(q, pinned) -> tuple:
    """What a replay needs unchanged: q's layout, then the pinned tensors' addresses and layouts."""
    return (q.stride(), q.dtype) + tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in pinned)


def replay(held: StepGraph, q) -> tuple:
    """Replay ``held`` for ``q`` (the caller checked ``held.key``): its outputs, overwritten by the next replay."""
    held.static_q.copy_(q)
    held.graph.replay()
    return tuple(held.outputs)


def _warm_up(fn, static_q, pinned):
    """This call's own (eager) result, computed on a side stream as PyTorch asks before a capture
    (lazy initialisation, Triton compilation and the shape caches all happen here, not in the capture)."""
    device = static_q.device
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        result = fn(static_q, *pinned)
    current.wait_stream(stream)
    for t in result:
        if isinstance(t, torch.Tensor):
            t.record_stream(current)  # allocated on the side stream, used on the caller's
    return result


@contextlib.contextmanager
def _watch_host_syncs(q):
    """Records in ``found`` whether the block synchronised the host with q's device (``.item()``, ``bool(t)``,
    ``nonzero``, ...): such a step cannot be captured, and a capture that fails leaves PyTorch's CUDA random
    generators marked as capturing. Uses PyTorch's sync debug mode in "warn"; nothing on CPU."""
    found = []
    if not q.is_cuda:
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "called a synchronizing CUDA operation" in str(w.message):
            found.append(w)
        elif "debug mode is a prototype" not in str(w.message):  # PyTorch's notice on setting the mode
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _reset_after_failed_capture(device) -> None:
    """A failed ``capture_end`` skips the CUDA generators' capture epilogue, and every later random op on the
    device raises "Offset increment outside graph capture". An empty capture runs the epilogue."""
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the CUDA graph is empty"
        with torch.cuda.stream(_streams[device]):
            graph.capture_begin(capture_error_mode="thread_local")
            graph.capture_end()


def _capture(fn, static_q, pinned, share=None):
    """Record ``fn(static_q, *pinned)`` into a CUDA graph: ``(graph, outputs, pool bytes)``. Capture
    runs no kernel, so the step's in-place state updates happen once (in the warm-up call).
    ``capture_begin`` directly rather than ``torch.cuda.graph``: that one synchronises and empties
    the allocator cache at every capture (one per layer and block here). ``share``: a callable giving
    graphs held now, whose memory pool this one joins (see ``run_step``)."""
    device = static_q.device
    pool = None
    if share is not None:  # a live graph's pool: its use count is above 0 while we hold the graph
        pool = next((g.graph.pool() for g in share() if g.static_q.device == device), None)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.memory_reserved(device)
    with torch.cuda.stream(_streams[device]):
        graph.capture_begin(**({} if pool is None else {"pool": pool}), capture_error_mode="thread_local")
        try:
            outputs = fn(static_q, *pinned)
        finally:
            graph.capture_end()
    return graph, outputs, torch.cuda.memory_reserved(device) - before


def run_step(fn, entry, q, pinned, cache: LayerCache, mode, *, key=None, share=None):
    """``fn(q, *pinned) -> tuple`` for one cached step, eagerly or as a CUDA graph; returns
    ``(outputs, replayed)``. With ``replayed`` the tensors are the graph's static outputs: copy what
    outlives the next call. ``entry.graph`` holds the graph (None: not captured yet, False: eager).

    ``fn`` must be capturable: fixed shapes for a given entry, state updated in place, no host reads
    of device values. q is copied into a static buffer; the ``pinned`` tensors (k and v: the prefix is
    too large to copy) are read in place, so a replay needs them at the captured address and layout,
    which a preallocated KV cache gives. ``key``: the call's ``graph_key`` when the caller has it already.

    ``mode``: False runs eager. True captures at the entry's first call and warns once when a later call's
    pinned tensors have moved (that call runs eager). None (automatic, the methods' default) captures only
    when two calls in a row saw the same pinned tensors, and drops a graph whose tensors moved, silently:
    hosts that rebuild k/v every call pay no capture. Inside another CUDA graph's capture every mode runs
    the step directly, so it is recorded into that graph.

    ``share`` (a callable giving the graphs held now, e.g. ``cache.graphs``): capture into the memory pool
    of one of them, so a method's graphs hold about one graph's work memory rather than one per layer.
    Only for callers that copy a replay's outputs before any other replay and keep their state outside
    the graphs: one graph's intermediates may then overwrite another's outputs."""
    if mode is False or not graphs_usable(q) or entry.graph is False or capturing(q):
        return fn(q, *pinned), False
    key = graph_key(q, pinned) if key is None else key
    held = entry.graph
    if held is not None:
        if held.key == key:
            return replay(held, q), True
        if mode is None:  # the buffer moved: this graph is stale; capture again once a buffer stays put
            entry.graph = None
            cache.sightings[id(entry)] = key
        else:
            cache.warn_once("cuda_graphs: k/v are not at the captured step's address (or q's layout changed); "
                            "graphs need [prefix | block] in one persistent buffer. Running eager.")
        return fn(q, *pinned), False
    if mode is None and cache.sightings.get(id(entry)) != key:
        cache.sightings[id(entry)] = key
        return fn(q, *pinned), False
    static_q = torch.empty_like(q).copy_(q)  # keeps q's strides: the same kernels see the same layout
    with _watch_host_syncs(q) as syncs:
        result = _warm_up(fn, static_q, pinned)
    if syncs:  # a first call's one-time work (compilation, autotuning) may synchronise: try once more
        strikes = cache.sync_strikes[id(entry)] = cache.sync_strikes.get(id(entry), 0) + 1
        if strikes >= 2:  # every call does, e.g. a PyTorch fallback for float32 inputs: this entry stays eager
            if mode:
                cache.warn_once(f"cuda_graphs: the step synchronises with the host ({syncs[0].message}); "
                                "running eager")
            entry.graph = False
        return result, False
    try:
        graph, outputs, pool = (_capture(fn, static_q, pinned) if share is None
                                else _capture(fn, static_q, pinned, share=share))
    except Exception as err:  # an op that cannot be captured: this entry stays eager
        _reset_after_failed_capture(q.device)
        cache.warn_once(f"cuda_graphs: capture failed, running eager ({type(err).__name__}: {err})")
        entry.graph = False
        return result, False
    entry.graph = StepGraph(graph, static_q, key, outputs, max(pool, 0) + static_q.nbytes)
    cache.captures += 1
    return result, False
