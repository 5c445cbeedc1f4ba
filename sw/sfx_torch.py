"""The torch twin of :mod:`superfloat.sw.sfx` (CPU and CUDA), for WASQ.

Same arithmetic, same codes, same exponents: ``tests/test_sfx_torch.py`` holds every
function here equal to the numpy model, bit for bit. Argument checks raise the same
kinds of errors with the same wording.

Functions:

* :func:`encode` -> int32 tensor of codes (torch has no uint16 arithmetic; use
  ``.numpy().astype(sfx.code_dtype(bits))`` to store them).
* :func:`decode` -> float tensor (float64 by default: exact).
* :func:`fake_quantize` -> ``decode(encode(v))`` in ``v``'s dtype, fused: the SFx
  grid value of every element times ``2**exponent``.
* :func:`choose_exponent` -> int8 tensor (or int for a per-tensor exponent).
* :class:`LinearOp`: the integer datapath (LINEAR of SPEC section 5) of one layer, exact.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import sfx

__all__ = ["encode", "decode", "fake_quantize", "choose_exponent", "encode_rows", "encode_rows_scaled", "default_row_scale", "fold_row_scale", "LinearOp", "MATMULS"]

# Power-of-two scale factors 2**s are normal float32 numbers for s in this range.
_F32_EXP_RANGE = (-126, 127)


def _check_float(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.is_complex():
        raise TypeError(f"{name} must be real, got a complex tensor")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_no_nan(t: torch.Tensor, name: str) -> None:
    mask = torch.isnan(t)
    if bool(mask.any()):
        n = int(mask.sum())
        flat = int(torch.argmax(mask.reshape(-1).to(torch.uint8)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape)) if mask.dim() else ()
        raise ValueError(
            f"{name} contains {n} NaN value(s); the first is at index {idx}. "
            f"SFx has no NaN: clean or mask the input first."
        )


def _exponent_tensor(exponent: Any, device) -> torch.Tensor:
    if isinstance(exponent, torch.Tensor):
        e = exponent
        if e.is_floating_point():
            _check_no_nan(e, "exponent")
            if not bool(torch.all(e == torch.round(e))):
                raise TypeError("exponent must hold integers, got non-integral floats")
        elif e.dtype == torch.bool:
            raise TypeError("exponent must hold integers, got booleans")
        e = e.to(device=device, dtype=torch.int32)
    else:
        e = torch.as_tensor(sfx._check_exponent(exponent), dtype=torch.int32, device=device)
    if e.numel() and (int(e.min()) < sfx.INT8_MIN or int(e.max()) > sfx.INT8_MAX):
        raise ValueError(f"exponent must be in {sfx.INT8_MIN}..{sfx.INT8_MAX} (int8), got values in "
                         f"{int(e.min())}..{int(e.max())}")
    return e


def _scaled(v: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
    """``v * 2**se`` exactly (see sfx._work_dtype for why float32 is exact here)."""
    lo, hi = (int(se.min()), int(se.max())) if se.numel() else (0, 0)
    if v.dtype in (torch.float16, torch.bfloat16, torch.float32) and _F32_EXP_RANGE[0] <= lo and hi <= _F32_EXP_RANGE[1]:
        w = v.to(torch.float32)
        return w * torch.exp2(se.to(torch.float32))
    w = v.to(torch.float64)
    return w * torch.exp2(se.to(torch.float64))


def _round(t: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    lim = float((1 << (bits - 1)) - 1)
    t = torch.clamp(t, -lim, lim)  # saturation; +-inf saturate; clamp-then-round == round-then-clamp
    return torch.round(t) if rounding == "nearest_even" else torch.trunc(t)


def _checked(values: Any, bits: int, exponent: Any, rounding: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The checked arguments of :func:`encode` / :func:`fake_quantize`: ``(bits, values, exponent int32)``."""
    bits = sfx.check_bits(bits)
    sfx.check_rounding(rounding)
    v = _check_float(values, "values")
    _check_no_nan(v, "values")
    return bits, v, _exponent_tensor(exponent, v.device)


def _signed_q(v: torch.Tensor, bits: int, e: torch.Tensor, rounding: str) -> torch.Tensor:
    """Signed integers ``q`` of checked ``v`` at exponents ``e`` (floats, saturated)."""
    return _round(_scaled(v, (bits - 1) - e), bits, rounding)


