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
* :func:`matmul_acc`, :func:`requantize`, :func:`linear`: the integer datapath.
"""
from __future__ import annotations

from typing import Any

import torch

from . import sfx

__all__ = ["encode", "decode", "fake_quantize", "choose_exponent", "matmul_acc", "requantize", "linear"]

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


def _signed_q(values: Any, bits: int, exponent: Any, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    bits = sfx.check_bits(bits)
    sfx.check_rounding(rounding)
    v = _check_float(values, "values")
    _check_no_nan(v, "values")
    e = _exponent_tensor(exponent, v.device)
    se = (bits - 1) - e
    return _round(_scaled(v, se), bits, rounding), e


def encode(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> torch.Tensor:
    """Codes (int32 tensor, on ``values``' device) identical to :func:`superfloat.sw.sfx.encode`."""
    q, _ = _signed_q(values, bits, exponent, rounding)
    qi = q.to(torch.int32)
    m = bits - 1
    return torch.where(qi < 0, (1 << m) | -qi, qi)


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
    m = bits - 1
    mag = c & ((1 << m) - 1)
    signed = torch.where(((c >> m) & 1) == 1, -mag, mag)
    e = _exponent_tensor(exponent, c.device)
    return (signed.to(torch.float64) * torch.exp2((e - m).to(torch.float64))).to(dtype)


def fake_quantize(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> torch.Tensor:
    """``decode(encode(values))`` in ``values``' dtype: the nearest SFx grid value times ``2**exponent``.

    Fused (no integer codes materialised); differentiable inputs are not tracked
    (wrap with a straight-through estimator for training).
    """
    bits = sfx.check_bits(bits)
    sfx.check_rounding(rounding)
    v = _check_float(values, "values")
    _check_no_nan(v, "values")
    e = _exponent_tensor(exponent, v.device)
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
    q, e = _signed_q(v, bits, e, rounding)
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
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        if not -v.dim() <= axis < v.dim():
            raise ValueError(f"axis {axis} is out of range for values with {v.dim()} dimension(s)")
        axis = axis % v.dim()
        red = [i for i in range(v.dim()) if i != axis]
        amax = torch.amax(a, dim=red, keepdim=keepdims) if red else a
    amax = amax.to(torch.float64)
    m = bits - 1
    finite = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, torch.finfo(torch.float64).max))
    _, e0 = torch.frexp(finite)
    e0 = e0.to(torch.int32)
    bound = (1.0 - 2.0 ** -m) * torch.exp2(e0.to(torch.float64))
    e = torch.where(finite <= bound, e0, e0 + 1)
    e = torch.where(amax == 0, torch.zeros_like(e), e)
    e = torch.clamp(e, sfx.INT8_MIN, sfx.INT8_MAX).to(torch.int8)
    if axis is None:
        return int(e)
    return e


# --------------------------------------------------------------------------- integer datapath


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    m = bits - 1
    c = codes.to(torch.int64)
    mag = c & ((1 << m) - 1)
    return torch.where(((c >> m) & 1) == 1, -mag, mag)


def _as_long(x: Any, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int64)
    return torch.as_tensor(x, dtype=torch.int64, device=device)


