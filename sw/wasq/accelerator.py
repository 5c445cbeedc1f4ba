"""Accelerator-exact execution of a quantized model: the numbers the FPGA computes (SPEC section 8).

A mode of the same quantized model, not a second model: :func:`set_backend` switches
every :class:`~superfloat.sw.wasq.SFxLinear` between ``"fake"`` (fake quantization, the
default: float matmul of the quantized values) and ``"accelerator"``, where each quantized
linear layer computes, and nothing else:

1. its float input ``x`` ``[T, K]`` streamed as the hardware receives it: one exponent per
   row (``xexp[t]``: ``sfx.choose_exponent`` of the row for dynamic activations, the
   calibrated one for static ones) and the codes ``encode(x[t], xa, xexp[t])``;
2. ``Y = LINEAR(X, W, bias, shift, mult, xexp)`` of SPEC section 5, exactly
   (:class:`superfloat.sw.sfx_torch.LinearOp`: exact integer accumulation, bias in
   accumulator units, the 16-bit per-channel multiplier of a float weight scale,
   requantization with rounding and saturation), with
   ``shift[n] = w_shift[n] - Eo[n]`` and ``Eo[n]`` the layer's **static** output exponent
   (:func:`calibrate_outputs_`, stored in the checkpoint as ``<name>.out_exponent``);
3. its output ``decode(Y, xo, Eo)``.

Attention, norms, activation functions and everything else stay float on the host.

How a layer maps onto LINEAR (also what co-simulation and the board host driver stream):

* weights: the stored codes; a power-of-two exponent ``Ew[n]`` goes into ``shift``; a
  float scale ``s[n]`` is folded by ``sfx.fold_scale`` into ``mult[n]`` and ``shift``
  (:func:`weight_scale_params`);
* bias: ``round_nearest_even(b[n] / unit[n])`` in accumulator units, with the unit of the
  row's activation exponent (:func:`bias_to_accumulator`), so rows with different
  exponents are separate LINEAR operations when the layer has a bias;
* activations of a weight-only layer: SF16 per-token (:data:`WEIGHT_ONLY_ACT_BITS`);
* a row exponent the layer's shifts cannot take (the hardware's right shift is 0..63) is
  clamped to the nearest one it can (the row's values then saturate or lose low bits):
  counted as ``clamped_rows`` and reported, never silent.

Static output exponents (the rule, :func:`output_exponent_rule`): per output channel, the
smallest ``Eo`` with ``headroom * max|y[:, n]|`` representable, ``max`` over the
calibration text; ``headroom`` (default :func:`default_headroom`: 4x for outputs of 12 bits
and more, 1x for narrower ones, where a lost bit costs more than a rare saturation) keeps unseen
text from saturating; outputs beyond it
saturate and are counted (``saturated``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .. import sfx, sfx_torch
from .formats import row_scale
from .layers import evaluating, quantized_layers
from .quantize import _run_batch

__all__ = ["BACKENDS", "DEFAULT_OUT_BITS", "WEIGHT_ONLY_ACT_BITS", "AcceleratorError",
           "LayerProgram", "RowStream", "set_backend", "backend_of", "calibrate_outputs_", "accelerator_stats",
           "reset_accelerator_stats", "output_exponent_rule", "default_headroom", "bias_to_accumulator", "weight_scale_params",
           "widen_codes", "MIN_CALIB_ROWS"]

BACKENDS = ("fake", "accelerator")
#: output width of every layer unless the config or the checkpoint says otherwise
DEFAULT_OUT_BITS = 16
#: static output exponents leave a factor of headroom above the calibrated maximum; how much
#: pays depends on the output width (:func:`default_headroom`): a wide output has bits to
#: spare and saturating an outlier token costs far more than a lost low bit
HEADROOM_WIDE, HEADROOM_NARROW, WIDE_OUT_BITS = 4.0, 1.0, 12


def default_headroom(out_bits: int) -> float:
    """The default headroom of SF``out_bits`` outputs: :data:`HEADROOM_WIDE` from
    :data:`WIDE_OUT_BITS` bits up, else :data:`HEADROOM_NARROW` (measured, docs/accelerator-exact.md)."""
    return HEADROOM_WIDE if out_bits >= WIDE_OUT_BITS else HEADROOM_NARROW
#: activations of a weight-only layer on the accelerator (it always streams codes)
WEIGHT_ONLY_ACT_BITS = 16
#: fewest calibration rows (tokens) a layer must see for its output exponents
MIN_CALIB_ROWS = 16


class AcceleratorError(ValueError):
    """A layer the accelerator cannot run as configured (the message names it and says what to do)."""


# --------------------------------------------------------------------------- the mapping (SPEC sections 1, 3-5)


def weight_scale_params(exported: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """``(mult, w_shift)`` per output channel of an exported layer
    (:class:`~superfloat.sw.wasq.ExportedLinear`): power-of-two exponents give
    ``(None, Ew)``; float scales give ``sfx.fold_scale(s)`` with ``Ew`` added
    (:meth:`ExportedLinear.fold`), i.e. ``real weight = value(code) * mult * 2**(w_shift - 16)``."""
    n = exported.codes.shape[0]
    if exported.scale is None:
        return None, np.broadcast_to(np.asarray(exported.exponent, dtype=np.int64), (n,)).copy()
    mult, shift = exported.fold()
    return np.asarray(mult, dtype=np.int64), np.asarray(shift, dtype=np.int64)


def bias_to_accumulator(bias: Any, *, frac_bits: int, a_exponent: int, w_shift: Any, mult: Any = None,
                        xmult: int | None = None) -> np.ndarray:
    """A float bias per output channel in accumulator units: ``round_nearest_even(b[n] / unit[n])``, exactly.

    One accumulator unit (SPEC section 3, ``acc`` represents ``acc * 2**(-F + Ea + Ew)``) is
    worth ``2**(a_exponent - frac_bits + w_shift[n])`` for power-of-two weight exponents
    (``w_shift = Ew``; this is SPEC's ``round(b * 2**(F - Ea - Ew))``), or
    ``2**(a_exponent - frac_bits) * mult[n] * 2**(w_shift[n] - 16)`` when the weight scale
    was folded into ``mult`` / ``w_shift`` by ``sfx.fold_scale``: the bias is divided by the
    scale the hardware really applies, so that after the multiplier it is worth ``b``.
    With a per-row multiplier ``xmult`` (SPEC revision 2) the unit is also multiplied by
    ``xmult * 2**-16`` (the bias is added before both multipliers). The division and the
    rounding (ties to even) are done on exact rationals.

    Args:
        bias: ``[N]`` floats (any float dtype; NaN / inf are errors).
        frac_bits: ``F = (a_bits - 1) + (w_bits - 1)`` of the array.
        a_exponent: the activation exponent ``Ea`` of the rows this bias is used with.
        w_shift: ``[N]`` (or scalar) weight exponents, or folded shifts with ``mult``.
        mult: ``[N]`` folded multipliers or None.
        xmult: the rows' 16-bit activation multiplier, or None.

    Returns:
        int64 ``[N]``. Range checks against the accumulator are ``sfx.check_linear_args``'.
    """
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"bias holds {int((~np.isfinite(b)).sum())} NaN/inf value(s)")
    n = b.size
    ws = np.broadcast_to(np.asarray(w_shift, dtype=np.int64), (n,))
    mu = None if mult is None else np.broadcast_to(np.asarray(mult, dtype=np.int64), (n,))
    base = int(a_exponent) - int(frac_bits) - (sfx.MULT_FRAC_BITS if xmult is not None else 0)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        e = base + int(ws[i]) - (sfx.MULT_FRAC_BITS if mu is not None else 0)
        unit = Fraction(2) ** e
        if mu is not None:
            unit *= int(mu[i])
        if xmult is not None:
            unit *= int(xmult)
        q = round(Fraction(float(b[i])) / unit)  # Fraction rounds half to even
        if abs(q) >= 1 << 62:
            raise ValueError(f"bias[{i}] = {b[i]!r} is {q} accumulator units: far out of any accumulator's range")
        out[i] = q
    return out


def widen_codes(codes: np.ndarray, from_bits: int, to_bits: int) -> np.ndarray:
    """SF``from_bits`` codes as SF``to_bits`` codes of the same values (exact; ``to_bits >= from_bits``)."""
    if to_bits == from_bits:
        return codes
    if to_bits < from_bits:
        raise ValueError(f"cannot narrow SF{from_bits} codes to SF{to_bits} without changing values")
    return sfx.encode(sfx.decode(codes, from_bits), to_bits)


def output_exponent_rule(amax: Any, out_bits: int, headroom: float | None = None) -> np.ndarray:
    """The static output exponents of calibrated per-channel maxima ``amax`` ``[N]``: the smallest
    ``Eo[n]`` with ``headroom * amax[n] <= (1 - 2**-(out_bits-1)) * 2**Eo[n]`` (``sfx.choose_exponent``
    of the scaled maximum; 0 for a channel that never fired). ``headroom=None``: :func:`default_headroom`."""
    if headroom is None:
        headroom = default_headroom(out_bits)
    if not (isinstance(headroom, (int, float)) and not isinstance(headroom, bool) and math.isfinite(headroom)
            and headroom >= 1.0):
        raise ValueError(f"headroom must be a finite number >= 1 (a factor above the calibrated maximum), "
                         f"got {headroom!r}")
    a = np.asarray(amax, dtype=np.float64) * float(headroom)
    return np.asarray(sfx.choose_exponent(a.reshape(-1, 1), out_bits, axis=0), dtype=np.int64)


def _uses_xmult(layer: Any) -> bool:
    return layer.act_bits is not None and layer.act_exponent == "dynamic" and getattr(layer, "act_scale", "pow2") == "float"


def _check_executable(layer: Any, name: str) -> None:
    if not layer.hardware_executable:
        raise AcceleratorError(f"layer {name}: {layer.weight_format().label()} with these activations is not "
                               f"executable by the SFx accelerator (software only)")


# --------------------------------------------------------------------------- one layer's program


@dataclass
class RowStream:
    """One call's activation stream (:meth:`LayerProgram.stream`): ``codes`` ``[T, K]``,
    ``x_exponent`` int64 ``[T]``, ``xmult`` int64 ``[T]`` or None, ``clamped`` bool ``[T]``."""

    codes: torch.Tensor
    x_exponent: torch.Tensor
    xmult: torch.Tensor | None
    clamped: torch.Tensor


@dataclass
class LayerProgram:
    """What the accelerator is programmed with for one quantized layer, and its exact forward.

    Built from the layer (:meth:`from_layer`); ``forward(x)`` is SPEC section 8 on float
    inputs ``[..., K]``. Statistics (tensors, no host sync in the forward):
    ``calls``, ``rows``, ``saturated`` (output codes that saturated), ``clamped_rows``
    (row exponents moved into the range the shifts allow).
    """

    name: str
    a_bits: int
    w_bits: int
    out_bits: int
    act_mode: str                  # "dynamic" | "xmult" (dynamic, float per-row scale) | "static"
    act_exponent: int | None       # static mode
    act_source: str                # "layer" or why the activation format was chosen
    rounding: str
    mult: np.ndarray | None
    w_shift: np.ndarray
    out_exponent: np.ndarray       # int64 [N]
    bias: np.ndarray | None        # float [N]
    w_codes: np.ndarray
    device: torch.device
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    act_clip_ratio: float = 1.0    # xmult mode: the row scale's fraction of max|x[t]| / (1 - 2**-M)

    def __post_init__(self) -> None:
        n = self.w_codes.shape[0]
        self.frac_bits = (self.a_bits - 1) + (self.w_bits - 1)
        shift = self.w_shift - self.out_exponent
        if shift.min() < sfx.INT8_MIN or shift.max() > sfx.INT8_MAX:
            j = int(np.argmax((shift < sfx.INT8_MIN) | (shift > sfx.INT8_MAX)))
            raise AcceleratorError(f"layer {self.name}: output exponent {int(self.out_exponent[j])} of channel {j} "
                                   f"gives shift {int(shift[j])}, outside int8 (weight shift {int(self.w_shift[j])})")
        self.shift = shift
        try:
            self.op = sfx_torch.LinearOp(self.w_codes, w_bits=self.w_bits, a_bits=self.a_bits,
                                         out_bits=self.out_bits, shift=shift, mult=self.mult,
                                         rounding=self.rounding, device=self.device,
                                         row_bias=self.bias is not None, xmult=self.act_mode == "xmult")
        except (TypeError, ValueError) as e:
            raise AcceleratorError(f"layer {self.name}: {e}") from None
        lo, hi = self.op.x_exponent_range
        if lo > hi:
            raise AcceleratorError(f"layer {self.name}: no activation exponent keeps every right shift in 0..63 "
                                   f"with these output exponents (SF{self.out_bits} outputs); recalibrate the "
                                   f"output exponents or use a wider output")
        self.x_exponent_range = (lo, hi)
        self._eo = torch.as_tensor(self.out_exponent, dtype=torch.int64, device=self.device)[None, :]
        self._bias_cache: dict[int, torch.Tensor] = {}
        self._out_scale: dict[torch.dtype, torch.Tensor] = {}
        # signed activations straight into the float matmul (no integer round trip)
        self._x_dtype = {"float32": torch.float32, "float64": torch.float64}.get(self.op.matmul, torch.int32)
        self.N, self.K = n, self.w_codes.shape[1]
        self.reset_stats()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_layer(cls, layer: Any, *, device: Any = None) -> "LayerProgram":
        """The program of an :class:`~superfloat.sw.wasq.SFxLinear` with calibrated output exponents."""
        name = layer.layer_name or "?"
        if layer.out_exponent is None:
            raise AcceleratorError(
                f"layer {name}: no calibrated output exponents (SPEC section 8); calibrate them with "
                f"superfloat.sw.wasq.accelerator.calibrate_outputs_(model, batches) or on the command line "
                f"'sfx quantize ... --calib-tokens N' (or 'sfx eval --calibrate-outputs')")
        _check_executable(layer, name)
        try:
            ex = layer.export()
        except ValueError as e:
            raise AcceleratorError(str(e)) from None
        out_bits = layer.out_bits or DEFAULT_OUT_BITS
        if layer.act_bits is None:
            a_bits, mode, e, src = WEIGHT_ONLY_ACT_BITS, "dynamic", None, (
                f"weight-only layer: SF{WEIGHT_ONLY_ACT_BITS} per-token activations")
        elif layer.act_exponent == "static":
            e = layer.static_act_exponent
            if e is None:
                raise AcceleratorError(f"layer {name}: static activation exponent not calibrated; run "
                                       f"superfloat.sw.wasq.calibrate_ first")
            a_bits, mode, src = int(layer.act_bits), "static", "layer"
        else:
            mode = "xmult" if getattr(layer, "act_scale", "pow2") == "float" else "dynamic"
            a_bits, e, src = int(layer.act_bits), None, "layer"
        mult, w_shift = weight_scale_params(ex)
        eo = np.asarray(layer.out_exponent, dtype=np.int64).reshape(-1)
        if eo.shape != (ex.codes.shape[0],):
            raise AcceleratorError(f"layer {name}: out_exponent has shape {list(eo.shape)}, expected "
                                   f"[{ex.codes.shape[0]}] (one per output channel)")
        dev = torch.device(device) if device is not None else layer.weight.device
        return cls(name, a_bits, int(ex.bits), int(out_bits), mode, e, src, ex.rounding, mult, w_shift, eo,
                   None if ex.bias is None else np.asarray(ex.bias, dtype=np.float64), ex.codes, dev,
                   act_clip_ratio=getattr(layer, "act_clip_ratio", 1.0) if mode == "xmult" else 1.0)

    # ------------------------------------------------------------------ per call

    def reset_stats(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.int64, device=self.device)  # noqa: E731
        self.stats = {"calls": z(), "rows": z(), "saturated": z(), "clamped_rows": z()}

    def stream(self, x2: torch.Tensor, *, signed: bool = False) -> "RowStream":
        """The activation stream of float rows ``x2`` ``[T, K]`` exactly as the hardware
        receives it (SPEC section 8 step 1): codes (``signed``: their signed integers, what
        the matmul takes), one exponent per row and, in ``xmult`` mode, one 16-bit multiplier
        per row; rows whose exponent had to be clamped into the range the shifts allow."""
        lo, hi = self.x_exponent_range
        xm = None
        if self.act_mode == "static":
            e = torch.full((x2.shape[0],), int(self.act_exponent), dtype=torch.int64, device=x2.device)
            ec = e.clamp(lo, hi)
        elif self.act_mode == "xmult":
            codes, e, xm = sfx_torch.encode_rows_scaled(x2, self.a_bits, row_scale(x2, self.a_bits, self.act_clip_ratio),
                                                        rounding=self.rounding, signed=signed)
            ec = e.clamp(lo, hi)
            if not bool((ec != e).any()):
                return RowStream(codes.to(self._x_dtype) if signed else codes, e, xm, torch.zeros_like(e, dtype=torch.bool))
            scale = torch.ldexp(xm.to(torch.float64), ec - sfx.MULT_FRAC_BITS)  # the scale the hardware applies
            codes, _, _ = sfx_torch.encode_rows_scaled(x2, self.a_bits, scale, rounding=self.rounding, signed=signed)
            return RowStream(codes, ec, xm, ec != e)
        else:
            codes, e8 = sfx_torch.encode_rows(x2, self.a_bits, self.rounding, signed=signed,
                                              dtype=self._x_dtype if signed else torch.int32)
            e = e8.to(torch.int64)
            ec = e.clamp(lo, hi)
            if not bool((ec != e).any()):
                return RowStream(codes, e, None, torch.zeros_like(e, dtype=torch.bool))
        codes = sfx_torch.encode(x2, self.a_bits, ec[:, None], self.rounding)
        if signed:
            codes = sfx_torch._signed(codes, self.a_bits).to(torch.int32)
        return RowStream(codes, ec, xm, ec != e)

    def stream_rows(self, x2: torch.Tensor, *, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes int32 [T, K], x_exponent int64 [T], clamped bool [T])`` of :meth:`stream`
        (layers without a per-row multiplier; ``xmult`` layers need :meth:`stream`)."""
        if self.act_mode == "xmult":
            raise AcceleratorError(f"layer {self.name}: streams a per-row multiplier (xmult); use stream()")
        st = self.stream(x2, signed=signed)
        return st.codes, st.x_exponent, st.clamped

    def row_groups(self, x_exponent: torch.Tensor, xmult: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The LINEAR operations of one call: ``[(rows, bias in accumulator units or None)]``.
        Without a bias, one operation for all rows; with a bias, one per distinct row scale
        (``x_exponent``, and ``xmult`` in that mode): the accumulator's unit depends on it."""
        if self.bias is None:
            return [(torch.arange(x_exponent.shape[0], device=x_exponent.device), None)]
        key = x_exponent if xmult is None else x_exponent * (1 << 20) + xmult
        out = []
        for kv in torch.unique(key).tolist():
            rows = torch.nonzero(key == kv).reshape(-1)
            r0 = int(rows[0])
            out.append((rows, self._bias_for(int(x_exponent[r0]), None if xmult is None else int(xmult[r0]))))
        return out

    def operations(self, x2: torch.Tensor) -> list[dict[str, Any]]:
        """The LINEAR operations (SPEC section 5) that compute one call of this layer on float
        rows ``x2`` ``[T, K]``, as numpy keyword arguments of :func:`superfloat.sw.sfx.linear`
        plus ``rows`` (which output rows they fill): what co-simulation streams into the RTL and
        the board host driver sends over its link. ``sfx.linear(**op)`` of every operation gives
        exactly :meth:`codes`' rows."""
        with torch.no_grad():
            st = self.stream(x2.detach().to(self.device))
        xc = st.codes.cpu().numpy().astype(sfx.code_dtype(self.a_bits))
        ops = []
        for rows, bias in self.row_groups(st.x_exponent, st.xmult):
            r = rows.cpu().numpy()
            ops.append({"rows": r, "x_codes": xc[r], "w_codes": self.w_codes, "a_bits": self.a_bits,
                        "w_bits": self.w_bits, "out_bits": self.out_bits,
                        "bias": None if bias is None else bias.cpu().numpy(), "shift": self.shift,
                        "mult": self.mult, "x_exponent": st.x_exponent[rows].cpu().numpy(),
                        "xmult": None if st.xmult is None else st.xmult[rows].cpu().numpy(),
                        "rounding": self.rounding})
        return ops

    def _bias_for(self, ea: int, xm: int | None = None) -> torch.Tensor:
        b = self._bias_cache.get((ea, xm))
        if b is None:
            try:
                acc = bias_to_accumulator(self.bias, frac_bits=self.frac_bits, a_exponent=ea, w_shift=self.w_shift,
                                          mult=self.mult, xmult=xm)
                b = self.op.check_bias(acc)
            except ValueError as e:
                what = f"activation exponent {ea}" + ("" if xm is None else f" and multiplier {xm}")
                raise AcceleratorError(f"layer {self.name}: bias with {what}: {e}") from None
            self._bias_cache[(ea, xm)] = b
        return b

    def _run(self, x2: torch.Tensor, **out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        st = self.stream(x2, signed=True)
        self.stats["clamped_rows"] += st.clamped.sum()
        groups = self.row_groups(st.x_exponent, st.xmult)
        if len(groups) == 1 and groups[0][1] is None:
            y, nsat = self.op(st.codes, st.x_exponent, st.xmult, signed=True, check=False, **out)
        else:  # one LINEAR operation per distinct row scale (the bias is in accumulator units)
            parts = []
            nsat = torch.zeros((), dtype=torch.int64, device=x2.device)
            for rows, bias in groups:
                yr, ns = self.op(st.codes[rows], st.x_exponent[rows], None if st.xmult is None else st.xmult[rows],
                                 signed=True, check=False, bias=bias, **out)
                parts.append((rows, yr))
                nsat += ns
            y = torch.empty((x2.shape[0], self.N), dtype=parts[0][1].dtype, device=x2.device)
            for rows, yr in parts:
                y[rows] = yr
        self.stats["saturated"] += nsat
        self.stats["calls"] += 1
        self.stats["rows"] += x2.shape[0]
        return y, st.x_exponent, nsat

    def codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output codes int32 [T, N], x_exponent [T], n_saturated)`` of float rows ``x2`` ``[T, K]``."""
        return self._run(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on the accelerator: ``decode(LINEAR(...), out_bits, Eo)`` in ``x``'s dtype."""
        shape = x.shape
        x2 = x.detach().reshape(-1, shape[-1])
        if x2.device != self.device:
            x2 = x2.to(self.device)
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.N)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = self._out_scale.get(dt)
        if scale is None:  # decode: q * 2**(Eo - Mo), exact in float32 (|q| < 2**15, Eo in int8)
            scale = self._out_scale[dt] = torch.exp2((self._eo[0] - (self.out_bits - 1)).to(dt))
        y, _, _ = self._run(x2, out="values", out_scale=scale)
        return y.to(device=x.device, dtype=x.dtype).reshape(*shape[:-1], self.N)


from . import qlinear as _qlinear  # noqa: E402

_qlinear._PROGRAM_BUILDER = LayerProgram.from_layer


# --------------------------------------------------------------------------- the model


def _layers(model: nn.Module) -> dict[str, Any]:
    layers = quantized_layers(model)
    if not layers:
        raise AcceleratorError("the model has no quantized layers (SFxLinear); quantize it first "
                               "(superfloat.sw.wasq.quantize_ or a WASQ checkpoint)")
    return layers


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run every quantized layer on ``backend``: ``"fake"`` (fake quantization) or ``"accelerator"``
    (SPEC section 8, exactly). Switching to the accelerator prepares each layer's program
    (and raises :class:`AcceleratorError` naming the first layer that cannot run: no
    calibrated output exponents, a software-only format, ...). Returns ``model``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    layers = _layers(model)
    if backend == "accelerator":
        for layer in layers.values():
            layer.accelerator_program()  # builds and caches, raising early
    for layer in layers.values():
        layer.backend = backend
    return model


def backend_of(model: nn.Module) -> str:
    """``"fake"`` or ``"accelerator"`` (the backend of the model's quantized layers)."""
    kinds = {getattr(layer, "backend", "fake") for layer in _layers(model).values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def reset_accelerator_stats(model: nn.Module) -> None:
    for layer in _layers(model).values():
        prog = layer._accel_program(build=False)
        if prog is not None:
            prog.reset_stats()


def accelerator_stats(model: nn.Module) -> dict[str, Any]:
    """Totals over the model's layers since the last reset: ``saturated`` output codes,
    ``clamped_rows``, ``rows`` and ``calls``; and ``layers``: the per-layer figures of the
    layers where something saturated or was clamped (host syncs here, not in the forward)."""
    tot = {"saturated": 0, "clamped_rows": 0, "rows": 0, "calls": 0, "outputs": 0}
    per = {}
    for name, layer in _layers(model).items():
        prog = layer._accel_program(build=False)
        if prog is None:
            continue
        s = {k: int(v) for k, v in prog.stats.items()}
        for k in ("saturated", "clamped_rows", "rows", "calls"):
            tot[k] += s[k]
        tot["outputs"] += s["rows"] * prog.N
        if s["saturated"] or s["clamped_rows"]:
            per[name] = {"saturated": s["saturated"], "clamped_rows": s["clamped_rows"], "rows": s["rows"]}
    tot["layers"] = per
    return tot


@torch.no_grad()
def calibrate_outputs_(model: nn.Module, batches: Iterable[Any], *, out_bits: int | None = None,
                       headroom: float | None = None, min_rows: int = MIN_CALIB_ROWS,
                       progress: bool = False) -> dict[str, dict[str, Any]]:
    """Calibrate the static output exponents ``Eo`` of every quantized layer (SPEC section 8).

    Runs ``batches`` (token-id tensors ``[B, T]`` / ``[T]`` or dicts of model inputs) through
    the model on its fake-quantized backend, records ``max|y[:, n]|`` of every layer's
    output channel and the largest activation exponent its input needed, then sets
    ``layer.out_bits`` (``out_bits``, else the layer's own, else :data:`DEFAULT_OUT_BITS`) and
    ``layer.out_exponent`` = :func:`output_exponent_rule` (``headroom`` above the maximum; ``None``:
    :func:`default_headroom` of the layer's output width),
    raised where needed so that every calibrated row's right shift is in 0..63.

    Returns ``{layer: {"out_bits", "headroom", "amax_max", "raised_channels", "rows"}}``.

    Raises:
        AcceleratorError: a layer saw fewer than ``min_rows`` calibration rows (names it), or
            no output exponent fits its shifts.
    """
    if out_bits is not None:
        sfx.check_bits(out_bits, "out_bits")
    layers = _layers(model)
    for name, layer in layers.items():
        _check_executable(layer, name)
    amax: dict[str, torch.Tensor] = {}
    xmax: dict[str, int] = {}
    rows: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].detach()
            y = out.detach().reshape(-1, out.shape[-1]).float().abs().amax(dim=0)
            amax[name] = y if name not in amax else torch.maximum(amax[name], y)
            a_bits = mod.act_bits or WEIGHT_ONLY_ACT_BITS
            if x.numel():
                x2 = x.reshape(-1, x.shape[-1])
                if _uses_xmult(mod):
                    s = row_scale(x2, a_bits, mod.act_clip_ratio)
                    e = int(sfx_torch.fold_row_scale(sfx_torch.default_row_scale(x2, a_bits) if s is None else s)[1].max())
                else:
                    e = int(sfx_torch.choose_exponent(x2, a_bits, axis=0).max())
                xmax[name] = max(xmax.get(name, -128), e)
            rows[name] = rows.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return fn

    saved = {n: getattr(m, "backend", "fake") for n, m in layers.items()}
    for name, layer in layers.items():
        layer.backend = "fake"
        hooks.append(layer.register_forward_hook(hook(name)))
    n_batches = 0
    try:
        from tqdm.auto import tqdm

        with evaluating(model, hooks=hooks):
            for batch in tqdm(list(batches), desc="calibrate outputs", disable=not progress, leave=False):
                _run_batch(model, batch)
                n_batches += 1
    finally:
        for n, m in layers.items():
            m.backend = saved[n]
    if n_batches == 0:
        raise AcceleratorError("calibrate_outputs_: no calibration batches were given")
    report = {}
    for name, layer in layers.items():
        seen = rows.get(name, 0)
        if seen < min_rows:
            raise AcceleratorError(f"layer {name}: saw {seen} calibration rows, fewer than {min_rows}: the calibration "
                                   f"text is too short to set its output exponents; give more tokens "
                                   f"(--calib-tokens)")
        ob = out_bits or layer.out_bits or DEFAULT_OUT_BITS
        hr = default_headroom(ob) if headroom is None else headroom
        eo = output_exponent_rule(amax[name].cpu().numpy(), ob, hr)
        # every calibrated row must keep its right shift in 0..63: Ea[t] <= F' - Mo - w_shift[n] + Eo[n]
        ex = layer.export()
        mult, w_shift = weight_scale_params(ex)
        a_bits = layer.act_bits or WEIGHT_ONLY_ACT_BITS
        f_eff = (a_bits - 1) + (ex.bits - 1) + (sfx.MULT_FRAC_BITS if mult is not None else 0) \
            + (sfx.MULT_FRAC_BITS if _uses_xmult(layer) else 0)
        ea_max = layer.static_act_exponent if layer.act_exponent == "static" and layer.act_bits else xmax.get(name, 0)
        need = w_shift + (ob - 1) - f_eff + int(ea_max)
        raised = int(np.count_nonzero(eo < need))
        eo = np.maximum(eo, need)
        eo = np.clip(eo, max(sfx.INT8_MIN, int((w_shift - sfx.INT8_MAX).max())),
                     min(sfx.INT8_MAX, int((w_shift - sfx.INT8_MIN).min())))
        layer.out_bits = int(ob)
        layer.out_exponent = eo.astype(np.int8)
        layer.invalidate_program()
        report[name] = {"out_bits": int(ob), "headroom": hr, "amax_max": float(amax[name].max()), "raised_channels": raised,
                        "rows": seen}
    return report