def encode(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> torch.Tensor:
    """Codes (int32 tensor, on ``values``' device) identical to :func:`superfloat.sw.sfx.encode`."""
    bits, v, e = _checked(values, bits, exponent, rounding)
    return _signed_to_codes(_signed_q(v, bits, e, rounding).to(torch.int32), bits - 1)


def decode(codes: Any, bits: int, exponent: Any = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Values ``(-1)**s * m * 2**(exponent - M)`` (exact in float64)."""
    bits = sfx.check_bits(bits)
    c = codes if isinstance(codes, torch.Tensor) else torch.as_tensor(codes)
    if c.is_floating_point() or c.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor of SF{bits} codes, got {c.dtype}; "
                        f"use encode() to turn floats into codes")
    c = c.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        bad = (c < 0) | (c > (1 << bits) - 1)
        raise ValueError(f"codes must be in [0, {1 << bits}) for SF{bits}: {int(bad.sum())} value(s) are not")
    e = _exponent_tensor(exponent, c.device)
    return (_signed(c, bits).to(torch.float64) * torch.exp2((e - (bits - 1)).to(torch.float64))).to(dtype)


def fake_quantize(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> torch.Tensor:
    """``decode(encode(values))`` in ``values``' dtype: the nearest SFx grid value times ``2**exponent``.

    Fused (no integer codes materialised); differentiable inputs are not tracked
    (wrap with a straight-through estimator for training).
    """
    bits, v, e = _checked(values, bits, exponent, rounding)
    m = bits - 1
    lo, hi = (int(e.min()), int(e.max())) if e.numel() else (0, 0)
    # float32 fast path: 2**(M-E) and its inverse are normal float32 numbers, and every
    # nonzero result q * 2**(E-M) (|q| <= 2**15) is a normal, finite float32: exact.
    if (v.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and m - hi >= -126 and m - lo <= 126 and hi - m + 16 <= 127):
        scale = torch.exp2((m - e).to(torch.float32))
        y = v.to(torch.float32) * scale
        lim = float((1 << m) - 1)
        y.clamp_(-lim, lim)
        y.round_() if rounding == "nearest_even" else y.trunc_()
        y.mul_(scale.reciprocal_())  # exact: 2**(E-M) is a normal float32
        return y.to(v.dtype)
    q = _signed_q(v, bits, e, rounding)
    back = (m - e).to(torch.float64)
    return (q.to(torch.float64) * torch.exp2(-back)).to(v.dtype)


def choose_exponent(values: Any, bits: int, axis: int | None = None, keepdims: bool = False):
    """Same as :func:`superfloat.sw.sfx.choose_exponent`: int for ``axis=None``, else int8 tensor."""
    bits = sfx.check_bits(bits)
    v = _check_float(values, "values")
    _check_no_nan(v, "values")
    a = v.detach().abs()  # abs and max are exact in any float dtype: reduce first, widen after
    if axis is None:
        amax = a.max() if a.numel() else torch.zeros((), dtype=torch.float64, device=v.device)
    else:
        axis = sfx._check_axis(axis, v.dim())
        red = [i for i in range(v.dim()) if i != axis]
        amax = torch.amax(a, dim=red, keepdim=keepdims) if red else a
    e = _exponent_of_amax(amax, bits - 1)
    if axis is None:
        return int(e)
    return e


def _exponent_of_amax(amax: torch.Tensor, m: int) -> torch.Tensor:
    """int8 exponents of section 2's rule from per-slice ``max|v|`` (any float dtype)."""
    amax = amax.to(torch.float64)
    finite = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, torch.finfo(torch.float64).max))
    _, e0 = torch.frexp(finite)
    e0 = e0.to(torch.int32)
    bound = (1.0 - 2.0 ** -m) * torch.exp2(e0.to(torch.float64))
    e = torch.where(finite <= bound, e0, e0 + 1)
    e = torch.where(amax == 0, torch.zeros_like(e), e)
    return torch.clamp(e, sfx.INT8_MIN, sfx.INT8_MAX).to(torch.int8)


# --------------------------------------------------------------------------- integer datapath


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    m = bits - 1
    c = codes.to(torch.int64)
    mag = c & ((1 << m) - 1)
    return torch.where(((c >> m) & 1) == 1, -mag, mag)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


class _TorchOps:
    """The array operations of ``sfx._round_limbs``, for torch tensors."""

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, a, b)

    @staticmethod
    def clip(x, lo, hi):
        return torch.clamp(x, lo, hi)


def _requantize_exact(a: torch.Tensor, r: torch.Tensor, mo: int, relu: bool, rounding: str, mults) -> tuple:
    """Validated int64 ``a``, right shifts ``r`` (0..63) and multipliers: signed saturated ``q``
    and the saturation mask, by the numpy model's limb arithmetic (``sfx._round_limbs``)."""
    hi, lo = sfx._limbs(a)
    for m in mults:
        if m is not None:
            hi, lo = sfx._limbs_mul(hi, lo, m)
    hi, lo, r = torch.broadcast_tensors(hi, lo, r)
    return sfx._round_limbs(hi, lo, r, rounding, mo, relu, _TorchOps)


# --------------------------------------------------------------------------- per-token activations


def _check_rows(x: Any) -> torch.Tensor:
    v = _check_float(x, "x")
    if v.dim() != 2:
        raise ValueError(f"x must be a 2-D [T, K] matrix (one row per token), got shape {list(v.shape)}")
    return v


def _rows_amax(v: torch.Tensor, check: bool) -> torch.Tensor:
    """``max|x[t]|`` per row in ``v``'s dtype (exact), NaN-checked when ``check``."""
    if v.shape[1] == 0:
        return torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    lo, hi = torch.aminmax(v, dim=1)
    amax = torch.maximum(-lo, hi)  # NaN propagates
    if check and bool(torch.isnan(amax).any()):
        _check_no_nan(v, "x")
    return amax


def _signed_to_codes(q: torch.Tensor, m: int) -> torch.Tensor:
    return torch.where(q < 0, (1 << m) - q, q)


