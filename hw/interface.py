"""The external contract of :class:`superfloat.hw.accelerator.SFxAccelerator`.

This module is shared by the RTL (``hw/``), the cocotb benches and the co-simulation
harness (``sim/``), and the FPGA host link: the payload layouts of every stream, the
order in which an operation's beats travel, and helpers that pack numpy arrays into
the integers that a simulator drives. Neither side re-derives any of it.

An operation (SPEC section 5, LINEAR) with ``T`` activation rows, ``N`` output
channels and reduction length ``K`` on an array of ``rows x cols`` PEs:

* ``cmd``: one beat ``{k, t, n, relu, rounding, use_mult}`` starts it (``use_xmult`` too
  when the accelerator is generated with ``xmult``, SPEC revision 2).
* It is cut into tiles of ``rows`` activation rows by ``cols`` output channels, in
  row-major tile order: ``for tt in range(ceil(T/rows)): for tn in range(ceil(N/cols))``.
* For every tile, in that order:
  * ``par``: ``cols`` beats, beat ``j`` holding channel ``tn*cols + j``'s ``{bias, shift,
    mult}`` (one lane a beat, so that neither the accelerator nor a link bridge needs a
    ``cols``-lane register or multiplexer; lanes past ``N`` carry bias 0 and any legal
    shift and mult);
  * ``act``: ``K`` beats, beat ``k`` holding ``X[tt*rows + i, k]`` in lane ``i`` and the
    row exponents ``xexp[tt*rows + i]`` (and, with ``xmult``, the row multipliers
    ``xmult[tt*rows + i]``; read on the tile's first beat; rows past ``T`` carry code 0
    and exponent 0);
  * ``wgt``: ``K`` beats, beat ``k`` holding ``W[tn*cols + j, k]`` in lane ``j`` (lanes
    past ``N`` carry code 0).
  * ``res``: ``min(rows, T - tt*rows)`` beats, beat ``i`` holding ``Y[tt*rows + i,
    tn*cols + j]`` in lane ``j``; lanes past ``N`` are code 0.

Every stream is an Amaranth ``lib.stream`` interface; in Verilog each becomes
``<name>__valid``, ``<name>__ready`` and ``<name>__payload`` (the payload packed with
the first field / lane in the least significant bits, as Amaranth's layouts do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from amaranth.lib import data

from superfloat.sw import sfx

__all__ = [
    "ROUNDING_CODES",
    "AccelParams",
    "cmd_layout",
    "act_layout",
    "wgt_layout",
    "par_layout",
    "res_layout",
    "pack_lanes",
    "unpack_lanes",
    "tile_schedule",
]

#: Encoding of the ``rounding`` command field.
ROUNDING_CODES = {"nearest_even": 0, "toward_zero": 1}

#: Width of the ``t`` and ``n`` command fields (so T, N <= 65535).
TN_BITS = 16


@dataclass(frozen=True)
class AccelParams:
    """Generation parameters of the accelerator, validated."""

    rows: int
    cols: int
    a_bits: int
    w_bits: int
    out_bits: int
    k_max: int = sfx.DEFAULT_K_MAX
    #: the per-row activation multiplier of SPEC revision 2 (section 4 step 0b): a
    #: ``use_xmult`` command bit and a 16-bit ``xmult`` per row in ``act``; without it the
    #: host refuses operations that carry ``xmult``
    xmult: bool = False

    def __post_init__(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if not 1 <= v <= 64:
                raise ValueError(f"{name} must be in 1..64, got {v}")
        sfx.check_bits(self.a_bits, "a_bits")
        sfx.check_bits(self.w_bits, "w_bits")
        sfx.check_bits(self.out_bits, "out_bits")
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int):
            raise TypeError(f"k_max must be an int, got {type(self.k_max).__name__} {self.k_max!r}")
        if not 1 <= self.k_max <= sfx.K_MAX_LIMIT:
            raise ValueError(f"k_max must be in 1..{sfx.K_MAX_LIMIT}, got {self.k_max}")
        if not isinstance(self.xmult, bool):
            raise TypeError(f"xmult must be a bool (generate the per-row activation multiplier), "
                            f"got {type(self.xmult).__name__} {self.xmult!r}")

    @property
    def frac_bits(self) -> int:
        """``F = Ma + Mw``: fraction bits of a product."""
        return self.a_bits - 1 + self.w_bits - 1

    @property
    def acc_bits(self) -> int:
        """Accumulator width ``A`` of SPEC section 3."""
        return sfx.accumulator_bits(self.a_bits, self.w_bits, self.k_max)

    @property
    def k_bits(self) -> int:
        """Width of the ``k`` command field (holds 0..k_max and a bit more to flag K > k_max)."""
        return max(1, (self.k_max).bit_length() + 1)


def cmd_layout(p: AccelParams) -> data.StructLayout:
    fields = {
        "k": p.k_bits,
        "t": TN_BITS,
        "n": TN_BITS,
        "relu": 1,
        "rounding": 1,
        "use_mult": 1,
    }
    if p.xmult:
        fields["use_xmult"] = 1
    return data.StructLayout(fields)


def act_layout(p: AccelParams) -> data.StructLayout:
    fields = {
        "codes": data.ArrayLayout(p.a_bits, p.rows),
        "exp": data.ArrayLayout(8, p.rows),  # two's complement int8, read on a tile's first beat
    }
    if p.xmult:
        fields["xmult"] = data.ArrayLayout(16, p.rows)  # unsigned, read with exp; used with use_xmult
    return data.StructLayout(fields)


def wgt_layout(p: AccelParams) -> data.ArrayLayout:
    return data.ArrayLayout(p.w_bits, p.cols)


def par_layout(p: AccelParams) -> data.StructLayout:
    """One ``par`` beat: one output channel's parameters (``cols`` beats per tile)."""
    return data.StructLayout({
        "bias": p.acc_bits,  # two's complement, accumulator units
        "shift": 8,  # two's complement int8
        "mult": 16,  # unsigned; used only when the command's use_mult is set
    })


def res_layout(p: AccelParams) -> data.ArrayLayout:
    return data.ArrayLayout(p.out_bits, p.cols)


def pack_lanes(values: np.ndarray, width: int) -> list[int]:
    """Pack ``[B, lanes]`` integers (two's complement for negatives) into ``B`` ints,
    lane 0 in the least significant bits."""
    v = np.asarray(values, dtype=np.int64)
    if v.ndim != 2:
        raise ValueError(f"values must be [beats, lanes], got shape {list(v.shape)}")
    mask = (1 << width) - 1
    out = []
    for row in v.tolist():
        word = 0
        for i, x in enumerate(row):
            word |= (x & mask) << (i * width)
        out.append(word)
    return out


def unpack_lanes(words: Sequence[int], width: int, lanes: int, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_lanes`: ``B`` ints to ``[B, lanes]`` int64."""
    mask = (1 << width) - 1
    out = np.empty((len(words), lanes), dtype=np.int64)
    for b, w in enumerate(words):
        w = int(w)
        for i in range(lanes):
            x = (w >> (i * width)) & mask
            if signed and x >> (width - 1):
                x -= 1 << width
            out[b, i] = x
    return out


def tile_schedule(t: int, n: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """Tiles of an operation in stream order: ``(t0, rows_valid, n0, cols_valid)``."""
    tiles = []
    for tt in range(math.ceil(t / rows)):
        for tn in range(math.ceil(n / cols)):
            t0, n0 = tt * rows, tn * cols
            tiles.append((t0, min(rows, t - t0), n0, min(cols, n - n0)))
    return tiles
