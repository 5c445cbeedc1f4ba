"""Host-side packing of LINEAR operations into stream beats, shared by every path that drives the RTL.

One place for the ``cmd`` word and the per-cycle beat lists (the layouts and the beat order
come from :mod:`superfloat.hw.interface`; nothing is re-derived here):

* :func:`cmd_word`: the ``cmd`` beat (also malformed ones, for the error tests);
* :func:`linear_traffic`: every beat of one operation as Python ints, in stream order (the
  per-cycle benches, the FPGA host driver, the IP testbench vectors);
* :func:`res_to_codes`: ``res`` beats back to ``[T, N]`` codes.

The in-simulation harness (:mod:`superfloat.sim.harness`) packs the same beats with numpy
(each activation / weight block stored once) and uses :func:`cmd_word` from here;
``tests/test_sim_harness.py`` checks both packings against each other. This module imports
numpy, :mod:`superfloat.hw.interface` and :mod:`superfloat.sw.sfx` only (no other module of
``superfloat.sim``), so every ``sim`` module can import it without closing an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from superfloat.hw.interface import (ROUNDING_CODES, TN_BITS, AccelParams, act_layout, cmd_layout, pack_lanes,
                                     par_layout, tile_schedule, unpack_lanes)
from superfloat.sw import sfx

__all__ = ["cmd_word", "check_xmult_support", "xmult_lanes", "LinearTraffic", "linear_traffic", "res_to_codes"]



def _fields(layout) -> dict[str, tuple[int, int]]:
    return {name: (f.offset, f.width) for name, f in layout}


def check_xmult_support(p: AccelParams, use_xmult: bool) -> None:
    """``ValueError`` when an operation carries ``xmult`` (SPEC revision 2) and ``p`` was
    generated without it (SPEC section 4: such hardware rejects the operation)."""
    if use_xmult and not p.xmult:
        raise ValueError("this operation carries xmult (per-row activation multipliers, SPEC revision 2) but the "
                         "accelerator was generated without it: generate it with xmult=True (sfx verilog --xmult)")


def cmd_word(p: AccelParams, *, k: int, t: int, n: int, relu: bool = False, rounding: str = "nearest_even",
             use_mult: bool = False, use_xmult: bool = False) -> int:
    """The ``cmd`` beat. ``k`` may be 0 or exceed ``k_max`` (a malformed command, for tests)
    as long as it fits the field. ``use_xmult`` needs an accelerator generated with ``xmult``."""
    check_xmult_support(p, use_xmult)
    f = _fields(cmd_layout(p))
    vals = {"k": k, "t": t, "n": n, "relu": int(bool(relu)), "rounding": ROUNDING_CODES[rounding],
            "use_mult": int(bool(use_mult))}
    if p.xmult:
        vals["use_xmult"] = int(bool(use_xmult))
    word = 0
    for name, v in vals.items():
        off, width = f[name]
        if not 0 <= int(v) < (1 << width):
            raise ValueError(f"cmd.{name} = {v} does not fit its {width}-bit field")
        word |= int(v) << off
    return word


#: what the ``xmult`` field of ``act`` carries when the operation does not use it, and in rows
#: past ``T``: a pattern (not 1), so that a datapath that wrongly applies it is caught
XMULT_UNUSED = 0xA5A5


def xmult_lanes(args: sfx.LinearArgs, rows_total: int) -> np.ndarray:
    """The ``xmult`` field of every activation row (``rows_total >= T``, padding rows included)."""
    xm = np.full(rows_total, XMULT_UNUSED, dtype=np.int64)
    if args.xmult is not None:
        xm[:args.T] = np.asarray(args.xmult, dtype=np.int64)
    return xm


@dataclass
class LinearTraffic:
    """The beats of one LINEAR operation, per stream, in stream order (``par``: ``cols`` beats
    per tile)."""

    cmd: int
    par: list[int]
    act: list[int]
    wgt: list[int]
    res_beats: int
    T: int
    N: int
    K: int
    tiles: int


def linear_traffic(args: sfx.LinearArgs, p: AccelParams) -> LinearTraffic:
    """Pack validated LINEAR arguments into stream beats (``hw/interface.py`` order).

    Rows past ``T`` carry code 0 and exponent 0; lanes past ``N`` carry code 0, bias 0 and
    the shift / mult of the last valid channel (legal values, so that ``r`` stays in
    range); the ``mult`` field holds ``0xA5A5`` when the command does not use it, and so
    does ``xmult`` (accelerators generated with it), so that a datapath that wrongly
    applies it is caught. An operation with ``xmult`` on an accelerator without it raises
    ``ValueError``.
    """
    t_total, n_total, k = args.T, args.N, args.K
    rows, cols = p.rows, p.cols
    if t_total > (1 << TN_BITS) - 1 or n_total > (1 << TN_BITS) - 1:
        raise ValueError(f"T={t_total} and N={n_total} must be < {1 << TN_BITS} (16-bit command fields)")
    use_mult = args.mult is not None
    cmd = cmd_word(p, k=k, t=t_total, n=n_total, relu=args.relu, rounding=args.rounding, use_mult=use_mult,
                   use_xmult=args.xmult is not None)

    act_f = _fields(act_layout(p))
    exp_off = act_f["exp"][0]
    xm_all = xmult_lanes(args, -(-t_total // rows) * rows)
    lane_f = _fields(par_layout(p))
    amask = (1 << p.acc_bits) - 1

    act_by_tt = {}
    for tt in range(-(-t_total // rows)):
        t0 = tt * rows
        tv = min(rows, t_total - t0)
        xp = np.zeros((rows, k), dtype=np.int64)
        xp[:tv] = args.x[t0:t0 + tv]
        e = np.zeros((1, rows), dtype=np.int64)
        e[0, :tv] = args.x_exponent[t0:t0 + tv]
        ew = pack_lanes(e, 8)[0] << exp_off
        if p.xmult:
            ew |= pack_lanes(xm_all[None, t0:t0 + rows], 16)[0] << act_f["xmult"][0]
        act_by_tt[tt] = [c | ew for c in pack_lanes(xp.T, p.a_bits)]

    wgt_by_tn, par_by_tn = {}, {}
    for tn in range(-(-n_total // cols)):
        n0 = tn * cols
        nv = min(cols, n_total - n0)
        wp = np.zeros((cols, k), dtype=np.int64)
        wp[:nv] = args.w[n0:n0 + nv]
        wgt_by_tn[tn] = pack_lanes(wp.T, p.w_bits)
        lanes = []
        for j in range(cols):
            ch = n0 + min(j, nv - 1)
            bias = int(args.bias[n0 + j]) if j < nv else 0
            mult = int(args.mult[ch]) if use_mult else 0xA5A5
            lanes.append(((bias & amask) << lane_f["bias"][0]) | ((int(args.shift[ch]) & 0xFF) << lane_f["shift"][0])
                         | ((mult & 0xFFFF) << lane_f["mult"][0]))
        par_by_tn[tn] = lanes

    par, act, wgt = [], [], []
    res_beats = 0
    for t0, tv, n0, nv in tile_schedule(t_total, n_total, rows, cols):
        par += par_by_tn[n0 // cols]
        act += act_by_tt[t0 // rows]
        wgt += wgt_by_tn[n0 // cols]
        res_beats += tv
    return LinearTraffic(cmd, par, act, wgt, res_beats, t_total, n_total, k, len(par) // cols)


def res_to_codes(words: list[int], t_total: int, n_total: int, p: AccelParams) -> tuple[np.ndarray, int]:
    """``res`` beats to ``[T, N]`` codes (dtype of ``sfx.code_dtype(out_bits)``), and the
    number of nonzero padding lanes (channels past ``N``; they must be code 0)."""
    out = np.zeros((t_total, n_total), dtype=sfx.code_dtype(p.out_bits))
    idx = 0
    padding = 0
    for t0, tv, n0, nv in tile_schedule(t_total, n_total, p.rows, p.cols):
        blk = unpack_lanes(words[idx:idx + tv], p.out_bits, p.cols)
        out[t0:t0 + tv, n0:n0 + nv] = blk[:, :nv]
        padding += int(np.count_nonzero(blk[:, nv:]))
        idx += tv
    if idx != len(words):
        raise ValueError(f"{len(words)} res beats for an operation that has {idx}")
    return out, padding
