"""argparse types shared by the sub-commands: bad values stop at parse time with one line saying what is allowed."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {value}")
    return value


def densities(text: str) -> list[float]:
    """Comma-separated densities (shares of key blocks kept), each in (0, 1]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one density in (0, 1]")
    for x in values:
        if not 0.0 < x <= 1.0:
            raise argparse.ArgumentTypeError(f"densities must lie in (0, 1] (share of key blocks kept), got {x:g}")
    return values


def precisions(text: str) -> list[str]:
    """Comma-separated kernel precisions, each one of the block-sparse kernel's (bf16, int8, int8_fp8)."""
    from ..kernels.block_sparse import PRECISIONS

    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in PRECISIONS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"precisions must be among {', '.join(PRECISIONS)}, got {text!r}")
    return values
