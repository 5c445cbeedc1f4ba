"""SFx hardware in Amaranth HDL.

* :class:`SFxAccelerator`: the LINEAR accelerator behind the streams of
  :mod:`superfloat.hw.interface` (MAC array, clamp unit, sequencers).
* :class:`SFxMacArray`, :class:`SFxPE`, :class:`SFxMagnitudeMultiplier`: the array and its
  processing elements (``impl="lut"`` / ``"dsp"`` multipliers, chosen per PE).
* :class:`SFxClampUnit`: requantization (SPEC section 4).
* :func:`generate_verilog`: deterministic Verilog with a documented header.
"""
from .accelerator import SFxAccelerator
from .clamp import SFxClampUnit
from .mac_array import SFxMacArray
from .pe import SFxMagnitudeMultiplier, SFxPE
from .verilog import generate_verilog

__all__ = ["SFxAccelerator", "SFxClampUnit", "SFxMacArray", "SFxPE", "SFxMagnitudeMultiplier", "generate_verilog"]
