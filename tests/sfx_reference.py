"""A slow scalar SFx reference written from ../shared/SPEC.md with Python integers and
``fractions.Fraction`` only (no numpy, no floats in the arithmetic). Tests hold the
fast models in ``superfloat.sw.sfx`` / ``sfx_torch`` equal to it."""
from __future__ import annotations

import math
from fractions import Fraction


def value(code: int, bits: int) -> Fraction:
    m_bits = bits - 1
    s, m = code >> m_bits, code & ((1 << m_bits) - 1)
    return Fraction(-m if s else m, 1 << m_bits)


def _round(x: Fraction, rounding: str) -> int:
    if rounding == "nearest_even":
        return round(x)  # Fraction.__round__ rounds half to even
    return math.trunc(x)


def encode(v: float, bits: int, e: int = 0, rounding: str = "nearest_even") -> int:
    m_bits = bits - 1
    lim = (1 << m_bits) - 1
    if math.isinf(v):
        n = lim if v > 0 else -lim
    else:
        t = Fraction(v) * Fraction(2) ** (m_bits - e)
        n = max(-lim, min(lim, _round(t, rounding)))
    return (1 << m_bits) | -n if n < 0 else n


def product(ca: int, a_bits: int, cw: int, w_bits: int) -> int:
    ma, mw = a_bits - 1, w_bits - 1
    sa, xa = ca >> ma, ca & ((1 << ma) - 1)
    sw, xw = cw >> mw, cw & ((1 << mw) - 1)
    p = xa * xw
    return -p if (sa ^ sw) else p


def requantize(acc: int, frac_bits: int, shift: int, out_bits: int, relu: bool = False,
               rounding: str = "nearest_even", mult: int | None = None,
               xmult: int | None = None) -> tuple[int, bool]:
    """(code, saturated) of one accumulator: SPEC section 4 as a rational computation
    (Python integers of any width: acc * mult * xmult may need more than 64 bits)."""
    f = frac_bits
    if mult is not None:
        acc, f = acc * mult, f + 16
    if xmult is not None:
        acc, f = acc * xmult, f + 16
    if relu:
        acc = max(acc, 0)
    mo = out_bits - 1
    r = f - mo - shift
    assert 0 <= r <= 63
    q = _round(Fraction(acc, 1 << r), rounding)
    lim = (1 << mo) - 1
    sat = abs(q) > lim
    q = max(-lim, min(lim, q))
    return ((1 << mo) | -q if q < 0 else q), sat


def linear(x, w, a_bits, w_bits, out_bits, bias, shift, relu, rounding, mult, xexp, xmult=None):
    """Nested-list LINEAR of SPEC section 5."""
    f = a_bits - 1 + w_bits - 1
    out = []
    for t, row in enumerate(x):
        orow = []
        for n, wrow in enumerate(w):
            acc = bias[n] + sum(product(a, a_bits, b, w_bits) for a, b in zip(row, wrow))
            code, _ = requantize(acc, f, shift[n] + xexp[t], out_bits, relu, rounding,
                                 None if mult is None else mult[n], None if xmult is None else xmult[t])
            orow.append(code)
        out.append(orow)
    return out
