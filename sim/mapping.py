"""How a WASQ checkpoint's linear layer maps onto the accelerator's LINEAR (docs/cosim.md).

Bias in accumulator units (:func:`bias_to_accumulator`), weight scales (:func:`weight_scale_params`),
output exponents (:func:`output_exponent`), input quantization (:func:`quantize_input`),
code widening (:func:`widen_codes`), a layer's quantization (:class:`LayerQuant`), a layer
call cut into operations (:class:`LayerCall`, :func:`layer_ops`), the array a layer runs on
(:func:`resolve_array`) and layer selection (:func:`select_layers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from superfloat.sw import sfx

from .engines import ArrayConfig, Op, OpResult


class CosimError(ValueError):
    """A checkpoint, a layer name or an option that cannot be co-simulated (raised before
    any simulator build starts; the message says what to change)."""


# --------------------------------------------------------------------------- checkpoint -> accelerator mapping


def bias_to_accumulator(bias: Any, *, frac_bits: int, a_exponent: int, w_shift: Any, mult: Any = None) -> np.ndarray:
    """A float bias per output channel in accumulator units: ``round_nearest_even(b[n] / unit[n])``, exactly.

    One accumulator unit (SPEC section 3, ``acc`` represents ``acc * 2**(-F + Ea + Ew)``) is
    worth ``2**(a_exponent - frac_bits + w_shift[n])`` for power-of-two weight exponents
    (``w_shift = Ew``; this is SPEC's ``round(b * 2**(F - Ea - Ew))``), or
    ``2**(a_exponent - frac_bits) * mult[n] * 2**(w_shift[n] - 16)`` when the weight scale
    was folded into ``mult`` / ``w_shift`` by ``sfx.fold_scale``: the bias is divided by the
    scale the hardware really applies, so that after the multiplier it is worth ``b``.
    The division and the rounding (ties to even) are done on exact rationals.

    Args:
        bias: ``[N]`` floats (any float dtype; NaN / inf are errors).
        frac_bits: ``F = (a_bits - 1) + (w_bits - 1)`` of the array.
        a_exponent: the activation exponent ``Ea`` of the rows this bias is used with.
        w_shift: ``[N]`` (or scalar) weight exponents, or folded shifts with ``mult``.
        mult: ``[N]`` folded multipliers or None.

    Returns:
        int64 ``[N]``. Range checks against the accumulator are ``sfx.check_linear_args``'.
    """
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"bias holds {int((~np.isfinite(b)).sum())} NaN/inf value(s)")
    n = b.size
    ws = np.broadcast_to(np.asarray(w_shift, dtype=np.int64), (n,))
    mu = None if mult is None else np.broadcast_to(np.asarray(mult, dtype=np.int64), (n,))
    base = int(a_exponent) - int(frac_bits)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        e = base + int(ws[i]) - (sfx.MULT_FRAC_BITS if mu is not None else 0)
        unit = Fraction(2) ** e
        if mu is not None:
            unit *= int(mu[i])
        q = round(Fraction(float(b[i])) / unit)  # Fraction rounds half to even
        if abs(q) >= 1 << 62:
            raise ValueError(f"bias[{i}] = {b[i]!r} is {q} accumulator units: far out of any accumulator's range")
        out[i] = q
    return out


def weight_scale_params(exported: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """``(mult, w_shift)`` per output channel of an exported layer
    (:class:`superfloat.sw.wasq.ExportedLinear`): power-of-two exponents give
    ``(None, Ew)``; float scales give ``sfx.fold_scale(s) `` with ``Ew`` added
    (:meth:`ExportedLinear.fold`), i.e. ``real weight = value(code) * mult * 2**(w_shift - 16)``."""
    n = exported.codes.shape[0]
    if exported.scale is None:
        return None, np.broadcast_to(np.asarray(exported.exponent, dtype=np.int64), (n,)).copy()
    mult, shift = exported.fold()
    return np.asarray(mult, dtype=np.int64), np.asarray(shift, dtype=np.int64)


def output_exponent(y_float: Any, out_bits: int, *, w_shift: Any, x_exponent: Any, frac_bits: int,
                    per: str = "channel") -> tuple[np.ndarray, int]:
    """Output exponents ``Eo`` (int64 ``[N]``) for the float layer output ``y_float`` ``[T, N]``.

    ``Eo`` starts from ``sfx.choose_exponent`` of the float output (per channel, or one for
    the tensor), then is clamped so that every right shift
    ``r = frac_bits - (out_bits - 1) - (w_shift[n] - Eo[n] + x_exponent[t])`` is in 0..63,
    ``shift = w_shift - Eo`` fits int8 and ``Eo`` fits int8. ``frac_bits`` includes the 16
    bits of ``mult`` when the layer uses it. Returns ``(Eo, number of channels clamped)``.
    """
    y = np.asarray(y_float, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y_float must be [T, N], got shape {list(y.shape)}")
    n = y.shape[1]
    ws = np.broadcast_to(np.asarray(w_shift, dtype=np.int64), (n,))
    xe = np.asarray(x_exponent, dtype=np.int64).reshape(-1)
    mo = sfx.check_bits(out_bits, "out_bits") - 1
    if per == "channel":
        e0 = np.asarray(sfx.choose_exponent(y, out_bits, axis=1), dtype=np.int64)
    elif per == "tensor":
        e0 = np.full(n, int(sfx.choose_exponent(y, out_bits)), dtype=np.int64)
    else:
        raise ValueError(f"per must be 'channel' or 'tensor', got {per!r}")
    xmax, xmin = (int(xe.max()), int(xe.min())) if xe.size else (0, 0)
    lo = np.maximum.reduce([ws + mo - frac_bits + xmax, ws - 127, np.full(n, -128)])
    hi = np.minimum.reduce([ws + mo - frac_bits + 63 + xmin, ws + 128, np.full(n, 127)])
    if np.any(lo > hi):
        j = int(np.argmax(lo > hi))
        raise ValueError(
            f"no output exponent keeps the right shift in 0..63 for channel {j} (weight shift {int(ws[j])}, "
            f"activation exponents {xmin}..{xmax}, F={frac_bits}): the per-token exponents span too much")
    if per == "tensor":
        lo_t, hi_t = int(lo.max()), int(hi.min())
        if lo_t > hi_t:
            raise ValueError("no single output exponent keeps every channel's right shift in 0..63; "
                             "use per-channel output exponents")
        e = np.full(n, min(max(int(e0[0]), lo_t), hi_t), dtype=np.int64)
    else:
        e = np.clip(e0, lo, hi)
    return e, int(np.count_nonzero(e != e0))


def quantize_input(x: Any, bits: int, *, mode: str = "dynamic", exponent: int | None = None,
                   rounding: str = "nearest_even") -> tuple[np.ndarray, np.ndarray]:
    """Activations ``[T, K]`` to SF``bits`` codes and one exponent per row (int64 ``[T]``).

    ``mode="dynamic"``: ``Ea[t] = sfx.choose_exponent`` of row ``t`` (what
    :class:`~superfloat.sw.wasq.SFxLinear` does per token); ``"static"``: the calibrated
    ``exponent`` for every row. Codes from ``sfx.encode``.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"x must be [T, K], got shape {list(arr.shape)}")
    if mode == "dynamic":
        e = np.asarray(sfx.choose_exponent(arr, bits, axis=0), dtype=np.int64)
    elif mode == "static":
        if exponent is None:
            raise ValueError("a static activation exponent is needed (the layer is not calibrated)")
        e = np.full(arr.shape[0], int(exponent), dtype=np.int64)
    else:
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    return sfx.encode(arr, bits, e[:, None], rounding), e


