"""Counting the device operations a call issues: the tests' bound on FlashBlock's and LoSA's steady-state path."""

from __future__ import annotations


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

        from ..kernels import block_sparse, merge
        from ..kernels.merge import prefix as prefix_merge
        from ..methods.losa import step_kernels as losa_step

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in OpCounter._FREE:
                    counter._count(name)
                return func(*args, **(kwargs or {}))

        for module, attr, label in ((block_sparse, "block_sparse_attention_torch", "<attention kernel>"),
                                    (merge, "_merge_torch", "<merge kernel>"),
                                    (prefix_merge, "_merge_prefix_torch", "<merge kernel>"),
                                    (losa_step, "_mean_key_score_torch", "<score kernel>"),
                                    (losa_step, "_token_change_torch", "<change kernel>")):
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
