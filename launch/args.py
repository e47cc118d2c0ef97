"""argparse `type=` helpers shared by every command: counts, lengths, sizes and rates.

A bad value is refused by argparse itself, before anything is loaded, with its usual two
lines (the usage, then `error: argument --seq-len: must be >= 1, got -5`) and exit status 2:

    p.add_argument("--seq-len", type=positive_int, default=8192)

No imports beyond the standard library: `hyena-glt --help` stays instant.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonnegative_int", "layer_index", "positive_float", "nonnegative_float", "fraction",
           "probability"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count, length or size: a whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (where 0 has a documented meaning: 'all', 'off', 'none')."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def layer_index(text: str) -> int:
    """A block of the model: 0-based, or negative counting from the end (-1: the last). Any whole
    number: the command checks it against the model's number of blocks once the model is loaded."""
    return _int(text)


def positive_float(text: str) -> float:
    """A finite number > 0 (a size in MB, a learning rate)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a temperature, a weight decay)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share or weight in [0, 1]."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1] (nucleus sampling's top-p)."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
