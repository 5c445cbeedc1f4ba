"""Parameter checks shared by the hardware generators (clear ``TypeError`` / ``ValueError``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from superfloat.sw import sfx

IMPLS = ("lut", "dsp")


def check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``lo..hi`` (inclusive); bools and floats are rejected."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_bits(value: Any, name: str) -> int:
    """An SFx width (2..16), with the messages of :func:`superfloat.sw.sfx.check_bits`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in {sfx.MIN_BITS}..{sfx.MAX_BITS}, "
                        f"got {type(value).__name__} {value!r}")
    return sfx.check_bits(value, name)


def check_impl(value: Any, name: str = "impl") -> str:
    """A multiplier implementation: ``"lut"`` or ``"dsp"``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {IMPLS!r}, got {type(value).__name__} {value!r}")
    if value not in IMPLS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, IMPLS))}, got {value!r}")
    return value


@contextmanager
def checking(component):
    """Wrap a constructor's parameter checks: a component that is rejected is marked as
    used, so that Amaranth does not also warn "created but never used"."""
    try:
        yield
    except (TypeError, ValueError):
        component._MustUse__used = True
        raise