def widen_codes(codes: np.ndarray, from_bits: int, to_bits: int) -> np.ndarray:
    """SF``from_bits`` codes as SF``to_bits`` codes of the same values (exact; ``to_bits >= from_bits``)."""
    if to_bits == from_bits:
        return codes
    if to_bits < from_bits:
        raise ValueError(f"cannot narrow SF{from_bits} codes to SF{to_bits} without changing values")
    return sfx.encode(sfx.decode(codes, from_bits), to_bits)


@dataclass
class LayerQuant:
    """One quantized layer of a checkpoint as the accelerator sees it.

    ``exported`` is :meth:`SFxLinear.export` (the stored codes, exponents, scales, bias);
    the activation settings come from the checkpoint, or are SF8 per-token dynamic for a
    weight-only checkpoint (``act_source`` says which)."""

    name: str
    exported: Any
    act_bits: int
    act_mode: str
    act_exponent: int | None
    act_source: str
    rounding: str

    @property
    def bits(self) -> int:
        return int(self.exported.bits)

    @property
    def N(self) -> int:
        return int(self.exported.codes.shape[0])

    @property
    def K(self) -> int:
        return int(self.exported.codes.shape[1])

    @property
    def has_bias(self) -> bool:
        return self.exported.bias is not None

    @property
    def scale_kind(self) -> str:
        return "float" if self.exported.scale is not None else "pow2"

    @classmethod
    def from_module(cls, name: str, module: Any, default_act_bits: int = 8) -> "LayerQuant":
        ex = module.export()
        if module.act_bits is None:
            return cls(name, ex, default_act_bits, "dynamic", None, "weight-only checkpoint: SF"
                       f"{default_act_bits} per-token dynamic activations chosen by cosim", ex.rounding)
        if module.act_exponent == "static":
            e = module.static_act_exponent
            if e is None:
                raise CosimError(f"layer {name}: the checkpoint asks for a static activation exponent but holds no "
                                 f"calibrated value (act_amax); re-quantize with calibration data")
            return cls(name, ex, int(module.act_bits), "static", int(e), "checkpoint", ex.rounding)
        return cls(name, ex, int(module.act_bits), "dynamic", None, "checkpoint", ex.rounding)


