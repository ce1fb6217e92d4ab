"""What both demo tabs share: input errors shown to the user, cooperative cancellation per browser
session, progress reporting, and the folder generated files go to."""

from __future__ import annotations

import os
import tempfile
import threading

import torch


class DemoInputError(ValueError):
    """A parameter the user can fix; the app shows the message instead of a traceback."""


class Cancelled(RuntimeError):
    """The user pressed Stop; raised from inside the model's forward so generation ends within a step."""


class CancelRegistry:
    """One cancel flag per browser session: Stop sets it, the running job checks it between steps.

    Gradio's ``cancels=`` stops queued and generator events, but a synchronous job already inside a
    diffusers pipeline keeps running in its thread; checking a flag in a forward pre-hook ends it.
    """

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None) -> threading.Event:
        with self._lock:
            flag = self._flags[session or ""] = threading.Event()
        return flag

    def stop(self, session: str | None) -> bool:
        """Flag the session's job; True when one was running."""
        with self._lock:
            flag = self._flags.get(session or "")
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, session: str | None, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session or "") is flag:
                del self._flags[session or ""]


CANCEL = CancelRegistry()


def check_cancel(flag: threading.Event | None) -> None:
    if flag is not None and flag.is_set():
        raise Cancelled("stopped by the user")


class cancel_hooks:
    """``with cancel_hooks(modules, flag):`` raise :class:`Cancelled` at the next forward once ``flag`` is set."""

    def __init__(self, modules, flag):
        self.modules, self.flag, self.handles = list(modules), flag, []

    def __enter__(self):
        if self.flag is not None:
            hook = lambda module, args: check_cancel(self.flag)
            self.handles = [m.register_forward_pre_hook(hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False


def no_progress(fraction=None, desc=None, **kwargs):
    """Stand-in for ``gr.Progress`` outside the app."""


def output_dir() -> str:
    """Where videos and heatmaps go (``SPARSEDIFF_DEMO_DIR`` or a temporary folder Gradio may serve)."""
    path = os.environ.get("SPARSEDIFF_DEMO_DIR") or os.path.join(tempfile.gettempdir(), "sparsediff_demo")
    os.makedirs(path, exist_ok=True)
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_sparsity(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"sparsity must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise DemoInputError(f"sparsity must lie in [0, 1) (share of key blocks skipped), got {value}")
    return value


def check_prompt(text) -> str:
    if text is None or not str(text).strip():
        raise DemoInputError("the prompt is empty: type a prompt first")
    return str(text)


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be an integer, got {value!r}") from None
    if number != float(value) or number < minimum:
        raise DemoInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def seconds(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def resolve_method(label: str, methods: dict) -> str:
    """A method name from a UI label ("BA-Att") or a name ("ba_att") among ``methods`` (label -> name)."""
    name = methods.get(label, label)
    if name not in methods.values():
        raise DemoInputError(f"unknown method {label!r}; choose one of {', '.join(methods)}")
    return name
