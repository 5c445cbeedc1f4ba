"""The activation clamp unit: accumulators to SFx codes (SPEC section 4)."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, EnableInserter, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bits, check_bool, check_impl, check_int, checking
from .pe import SFxMagnitudeMultiplier

__all__ = ["SFxClampUnit", "clamp_in_layout", "clamp_out_layout", "sat_count_split", "SHIFT_BITS", "CLAMP_LATENCY"]

#: Width of the clamp unit's ``shift`` input: ``shift[n] + xexp[t]`` of two int8 values.
SHIFT_BITS = 9
#: Cycles from an input transfer to its result (with no stall).
CLAMP_LATENCY = 7
_MAX_R = 63


def clamp_in_layout(acc_bits: int, xmult: bool = False) -> data.StructLayout:
    """Payload of :attr:`SFxClampUnit.i` (``xmult``: with the per-row multiplier fields)."""
    fields = {
        "acc": signed(acc_bits),       # accumulator, bias included
        "shift": signed(SHIFT_BITS),   # shift[n] + xexp[t]
        "mult": 16,                    # per-channel multiplier (mult * 2**-16), used with use_mult
        "use_mult": 1,
        "relu": 1,
        "rounding": 1,                 # interface.ROUNDING_CODES: 0 nearest_even, 1 toward_zero
    }
    if xmult:
        fields["xmult"] = 16           # per-row multiplier (xmult * 2**-16), used with use_xmult
        fields["use_xmult"] = 1
    return data.StructLayout(fields)


def clamp_out_layout(out_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxClampUnit.o`."""
    return data.StructLayout({"code": out_bits, "sat": 1})


def sat_count_split(count_bits: int) -> int:
    """Bits of the lower of the two counters that make a ``count_bits`` saturation count
    (all of them below 4 bits: one counter)."""
    return count_bits if count_bits < 4 else count_bits // 2


