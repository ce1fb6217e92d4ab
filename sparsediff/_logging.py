"""One warning per distinct cause: the library's shared "warn once" (a per-call warning would flood the log)."""

from __future__ import annotations

import logging

_warned: set = set()


def warn_once(logger: logging.Logger, message: str, key=None) -> None:
    """Log ``message`` at WARNING on ``logger`` the first time ``key`` (default: the message) is seen."""
    key = (logger.name, message if key is None else key)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)
