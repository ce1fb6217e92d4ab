"""``sparsediff demo``: launch the Gradio demo (dense vs sparse side by side, video and long text).

    sparsediff demo [--host 127.0.0.1] [--port 7860] [--share]

The app lives in the repository's ``demos/`` package (next to ``sparsediff/``), not in the installed
library, so that the library does not depend on UI code. This command finds it from the editable
install (or ``SPARSEDIFF_DEMOS``, a path to a checkout) and imports it as ``demos``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .args import port_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=7860, help="1..65535")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link")


def checkout_root() -> Path | None:
    """The repository root holding ``demos/app.py``, or None."""
    candidates = [os.environ.get("SPARSEDIFF_DEMOS"), Path(__file__).resolve().parents[2]]
    for path in candidates:
        if path and (Path(path) / "demos" / "app.py").is_file():
            return Path(path).resolve()
    return None


def load_app():
    """Import ``demos.app`` (putting the checkout root on ``sys.path`` when needed)."""
    root = checkout_root()
    if root is None:
        raise ModuleNotFoundError("the demo ships with the source repository (demos/app.py), not the wheel: "
                                  "clone it and `pip install -e .`, or set SPARSEDIFF_DEMOS to a checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("demos.app")


def run(args) -> int:
    try:
        app = load_app()
    except ModuleNotFoundError as err:
        print(f"sparsediff demo: {err}", file=sys.stderr)
        return 2
    app.launch(args.host, args.port, args.share)
    return 0