@dataclass
class LayerCall:
    """The accelerator operations of one call of a layer, and how to put the output together."""

    layer: LayerQuant
    array: ArrayConfig
    ops: list[Op]
    out_exponent: np.ndarray  # [N]
    x_exponent: np.ndarray  # [T]
    clamped_channels: int
    shape: tuple[int, int, int]  # T, N, K

    def assemble(self, results: Sequence[OpResult], which: str = "codes") -> np.ndarray:
        t, n, _ = self.shape
        out = np.zeros((t, n), dtype=sfx.code_dtype(self.array.out_bits))
        for op, r in zip(self.ops, results):
            out[op.rows_index] = getattr(r, which)
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return sfx.decode(codes, self.array.out_bits, self.out_exponent[None, :])


def layer_ops(lq: LayerQuant, x: Any, y_float: Any, array: ArrayConfig, *, out_exponent: str = "channel") -> LayerCall:
    """The LINEAR operations that compute layer ``lq`` on float inputs ``x`` ``[T, K]`` on ``array``.

    ``y_float`` ``[T, N]`` is the float layer output on the same inputs (it sets the output
    exponents). Codes narrower than the array are widened exactly; wider ones are an error
    (:func:`check_layer_fits`). Every operation is validated by ``sfx.check_linear_args``;
    a problem raises :class:`CosimError` naming the layer.
    """
    ex = lq.exported
    x = np.asarray(x)
    t, k = x.shape
    try:
        xc, ea = quantize_input(x, lq.act_bits, mode=lq.act_mode, exponent=lq.act_exponent, rounding=lq.rounding)
        xc = widen_codes(xc, lq.act_bits, array.a_bits)
        wc = widen_codes(ex.codes, lq.bits, array.w_bits)
        mult, w_shift = weight_scale_params(ex)
        f = (array.a_bits - 1) + (array.w_bits - 1)
        f_eff = f + (sfx.MULT_FRAC_BITS if mult is not None else 0)
        eo, clamped = output_exponent(y_float, array.out_bits, w_shift=w_shift, x_exponent=ea, frac_bits=f_eff,
                                      per=out_exponent)
        shift = w_shift - eo
        groups: list[tuple[np.ndarray, Any]] = []
        if ex.bias is None:
            groups.append((np.arange(t), None))
        else:
            for e in np.unique(ea):
                rows = np.flatnonzero(ea == e)
                groups.append((rows, bias_to_accumulator(ex.bias, frac_bits=f, a_exponent=int(e), w_shift=w_shift,
                                                         mult=mult)))
        ops = []
        for i, (rows, bias) in enumerate(groups):
            args = sfx.check_linear_args(xc[rows], wc, a_bits=array.a_bits, w_bits=array.w_bits,
                                         out_bits=array.out_bits, bias=bias, shift=shift, relu=False,
                                         rounding=lq.rounding, k_max=array.k_max, mult=mult, x_exponent=ea[rows])
            label = lq.name if len(groups) == 1 else f"{lq.name} [Ea={int(ea[rows[0]])}]"
            ops.append(Op(args, array, lq.name, rows, label))
    except (ValueError, TypeError) as e:
        raise CosimError(f"layer {lq.name}: {e}") from None
    return LayerCall(lq, array, ops, eo, ea, clamped, (t, lq.N, k))


