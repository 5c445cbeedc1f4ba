"""The bit-exact SFx reference model (``docs/spec.md`` sections 1-5), in numpy.

This module is the single definition of SFx arithmetic in the project. The RTL
scoreboards, the co-simulation harness and WASQ's fake quantization call it (or its
torch twin :mod:`superfloat.sw.sfx_torch`, held equal to it by tests); none of them
re-derives it.

Summary of the format (see ``docs/sfx-format.md``):

* ``SFx`` has ``x`` bits, ``2 <= x <= 16``, ``M = x - 1`` magnitude bits. A code ``c``
  holds sign ``c >> M`` and magnitude ``c & (2**M - 1)``; its value is
  ``(-1)**s * m * 2**-M``: sign-magnitude fixed point Q0.M, ``|value| <= 1 - 2**-M``.
* Scaled SFx: ``real = value(c) * 2**E`` with integer (int8) exponents ``E``.
* :func:`matmul_acc` is exact integer accumulation; :func:`requantize` is the
  activation clamp unit (optional 16-bit multiplier, shift, ReLU, rounding,
  saturation); :func:`linear` composes them (SPEC section 5).

Every function validates its arguments and raises :class:`ValueError` or
:class:`TypeError` naming the offending argument.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "ROUNDINGS",
    "DEFAULT_K_MAX",
    "MULT_FRAC_BITS",
    "code_dtype",
    "max_magnitude",
    "accumulator_bits",
    "encode",
    "decode",
    "fake_quantize",
    "choose_exponent",
    "matmul_acc",
    "requantize",
    "linear",
    "linear_with_stats",
    "LinearStats",
    "fold_scale",
    "fold_row_scale",
    "encode_rows",
    "encode_rows_scaled",
    "default_row_scale",
    "check_bits",
    "check_codes",
    "check_rounding",
    "check_linear_args",
    "LinearArgs",
]

MIN_BITS = 2
MAX_BITS = 16
ROUNDINGS = ("nearest_even", "toward_zero")
DEFAULT_K_MAX = 16384
MULT_FRAC_BITS = 16  # mult means mult * 2**-16 (SPEC section 4, step 0)
MAX_RIGHT_SHIFT = 63
INT8_MIN, INT8_MAX = -128, 127
K_MAX_LIMIT = 1 << 20  # accumulator width stays <= 54 bits; acc * mult fits int64

# encode() works on chunks this large, in parallel threads (numpy releases the GIL).
_CHUNK = 1 << 17
_THREADS = max(1, min(4, os.cpu_count() or 1))
_POOL: ThreadPoolExecutor | None = None


# --------------------------------------------------------------------------- checks


def check_bits(bits: Any, name: str = "bits") -> int:
    """Return ``bits`` as an int after checking ``2 <= bits <= 16``."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {type(bits).__name__} {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS} (SFx widths), got {bits}")
    return bits


def check_rounding(rounding: Any, name: str = "rounding") -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
    return rounding


def code_dtype(bits: int) -> np.dtype:
    """Storage dtype of SF``bits`` codes: uint8 for bits <= 8, else uint16."""
    return np.dtype(np.uint8) if check_bits(bits) <= 8 else np.dtype(np.uint16)


def max_magnitude(bits: int) -> int:
    """Largest magnitude field ``2**(bits-1) - 1`` (the value ``1 - 2**-M``)."""
    return (1 << (check_bits(bits) - 1)) - 1


def accumulator_bits(a_bits: int, w_bits: int, k_max: int = DEFAULT_K_MAX) -> int:
    """Accumulator width ``A = F + ceil(log2(k_max)) + 2`` of SPEC section 3."""
    f = check_bits(a_bits, "a_bits") - 1 + check_bits(w_bits, "w_bits") - 1
    k_max = _check_k_max(k_max)
    return f + max(0, math.ceil(math.log2(k_max))) + 2


def _check_k_max(k_max: Any) -> int:
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)):
        raise TypeError(f"k_max must be an int, got {type(k_max).__name__} {k_max!r}")
    k_max = int(k_max)
    if not 1 <= k_max <= K_MAX_LIMIT:
        raise ValueError(f"k_max must be in 1..{K_MAX_LIMIT}, got {k_max}")
    return k_max


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_array(values: Any, name: str) -> np.ndarray:
    """numpy view of ``values`` (torch tensors of any float dtype included, exactly)."""
    if _is_torch(values):
        t = values.detach()
        if t.dtype.is_floating_point and t.dtype not in _torch_np_floats():
            t = t.to(dtype=_torch_float32())  # bfloat16 -> float32 is exact
        return t.cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    return arr


def _torch_np_floats():
    import torch

    return (torch.float16, torch.float32, torch.float64)