class SFxClampUnit(wiring.Component):
    """Requantization of one accumulator per cycle: ``superfloat.sw.sfx.requantize``.

    For each input ``{acc, shift, mult, use_mult, relu, rounding}`` it returns the
    SF``out_bits`` code of ``requantize(acc, frac_bits=frac_bits, shift=shift,
    out_bits=out_bits, relu, rounding, mult=mult if use_mult else None, xmult=xmult if
    use_xmult else None)``, bit for bit, and whether it saturated (``xmult``: the per-row
    activation multiplier of SPEC revision 2, a generation option). The datapath works in sign-magnitude, which is exact
    because both roundings of SPEC section 4 are symmetric around zero
    (``round(-x) == -round(x)``):

    1. ``neg = acc < 0``; ``mag = |acc|`` (``0`` when ``relu`` and ``neg``);
       ``r = frac_bits (+16 if use_mult) (+16 if use_xmult) - (out_bits - 1) - shift``.
    1b. With ``xmult`` only: ``m = (mult if use_mult else 1) * (xmult if use_xmult else 1)``,
       a 32-bit product, registered (one cycle more latency).
    2. ``prod = mag * (mult if use_mult else 1)`` (with ``xmult``: ``mag * m``, up to
       ``acc_bits + 32`` bits, which is more than 64 for wide accumulators) (:class:`SFxMagnitudeMultiplier`:
       ``16 x 16`` on the low 16 bits of ``mag`` and ``(acc_bits - 16) x 16`` on the rest,
       registered, then added over the high bits: each product fits one DSP block).
    3. Coarse right shift by ``r & 0x38`` with a guard bit: only a window of
       ``out_bits + 7`` bits (rounded up to bytes) is kept; the bits below it form a sticky
       bit, the bits above it a saturation flag (the shifter's cost follows the output
       width, not the ``acc_bits + 16`` bits of the product).
    4. Fine right shift by ``r & 7`` within the window.
    5. Round (nearest-even: up if ``guard & (sticky | lsb)``; toward-zero: never).
    6. Saturate to ``2**(out_bits-1) - 1``, encode sign-magnitude (zero is code 0).

    ``r`` outside ``0..63`` is not supported by the hardware (SPEC section 4): it sets the
    sticky :attr:`error` and is clamped into ``0..63`` (the result is then meaningless).

    Latency: :data:`CLAMP_LATENCY` (7) cycles, plus ``mult_stages``, plus with ``xmult`` 1
    (``mult_impl="dsp"``) or 3 (``"lut"``: the ``mult * xmult`` product and the ``A x 32``
    product get one more register each). Throughput: one result per cycle. The
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
    mult_stages : int
        Extra pipeline registers in the multiplier (0..2, default 0): a logic multiplier's
        adder tree is cut by ``1 + mult_stages`` registers, a DSP product is registered
        ``1 + mult_stages`` times. The latency is :data:`CLAMP_LATENCY` ``+ mult_stages``.
    mult_premuxed : bool
        The producer guarantees ``mult == 1`` whenever ``use_mult`` is 0 (and ``xmult == 1``
        whenever ``use_xmult`` is 0; default ``False``): the unit then multiplies by ``mult``
        as it comes, without a multiplexer (the register before the multiplier can then
        sit inside a DSP block).
    xmult : bool
        Generate the per-row multiplier (SPEC revision 2, section 4 step 0b): the input
        gains ``xmult`` and ``use_xmult`` (default ``False``).

    Members
    -------
    i : In(stream.Signature(clamp_in_layout(acc_bits, xmult)))
        One accumulator and its requantization parameters.
    o : Out(stream.Signature(clamp_out_layout(out_bits)))
        The code and whether it saturated.
    sat_count : Out(count_bits)
        Saturated results transferred on :attr:`o` since reset (saturates at
        ``2**count_bits - 1``). From 4 bits on it is two counters (:func:`sat_count_split`
        bits below, the rest above): the upper one takes the lower one's carry a cycle later
        (timing), so in the cycle after the lower half wraps the count reads ``2**split``
        low; :attr:`busy` is high in that cycle.
    error : Out(1)
        Sticky: an input with ``r`` outside ``0..63`` was accepted. Cleared by reset.
    busy : Out(1)
        A result is in the pipeline.
    """

    def __init__(self, *, acc_bits: int, frac_bits: int, out_bits: int, mult_impl: str = "dsp",
                 count_bits: int = 32, mult_premuxed: bool = False, mult_stages: int = 0,
                 xmult: bool = False):
        with checking(self):
            self._acc_bits = check_int(acc_bits, "acc_bits", 2, 64)
            self._frac_bits = check_int(frac_bits, "frac_bits", 0, 64)
            self._out_bits = check_bits(out_bits, "out_bits")
            self._mult_impl = check_impl(mult_impl, "mult_impl")
            self._count_bits = check_int(count_bits, "count_bits", 1, 64)
            self._premuxed = check_bool(mult_premuxed, "mult_premuxed")
            self._mult_stages = check_int(mult_stages, "mult_stages", 0, 2)
            self._xmult = check_bool(xmult, "xmult")
        super().__init__({
            "i": In(stream.Signature(clamp_in_layout(self._acc_bits, self._xmult))),
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
    mult_stages = property(lambda self: self._mult_stages, doc="Extra pipeline registers in the multiplier.")
    xmult = property(lambda self: self._xmult, doc="Whether the per-row multiplier is generated.")

    @property
    def _x_stages(self) -> int:
        """Registers inside the ``mult * xmult`` multiplier: 1 for a logic multiplier, 0 for a DSP."""
        return int(self._xmult and self._mult_impl == "lut")

    @property
    def latency(self) -> int:
        """Cycles from an input transfer to its result (with no stall)."""
        return CLAMP_LATENCY + self._mult_stages + self._xmult + 2 * self._x_stages

    def elaborate(self, platform):
        m = Module()
        A, F, mo = self._acc_bits, self._frac_bits, self._out_bits - 1
        BW = sfx.MULT_FRAC_BITS * (1 + self._xmult)   # multiplier operand width
        P = A + BW                   # product width
        X = P + 1                    # product with a guard bit below

        v1, v2b, v3, v4, v5, v6 = (Signal(name=f"v{k}") for k in ("1", "2b", "3", "4", "5", "6"))
        adv = Signal()
        m.d.comb += [
            adv.eq(~v6 | self.o.ready),
            self.i.ready.eq(adv),
            self.o.valid.eq(v6),
        ]

        # Stage 1: magnitude, relu, multiplier operand, right shift amount.
        ip = self.i.payload
        neg_in = ip.acc < 0
        r_full = Signal(signed(12))
        r_base = Const(F - mo, signed(10)) + Mux(ip.use_mult, sfx.MULT_FRAC_BITS, 0)
        if self._xmult:
            r_base = r_base + Mux(ip.use_xmult, sfx.MULT_FRAC_BITS, 0)
        m.d.comb += r_full.eq(r_base - ip.shift)
        r_bad = (r_full < 0) | (r_full > _MAX_R)
        mag1 = Signal(A, reset_less=True)
        neg1, rnd1 = Signal(reset_less=True), Signal(reset_less=True)
        mul1 = Signal(16, reset_less=True)
        r1 = Signal(6, reset_less=True)
        error = Signal()
        v_first = [v1]
        with m.If(adv):
            m.d.sync += [
                v1.eq(self.i.valid),
                # |acc| as (acc XOR sign) + sign: one carry chain (a negate ``-acc`` became a ripple
                # of LUTs on the iCE40, the 8x8 SF4 critical path into the DSP's input register)
                mag1.eq(Mux(neg_in & ip.relu, 0, (ip.acc.as_unsigned() ^ neg_in.replicate(A)) + neg_in)),
                neg1.eq(neg_in & ~ip.relu),
                rnd1.eq(ip.rounding),
                mul1.eq(ip.mult if self._premuxed else Mux(ip.use_mult, ip.mult, 1)),
                r1.eq(Mux(r_full < 0, 0, Mux(r_full > _MAX_R, _MAX_R, r_full))),
            ]
        with m.If(self.i.valid & self.i.ready & r_bad):
            m.d.sync += error.eq(1)
        m.d.comb += self.error.eq(error)

        # Stage 1b (xmult only): the two 16-bit multipliers' product, registered (a logic
        # multiplier's adder tree is cut by one more register: ``_x_stages``); the other
        # stage-1 values wait beside it.
        vx = []
        if self._xmult:
            xs = self._x_stages
            xmul1 = Signal(16, reset_less=True)
            with m.If(adv):
                m.d.sync += xmul1.eq(ip.xmult if self._premuxed else Mux(ip.use_xmult, ip.xmult, 1))
            mul_x = SFxMagnitudeMultiplier(a_width=16, b_width=16, impl=self._mult_impl, stages=xs)
            m.submodules.mul_x = EnableInserter(adv)(mul_x) if xs else mul_x
            m.d.comb += [mul_x.a.eq(mul1), mul_x.b.eq(xmul1)]
            mul1 = Signal(32, reset_less=True, name="mul1b")
            staged = [v1, mag1, neg1, rnd1, r1]
            for k in range(1 + xs):
                nxt = []
                for sig, name in zip(staged, ("v1b", "mag1b", "neg1b", "rnd1b", "r1b")):
                    d = Signal(sig.shape(), name=f"{name}_{k}", reset_less=(name != "v1b"))
                    with m.If(adv):
                        m.d.sync += d.eq(sig)
                    nxt.append(d)
                staged = nxt
                vx.append(staged[0])
            with m.If(adv):
                m.d.sync += mul1.eq(mul_x.p)
            v1, mag1, neg1, rnd1, r1 = staged

        # Stage 2: product, then 2b: registered. With the DSP the product is two registered
        # partial products (the low 16 bits of the magnitude and the rest, each within one
        # 16 x 16 block), added in stage 2b over the high bits only. In logic it is one
        # multiplier whose adder tree is cut by registers (``1 + mult_stages`` of them).
        # ``mult_stages`` adds that many registers in both cases.
        # (a logic A x 32 multiplier with xmult gets one more register, like the mult * xmult one)
        ms = self._mult_stages + self._x_stages
        flags = [(v1, "v"), (neg1, "neg"), (rnd1, "rnd"), (r1, "r")]
        vmid = []
        for k in range(1 + ms):
            nxt = []
            for sig, name in flags:
                d = Signal(sig.shape(), name=f"{name}2_{k}", reset_less=(name != "v"))
                with m.If(adv):
                    m.d.sync += d.eq(sig)
                nxt.append((d, name))
            flags = nxt
            vmid.append(flags[0][0])
        (v2, _), (neg2, _), (rnd2, _), (r2, _) = flags

        def delayed(value, name):
            for k in range(ms):
                d = Signal(value.shape(), name=f"{name}_d{k}", reset_less=True)
                with m.If(adv):
                    m.d.sync += d.eq(value)
                value = d
            return value

        if self._mult_impl == "lut":
            mul = SFxMagnitudeMultiplier(a_width=A, b_width=BW, impl="lut", stages=1 + ms)
            m.submodules.mul = EnableInserter(adv)(mul)
            m.d.comb += [mul.a.eq(mag1), mul.b.eq(mul1)]
            full = mul.p
        else:
            lo_w = min(A, 16)
            m.submodules.mul = mul = SFxMagnitudeMultiplier(a_width=lo_w, b_width=BW, impl="dsp")
            m.d.comb += [mul.a.eq(mag1[:lo_w]), mul.b.eq(mul1)]
            part_lo = Signal(lo_w + BW, reset_less=True)
            with m.If(adv):
                m.d.sync += part_lo.eq(mul.p)
            part_lo = delayed(part_lo, "part_lo")
            if A > 16:
                m.submodules.mul_hi = mul_hi = SFxMagnitudeMultiplier(a_width=A - 16, b_width=BW, impl="dsp")
                m.d.comb += [mul_hi.a.eq(mag1[16:]), mul_hi.b.eq(mul1)]
                part_hi = Signal(A - 16 + BW, reset_less=True)
                with m.If(adv):
                    m.d.sync += part_hi.eq(mul_hi.p)
                part_hi = delayed(part_hi, "part_hi")
                full = Cat(part_lo[:16], (part_lo[16:] + part_hi)[:P - 16])
            else:
                full = part_lo
        prod2 = Signal(P, reset_less=True)
        neg2b, rnd2b = Signal(reset_less=True), Signal(reset_less=True)
        r2b = Signal(6, reset_less=True)
        with m.If(adv):
            m.d.sync += [v2b.eq(v2), prod2.eq(full), neg2b.eq(neg2), rnd2b.eq(rnd2), r2b.eq(r2)]

        # Stage 3: coarse shift by 8c. Only a window of WB bytes of x >> 8c is kept (the
        # fine shift and the rounding need y[0 .. mo + 7]); the bits below it feed the
        # sticky bit, the bits above it the saturation flag. This keeps the shifter's
        # cost proportional to the output width, not to the A + 16 bits of the product.
        x = Cat(Const(0, 1), prod2)
        wb = (mo + 8 + 7) // 8                  # window bytes: mo + 8 bits, rounded up
        nbytes = (X + 7) // 8
        xb = Cat(x, Const(0, 8 * (nbytes + wb) - X))
        byte_any = [xb[8 * k:8 * k + 8].any() for k in range(nbytes)]
        coarse = r2b[3:6]
        windows = [xb[8 * c:8 * c + 8 * wb] if c < nbytes else Const(0, 8 * wb) for c in range(8)]
        # Byte k is below the window when k < c, above it when k >= c + wb: each byte's "any"
        # is gated by a comparison of the 3-bit coarse shift with a constant, then OR-ed (a
        # shallower tree than selecting one of 8 precomputed ORs).
        below = Cat(byte_any[k] & (coarse > k) for k in range(min(nbytes, 7))).any()
        # (a byte k >= wb + 7 is above the window for every coarse shift: no comparison)
        above = Cat(byte_any[k] & ((coarse <= k - wb) if k - wb < 7 else 1)
                    for k in range(wb, nbytes)).any() if nbytes > wb else Const(0, 1)
        win3 = Signal(8 * wb, reset_less=True)
        st3, hi3, neg3, rnd3 = (Signal(reset_less=True, name=n) for n in ("st3", "hi3", "neg3", "rnd3"))
        f3 = Signal(3, reset_less=True)
        with m.If(adv):
            m.d.sync += [
                v3.eq(v2b), win3.eq(Array(windows)[coarse]), st3.eq(below),
                hi3.eq(above), neg3.eq(neg2b), rnd3.eq(rnd2b), f3.eq(r2b[:3]),
            ]

        # Stage 4: fine shift by f within the window: y4 = {q[0..mo-1], guard}, and the
        # flags: bits below f join the sticky bit, bits of y above mo the saturation flag.
        y = win3 >> f3
        fine_mask = Array(Const((1 << c) - 1, 8 * wb) for c in range(8))[f3]
        y4 = Signal(mo + 1, reset_less=True)
        st4, hi4, neg4, rnd4 = (Signal(reset_less=True, name=n) for n in ("st4", "hi4", "neg4", "rnd4"))
        with m.If(adv):
            m.d.sync += [
                v4.eq(v3), y4.eq(y[:mo + 1]), st4.eq(st3 | ((win3 & fine_mask) != 0)),
                hi4.eq(hi3 | (y[mo + 1:] != 0)), neg4.eq(neg3), rnd4.eq(rnd3),
            ]

        # Stage 5: round. y4 = {q, guard}; r = 0 gives guard 0.
        q = y4[1:]
        guard = y4[0]
        up = ~rnd4 & guard & (st4 | q[0])
        q5 = Signal(mo + 1, reset_less=True)
        hi5, neg5 = Signal(reset_less=True), Signal(reset_less=True)
        with m.If(adv):
            m.d.sync += [v5.eq(v4), q5.eq(q[:mo] + up), hi5.eq(hi4), neg5.eq(neg4)]

        # Stage 6: saturate, encode.
        sat = hi5 | q5[mo]
        lim = (1 << mo) - 1
        mag6 = Mux(sat, lim, q5[:mo])
        code = Signal(self._out_bits, reset_less=True)
        sat6 = Signal(reset_less=True)
        with m.If(adv):
            m.d.sync += [v6.eq(v5), code.eq(Cat(mag6, neg5 & (mag6 != 0))), sat6.eq(sat)]
        m.d.comb += [self.o.payload.code.eq(code), self.o.payload.sat.eq(sat6)]

        carry = self._sat_counter(m, self.o.valid & self.o.ready & sat6)
        m.d.comb += self.busy.eq(Cat(*v_first, *vx, *vmid, v2b, v3, v4, v5, v6, carry).any())
        return m

    def _sat_counter(self, m, hit):
        """:attr:`sat_count`, counting ``hit``; returns the pending carry into its upper half
        (``Const(0)`` for a single counter)."""
        n = self._count_bits
        low = sat_count_split(n)
        lo = Signal(low)
        lo_inc = Signal(low + 1)
        m.d.comb += lo_inc.eq(lo + 1)   # its carry out says "lo is all ones" (no AND tree)
        if low == n:
            with m.If(hit & ~lo_inc[-1]):
                m.d.sync += lo.eq(lo_inc[:low])
            m.d.comb += self.sat_count.eq(lo)
            return Const(0, 1)
        hi = Signal(n - low)
        hi_inc = Signal(n - low + 1)
        hi_top = Signal()   # hi is all ones (a cycle late: lo needs 2**low - 1 >= 3 more hits first)
        carry = Signal()    # lo wrapped in the previous cycle: hi takes it now
        m.d.comb += hi_inc.eq(hi + 1)
        en = hit & ~(hi_top & lo_inc[-1])   # at 2**n - 1 (both halves all ones) the count stops
        m.d.sync += [carry.eq(en & lo_inc[-1]), hi_top.eq(hi_inc[-1])]
        with m.If(en):
            m.d.sync += lo.eq(lo_inc[:low])
        with m.If(carry):
            m.d.sync += hi.eq(hi_inc[:n - low])
        m.d.comb += self.sat_count.eq(Cat(lo, hi))
        return carry