def encode_rows(x: Any, bits: int, rounding: str = "nearest_even", *, signed: bool = False,
                check: bool = True, dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activations in one pass, identical to :func:`superfloat.sw.sfx.encode_rows`:
    ``x_exponent[t] = choose_exponent(x[t], bits)`` and ``codes[t] = encode(x[t], bits, x_exponent[t])``.

    Args:
        x: ``[T, K]`` float tensor (float16, bfloat16, float32, float64), any device.
        signed: return the signed integers ``(-1)**s * m`` of the codes instead of the codes
            (what :class:`LinearOp` multiplies; pass them with ``signed=True``), saving a pass.
        check: raise on NaN (one host sync); ``False`` skips the check.
        dtype: of the returned codes / signed integers; a float dtype (exact: ``|q| < 2**15``)
            only with ``signed`` (what :class:`LinearOp`'s float matmuls take, saving passes).

    Returns:
        ``(codes int32 [T, K], x_exponent int8 [T])``, on ``x``'s device.
    """
    if dtype.is_floating_point and not signed:
        raise ValueError("encode_rows: a float dtype holds signed integers only (signed=True); codes are integers")
    bits = sfx.check_bits(bits)
    sfx.check_rounding(rounding)
    v = _check_rows(x)
    m = bits - 1
    e = _exponent_of_amax(_rows_amax(v, check), m)
    se = (m - e.to(torch.int32))[:, None]  # in -112..143
    if v.dtype == torch.float64:
        y = v * torch.exp2(se.to(torch.float64))
    else:
        # float32 is exact here (see sfx._work_dtype): scaling by a power of two, in two normal
        # float32 factors when 2**se is beyond float32 (se > 127: tiny rows; the product only grows).
        s1 = torch.clamp(se, max=_F32_EXP_RANGE[1])
        y = v.to(torch.float32) * torch.exp2(s1.to(torch.float32))
        y = y * torch.exp2((se - s1).to(torch.float32))
    q = _round(y, bits, rounding)
    if signed and dtype.is_floating_point:
        return q.to(dtype).add_(0.0), e  # -0.0 -> +0.0
    q = q.to(torch.int32)
    return (q if signed else _signed_to_codes(q, m)).to(dtype), e


def fold_row_scale(scale: Any, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`superfloat.sw.sfx.fold_row_scale`: per-row float scales to int64
    ``(xmult, xexp)`` with ``xmult * 2**(xexp - 16)`` the scale rounded to 16 significant bits
    (nearest-even), ``2**15 <= xmult < 2**16``. ``check`` validates (positive, finite,
    exponent in int8; host syncs)."""
    s = _check_float(scale, "scale").to(torch.float64)
    if check:
        _check_no_nan(s, "scale")
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            raise ValueError(f"scale must be positive and finite: {int(bad.sum())} value(s) are not, the first "
                             f"{float(s[bad].reshape(-1)[0])!r}")
    f, e = torch.frexp(s)  # s = f * 2**e, f in [0.5, 1)
    mult = torch.round(torch.ldexp(f, torch.tensor(sfx.MULT_FRAC_BITS, device=s.device))).to(torch.int64)
    carry = mult == (1 << sfx.MULT_FRAC_BITS)
    mult = torch.where(carry, torch.full_like(mult, 1 << (sfx.MULT_FRAC_BITS - 1)), mult)
    xexp = e.to(torch.int64) + carry.to(torch.int64)
    if check and xexp.numel() and (int(xexp.min()) < sfx.INT8_MIN or int(xexp.max()) > sfx.INT8_MAX):
        bad = (xexp < sfx.INT8_MIN) | (xexp > sfx.INT8_MAX)
        raise ValueError(f"scale gives an exponent outside int8 ({sfx.INT8_MIN}..{sfx.INT8_MAX}) for "
                         f"{int(bad.sum())} row(s), the first {int(xexp[bad][0])}")
    return mult, xexp


def default_row_scale(x: Any, bits: int, *, check: bool = True) -> torch.Tensor:
    """Same as :func:`superfloat.sw.sfx.default_row_scale`: ``max|x[t]| / (1 - 2**-M)`` (float64,
    1.0 for an all-zero row)."""
    bits = sfx.check_bits(bits)
    v = _check_rows(x)
    s = _rows_amax(v, check).to(torch.float64) / (1.0 - 2.0 ** -(bits - 1))
    return torch.where(s > 0, s, torch.ones_like(s))


def encode_rows_scaled(x: Any, bits: int, scale: Any = None, rounding: str = "nearest_even", *,
                       signed: bool = False, check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`superfloat.sw.sfx.encode_rows_scaled` (SPEC revision 2): ``(xmult, xexp) =
    fold_row_scale(scale)``, ``codes[t] = encode(x[t] / s[t], bits)`` with ``s[t] = xmult[t] *
    2**(xexp[t] - 16)``, the division in float64. ``scale`` defaults to :func:`default_row_scale`.

    Returns ``(codes int32 [T, K] (signed integers if ``signed``), xexp int64 [T], xmult int64 [T])``."""
    bits = sfx.check_bits(bits)
    sfx.check_rounding(rounding)
    v = _check_rows(x)
    if scale is None:
        scale = default_row_scale(v, bits, check=check)
    sc = _check_float(scale, "scale").to(device=v.device)
    if tuple(sc.shape) != (v.shape[0],):
        raise ValueError(f"scale must have shape [{v.shape[0]}] (one per row of x), got {list(sc.shape)}")
    xm, xe = fold_row_scale(sc, check=check)
    s = torch.ldexp(xm.to(torch.float64), xe - sfx.MULT_FRAC_BITS)
    if check:
        _check_no_nan(v, "x")
    m = bits - 1
    y = (v.to(torch.float64) / s[:, None]) * float(1 << m)  # exact scaling of the float64 quotient
    q = _round(y, bits, rounding).to(torch.int32)
    return (q if signed else _signed_to_codes(q, m)), xe, xm


# --------------------------------------------------------------------------- prepared LINEAR

MATMULS = ("auto", "int8", "float32", "float64")
_INT8_DIGIT_BOUND = 128 * 128  # |d_x * d_w| for int8 digits in [-128, 127]


def _digits(v: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Balanced base-256 digits of signed integers: ``v == sum_i d_i * 256**i``, each ``d_i``
    in [-128, 127] (the last one as well when ``n`` is large enough for ``v``'s range)."""
    out = []
    for i in range(n):
        if i == n - 1:
            out.append(v.to(torch.int8))
        else:
            d = ((v + 128) & 255) - 128
            out.append(d.to(torch.int8))
            v = (v - d) >> 8
    return out


def _packed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides exactly (``torch._int_mm`` on CPU misreads the degenerate
    strides that ``.contiguous()`` keeps on size-1 dimensions, e.g. ``(1, 1)`` for ``[1, N]``)."""
    want = (t.shape[1], 1) if t.dim() == 2 else None
    return t if tuple(t.stride()) == want else t.clone(memory_format=torch.contiguous_format)


def _n_digits(bits: int) -> int:
    """int8 digits that hold a signed SF``bits`` magnitude (|v| <= 2**(bits-1) - 1)."""
    return 1 if bits <= 8 else (2 if bits <= 15 else 3)


def _float_digit_bounds(bits: int, n: int, b: int) -> int:
    """The largest ``|digit|`` of :func:`_float_digits` over every signed SF``bits`` value."""
    v = float(sfx.max_magnitude(bits))
    ext = torch.tensor([-v, v], dtype=torch.float64)
    return max(int(d.abs().max()) for d in _float_digits(ext, n, b))


def _float_digits(v: torch.Tensor, n: int, b: int) -> list[torch.Tensor]:
    """Base-``2**b`` digits of signed integers held in a float tensor, ``v == sum_i d_i * 2**(b*i)``:
    ``d_top = round(v / 2**((n-1)*b))``... computed low digit first, each lower digit
    ``v - 2**b * round(v / 2**b)`` in ``[-2**(b-1), 2**(b-1)]`` (ties to even). Every step is
    exact in the float dtype (power-of-two scalings and differences of integers below 2**24)."""
    if n == 1:
        return [v]
    out = []
    for _ in range(n - 1):
        hi = torch.round(v * (2.0 ** -b))
        out.append(v - hi * (2.0 ** b))
        v = hi
    out.append(v)
    return out


def _combine_digits(p: torch.Tensor, t: int, n: int, da: int, dw: int, b: int) -> torch.Tensor:
    """``sum_ij p[i*t:(i+1)*t, j*n:(j+1)*n] * 2**(b*(i+j))`` of a digit-product matmul (float64, exact)."""
    acc = p[:t, :n].clone()
    for i in range(da):
        for j in range(dw):
            if i or j:
                acc.add_(p[i * t:(i + 1) * t, j * n:(j + 1) * n], alpha=float(1 << (b * (i + j))))
    return acc


def _float_plan(a_bits: int, w_bits: int, maxw: int, k: int, dt: torch.dtype) -> tuple[int, int, int, int, float]:
    """``(digits of x, digits of w, digit bits, K-chunk, cost)`` of an exact float matmul: every partial
    sum of a chunk stays below the float's exact-integer limit (``2**24`` / ``2**53``), so BLAS
    gives exact integers whatever its summation order. Picks the cheapest split (digits x chunks)."""
    limit = 1 << (24 if dt == torch.float32 else 53)
    best = None
    for da in (1, 2, 3):
        for dw in (1, 2, 3):
            ba = max(1, -(-(a_bits) // da)) if da > 1 else 0
            bw = max(1, -(-(w_bits) // dw)) if dw > 1 else 0
            if da > 1 and dw > 1 and ba != bw:
                continue  # one base for both operands' digits
            b = max(ba, bw)
            ma = _float_digit_bounds(a_bits, da, b) if da > 1 else sfx.max_magnitude(a_bits)
            mw = min(maxw, _float_digit_bounds(w_bits, dw, b)) if dw > 1 else maxw
            chunk = (limit - 1) // max(1, ma * mw)
            if chunk < 1:
                continue
            cost = da * dw * (-(-k // chunk) if k else 1) + 0.01 * (da + dw)
            if best is None or cost < best[0]:
                best = (cost, da, dw, b, max(1, min(chunk, max(k, 1))))
    if best is None:  # unreachable for bits <= 16
        raise ValueError(f"no exact float matmul for SF{a_bits} x SF{w_bits}")
    return best[1], best[2], best[3], best[4], best[0]


class LinearOp:
    """LINEAR (SPEC section 5) for a fixed layer, prepared once, exact, vectorised in torch.

    ``op(x_codes, x_exponent, xmult)`` returns exactly :func:`superfloat.sw.sfx.linear`'s codes
    (as int32) and saturation count for every legal parameter, batched over the ``T`` rows.
    All layer parameters are validated at construction by the numpy model's checks
    (:func:`superfloat.sw.sfx.check_linear_args`, same messages); a call validates only the
    per-row inputs, and ``check=False`` skips even that (no host synchronisation at all).

    How it stays exact and fast:

    * matmul (``matmul="auto"`` picks): ``"int8"``: ``torch._int_mm`` on balanced base-256
      int8 digits of the signed operands (1 digit up to SF8, 2 up to SF15, 3 for SF16),
      digit products stacked into one call, int32 partial sums over K-chunks of at most
      131071 (``|sum| < 2**31``), combined in int64; ``"float32"``/``"float64"``: BLAS on
      K-chunks whose partial sums stay below ``2**24`` / ``2**53`` (every float operation is
      then exact whatever the summation order), chunks summed in integers. ``auto`` is int8
      on CUDA for up to 4 digit products, else float32 when a chunk holds at least 256 terms
      (and TF32 is off on CUDA) and needs at most 1.5x the passes of float64, else float64.
    * requantization: ``"float64"`` when ``|(acc + bias) * mult * xmult| < 2**53`` for these
      weights (bound from the actual weight codes): the scaling by ``mult * 2**-r`` and the
      row's ``xmult * 2**xexp`` are exact float64 products, ``torch.round`` rounds half to even;
      ``"int64"`` when the product stays below ``2**61``: integer shifts with the rounding
      offsets of section 4; otherwise ``"limbs"``: the numpy model's two-limb arithmetic
      (``sfx._round_limbs``), exact for every width.

    Args (keyword-only after ``w_codes``):
        w_codes: ``[N, K]`` SF``w_bits`` weight codes (numpy or torch).
        w_bits, a_bits, out_bits: widths (2..16).
        bias: accumulator units, scalar or ``[N]`` (``|bias| < 2**(A-2)``), or None.
        shift: int8, scalar or ``[N]`` (``w_shift - Eo`` of SPEC section 8).
        mult: optional 16-bit multiplier per channel.
        relu, rounding, k_max: as in :func:`superfloat.sw.sfx.linear`.
        xmult: ``True`` for the per-row multiplier mode (SPEC revision 2): every call then
            needs ``xmult``; ``False`` (default) forbids it.
        row_bias: ``True`` lets each call pass its own ``bias`` (accumulator units, checked
            by :meth:`check_bias`): the accumulator's unit depends on the rows' activation
            exponent, so a layer with a float bias is one operation per exponent. The
            exactness bounds then assume any legal bias (``|bias| < 2**(A-2)``).
        device: where the prepared weights live (default: ``w_codes``' device, or CPU).
        matmul: one of :data:`MATMULS`.

    Attributes: ``x_exponent_range`` (the ``(lo, hi)`` per-row exponents for which every
    right shift is in 0..63), ``matmul``, ``requant`` (the chosen strategies), ``N``, ``K``.
    """

    def __init__(self, w_codes: Any, *, w_bits: int, a_bits: int, out_bits: int, bias: Any = None,
                 shift: Any = 0, mult: Any = None, relu: bool = False, rounding: str = "nearest_even",
                 k_max: int = sfx.DEFAULT_K_MAX, xmult: bool = False, device: Any = None,
                 matmul: str = "auto", row_bias: bool = False) -> None:
        if not isinstance(xmult, bool):
            raise TypeError(f"xmult must be a bool (the per-row multiplier mode), got {xmult!r}")
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {', '.join(map(repr, MATMULS))}, got {matmul!r}")
        a_bits = sfx.check_bits(a_bits, "a_bits")
        w_bits = sfx.check_bits(w_bits, "w_bits")
        out_bits = sfx.check_bits(out_bits, "out_bits")
        w_np = sfx._check_matrix(_np(w_codes), w_bits, "w_codes")
        n, k = w_np.shape
        sh = sfx._broadcast_channel(_np(shift), n, "shift", sfx.INT8_MIN, sfx.INT8_MAX)
        mo = out_bits - 1
        f = a_bits - 1 + w_bits - 1 + sfx.MULT_FRAC_BITS * ((mult is not None) + xmult)
        rn = f - mo - sh  # r[t, n] = rn[n] - x_exponent[t]
        lo = max(int(rn.max()) - sfx.MAX_RIGHT_SHIFT, sfx.INT8_MIN)
        hi = min(int(rn.min()), sfx.INT8_MAX)
        probe = min(max(0, lo), hi) if lo <= hi else 0  # an empty range fails at 0 with the model's message
        args = sfx.check_linear_args(np.zeros((1, k), dtype=np.uint8), w_np, a_bits=a_bits, w_bits=w_bits,
                                     out_bits=out_bits, bias=_np(bias), shift=sh, relu=relu, rounding=rounding,
                                     k_max=k_max, mult=_np(mult), x_exponent=probe,
                                     xmult=(1 << 15) if xmult else None)
        if device is None:
            device = w_codes.device if isinstance(w_codes, torch.Tensor) else torch.device("cpu")
        dev = torch.device(device)
        self._dev = dev
        self.a_bits, self.w_bits, self.out_bits = a_bits, w_bits, out_bits
        self.relu, self.rounding, self.k_max = bool(relu), rounding, args.k_max
        self.uses_mult, self.uses_xmult = args.mult is not None, xmult
        self.N, self.K = n, k
        self.x_exponent_range = (lo, hi)
        self._mo, self._lim = mo, (1 << mo) - 1
        self._rn = torch.as_tensor(rn, dtype=torch.int64, device=dev)

        # ---- bounds (exact Python integers) from the actual weights
        ws_np = sfx._signed_from_codes(w_np.astype(np.int64), w_bits)  # [N, K] signed
        amax_a = sfx.max_magnitude(a_bits)
        row_abs = np.abs(ws_np).sum(axis=1)  # int64, < 2**35
        mult_np = args.mult if args.mult is not None else np.ones(n, dtype=np.int64)
        self.row_bias = bool(row_bias)
        self._blim = (1 << (sfx.accumulator_bits(a_bits, w_bits, args.k_max) - 2)) - 1
        bias_abs = [self._blim if row_bias else abs(int(args.bias[i])) for i in range(n)]
        acc_bound = max((int(row_abs[i]) * amax_a + bias_abs[i]) for i in range(n))
        v_bound = max((int(row_abs[i]) * amax_a + bias_abs[i]) * int(mult_np[i]) for i in range(n))
        if xmult:
            v_bound *= (1 << sfx.MULT_FRAC_BITS) - 1
        self._acc_bound = acc_bound
        self.requant = "float64" if v_bound < 1 << 53 else ("int64" if v_bound < 1 << 61 else "limbs")

        # ---- matmul plan
        maxw = int(np.abs(ws_np).max()) if ws_np.size else 0
        da, dw = _n_digits(a_bits), _n_digits(w_bits)
        if matmul == "auto":
            matmul = "int8" if dev.type == "cuda" and hasattr(torch, "_int_mm") and da * dw <= 4 else None
            if matmul is None:  # float64 BLAS costs about 2x float32 per product on CPU, and
                # splitting into digits adds passes: one float64 matmul beats two float32 ones
                # (SF16 x SF8 on one CPU thread; the eval times are in results/accelerator.md)
                c32 = _float_plan(a_bits, w_bits, maxw, k, torch.float32)[4]
                c64 = _float_plan(a_bits, w_bits, maxw, k, torch.float64)[4]
                matmul = "float32" if _float32_exact(max(a_bits, w_bits), dev) and c32 <= 1.5 * c64 else "float64"
        self.matmul = matmul
        ws = torch.as_tensor(ws_np, device=dev)
        if matmul == "int8":
            self._da, self._dw = da, dw
            self._chunk = (2 ** 31 - 1) // _INT8_DIGIT_BOUND
            wd = torch.cat(_digits(ws, dw), dim=0).t()  # [K, dw*N] int8
            self._w = [_packed(wd[s:s + self._chunk]) for s in range(0, k, self._chunk)]
        else:
            dt = torch.float32 if matmul == "float32" else torch.float64
            self._dtype = dt
            self._da, self._dw, self._base, self._chunk, _ = _float_plan(a_bits, w_bits, maxw, k, dt)
            wf = ws.to(dt)
            wd = torch.cat(_float_digits(wf, self._dw, self._base), dim=0) if self._dw > 1 else wf  # [dw*N, K]
            self._w = [wd[:, s:s + self._chunk].to(dt).contiguous() for s in range(0, k, self._chunk)]
        self._nchunks = len(self._w)
        # partial sums combine in int32 when the whole accumulator fits
        self._acc32 = acc_bound < (1 << 31)

        # ---- requantization constants
        self._bias = torch.as_tensor(args.bias, dtype=torch.int64, device=dev)
        self._mult = None if args.mult is None else torch.as_tensor(args.mult, dtype=torch.int64, device=dev)
        if self.requant == "float64":
            scale = np.ldexp(mult_np.astype(np.float64), (-rn).astype(np.int32))  # mult * 2**-rn, exact
            self._s = torch.as_tensor(scale, dtype=torch.float64, device=dev)
            self._b = torch.as_tensor(args.bias.astype(np.float64) * scale, dtype=torch.float64, device=dev)  # exact
        elif self.requant == "int64":
            m2 = 2 * mult_np if self.rounding == "nearest_even" else mult_np  # 2v for the rounding offsets
            self._m2 = torch.as_tensor(m2, dtype=torch.int64, device=dev)

    @property
    def device(self) -> torch.device:
        return self._dev

    # ------------------------------------------------------------------ per call

    def _check_inputs(self, x: torch.Tensor, signed: bool, xe: torch.Tensor | None, xm: torch.Tensor | None):
        if (x.is_floating_point() and not signed) or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x_codes must be an integer tensor of SF{self.a_bits} codes, got {x.dtype}; "
                            f"use encode_rows() to turn floats into codes")
        if x.is_floating_point() and not bool(torch.all(x == torch.round(x))):
            raise ValueError("x_codes (signed=True, a float tensor) must hold integers")
        if x.numel():
            lo, hi = (-self._amax_a(), self._amax_a()) if signed else (0, (1 << self.a_bits) - 1)
            mn, mx = int(x.min()), int(x.max())
            if mn < lo or mx > hi:
                what = "signed SF{} values".format(self.a_bits) if signed else f"SF{self.a_bits} codes"
                raise ValueError(f"x_codes must hold {what} in {lo}..{hi}, got values in {mn}..{mx}")
        if xe is not None and xe.numel():
            lo, hi = self.x_exponent_range
            mn, mx = int(xe.min()), int(xe.max())
            if mn < lo or mx > hi:
                raise ValueError(
                    f"x_exponent must be in {lo}..{hi} for this layer (right shift r = rn[n] - x_exponent[t] in "
                    f"0..{sfx.MAX_RIGHT_SHIFT}), got values in {mn}..{mx}")
        if xm is not None and xm.numel():
            mn, mx = int(xm.min()), int(xm.max())
            if mn < 1 or mx > (1 << sfx.MULT_FRAC_BITS) - 1:
                raise ValueError(f"xmult must be in 1..{(1 << sfx.MULT_FRAC_BITS) - 1}, got values in {mn}..{mx}")

    def _amax_a(self) -> int:
        return (1 << (self.a_bits - 1)) - 1

    def _row(self, v: Any, t: int, name: str) -> torch.Tensor:
        r = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        if r.is_floating_point() or r.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {r.dtype}")
        r = r.to(device=self._dev, dtype=torch.int64)
        if r.dim() == 0:
            r = r.expand(t)
        if tuple(r.shape) != (t,):
            raise ValueError(f"{name} must be a scalar or have shape [{t}] (one per activation row), "
                             f"got {list(r.shape)}")
        return r

    def check_bias(self, bias: Any) -> torch.Tensor:
        """A per-call bias (``row_bias=True``): ``[N]`` or scalar accumulator units, range-checked
        (``|bias| < 2**(A-2)``, the numpy model's message), as an int64 tensor on the layer's device."""
        b = sfx._broadcast_channel(_np(bias), self.N, "bias", -self._blim, self._blim)
        return torch.as_tensor(b, dtype=torch.int64, device=self._dev)

    def __call__(self, x_codes: torch.Tensor, x_exponent: Any = None, xmult: Any = None, *,
                 signed: bool = False, check: bool = True, bias: Any = None, out: str = "codes",
                 out_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes int32 [T, N], n_saturated int64 0-d tensor)`` of LINEAR on ``x_codes`` ``[T, K]``.

        Args:
            x_codes: SF``a_bits`` codes (any integer dtype), or with ``signed=True`` their signed
                integers (``encode_rows(..., signed=True)``), on the layer's device.
            x_exponent: int per row (``[T]`` or scalar; default 0), added to ``shift``.
            xmult: ``[T]`` 16-bit multipliers, required in ``xmult`` mode, else must be None.
            check: validate codes and row parameters (host syncs); ``False`` trusts the caller.
            bias: this call's bias (``row_bias=True`` only), preferably from :meth:`check_bias`.
            out: ``"codes"`` (the SF``out_bits`` codes), ``"signed"`` (their signed integers
                ``(-1)**s * m``, int32) or ``"values"``: the signed integers times ``out_scale``
                (a float tensor ``[N]``, e.g. ``2**(Eo - Mo)`` to decode them), in its dtype.
        """
        if out not in ("codes", "signed", "values"):
            raise ValueError(f"out must be 'codes', 'signed' or 'values', got {out!r}")
        if (out == "values") != (out_scale is not None):
            raise ValueError("out='values' needs out_scale (a float tensor [N]), and only it takes one")
        if not isinstance(x_codes, torch.Tensor):
            x_codes = torch.as_tensor(x_codes)
        if x_codes.dim() != 2 or x_codes.shape[1] != self.K:
            raise ValueError(f"x_codes must be [T, K={self.K}] (w_codes is [N={self.N}, K={self.K}]), "
                             f"got {list(x_codes.shape)}")
        if x_codes.device != self._dev:
            raise ValueError(f"x_codes is on {x_codes.device} but the layer is on {self._dev}")
        t = x_codes.shape[0]
        if self.uses_xmult and xmult is None:
            raise ValueError("this LinearOp was built with xmult=True: pass xmult (one per activation row)")
        if not self.uses_xmult and xmult is not None:
            raise ValueError("xmult given but this LinearOp was built with xmult=False (build it with xmult=True)")
        xe = None if x_exponent is None else self._row(x_exponent, t, "x_exponent")
        xm = None if xmult is None else self._row(xmult, t, "xmult")
        if bias is not None:
            if not self.row_bias:
                raise ValueError("bias given to a call but this LinearOp was built with row_bias=False "
                                 "(the bias is fixed at construction; build it with row_bias=True)")
            if not (isinstance(bias, torch.Tensor) and bias.dtype == torch.int64 and tuple(bias.shape) == (self.N,)
                    and bias.device == self._dev) or check:
                bias = self.check_bias(bias)
        if check:
            self._check_inputs(x_codes, signed, xe if xe is not None else torch.zeros(1, dtype=torch.int64), xm)
        xs = x_codes if signed and x_codes.is_floating_point() and self.matmul != "int8" else x_codes.to(torch.int32)
        if not signed:
            m = self.a_bits - 1
            mag = xs & ((1 << m) - 1)
            xs = torch.where((xs >> m) != 0, -mag, mag)
        q, nsat = self._requantize(self._matmul(xs), xe, xm, bias)
        if out == "codes":
            return _signed_to_codes(q, self._mo).to(torch.int32), nsat
        if out == "signed":
            return q.to(torch.int32), nsat
        y = q.to(out_scale.dtype).mul_(out_scale[None, :])
        return (y.add_(0.0) if y.is_floating_point() else y), nsat  # -0.0 (a rounded tiny negative) -> +0.0

    def _matmul(self, xs: torch.Tensor) -> torch.Tensor:
        """Exact ``sum_k x[t,k] w[n,k]`` (no bias): an int32/int64 tensor, or a float tensor of
        exact integers when a single float chunk was enough."""
        t, k, n = xs.shape[0], self.K, self.N
        outs = []
        if self.matmul == "int8":
            xd = torch.cat(_digits(xs, self._da), dim=0) if self._da > 1 else xs.to(torch.int8)
            for c, wc in enumerate(self._w):
                s, e = c * self._chunk, min(k, (c + 1) * self._chunk)
                p = torch._int_mm(_packed(xd[:, s:e] if self._nchunks > 1 else xd), wc)
                if self._da * self._dw > 1:
                    p64 = torch.zeros((t, n), dtype=torch.int64, device=xs.device)
                    for i in range(self._da):
                        for j in range(self._dw):
                            blk = p[i * t:(i + 1) * t, j * n:(j + 1) * n]
                            p64 += blk.to(torch.int64) << (8 * (i + j))
                    p = p64
                outs.append(p)
        else:
            if self.matmul == "float32" and not _float32_exact(max(self.a_bits, self.w_bits), self._dev):
                raise RuntimeError(
                    "float32 matmuls run in reduced precision (torch.set_float32_matmul_precision / "
                    "torch.backends.cuda.matmul.allow_tf32): the float32 LinearOp path is not exact for "
                    f"SF{max(self.a_bits, self.w_bits)} operands; restore 'highest' or build with matmul='float64'")
            da, dw = self._da, self._dw
            xf = xs.to(self._dtype)
            if da > 1:
                xf = torch.cat(_float_digits(xf, da, self._base), dim=0)
            # one exact float matmul per K-chunk; chunks (and digits) combine in float64, exactly:
            # every partial sum is an integer below 2**53 (|acc| < 2**45, digits are balanced)
            acc = None
            for c, wc in enumerate(self._w):
                s, e = c * self._chunk, min(k, (c + 1) * self._chunk)
                p = torch.nn.functional.linear(xf[:, s:e] if self._nchunks > 1 else xf, wc)
                if da * dw > 1 or self._nchunks > 1:
                    p = p.to(torch.float64)
                if da * dw > 1:
                    p = _combine_digits(p, t, n, da, dw, self._base)
                acc = p if acc is None else acc.add_(p)
            return acc
        if len(outs) == 1:
            return outs[0]
        it = torch.int32 if self._acc32 else torch.int64
        acc = outs[0].to(it)
        for p in outs[1:]:
            acc += p.to(it)
        return acc

    def _requantize(self, acc: torch.Tensor, xe: torch.Tensor | None, xm: torch.Tensor | None,
                    bias: torch.Tensor | None = None):
        lim, mo = self._lim, self._mo
        ibias = self._bias if bias is None else bias
        if self.requant == "float64":
            fb = self._b if bias is None else bias.to(torch.float64) * self._s  # exact: |bias * mult| < 2**53
            y = torch.addcmul(fb, acc.to(torch.float64), self._s)  # (acc + bias) * mult * 2**-rn, exact
            if xe is not None or xm is not None:
                rowf = torch.exp2(xe.to(torch.float64)) if xe is not None else None
                if xm is not None:
                    rowf = xm.to(torch.float64) if rowf is None else rowf * xm.to(torch.float64)
                y.mul_(rowf[:, None])
            y.clamp_(0.0 if self.relu else -(lim + 1.0), lim + 1.0)  # ReLU; saturation keeps the sign
            y.round_() if self.rounding == "nearest_even" else y.trunc_()
            q = y
        elif self.requant == "int64":
            v = acc.to(torch.int64) + ibias
            v.mul_(self._m2)
            if xm is not None:
                v.mul_(xm[:, None])
            if self.relu:
                v.clamp_(min=0)
            r = self._rn if xe is None else self._rn[None, :] - xe[:, None]
            # |value| < 2**61: a right shift of 63 gives 0 exactly as 62 does (|value| / 2**62 < 1/2)
            r = torch.clamp(r, max=62)
            if self.rounding == "nearest_even":
                # v holds 2 * value (< 2**62): q = (v + 2**r - 1 + bit_(r+1)(v)) >> (r + 1), ties to even
                r1 = r + 1
                q = ((v + ((v >> r1) & 1)) + ((1 << r) - 1)) >> r1
            else:
                q = (v + ((v >> 63) & ((1 << r) - 1))) >> r
            q = q.clamp_(-(lim + 1), lim + 1)
        else:
            v = acc.to(torch.int64) + ibias
            r = self._rn if xe is None else self._rn[None, :] - xe[:, None]
            mults = [None if self._mult is None else self._mult, None if xm is None else xm[:, None]]
            q, sat = _requantize_exact(v, r, mo, self.relu, self.rounding, mults)
            return q, sat.sum()
        # q is rounded and clamped to +-(lim + 1): saturated exactly where |q| > lim
        nsat = (q.abs() > lim).sum()
        return q.clamp_(-lim, lim), nsat


def _float32_exact(bits: int, dev: torch.device) -> bool:
    """Whether float32 matmuls multiply SF``bits`` signed integers exactly: always at full
    float32 precision; with TF32 (10 fraction bits) up to SF12, bfloat16 inputs up to SF9."""
    reduced = torch.get_float32_matmul_precision() != "highest"
    if dev.type == "cuda":
        reduced = reduced or bool(torch.backends.cuda.matmul.allow_tf32)
    return not reduced or bits <= 9
