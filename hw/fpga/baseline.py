"""Comparison designs: SFx sign-magnitude PEs beside two's complement integer PEs.

"Sign-magnitude saves logic" is a claim to measure, not to assume. The comparison uses the
accelerator's own array and accelerator, built twice with nothing changed but the PE
(``pe_kind``, :class:`superfloat.hw.pe.SFxPE`):

* ``"sm"``: the SFx PE, an unsigned ``(a_bits-1) x (w_bits-1)`` magnitude multiplier, sign
  ``sa ^ sw``, the conditional negation folded into the accumulator's adder (carry-in);
* ``"tc"``: a signed ``a_bits x w_bits`` two's complement multiplier
  (:class:`superfloat.hw.pe.TwosComplementMultiplier`: modified Baugh-Wooley partial
  products summed by the same balanced adder tree as the SFx LUT multiplier, so neither
  side gets a better adder structure), added to its accumulator.

Both take the same code widths, accumulate exactly in the bits their own products need
(``mac_array.sum_bits(a_bits, w_bits, k, kind)``: a two's complement product reaches
``2**(a_bits + w_bits - 2)``, an SFx one ``(2**(a_bits-1) - 1) * (2**(w_bits-1) - 1)``, so
the integer PE may need one bit more; the accelerators add the bias and requantize in
SPEC's ``A`` bits either way), and have the same broadcast registers,
drain readout and control: :func:`comparison_array` is an :class:`SFxMacArray` (the bare
array), :func:`comparison_accelerator` an :class:`SFxAccelerator` (streams, context
memories, clamp unit, result FIFO around it).
"""
from __future__ import annotations

from superfloat.hw.accelerator import SFxAccelerator
from superfloat.hw.mac_array import SFxMacArray
from superfloat.hw.pe import PE_KINDS, TwosComplementMultiplier
from superfloat.sw import sfx

__all__ = ["KINDS", "TwosComplementMultiplier", "comparison_array", "comparison_accelerator"]

#: PE kinds of the comparison.
KINDS = PE_KINDS


def _kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


def comparison_array(kind: str, *, rows: int, cols: int, a_bits: int, w_bits: int,
                     k_max: int = sfx.DEFAULT_K_MAX, overlap_drain: bool = True, mul_stages: int = 0) -> SFxMacArray:
    """The bare PE array with ``kind`` PEs (logic multipliers only: the question is logic)."""
    return SFxMacArray(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max, dsp_pes=0,
                       overlap_drain=overlap_drain, mul_stages=mul_stages, pe_kind=_kind(kind))


def comparison_accelerator(kind: str, **kwargs) -> SFxAccelerator:
    """The whole accelerator with ``kind`` PEs (keywords of :class:`SFxAccelerator`)."""
    return SFxAccelerator(**kwargs, pe_kind=_kind(kind))
