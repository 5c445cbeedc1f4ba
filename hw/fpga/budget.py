"""DSP budgeting: how many PEs of an SFx MAC array get a DSP multiplier.

Yosys maps every ``*`` it sees to DSP blocks, even when the device has too few, and
placement then fails. The accelerator therefore takes ``dsp_pes``: the first ``dsp_pes``
PEs (row-major) use a ``*`` multiplier (:class:`superfloat.hw.pe.SFxMagnitudeMultiplier`
with ``impl="dsp"``), all others an explicit shift-and-add tree that Yosys never turns
into a DSP. This module picks ``dsp_pes`` for a target so that the design never asks for
more DSP blocks than the device has, nor more than a budget the user gives.

DSP blocks per multiplier (an unsigned ``a_width x b_width`` product of magnitudes,
``a_width = a_bits - 1``, ``b_width = w_bits - 1``), following Yosys' ``mul2dsp`` rules:

* iCE40 UltraPlus ``SB_MAC16``: 16 x 16. ``synth_ice40 -dsp`` maps a product only when
  its result has at least 11 bits (``DSP_Y_MINWIDTH=11``); narrower products stay in
  logic, so a DSP PE costs 0 DSPs there (and ``dsp_pes`` is set to 0: it would buy
  nothing). Wider operands are split into ``ceil(a/16) * ceil(b/16)`` blocks.
* ECP5 ``MULT18X18D``: 18 x 18, mapped from 2 x 2 up; ``ceil(a/18) * ceil(b/18)``.

For every SFx width (2..16 bits, magnitudes up to 15 bits) a DSP PE costs one block or
none.

Policy: a PE gets a DSP only when its magnitude product has at least
:data:`PE_DSP_MIN_PRODUCT_BITS` bits: 11 on the iCE40 (Yosys' own threshold), 15 on the
ECP5 (SF16 products only). A DSP block sits in a fixed column away from the PE's logic,
and the broadcast activation register of a row feeds all of its PEs (Yosys merges the
operand registers of DSP PEs of one row into one): on the ECP5 at the 125 MHz the SF8
array is built for, the route to the far DSP blocks set the clock (4x4 SF8: 97.6 MHz
with DSP PEs, 115.7 MHz with logic PEs, where the block-RAM FIFO output was then the
critical path), and the ECP5-25k has the logic for 64 SF8 logic multipliers. Two's
complement baselines (signed ``x``-bit operands) use the same rules with the full width.

The accelerator has one more multiplier: the clamp unit's ``A x 16`` product
(accumulator times the per-channel ``mult``), ``A = sfx.accumulator_bits(...)``, 2 or 3
blocks. On the iCE40 it replaces a far larger logic multiplier than any PE's, so the plan
gives it DSPs first (``clamp="auto"``) when the budget allows, and the PEs share the rest;
on the ECP5 it stays in logic by default (:data:`CLAMP_DSP_FAMILIES`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from superfloat.sw import sfx

__all__ = ["DSP_FAMILIES", "PE_DSP_MIN_PRODUCT_BITS", "DspPlan", "device_dsps", "dsps_per_multiplier", "plan_dsp_pes",
           "ARCH_DEFAULTS", "ArchPlan", "plan_architecture", "CLAMP_DSP_FAMILIES"]


@dataclass(frozen=True)
class DspFamily:
    """DSP facts of one FPGA family (as Yosys maps multipliers to it)."""

    cell: str
    a_max: int
    b_max: int
    a_min: int
    b_min: int
    y_min: int


#: Per family: the DSP cell and Yosys' mapping limits (``mul2dsp`` parameters).
DSP_FAMILIES = {
    "ice40": DspFamily(cell="SB_MAC16", a_max=16, b_max=16, a_min=2, b_min=2, y_min=11),
    "ecp5": DspFamily(cell="MULT18X18D", a_max=18, b_max=18, a_min=2, b_min=2, y_min=0),
}

#: Smallest magnitude product (bits) worth a DSP block in a PE (see the module doc).
PE_DSP_MIN_PRODUCT_BITS = {"ice40": 11, "ecp5": 15}

#: Families whose clamp multiplier goes to DSP blocks by default (``clamp="auto"``). On the
#: ECP5, Yosys leaves the MULT18X18D registers unused, and the block's combinational delay
#: plus the routes to its fixed column set the clock of a 125 MHz design (8x8 SF8: the clamp
#: multiplier was the critical path at 112 MHz); a pipelined logic multiplier is faster, and
#: the ECP5-25k has the logic for it.
CLAMP_DSP_FAMILIES = ("ice40",)

#: DSP blocks of each synthesis target (iCE40 UP5K: 8 SB_MAC16; ECP5 LFE5U-25F: 28 MULT18X18D).
_TARGET_DSPS = {"ice40-up5k": ("ice40", 8), "ecp5-25k": ("ecp5", 28)}


def _family_of(target: str) -> tuple[str, int]:
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__} {target!r}")
    try:
        return _TARGET_DSPS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}: choose one of {', '.join(sorted(_TARGET_DSPS))}") from None


def device_dsps(target: str) -> int:
    """Number of DSP blocks of ``target``."""
    return _family_of(target)[1]


def dsps_per_multiplier(target: str, a_width: int, b_width: int) -> int:
    """DSP blocks that Yosys uses for one ``a_width x b_width`` multiplier on ``target``
    (0 when it keeps the product in logic)."""
    fam = DSP_FAMILIES[_family_of(target)[0]]
    for name, v in (("a_width", a_width), ("b_width", b_width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if a_width < fam.a_min or b_width < fam.b_min or a_width + b_width < fam.y_min:
        return 0
    return math.ceil(a_width / fam.a_max) * math.ceil(b_width / fam.b_max)


@dataclass(frozen=True)
class DspPlan:
    """The DSP choice for one accelerator (recorded in every synthesis report)."""

    target: str
    cell: str
    device_dsps: int   # DSP blocks on the device
    budget: int        # DSP blocks the generator may use (min of device and user budget)
    per_pe: int        # DSP blocks per DSP multiplier at this width (0: stays in logic)
    pes: int           # PEs in the array
    dsp_pes: int       # PEs that get a DSP multiplier
    dsps_used: int     # dsp_pes * per_pe + clamp_dsps
    clamp_impl: str    # "dsp" or "lut": the clamp unit's A x 16 multiplier
    clamp_dsps: int    # DSP blocks of the clamp multiplier (0 with "lut")
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_dsp_pes(target: str, *, rows: int, cols: int, a_bits: int, w_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, budget: int | None = None, clamp: str = "auto") -> DspPlan:
    """Choose ``dsp_pes`` (and the clamp multiplier) for a ``rows x cols`` SFx accelerator.

    ``budget`` (default: all DSPs of the device) caps the DSP blocks used; it may not be
    negative. ``clamp``: ``"auto"`` (DSP if it fits the budget), ``"dsp"`` or ``"lut"``.
    The plan never uses more than ``min(budget, device_dsps(target))`` blocks; with
    ``clamp="dsp"`` and too small a budget it raises ``ValueError``.
    """
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
            raise ValueError(f"{name} must be an int in 1..64, got {v!r}")
    sfx.check_bits(a_bits, "a_bits")
    sfx.check_bits(w_bits, "w_bits")
    if clamp not in ("auto", "dsp", "lut"):
        raise ValueError(f"clamp must be 'auto', 'dsp' or 'lut', got {clamp!r}")
    family, have = _family_of(target)
    if budget is None:
        budget = have
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"DSP budget must be an int >= 0, got {budget!r}")
    usable = min(budget, have)
    cell = DSP_FAMILIES[family].cell
    acc = sfx.accumulator_bits(a_bits, w_bits, k_max)
    clamp_need = dsps_per_multiplier(target, acc, 16)
    if clamp == "dsp" and clamp_need > usable:
        raise ValueError(f"the clamp unit's {acc}x16 multiplier needs {clamp_need} {cell} but the DSP budget "
                         f"is {usable}: use clamp='lut' or a larger budget")
    clamp_impl = ("dsp" if clamp == "dsp" or (clamp == "auto" and family in CLAMP_DSP_FAMILIES
                                               and clamp_need <= usable) else "lut")
    clamp_dsps = clamp_need if clamp_impl == "dsp" else 0
    left = usable - clamp_dsps
    product_bits = (a_bits - 1) + (w_bits - 1)
    min_bits = PE_DSP_MIN_PRODUCT_BITS[family]
    per_pe = dsps_per_multiplier(target, a_bits - 1, w_bits - 1) if product_bits >= min_bits else 0
    pes = rows * cols
    clamp_txt = (f"clamp multiplier {acc}x16 on {clamp_dsps} {cell}" if clamp_impl == "dsp"
                 else f"clamp multiplier {acc}x16 in logic")
    if per_pe == 0:
        n = 0
        reason = (f"{clamp_txt}; a {a_bits - 1}x{w_bits - 1}-bit magnitude product ({product_bits} bits) is below "
                  f"the {min_bits}-bit threshold for a PE DSP on {family}: all PEs use logic multipliers")
    else:
        n = min(pes, left // per_pe)
        limit = "the user budget" if budget < have else "the device"
        if n == pes:
            reason = f"{clamp_txt}; all {pes} PEs use {cell} ({n * per_pe + clamp_dsps} of {usable} usable)"
        else:
            reason = (f"{clamp_txt}; {n} of {pes} PEs use {cell} ({per_pe} each), limited by {limit} "
                      f"({usable} usable of {have}); the other {pes - n} use logic multipliers")
    return DspPlan(target=target, cell=cell, device_dsps=have, budget=usable, per_pe=per_pe, pes=pes,
                   dsp_pes=n, dsps_used=n * per_pe + clamp_dsps, clamp_impl=clamp_impl, clamp_dsps=clamp_dsps,
                   reason=reason)


# --------------------------------------------------------------------------- architecture plan

#: Per target: the array organisation that ``sfx synth`` / ``sfx build-board`` use unless told
#: otherwise (docs/fpga.md, "Architecture per target").
#:
#: * iCE40 UP5K: an iCE40 logic cell is one LUT4 and one flip-flop, and a PE is mostly
#:   accumulator bits, so the PEs have no shadow registers (the array waits while a tile
#:   drains) and accumulate at most ``chunk_k`` products (16-bit SF4 accumulators; longer
#:   reductions add their partial sums in block RAM).
#: * ECP5-25k: LUTs and flip-flops are separate and plentiful: shadow registers (the drain
#:   overlaps the next tile), the same chunking (smaller PEs: a larger array fits).
ARCH_DEFAULTS = {
    "ice40-up5k": {"overlap_drain": False, "chunk_k": 512, "pipelined": False},
    "ecp5-25k": {"overlap_drain": True, "chunk_k": 512, "pipelined": True},
}

#: Logic multipliers whose product has at least this many bits get one pipeline register.
PIPELINE_PRODUCT_BITS = 8


@dataclass(frozen=True)
class ArchPlan:
    """Array organisation of one accelerator (recorded in every synthesis report)."""

    target: str
    overlap_drain: bool
    chunk_k: int       # longest run of products a PE accumulates (<= k_max)
    mul_stages: int    # pipeline registers inside the PE multipliers
    pipelined: bool    # registers after the drain stage's block-RAM reads
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_architecture(target: str, *, a_bits: int, w_bits: int, k_max: int = sfx.DEFAULT_K_MAX,
                      overlap_drain: bool | None = None, chunk_k: int | None = None,
                      mul_stages: int | None = None, pipelined: bool | None = None) -> ArchPlan:
    """The target's defaults (:data:`ARCH_DEFAULTS`), each overridable; ``mul_stages``
    defaults to 1 for products of :data:`PIPELINE_PRODUCT_BITS` bits or more, else 0."""
    _family_of(target)
    sfx.check_bits(a_bits, "a_bits")
    sfx.check_bits(w_bits, "w_bits")
    d = ARCH_DEFAULTS[target]
    why = []
    if overlap_drain is None:
        overlap_drain = d["overlap_drain"]
        why.append("shadow registers (drain overlaps accumulation)" if overlap_drain else
                   "no shadow registers (the array waits while a tile drains)")
    elif not isinstance(overlap_drain, bool):
        raise TypeError(f"overlap_drain must be a bool or None, got {overlap_drain!r}")
    if chunk_k is None:
        chunk_k = min(k_max, d["chunk_k"])
    if isinstance(chunk_k, bool) or not isinstance(chunk_k, int) or chunk_k < 1:
        raise ValueError(f"chunk_k must be an int >= 1, got {chunk_k!r}")
    chunk_k = min(chunk_k, k_max)
    if chunk_k < k_max:
        why.append(f"PEs accumulate chunks of at most {chunk_k} products (partial sums in block RAM)")
    product_bits = (a_bits - 1) + (w_bits - 1)
    if mul_stages is None:
        mul_stages = 1 if product_bits >= PIPELINE_PRODUCT_BITS else 0
        if mul_stages:
            why.append(f"a {product_bits}-bit logic product gets a pipeline register")
    if isinstance(mul_stages, bool) or not isinstance(mul_stages, int) or not 0 <= mul_stages <= 4:
        raise ValueError(f"mul_stages must be an int in 0..4, got {mul_stages!r}")
    if pipelined is None:
        pipelined = d["pipelined"]
        if pipelined:
            why.append("registers after the block-RAM reads")
    elif not isinstance(pipelined, bool):
        raise TypeError(f"pipelined must be a bool or None, got {pipelined!r}")
    return ArchPlan(target=target, overlap_drain=overlap_drain, chunk_k=chunk_k, mul_stages=mul_stages,
                    pipelined=pipelined, reason="; ".join(why) or "as given")