# --------------------------------------------------------------------------- preflight


def resolve_array(lq: LayerQuant, *, rows: int, cols: int, k_max: int, simulator: str, a_bits: int | None = None,
                  w_bits: int | None = None, out_bits: int | None = None) -> ArrayConfig:
    """The array that runs layer ``lq``: the given widths, or the layer's own (activations of a
    weight-only checkpoint: 8 bits; output: the activation width). Raises :class:`CosimError`
    when the layer does not fit: codes wider than the array's, ``K > k_max``, ``N`` too large."""
    a = lq.act_bits if a_bits is None else a_bits
    w = lq.bits if w_bits is None else w_bits
    o = a if out_bits is None else out_bits
    try:
        cfg = ArrayConfig(rows=rows, cols=cols, a_bits=a, w_bits=w, out_bits=o, k_max=k_max, simulator=simulator)
        cfg.params()
    except (TypeError, ValueError) as e:
        raise CosimError(f"array: {e}") from None
    if lq.bits > w:
        raise CosimError(
            f"layer {lq.name}: the checkpoint holds SF{lq.bits} weight codes but the array takes SF{w} weights "
            f"(--w-bits {w}): codes wider than the array cannot be streamed; use an array generated with "
            f"--w-bits {lq.bits} (or leave --w-bits out)")
    if lq.act_bits > a:
        raise CosimError(
            f"layer {lq.name}: the checkpoint quantizes activations to SF{lq.act_bits} but the array takes SF{a} "
            f"activations (--a-bits {a}); use an array generated with --a-bits {lq.act_bits} (or leave --a-bits out)")
    if lq.K > k_max:
        raise CosimError(f"layer {lq.name}: K={lq.K} exceeds the array's k_max={k_max} (longest reduction it "
                         f"accepts); use an array generated with --k-max {lq.K} or more")
    from superfloat.hw.interface import TN_BITS

    if lq.N > (1 << TN_BITS) - 1:
        raise CosimError(f"layer {lq.name}: N={lq.N} does not fit the 16-bit command field")
    return cfg


def select_layers(names: Sequence[str], layer: str) -> tuple[list[str], str]:
    """The layer names that ``layer`` selects and its kind: ``"layer"`` (one name), ``"block"``
    (a module prefix: every quantized layer under it), ``"all"``, or ``"layers"`` (several
    comma-separated selections). Unknown names raise :class:`CosimError` listing a few valid ones."""
    names = list(names)
    if layer == "all":
        return names, "all"
    if "," in layer:  # several selections: their union, in model order
        chosen: set[str] = set()
        for part in (p.strip() for p in layer.split(",")):
            if part:
                chosen.update(select_layers(names, part)[0])
        return [n for n in names if n in chosen], "layers"
    if layer in names:
        return [layer], "layer"
    prefix = layer.rstrip(".") + "."
    block = [n for n in names if n.startswith(prefix)]
    if block:
        return block, "block"
    import difflib

    blocks = sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda b: names.index(next(n for n in names
                                                                                          if n.startswith(b + "."))))
    last = layer.rsplit(".", 1)[-1]
    same_last = [n for n in names + blocks if n.rsplit(".", 1)[-1] == last]
    close = difflib.get_close_matches(layer, same_last, n=3, cutoff=0.0) if same_last else \
        difflib.get_close_matches(layer, names + blocks, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CosimError(
        f"no quantized layer or block named {layer!r} in the checkpoint.{hint} Valid layers "
        f"({len(names)} in total) include {', '.join(names[:4])}; blocks include {', '.join(blocks[:3])}; "
        f"or 'all' (sfx cosim --list-layers shows every name)")