def _torch_float32():
    import torch

    return torch.float32


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    flat = int(np.argmax(mask.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape)) if mask.ndim else ()


def _check_no_nan(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f":
        mask = np.isnan(arr)
        if mask.any():
            raise ValueError(
                f"{name} contains {int(mask.sum())} NaN value(s); the first is at index "
                f"{_first_index(mask)}. SFx has no NaN: clean or mask the input first."
            )


def _int_array(x: Any, name: str, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """``x`` as an int64 array, checking integrality and the inclusive range [lo, hi]."""
    arr = _as_array(x, name)
    if arr.dtype.kind == "b":
        raise TypeError(f"{name} must hold integers, got booleans")
    if arr.dtype.kind == "f":
        _check_no_nan(arr, name)
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise TypeError(f"{name} must hold integers, got non-integral floats")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values beyond int64")
    out = arr.astype(np.int64, copy=False)
    if out.size and lo is not None and out.min() < lo:
        bad = out < lo
        raise ValueError(
            f"{name} must be >= {lo}: {int(bad.sum())} value(s) below, the first {int(out[bad].flat[0])} "
            f"at index {_first_index(bad)}"
        )
    if out.size and hi is not None and out.max() > hi:
        bad = out > hi
        raise ValueError(
            f"{name} must be <= {hi}: {int(bad.sum())} value(s) above, the first {int(out[bad].flat[0])} "
            f"at index {_first_index(bad)}"
        )
    return out


def check_codes(codes: Any, bits: int, name: str = "codes") -> np.ndarray:
    """Validate SF``bits`` codes (integers in ``[0, 2**bits)``).

    Returns uint8/uint16 arrays as they are (no copy) and anything else as int64.
    """
    bits = check_bits(bits)
    arr = _as_array(codes, name)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        hi = (1 << bits) - 1
        if arr.size and int(arr.max()) > hi:
            bad = arr > hi
            raise ValueError(
                f"{name} must be <= {hi}: {int(bad.sum())} value(s) above, the first {int(arr[bad].flat[0])} "
                f"at index {_first_index(bad)}"
            )
        return arr
    if arr.dtype.kind == "f":
        raise TypeError(
            f"{name} must be an integer array of SF{bits} codes (uint8/uint16), got {arr.dtype}; "
            f"use encode() to turn floats into codes"
        )
    return _int_array(arr, name, 0, (1 << bits) - 1)


def _check_exponent(exponent: Any, name: str = "exponent") -> np.ndarray:
    return _int_array(exponent, name, INT8_MIN, INT8_MAX)


# --------------------------------------------------------------------------- encode / decode


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="sfx-encode")
    return _POOL


def _encode_chunk(v: np.ndarray, scale, m: int, trunc: bool, out: np.ndarray) -> None:
    """Encode one chunk into ``out``. ``v`` float32 or float64; ``scale`` = ``2**(M-E)`` in
    ``v``'s dtype (a scalar or an array broadcast to ``v``)."""
    with np.errstate(over="ignore", under="ignore"):
        t = np.multiply(v, scale, dtype=v.dtype)  # exact: scaling by a power of two (see _work_dtype)
    lim = v.dtype.type((1 << m) - 1)
    np.clip(t, -lim, lim, out=t)  # saturation; +-inf saturate. Clip-then-round == round-then-clip.
    if trunc:
        np.trunc(t, out=t)
    else:
        np.rint(t, out=t)  # ties to even
    q = t.astype(np.int16)  # |q| <= 2**15 - 1
    s = q >> 15  # -1 where negative, else 0
    q ^= s
    q -= s  # |q|
    s &= np.array([1 << m], dtype=np.uint16).view(np.int16)[0]
    q |= s  # sign bit
    out[...] = q.view(np.uint16) if out.dtype == np.uint16 else q


def _work_dtype(dtype: np.dtype, exps: np.ndarray, m: int) -> np.dtype:
    """float32 when it gives the same result as float64, else float64.

    For float16/float32 input, ``v * 2**(M-E)`` computed in float32 is exact when
    ``2**(M-E)`` is a normal float32, unless the product overflows (then it is +-inf and
    saturates exactly as the float64 result does) or falls below 2**-126 (then both
    round to 0). So float32 is bit-identical to the float64 arithmetic of SPEC
    section 2, and faster. The same argument makes a float64 product exact.
    """
    if dtype in (np.float16, np.float32):
        se = m - exps
        if exps.size == 0 or (se.min() >= -126 and se.max() <= 127):
            return np.dtype(np.float32)
    return np.dtype(np.float64)


def encode(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> np.ndarray:
    """Encode real values to SF``bits`` codes (SPEC section 2).

    Args:
        values: array-like or torch tensor of floats (float16, bfloat16, float32,
            float64; integers are converted exactly).
        bits: total bits of the format, 2..16.
        exponent: int8 power-of-two exponent ``E``, scalar or broadcastable to
            ``values`` (per tensor, per channel with shape ``[N, 1]``, per token...).
        rounding: ``"nearest_even"`` (default) or ``"toward_zero"``.

    Returns:
        Codes as ``uint8`` (bits <= 8) or ``uint16``, shape of the broadcast.

    Raises:
        ValueError: NaN in ``values`` (count and first index), bits out of 2..16,
            exponent outside int8, unknown rounding.
    """
    bits = check_bits(bits)
    check_rounding(rounding)
    arr = _as_array(values, "values")
    if arr.dtype.kind == "c":
        raise TypeError("values must be real, got a complex array")
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    _check_no_nan(arr, "values")
    exps = _check_exponent(exponent)
    m = bits - 1
    dt = _work_dtype(arr.dtype, exps, m)
    try:
        shape = np.broadcast_shapes(arr.shape, exps.shape)
    except ValueError:
        raise ValueError(f"exponent of shape {list(exps.shape)} does not broadcast against values of shape "
                         f"{list(arr.shape)} (use [N, 1] per channel / per row of a [N, K] tensor)") from None
    out = np.empty(shape, dtype=code_dtype(bits))
    trunc = rounding == "toward_zero"
    if exps.ndim == 0 and arr.shape == shape:
        # Fast path: one exponent; chunked so that every pass stays in cache.
        v = np.ascontiguousarray(arr, dtype=dt).reshape(-1)
        o = out.reshape(-1)
        scale = np.ldexp(dt.type(1), int(m - int(exps)))
        n = v.size
        if n <= 2 * _CHUNK:
            _encode_chunk(v, scale, m, trunc, o)
        else:
            starts = range(0, n, _CHUNK)
            list(_pool().map(lambda s: _encode_chunk(v[s:s + _CHUNK], scale, m, trunc, o[s:s + _CHUNK]), starts))
        return out
    v = np.ascontiguousarray(np.broadcast_to(arr.astype(dt, copy=False), shape))
    scale = np.ldexp(dt.type(1), (m - exps).astype(np.int32))
    _encode_chunk(v, np.broadcast_to(scale, shape), m, trunc, out)
    return out


def decode(codes: Any, bits: int, exponent: Any = 0) -> np.ndarray:
    """Decode SF``bits`` codes to float64 values times ``2**exponent`` (exact).

    Negative zero (sign set, magnitude 0) decodes to +0.0.
    """
    bits = check_bits(bits)
    c = check_codes(codes, bits).astype(np.int64, copy=False)
    exps = _check_exponent(exponent)
    m = bits - 1
    signed = _signed_from_codes(c, bits)
    return np.ldexp(signed.astype(np.float64), (exps - m).astype(np.int32))


def _signed_from_codes(c: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer magnitude ``(-1)**s * m`` of validated int64 codes."""
    m = bits - 1
    mag = c & ((1 << m) - 1)
    return np.where((c >> m) & 1, -mag, mag)


def _codes_from_signed(q: np.ndarray, bits: int) -> np.ndarray:
    """Sign-magnitude codes of saturated signed integers (0 gives code 0)."""
    m = bits - 1
    return np.where(q < 0, (1 << m) | -q, q).astype(code_dtype(bits))


def fake_quantize(values: Any, bits: int, exponent: Any = 0, rounding: str = "nearest_even") -> np.ndarray:
    """``decode(encode(values, bits, exponent, rounding), bits, exponent)``."""
    return decode(encode(values, bits, exponent, rounding), bits, exponent)


def choose_exponent(values: Any, bits: int, axis: int | None = None, keepdims: bool = False):
    """Smallest int8 exponent ``E`` with ``max|v| <= (1 - 2**-M) * 2**E`` (SPEC section 2).

    Args:
        values: the tensor (numpy or torch).
        bits: SFx width.
        axis: ``None`` for one exponent per tensor (returns an ``int``), or the
            *channel* axis (torch's convention): one exponent per index along
            ``axis``, e.g. ``axis=0`` of a weight ``[N, K]`` gives one per output
            channel, ``axis=0`` of activations ``[T, K]`` one per token.
        keepdims: return a shape that broadcasts against ``values``.

    All-zero slices get ``E = 0``; results are clipped to the int8 range.
    """
    bits = check_bits(bits)
    arr = _as_array(values, "values")
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    _check_no_nan(arr, "values")
    a = np.abs(arr.astype(np.float64, copy=False))
    if axis is None:
        amax = np.asarray(a.max() if a.size else 0.0)
    else:
        axis = _check_axis(axis, arr.ndim)
        red = tuple(i for i in range(arr.ndim) if i != axis)
        amax = a.max(axis=red, keepdims=keepdims) if a.size else np.zeros(
            [arr.shape[i] if (i == axis or not keepdims) else 1 for i in range(arr.ndim) if keepdims or i == axis])
    e = _exponent_of_amax(amax, bits - 1)
    if axis is None:
        return int(e)
    return e


def _check_axis(axis: Any, ndim: int) -> int:
    """``axis`` (an int in ``-ndim..ndim-1``) as a non-negative index."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for values with {ndim} dimension(s)")
    return int(axis) % ndim


def _exponent_of_amax(amax: np.ndarray, m: int) -> np.ndarray:
    amax = np.asarray(amax, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.where(np.isfinite(amax), amax, np.finfo(np.float64).max)
        _, e0 = np.frexp(finite)  # finite = f * 2**e0, f in [0.5, 1): finite < 2**e0
        bound = np.ldexp(1.0 - 2.0 ** -m, e0)
        e = np.where(finite <= bound, e0, e0 + 1)
    e = np.where(amax == 0, 0, e)
    return np.clip(e, INT8_MIN, INT8_MAX).astype(np.int8)


# --------------------------------------------------------------------------- integer datapath


def _broadcast_channel(x: Any, n: int, name: str, lo: int | None, hi: int | None,
                       per: str = "output channel") -> np.ndarray:
    """Scalar or ``[N]`` integer parameter, one per ``per`` (output channel, activation row), as int64 ``[N]``."""
    arr = _int_array(x, name, lo, hi)
    if arr.ndim == 0:
        return np.full(n, int(arr), dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape [{n}] (one per {per}), got {list(arr.shape)}")
    return arr


def _check_matrix(codes: Any, bits: int, name: str) -> np.ndarray:
    c = check_codes(codes, bits, name)
    if c.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {list(c.shape)}")
    return c


def _signed_lut(bits: int) -> np.ndarray:
    """float64 signed integer value ``(-1)**s * m`` of every SF``bits`` code."""
    c = np.arange(1 << bits, dtype=np.int64)
    return _signed_from_codes(c, bits).astype(np.float64)


def _check_operands(x_codes: Any, w_codes: Any, a_bits: int, w_bits: int, k_max: int,
                    allow_empty_k: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``[T, K]`` activation and ``[N, K]`` weight code matrices."""
    x = _check_matrix(x_codes, a_bits, "x_codes")
    w = _check_matrix(w_codes, w_bits, "w_codes")
    t, k = x.shape
    n, kw = w.shape
    if k != kw:
        raise ValueError(f"x_codes is [T={t}, K={k}] but w_codes is [N={n}, K={kw}]: the K dimensions differ")
    if k == 0 and not allow_empty_k:
        raise ValueError("K must be at least 1 (x_codes and w_codes have no columns)")
    if k > k_max:
        raise ValueError(f"K={k} exceeds k_max={k_max}: split the reduction or raise k_max")
    return x, w


def _exact_code_matmul(x: np.ndarray, a_bits: int, w: np.ndarray, w_bits: int) -> np.ndarray:
    """Exact integer ``sum_k p(x[t,k], w[n,k])`` of validated codes, int64 ``[T, N]``.

    Codes become their signed magnitudes through a lookup table (one gather pass),
    then float64 BLAS multiplies K-chunks: every partial sum of a chunk stays below
    2**53, so each float64 operation is exact whatever order BLAS uses; chunks are
    summed in int64.
    """
    t, k = x.shape
    n = w.shape[0]
    max_abs_product = max_magnitude(a_bits) * max_magnitude(w_bits)
    if max_abs_product == 0 or k == 0:
        return np.zeros((t, n), dtype=np.int64)
    chunk = max(1, (1 << 53) // max_abs_product - 1)
    xf = _signed_lut(a_bits)[x]
    wf = _signed_lut(w_bits)[w]
    if k <= chunk:
        return (xf @ wf.T).astype(np.int64)
    acc = np.zeros((t, n), dtype=np.int64)
    for s in range(0, k, chunk):
        acc += (xf[:, s:s + chunk] @ wf[:, s:s + chunk].T).astype(np.int64)
    return acc


def matmul_acc(x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, bias: Any = None,
               k_max: int = DEFAULT_K_MAX) -> np.ndarray:
    """Exact accumulators ``bias[n] + sum_k p(x[t,k], w[n,k])`` (SPEC section 3), int64 ``[T, N]``.

    Products are sign-magnitude (``(-1)**(sa^sw) * ma * mw``), the sum is exact.
    ``bias`` (scalar or ``[N]``) is in accumulator units and must satisfy
    ``|bias| < 2**(A-2)``; ``K`` must not exceed ``k_max``.
    """
    a_bits = check_bits(a_bits, "a_bits")
    w_bits = check_bits(w_bits, "w_bits")
    k_max = _check_k_max(k_max)
    x, w = _check_operands(x_codes, w_codes, a_bits, w_bits, k_max, allow_empty_k=True)
    n = w.shape[0]
    a = accumulator_bits(a_bits, w_bits, k_max)
    blim = (1 << (a - 2)) - 1
    b = np.zeros(n, dtype=np.int64) if bias is None else _broadcast_channel(bias, n, "bias", -blim, blim)
    return _exact_code_matmul(x, a_bits, w, w_bits) + b[None, :]


_LIMB = 32
_LIMB_MASK = (1 << _LIMB) - 1
_FLOOR_CLIP = 1 << 21  # |floor| beyond this saturates every SFx width (|q| <= 2**15 - 1)


class _NumpyOps:
    """The array operations :func:`_round_limbs` needs, for numpy (``sfx_torch`` passes torch's)."""

    where = staticmethod(np.where)
    clip = staticmethod(np.clip)


def _limbs(a):
    """Split int64 ``a`` into ``(hi, lo)`` with ``a == hi * 2**32 + lo`` and ``0 <= lo < 2**32``."""
    return a >> _LIMB, a & _LIMB_MASK


def _limbs_mul(hi, lo, m):
    """``(hi, lo) * m`` as limbs, exactly, for ``1 <= m < 2**16`` and ``|hi| < 2**47``.

    ``lo * m < 2**48`` and ``|hi * m| < 2**63``: no intermediate leaves int64. Starting from
    an int64 accumulator (``|hi| <= 2**31``) two multiplications stay in range (after one,
    ``|hi| < 2**47``), which is what ``mult`` and ``xmult`` (SPEC section 4 steps 0, 0b) need.
    """
    p = lo * m
    return hi * m + (p >> _LIMB), p & _LIMB_MASK


def _round_limbs(hi, lo, r, rounding: str, mo: int, relu: bool, xp=_NumpyOps):
    """SPEC section 4 steps 1-3 on the exact integer ``v = hi * 2**32 + lo``, for ``0 <= r <= 63``.

    Returns ``(q, saturated)``: the saturated signed result and a boolean mask. Every
    intermediate stays in int64: for ``r <= 32`` the floor is ``hi * 2**(32-r) + (lo >> r)``
    (``hi`` clipped to ``+-2**21`` first: beyond that the result saturates either way, with
    the same sign), the remainder ``lo mod 2**r``; for ``r > 32`` the floor is
    ``hi >> (r-32)``, the remainder ``(hi mod 2**(r-32)) * 2**32 + lo < 2**63``. Rounding
    follows from the floor and the remainder: nearest-even adds 1 when ``rem > half`` or
    (``rem == half`` and the floor is odd); toward-zero adds 1 to the floor of a negative
    value with a nonzero remainder (no ``abs``, so ``-2**63`` is handled).
    """
    if relu:
        neg = hi < 0  # v < 0 exactly when hi < 0 (0 <= lo < 2**32)
        hi = xp.where(neg, 0, hi)
        lo = xp.where(neg, 0, lo)
    small = r <= _LIMB
    rs = xp.clip(r, 0, _LIMB)
    d = xp.clip(r - _LIMB, 0, _LIMB)
    fl_small = (xp.clip(hi, -_FLOOR_CLIP, _FLOOR_CLIP) << (_LIMB - rs)) + (lo >> rs)
    rem_small = lo & ((1 << rs) - 1)
    fl_big = hi >> d
    rem_big = ((hi - (fl_big << d)) << _LIMB) | lo
    fl = xp.where(small, fl_small, fl_big)
    rem = xp.where(small, rem_small, rem_big)
    if rounding == "nearest_even":
        half = xp.where(r > 0, 1 << xp.clip(r - 1, 0, 62), 0)
        up = (r > 0) & ((rem > half) | ((rem == half) & ((fl & 1) == 1)))
    else:
        up = (hi < 0) & (rem != 0)
    q = xp.clip(fl, -_FLOOR_CLIP, _FLOOR_CLIP) + up
    lim = (1 << mo) - 1
    sat = (q > lim) | (q < -lim)
    return xp.clip(q, -lim, lim), sat


def _check_per(x: Any, name: str, lo: int, hi: int, shape: tuple, what: str) -> np.ndarray:
    arr = _int_array(x, name, lo, hi)
    try:
        np.broadcast_shapes(shape, arr.shape)
    except ValueError:
        raise ValueError(f"{name} of shape {list(arr.shape)} does not broadcast against {what} of shape "
                         f"{list(shape)}") from None
    return arr


def requantize(acc: Any, *, frac_bits: int, shift: Any = 0, out_bits: int, relu: bool = False,
               rounding: str = "nearest_even", mult: Any = None, xmult: Any = None) -> tuple[np.ndarray, int]:
    """The activation clamp unit (SPEC section 4): accumulators to SF``out_bits`` codes.

    ``y = acc * 2**(-frac_bits + shift)`` (times ``mult * 2**-16`` if ``mult`` is given, and
    times ``xmult * 2**-16`` if ``xmult`` is given), optional ReLU, right shift by
    ``r = frac_bits (+16) (+16) - (out_bits - 1) - shift`` with ``rounding``, saturation to
    ``+-(2**(out_bits-1) - 1)``, sign-magnitude encoding.

    ``shift``, ``mult`` and ``xmult`` are scalars or broadcast against ``acc`` (per output
    channel: shape ``[N]`` for ``acc`` ``[T, N]``; per activation row: ``[T, 1]``; per
    element: ``acc``'s shape). Exact for every int64 ``acc``: the products with ``mult`` and
    ``xmult`` (up to 95 bits) are carried as two int64 limbs, never in floating point.

    Returns:
        ``(codes, n_saturated)``: codes (uint8/uint16) of the broadcast shape and the
        number of outputs that saturated.
    """
    out_bits = check_bits(out_bits, "out_bits")
    check_rounding(rounding)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)):
        raise TypeError(f"frac_bits must be an int, got {frac_bits!r}")
    if not 0 <= frac_bits <= 127:
        raise ValueError(f"frac_bits must be in 0..127, got {frac_bits}")
    if not isinstance(relu, (bool, np.bool_)):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    a = _int_array(acc, "acc")
    f = int(frac_bits)
    sh = _check_per(shift, "shift", None, None, a.shape, "acc")
    mu = None if mult is None else _check_per(mult, "mult", 1, (1 << MULT_FRAC_BITS) - 1, a.shape, "acc")
    xm = None if xmult is None else _check_per(xmult, "xmult", 1, (1 << MULT_FRAC_BITS) - 1, a.shape, "acc")
    extra = "".join(" + 16" for m in (mu, xm) if m is not None)
    f += MULT_FRAC_BITS * ((mu is not None) + (xm is not None))
    mo = out_bits - 1
    r = f - mo - sh
    if r.size and (r.min() < 0 or r.max() > MAX_RIGHT_SHIFT):
        bad = (r < 0) | (r > MAX_RIGHT_SHIFT)
        rb = r[bad].flat[0] if bad.ndim else int(r)
        raise ValueError(
            f"right shift r = frac_bits{extra} - (out_bits - 1) - shift = {int(rb)} "
            f"is outside 0..{MAX_RIGHT_SHIFT} (frac_bits={frac_bits}, out_bits={out_bits}, "
            f"{int(bad.sum())} element(s)); choose the output exponent so that the shift is in range"
        )
    hi, lo = _limbs(a)
    for m in (mu, xm):
        if m is not None:
            hi, lo = _limbs_mul(hi, lo, m)
    shape = np.broadcast_shapes(hi.shape, r.shape)
    q, sat = _round_limbs(np.broadcast_to(hi, shape), np.broadcast_to(lo, shape), np.broadcast_to(r, shape),
                          rounding, mo, bool(relu))
    return _codes_from_signed(q, out_bits), int(sat.sum())


@dataclass(frozen=True)
class LinearArgs:
    """Validated, normalised arguments of a LINEAR operation (SPEC section 5)."""

    x: np.ndarray  # [T, K] codes (uint8/uint16 as given, else int64)
    w: np.ndarray  # [N, K] codes
    a_bits: int
    w_bits: int
    out_bits: int
    bias: np.ndarray  # int64 [N]
    shift: np.ndarray  # int64 [N]
    mult: np.ndarray | None  # int64 [N] or None
    x_exponent: np.ndarray  # int64 [T]
    relu: bool
    rounding: str
    k_max: int
    xmult: np.ndarray | None = None  # int64 [T] or None (SPEC revision 2, section 4 step 0b)

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def K(self) -> int:
        return self.x.shape[1]

    @property
    def N(self) -> int:
        return self.w.shape[0]

    @property
    def frac_bits(self) -> int:
        return self.a_bits - 1 + self.w_bits - 1


def check_linear_args(x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, out_bits: int, bias: Any = None,
                      shift: Any = 0, relu: bool = False, rounding: str = "nearest_even",
                      k_max: int = DEFAULT_K_MAX, mult: Any = None, x_exponent: Any = None,
                      xmult: Any = None) -> LinearArgs:
    """Check every argument of :func:`linear` (shared with the RTL harness, same messages)."""
    a_bits = check_bits(a_bits, "a_bits")
    w_bits = check_bits(w_bits, "w_bits")
    out_bits = check_bits(out_bits, "out_bits")
    check_rounding(rounding)
    k_max = _check_k_max(k_max)
    if not isinstance(relu, (bool, np.bool_)):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    x, w = _check_operands(x_codes, w_codes, a_bits, w_bits, k_max, allow_empty_k=False)
    t, n = x.shape[0], w.shape[0]
    a = accumulator_bits(a_bits, w_bits, k_max)
    blim = (1 << (a - 2)) - 1
    b = np.zeros(n, dtype=np.int64) if bias is None else _broadcast_channel(bias, n, "bias", -blim, blim)
    sh = _broadcast_channel(shift, n, "shift", INT8_MIN, INT8_MAX)
    mu = None if mult is None else _broadcast_channel(mult, n, "mult", 1, (1 << MULT_FRAC_BITS) - 1)
    xe = _broadcast_channel(0 if x_exponent is None else x_exponent, t, "x_exponent", INT8_MIN, INT8_MAX,
                            "activation row")
    xm = None if xmult is None else _broadcast_channel(xmult, t, "xmult", 1, (1 << MULT_FRAC_BITS) - 1,
                                                       "activation row")
    f = a_bits - 1 + w_bits - 1 + MULT_FRAC_BITS * ((mu is not None) + (xm is not None))
    r = f - (out_bits - 1) - (sh[None, :] + xe[:, None])
    if r.size and (r.min() < 0 or r.max() > MAX_RIGHT_SHIFT):
        bad = np.argwhere((r < 0) | (r > MAX_RIGHT_SHIFT))[0]
        raise ValueError(
            f"right shift r = F - (out_bits - 1) - (shift[n] + x_exponent[t]) = {int(r[tuple(bad)])} at t={bad[0]}, "
            f"n={bad[1]} is outside 0..{MAX_RIGHT_SHIFT} (F={f}): choose shift / output exponent in range"
        )
    return LinearArgs(x, w, a_bits, w_bits, out_bits, b, sh, mu, xe, bool(relu), rounding, k_max, xm)


@dataclass(frozen=True)
class LinearStats:
    n_saturated: int
    macs: int
    acc_min: int
    acc_max: int


def linear_with_stats(x_codes: Any, w_codes: Any, **kw: Any) -> tuple[np.ndarray, LinearStats]:
    """:func:`linear` that also returns the saturation count and accumulator range."""
    args = check_linear_args(x_codes, w_codes, **kw)
    return _linear(args)


def _linear(args: LinearArgs) -> tuple[np.ndarray, LinearStats]:
    acc = _exact_code_matmul(args.x, args.a_bits, args.w, args.w_bits) + args.bias[None, :]
    shift = args.shift[None, :] + args.x_exponent[:, None]
    codes, nsat = requantize(acc, frac_bits=args.frac_bits, shift=shift, out_bits=args.out_bits, relu=args.relu,
                             rounding=args.rounding, mult=None if args.mult is None else args.mult[None, :],
                             xmult=None if args.xmult is None else args.xmult[:, None])
    stats = LinearStats(nsat, args.T * args.N * args.K, int(acc.min()) if acc.size else 0,
                        int(acc.max()) if acc.size else 0)
    return codes, stats


def linear(x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, out_bits: int, bias: Any = None,
           shift: Any = 0, relu: bool = False, rounding: str = "nearest_even", k_max: int = DEFAULT_K_MAX,
           mult: Any = None, x_exponent: Any = None, xmult: Any = None) -> np.ndarray:
    """LINEAR (SPEC section 5): ``Y[t,n] = requantize(bias[n] + sum_k X[t,k] W[n,k], F,
    shift[n] + x_exponent[t], out_bits, relu, rounding, mult[n], xmult[t])``.

    Args:
        x_codes: ``[T, K]`` SF``a_bits`` codes (activations).
        w_codes: ``[N, K]`` SF``w_bits`` codes (weights, one row per output channel).
        bias: integer accumulator units, scalar or ``[N]``.
        shift: int8 per output channel (``Ea + Ew - Eo`` or from :func:`fold_scale`).
        mult: optional 16-bit per-channel multiplier (``mult * 2**-16``).
        x_exponent: optional int8 per activation row.
        xmult: optional 16-bit per-row multiplier (``xmult[t] * 2**-16``, SPEC revision 2),
            see :func:`fold_row_scale` and :func:`encode_rows_scaled`.

    Returns:
        ``[T, N]`` SF``out_bits`` codes.
    """
    codes, _ = linear_with_stats(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, bias=bias,
                                 shift=shift, relu=relu, rounding=rounding, k_max=k_max, mult=mult,
                                 x_exponent=x_exponent, xmult=xmult)
    return codes


def fold_scale(scale: Any) -> tuple[Any, Any]:
    """A positive float scale per channel to ``(mult, shift)`` with
    ``mult * 2**(shift - 16) == scale`` rounded to 16 significant bits (nearest-even),
    ``2**15 <= mult < 2**16`` (SPEC section 4).

    Scalars give Python ints, arrays give int64 arrays of the same shape. The caller
    adds any other power-of-two exponents to ``shift``.
    """
    arr = _as_array(scale, "scale")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"scale must be real numbers, got dtype {arr.dtype}")
    s = arr.astype(np.float64)
    _check_no_nan(s, "scale")
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        raise ValueError(
            f"scale must be positive and finite: {int(bad.sum())} value(s) are not, the first "
            f"{float(s[bad].flat[0])!r} at index {_first_index(bad)}"
        )
    f, e = np.frexp(s)  # s = f * 2**e, f in [0.5, 1)
    mult = np.rint(np.ldexp(f, MULT_FRAC_BITS)).astype(np.int64)  # in [2**15, 2**16]
    carry = mult == (1 << MULT_FRAC_BITS)
    mult = np.where(carry, 1 << (MULT_FRAC_BITS - 1), mult)
    shift = (e + carry).astype(np.int64)
    if arr.ndim == 0:
        return int(mult), int(shift)
    return mult, shift


def fold_row_scale(scale: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-row float activation scales ``[T]`` to ``(xmult, xexp)`` (SPEC revision 2, section 4
    step 0b): :func:`fold_scale`'s rounding (16 significant bits, nearest-even,
    ``2**15 <= xmult < 2**16``, ``xmult * 2**(xexp - 16)`` the rounded scale), with ``xexp``
    checked against the int8 range of ``x_exponent``. Returns int64 arrays."""
    arr = _as_array(scale, "scale")
    xm, xe = fold_scale(arr)
    xm, xe = np.asarray(xm, dtype=np.int64), np.asarray(xe, dtype=np.int64)
    bad = (xe < INT8_MIN) | (xe > INT8_MAX)
    if bad.any():
        raise ValueError(f"scale gives an exponent outside int8 ({INT8_MIN}..{INT8_MAX}) for {int(bad.sum())} "
                         f"row(s), the first {int(xe[bad].flat[0])} at index {_first_index(bad)}")
    return xm, xe


def _check_rows(values: Any) -> np.ndarray:
    arr = _as_array(values, "x")
    if arr.ndim != 2:
        raise ValueError(f"x must be a 2-D [T, K] matrix (one row per token), got shape {list(arr.shape)}")
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    return arr


def encode_rows(values: Any, bits: int, rounding: str = "nearest_even") -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-token activations (SPEC sections 2 and 5): ``x_exponent[t] =
    choose_exponent(x[t])`` and ``codes[t] = encode(x[t], bits, x_exponent[t])``.

    Returns ``(codes [T, K], x_exponent int8 [T])``."""
    arr = _check_rows(values)
    e = choose_exponent(arr, bits, axis=0)
    return encode(arr, bits, e[:, None], rounding), e


def default_row_scale(values: Any, bits: int) -> np.ndarray:
    """``max|x[t]| / (1 - 2**-M)`` per row (1.0 for an all-zero row): the float scale that maps
    a row's largest magnitude onto the largest SF``bits`` value."""
    arr = _check_rows(values)
    bits = check_bits(bits)
    _check_no_nan(arr, "x")
    amax = np.abs(arr.astype(np.float64)).max(axis=1) if arr.size else np.zeros(arr.shape[0])
    s = amax / (1.0 - 2.0 ** -(bits - 1))
    return np.where(s > 0, s, 1.0)


def encode_rows_scaled(values: Any, bits: int, scale: Any = None,
                       rounding: str = "nearest_even") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token activations with a float scale (SPEC revision 2, sections 4 step 0b and 8):
    ``(xmult, xexp) = fold_row_scale(scale)`` and ``codes[t] = encode(x[t] / s[t], bits)``
    where ``s[t] = xmult[t] * 2**(xexp[t] - 16)`` is the scale as the accelerator applies it
    (the 16-bit rounded one), the division in float64.

    ``scale`` defaults to :func:`default_row_scale`. Returns ``(codes [T, K], xexp int64 [T],
    xmult int64 [T])``: pass them as ``x_exponent`` and ``xmult`` to :func:`linear`."""
    arr = _check_rows(values)
    if scale is None:
        scale = default_row_scale(arr, bits)
    sc = _as_array(scale, "scale")
    if sc.shape != (arr.shape[0],):
        raise ValueError(f"scale must have shape [{arr.shape[0]}] (one per row of x), got {list(sc.shape)}")
    xm, xe = fold_row_scale(sc)
    s = np.ldexp(xm.astype(np.float64), (xe - MULT_FRAC_BITS).astype(np.int32))
    _check_no_nan(arr, "x")
    return encode(arr.astype(np.float64) / s[:, None], bits, 0, rounding), xe, xm
