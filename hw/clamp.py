"""The activation clamp unit: accumulators to SFx codes (SPEC section 4)."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bits, check_impl, check_int, checking
from .pe import SFxMagnitudeMultiplier

__all__ = ["SFxClampUnit", "clamp_in_layout", "clamp_out_layout", "SHIFT_BITS", "CLAMP_LATENCY"]

#: Width of the clamp unit's ``shift`` input: ``shift[n] + xexp[t]`` of two int8 values.
SHIFT_BITS = 9
#: Cycles from an input transfer to its result (with no stall).
CLAMP_LATENCY = 6
_MAX_R = 63


def clamp_in_layout(acc_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxClampUnit.i`."""
    return data.StructLayout({
        "acc": signed(acc_bits),       # accumulator, bias included
        "shift": signed(SHIFT_BITS),   # shift[n] + xexp[t]
        "mult": 16,                    # per-channel multiplier (mult * 2**-16), used with use_mult
        "use_mult": 1,
        "relu": 1,
        "rounding": 1,                 # interface.ROUNDING_CODES: 0 nearest_even, 1 toward_zero
    })


def clamp_out_layout(out_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxClampUnit.o`."""
    return data.StructLayout({"code": out_bits, "sat": 1})


class SFxClampUnit(wiring.Component):
    """Requantization of one accumulator per cycle: ``superfloat.sw.sfx.requantize``.

    For each input ``{acc, shift, mult, use_mult, relu, rounding}`` it returns the
    SF``out_bits`` code of ``requantize(acc, frac_bits=frac_bits, shift=shift,
    out_bits=out_bits, relu, rounding, mult=mult if use_mult else None)``, bit for bit,
    and whether it saturated. The datapath works in sign-magnitude, which is exact
    because both roundings of SPEC section 4 are symmetric around zero
    (``round(-x) == -round(x)``):

    1. ``neg = acc < 0``; ``mag = |acc|`` (``0`` when ``relu`` and ``neg``);
       ``r = frac_bits (+16 if use_mult) - (out_bits - 1) - shift``.
    2. ``prod = mag * (mult if use_mult else 1)`` (:class:`SFxMagnitudeMultiplier`,
       ``acc_bits x 16``).
    3. Coarse right shift by ``r & 0x38`` with a guard bit and a sticky bit.
    4. Fine right shift by ``r & 7``.
    5. Round (nearest-even: up if ``guard & (sticky | lsb)``; toward-zero: never).
    6. Saturate to ``2**(out_bits-1) - 1``, encode sign-magnitude (zero is code 0).

    ``r`` outside ``0..63`` is not supported by the hardware (SPEC section 4): it sets the
    sticky :attr:`error` and is clamped into ``0..63`` (the result is then meaningless).

    Latency: :data:`CLAMP_LATENCY` (6) cycles. Throughput: one result per cycle. The
    pipeline advances when :attr:`o` is empty or taken (``i.ready = ~o.valid | o.ready``,
    a combinational path from ``o.ready`` to ``i.ready``).

    Parameters
    ----------
    acc_bits : int
        Width of the two's complement accumulator input (2..64).
    frac_bits : int
        ``F = (a_bits - 1) + (w_bits - 1)``: fraction bits of the accumulator (0..64).
    out_bits : int
        SFx width of the result (2..16).
    mult_impl : str
        Implementation of the ``acc_bits x 16`` multiplier: ``"dsp"`` (default) or
        ``"lut"`` (see :class:`SFxMagnitudeMultiplier`).
    count_bits : int
        Width of :attr:`sat_count` (1..64, default 32).

    Members
    -------
    i : In(stream.Signature(clamp_in_layout(acc_bits)))
        One accumulator and its requantization parameters.
    o : Out(stream.Signature(clamp_out_layout(out_bits)))
        The code and whether it saturated.
    sat_count : Out(count_bits)
        Saturated results transferred on :attr:`o` since reset (saturates at
        ``2**count_bits - 1``).
    error : Out(1)
        Sticky: an input with ``r`` outside ``0..63`` was accepted. Cleared by reset.
    busy : Out(1)
        A result is in the pipeline.
    """

    def __init__(self, *, acc_bits: int, frac_bits: int, out_bits: int, mult_impl: str = "dsp",
                 count_bits: int = 32):
        with checking(self):
            self._acc_bits = check_int(acc_bits, "acc_bits", 2, 64)
            self._frac_bits = check_int(frac_bits, "frac_bits", 0, 64)
            self._out_bits = check_bits(out_bits, "out_bits")
            self._mult_impl = check_impl(mult_impl, "mult_impl")
            self._count_bits = check_int(count_bits, "count_bits", 1, 64)
        super().__init__({
            "i": In(stream.Signature(clamp_in_layout(self._acc_bits))),
            "o": Out(stream.Signature(clamp_out_layout(self._out_bits))),
            "sat_count": Out(self._count_bits),
            "error": Out(1),
            "busy": Out(1),
        })

    acc_bits = property(lambda self: self._acc_bits, doc="Accumulator input width.")
    frac_bits = property(lambda self: self._frac_bits, doc="Fraction bits F of the accumulator.")
    out_bits = property(lambda self: self._out_bits, doc="SFx width of the result.")
    mult_impl = property(lambda self: self._mult_impl, doc="Multiplier implementation.")
    count_bits = property(lambda self: self._count_bits, doc="Width of the saturation counter.")

    def elaborate(self, platform):
        m = Module()
        A, F, mo = self._acc_bits, self._frac_bits, self._out_bits - 1
        P = A + sfx.MULT_FRAC_BITS   # product width
        X = P + 1                    # product with a guard bit below

        v1, v2, v3, v4, v5, v6 = (Signal(name=f"v{k}") for k in range(1, 7))
        adv = Signal()
        m.d.comb += [
            adv.eq(~v6 | self.o.ready),
            self.i.ready.eq(adv),
            self.o.valid.eq(v6),
            self.busy.eq(v1 | v2 | v3 | v4 | v5 | v6),
        ]

        # Stage 1: magnitude, relu, multiplier operand, right shift amount.
        ip = self.i.payload
        neg_in = ip.acc < 0
        r_full = Signal(signed(12))
        m.d.comb += r_full.eq(Const(F - mo, signed(10)) + Mux(ip.use_mult, sfx.MULT_FRAC_BITS, 0) - ip.shift)
        r_bad = (r_full < 0) | (r_full > _MAX_R)
        mag1 = Signal(A, reset_less=True)
        neg1, rnd1 = Signal(reset_less=True), Signal(reset_less=True)
        mul1 = Signal(16, reset_less=True)
        r1 = Signal(6, reset_less=True)
        error = Signal()
        with m.If(adv):
            m.d.sync += [
                v1.eq(self.i.valid),
                mag1.eq(Mux(neg_in, Mux(ip.relu, 0, -ip.acc), ip.acc)),
                neg1.eq(neg_in & ~ip.relu),
                rnd1.eq(ip.rounding),
                mul1.eq(Mux(ip.use_mult, ip.mult, 1)),
                r1.eq(Mux(r_full < 0, 0, Mux(r_full > _MAX_R, _MAX_R, r_full))),
            ]
        with m.If(self.i.valid & self.i.ready & r_bad):
            m.d.sync += error.eq(1)
        m.d.comb += self.error.eq(error)

        # Stage 2: product.
        m.submodules.mul = mul = SFxMagnitudeMultiplier(a_width=A, b_width=16, impl=self._mult_impl)
        m.d.comb += [mul.a.eq(mag1), mul.b.eq(mul1)]
        prod2 = Signal(P, reset_less=True)
        neg2, rnd2 = Signal(reset_less=True), Signal(reset_less=True)
        r2 = Signal(6, reset_less=True)
        with m.If(adv):
            m.d.sync += [v2.eq(v1), prod2.eq(mul.p), neg2.eq(neg1), rnd2.eq(rnd1), r2.eq(r1)]

        # Stage 3: coarse shift by multiples of 8; the lost bits feed the sticky bit.
        x = Cat(Const(0, 1), prod2)
        coarse = r2[3:6]
        coarse_mask = Array(Const(((1 << (8 * c)) - 1) & ((1 << X) - 1), X) for c in range(8))[coarse]
        y3 = Signal(X, reset_less=True)
        st3, neg3, rnd3 = Signal(reset_less=True), Signal(reset_less=True), Signal(reset_less=True)
        f3 = Signal(3, reset_less=True)
        with m.If(adv):
            m.d.sync += [
                v3.eq(v2), y3.eq(x >> (coarse * 8)), st3.eq((x & coarse_mask) != 0),
                neg3.eq(neg2), rnd3.eq(rnd2), f3.eq(r2[:3]),
            ]

        # Stage 4: fine shift.
        fine_mask = Array(Const((1 << c) - 1, X) for c in range(8))[f3]
        y4 = Signal(X, reset_less=True)
        st4, neg4, rnd4 = Signal(reset_less=True), Signal(reset_less=True), Signal(reset_less=True)
        with m.If(adv):
            m.d.sync += [
                v4.eq(v3), y4.eq(y3 >> f3), st4.eq(st3 | ((y3 & fine_mask) != 0)),
                neg4.eq(neg3), rnd4.eq(rnd3),
            ]

        # Stage 5: round. y4 = {q, guard}; r = 0 gives guard 0.
        q = y4[1:]
        guard = y4[0]
        up = ~rnd4 & guard & (st4 | q[0])
        q5 = Signal(mo + 1, reset_less=True)
        hi5, neg5 = Signal(reset_less=True), Signal(reset_less=True)
        with m.If(adv):
            m.d.sync += [v5.eq(v4), q5.eq(q[:mo] + up), hi5.eq(q[mo:] != 0), neg5.eq(neg4)]

        # Stage 6: saturate, encode.
        sat = hi5 | q5[mo]
        lim = (1 << mo) - 1
        mag6 = Mux(sat, lim, q5[:mo])
        code = Signal(self._out_bits, reset_less=True)
        sat6 = Signal(reset_less=True)
        with m.If(adv):
            m.d.sync += [v6.eq(v5), code.eq(Cat(mag6, neg5 & (mag6 != 0))), sat6.eq(sat)]
        m.d.comb += [self.o.payload.code.eq(code), self.o.payload.sat.eq(sat6)]

        sat_count = Signal(self._count_bits)
        with m.If(self.o.valid & self.o.ready & sat6 & ~sat_count.all()):
            m.d.sync += sat_count.eq(sat_count + 1)
        m.d.comb += self.sat_count.eq(sat_count)
        return m
