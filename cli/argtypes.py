"""argparse ``type=`` helpers that range-check numeric flags with one clear message.

argparse turns the ``ArgumentTypeError`` into ``sfx CMD: error: argument --FLAG: MESSAGE``
(exit status 2), so the messages here say what the value must be and what was given::

    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--top-p", type=probability(open_low=True))      # (0, 1]
    p.add_argument("--weight-bits", type=sfx_bits)                   # 2..16
    p.add_argument("--exponent", type=int_range(-128, 127))

Floats must be finite (``nan`` and ``inf`` are refused everywhere).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "probability", "int_range",
           "float_range", "sfx_bits"]


def _int(s: str) -> int:
    try:
        return int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return v


def _checked(convert: Callable[[str], float], bad: Callable[[float], bool], message: str,
             name: str) -> Callable[[str], float]:
    """``type=``: ``convert(s)``, refused with ``"MESSAGE, got S"`` where ``bad(value)``."""
    def parse(s: str):
        v = convert(s)
        if bad(v):
            raise argparse.ArgumentTypeError(f"{message}, got {s}")
        return v

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def int_range(lo: int | None = None, hi: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """``type=`` for an integer in ``lo..hi`` (either bound may be ``None``: unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"int_range: lo {lo} > hi {hi}")
    want = f"in {lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
    return _checked(_int, lambda v: (lo is not None and v < lo) or (hi is not None and v > hi),
                    f"must be {what} {want}", f"int_range({lo}, {hi})")


def float_range(lo: float | None = None, hi: float | None = None, *, open_low: bool = False,
                open_high: bool = False) -> Callable[[str], float]:
    """``type=`` for a finite float in ``[lo, hi]`` (``open_low``/``open_high``: exclude the bound)."""
    if lo is not None and hi is not None:
        want = f"in {'(' if open_low else '['}{lo:g}, {hi:g}{')' if open_high else ']'}"
    elif lo is not None:
        want = f"{'>' if open_low else '>='} {lo:g}"
    else:
        want = "" if hi is None else f"{'<' if open_high else '<='} {hi:g}"
    return _checked(_float, lambda v: ((lo is not None and (v <= lo if open_low else v < lo))
                                       or (hi is not None and (v >= hi if open_high else v > hi))),
                    f"must be a number {want}", f"float_range({lo}, {hi})")


def probability(*, open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """``type=`` for a probability in ``[0, 1]`` (e.g. ``--top-p``: ``probability(open_low=True)``, (0, 1])."""
    return float_range(0.0, 1.0, open_low=open_low, open_high=open_high)


positive_int = int_range(1, None)
positive_int.__name__ = "positive_int"
nonneg_int = int_range(0, None)
nonneg_int.__name__ = "nonneg_int"
positive_float = float_range(0.0, None, open_low=True)
positive_float.__name__ = "positive_float"
nonneg_float = float_range(0.0, None)
nonneg_float.__name__ = "nonneg_float"
sfx_bits = int_range(2, 16, what="an SFx width")
sfx_bits.__name__ = "sfx_bits"