def matmul_acc(x_codes: torch.Tensor, w_codes: torch.Tensor, *, a_bits: int, w_bits: int, bias: Any = None,
               k_max: int = sfx.DEFAULT_K_MAX) -> torch.Tensor:
    """Exact int64 accumulators ``[T, N]``; arguments checked by the numpy model's rules."""
    dev = x_codes.device if isinstance(x_codes, torch.Tensor) else torch.device("cpu")
    # Validation (shapes, code ranges, K, bias range) uses the numpy model's checks and messages.
    _validate_acc(x_codes, w_codes, a_bits, w_bits, bias, k_max)
    xs = _signed(_as_long(x_codes, dev), a_bits).to(torch.float64)
    ws = _signed(_as_long(w_codes, dev), w_bits).to(torch.float64)
    maxp = sfx.max_magnitude(a_bits) * sfx.max_magnitude(w_bits)
    k = xs.shape[1]
    chunk = max(1, (1 << 53) // max(maxp, 1) - 1)
    acc = torch.zeros((xs.shape[0], ws.shape[0]), dtype=torch.int64, device=dev)
    for s in range(0, k, chunk):
        acc += (xs[:, s:s + chunk] @ ws[:, s:s + chunk].T).to(torch.int64)
    if bias is not None:
        b = _as_long(bias, dev)
        acc = acc + (b.reshape(1, -1) if b.dim() else b)
    return acc


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _validate_acc(x_codes, w_codes, a_bits, w_bits, bias, k_max):
    x = sfx._check_matrix(_np(x_codes), sfx.check_bits(a_bits, "a_bits"), "x_codes")
    w = sfx._check_matrix(_np(w_codes), sfx.check_bits(w_bits, "w_bits"), "w_codes")
    k_max = sfx._check_k_max(k_max)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x_codes is [T={x.shape[0]}, K={x.shape[1]}] but w_codes is [N={w.shape[0]}, "
                         f"K={w.shape[1]}]: the K dimensions differ")
    if x.shape[1] > k_max:
        raise ValueError(f"K={x.shape[1]} exceeds k_max={k_max}: split the reduction or raise k_max")
    if bias is not None:
        a = sfx.accumulator_bits(a_bits, w_bits, k_max)
        blim = (1 << (a - 2)) - 1
        sfx._broadcast_channel(_np(bias), w.shape[0], "bias", -blim, blim)


def requantize(acc: torch.Tensor, *, frac_bits: int, shift: Any = 0, out_bits: int, relu: bool = False,
               rounding: str = "nearest_even", mult: Any = None) -> tuple[torch.Tensor, int]:
    """Same as :func:`superfloat.sw.sfx.requantize`; codes as an int32 tensor."""
    out_bits = sfx.check_bits(out_bits, "out_bits")
    sfx.check_rounding(rounding)
    dev = acc.device
    a = acc.to(torch.int64)
    sh = _as_long(shift, dev)
    f = int(frac_bits)
    if mult is not None:
        mu = _as_long(mult, dev)
        if mu.numel() and (int(mu.min()) < 1 or int(mu.max()) >= 1 << sfx.MULT_FRAC_BITS):
            raise ValueError(f"mult must be in 1..{(1 << sfx.MULT_FRAC_BITS) - 1}")
        a = a * mu
        f += sfx.MULT_FRAC_BITS
    mo = out_bits - 1
    r = f - mo - sh
    if r.numel() and (int(r.min()) < 0 or int(r.max()) > sfx.MAX_RIGHT_SHIFT):
        raise ValueError(f"right shift r = frac_bits - (out_bits - 1) - shift is outside 0..{sfx.MAX_RIGHT_SHIFT}")
    if relu:
        a = torch.clamp(a, min=0)
    a, r = torch.broadcast_tensors(a, r)
    if rounding == "nearest_even":
        q = a >> r
        rem = a - (q << r)
        half = torch.where(r > 0, torch.ones_like(r) << torch.clamp(r - 1, min=0), torch.zeros_like(r))
        up = (r > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
        q = q + up.to(torch.int64)
    else:
        q = torch.sign(a) * (torch.abs(a) >> r)
    lim = (1 << mo) - 1
    nsat = int(((q > lim) | (q < -lim)).sum())
    q = torch.clamp(q, -lim, lim)
    codes = torch.where(q < 0, (1 << mo) | -q, q).to(torch.int32)
    return codes, nsat


def linear(x_codes: torch.Tensor, w_codes: torch.Tensor, *, a_bits: int, w_bits: int, out_bits: int,
           bias: Any = None, shift: Any = 0, relu: bool = False, rounding: str = "nearest_even",
           k_max: int = sfx.DEFAULT_K_MAX, mult: Any = None, x_exponent: Any = None) -> torch.Tensor:
    """Same as :func:`superfloat.sw.sfx.linear` (validated by the same checks); int32 codes."""
    args = sfx.check_linear_args(_np(x_codes), _np(w_codes), a_bits=a_bits, w_bits=w_bits, out_bits=out_bits,
                                 bias=_np(bias), shift=_np(shift), relu=relu, rounding=rounding, k_max=k_max,
                                 mult=_np(mult), x_exponent=_np(x_exponent))
    dev = x_codes.device if isinstance(x_codes, torch.Tensor) else torch.device("cpu")
    acc = matmul_acc(_as_long(x_codes, dev), _as_long(w_codes, dev), a_bits=a_bits, w_bits=w_bits,
                     bias=torch.as_tensor(args.bias, device=dev), k_max=k_max)
    sh = torch.as_tensor(args.shift, device=dev)[None, :] + torch.as_tensor(args.x_exponent, device=dev)[:, None]
    mu = None if args.mult is None else torch.as_tensor(args.mult, device=dev)[None, :]
    codes, _ = requantize(acc, frac_bits=args.frac_bits, shift=sh, out_bits=out_bits, relu=relu,
                          rounding=rounding, mult=mu)
    return codes
