"""Processing element of the SFx MAC array: magnitude multiplier and accumulator.

SPEC section 3: a product of two sign-magnitude codes is
``(-1)**(sa ^ sw) * ma * mw``, an exact integer; products are accumulated exactly in an
``A``-bit two's complement register (``A = sfx.accumulator_bits(a_bits, w_bits, k_max)``).
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._checks import check_bits, check_impl, check_int, checking

__all__ = ["SFxMagnitudeMultiplier", "SFxPE"]


class SFxMagnitudeMultiplier(wiring.Component):
    """Unsigned ``a_width x b_width`` multiplier, purely combinational.

    Two implementations, bit-identical (``p == a * b`` for every input):

    * ``impl="lut"``: ``b_width`` partial products ``(a AND b[k]) << k`` summed by a
      balanced adder tree. There is no ``*`` operator, so Yosys never infers a DSP
      block: use it to keep a design within the DSP budget of a small FPGA.
    * ``impl="dsp"``: the ``*`` operator; Yosys maps it to DSP blocks (iCE40
      ``SB_MAC16``, ECP5 ``MULT18X18D``) when the synthesis script allows DSPs.

    Latency: 0 (combinational). Throughput: one product per cycle.

    Parameters
    ----------
    a_width : int
        Width of ``a`` (1..64).
    b_width : int
        Width of ``b`` (1..64).
    impl : str
        ``"lut"`` or ``"dsp"``.

    Members
    -------
    a : In(a_width)
        First magnitude.
    b : In(b_width)
        Second magnitude.
    p : Out(a_width + b_width)
        Exact product ``a * b``.
    """

    def __init__(self, *, a_width: int, b_width: int, impl: str = "lut"):
        with checking(self):
            self._a_width = check_int(a_width, "a_width", 1, 64)
            self._b_width = check_int(b_width, "b_width", 1, 64)
            self._impl = check_impl(impl)
        super().__init__({
            "a": In(self._a_width),
            "b": In(self._b_width),
            "p": Out(self._a_width + self._b_width),
        })

    @property
    def a_width(self) -> int:
        return self._a_width

    @property
    def b_width(self) -> int:
        return self._b_width

    @property
    def impl(self) -> str:
        return self._impl

    def elaborate(self, platform):
        m = Module()
        if self._impl == "dsp":
            m.d.comb += self.p.eq(self.a * self.b)
            return m
        # Shifted-AND partial products, summed pairwise (a balanced tree of adders).
        terms = [(self.a & self.b[k].replicate(self._a_width)) << k for k in range(self._b_width)]
        while len(terms) > 1:
            nxt = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
            if len(terms) % 2:
                nxt.append(terms[-1])
            terms = nxt
        m.d.comb += self.p.eq(terms[0])
        return m


class SFxPE(wiring.Component):
    """One processing element: sign-magnitude product, exact accumulation, shadow register.

    The PE keeps three registers:

    * ``prod``: the product of the codes on ``a`` and ``w``, registered every cycle
      (sign ``sa ^ sw`` and magnitude ``ma * mw`` from :class:`SFxMagnitudeMultiplier`);
    * ``acc``: ``A``-bit two's complement accumulator. When ``acc_en``, it takes
      ``(first ? 0 : acc) + prod`` (the product added in two's complement; a zero
      magnitude adds 0 whatever its sign);
    * ``shadow``: when ``acc_en & capture`` it takes the same new sum (the finished dot
      product of a tile); else when ``shift`` it takes ``chain_in``. ``chain_out`` is
      the shadow register: PEs are chained so that a whole tile drains through one port
      while the accumulators already work on the next tile.

    Latency: the product of ``a``/``w`` presented in cycle ``c`` is added in cycle
    ``c + 1`` (``acc_en`` and ``first`` belong to that cycle); the sum is visible on
    ``chain_out`` in cycle ``c + 2`` when captured. Throughput: one MAC per cycle.

    Parameters
    ----------
    a_bits, w_bits : int
        SFx widths of activations and weights (2..16).
    acc_bits : int
        Accumulator width ``A`` (at least ``a_bits + w_bits``, at most 64).
    impl : str
        Multiplier implementation, ``"lut"`` or ``"dsp"`` (see
        :class:`SFxMagnitudeMultiplier`).

    Members
    -------
    a : In(a_bits)
        Activation code (sign-magnitude).
    w : In(w_bits)
        Weight code (sign-magnitude).
    acc_en : In(1)
        The registered product is valid: accumulate it.
    first : In(1)
        With ``acc_en``: start a new sum (``acc = prod``).
    capture : In(1)
        With ``acc_en``: also load the new sum into the shadow register.
    shift : In(1)
        Load ``chain_in`` into the shadow register (ignored while capturing).
    chain_in : In(signed(acc_bits))
        Shadow value of the next PE in the drain chain.
    chain_out : Out(signed(acc_bits))
        This PE's shadow register.
    """

    def __init__(self, *, a_bits: int, w_bits: int, acc_bits: int, impl: str = "lut"):
        with checking(self):
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._acc_bits = check_int(acc_bits, "acc_bits", a_bits + w_bits, 64)
            self._impl = check_impl(impl)
        super().__init__({
            "a": In(self._a_bits),
            "w": In(self._w_bits),
            "acc_en": In(1),
            "first": In(1),
            "capture": In(1),
            "shift": In(1),
            "chain_in": In(signed(self._acc_bits)),
            "chain_out": Out(signed(self._acc_bits)),
        })

    @property
    def a_bits(self) -> int:
        return self._a_bits

    @property
    def w_bits(self) -> int:
        return self._w_bits

    @property
    def acc_bits(self) -> int:
        return self._acc_bits

    @property
    def impl(self) -> str:
        return self._impl

    def elaborate(self, platform):
        m = Module()
        ma, mw = self._a_bits - 1, self._w_bits - 1
        width = self._acc_bits
        m.submodules.mul = mul = SFxMagnitudeMultiplier(a_width=ma, b_width=mw, impl=self._impl)
        m.d.comb += [mul.a.eq(self.a[:ma]), mul.b.eq(self.w[:mw])]

        prod_mag = Signal(ma + mw, reset_less=True)
        prod_neg = Signal(reset_less=True)
        m.d.sync += [prod_mag.eq(mul.p), prod_neg.eq(self.a[ma] ^ self.w[mw])]

        acc = Signal(width, reset_less=True)
        base = Mux(self.first, 0, acc)
        # Two's complement of a sign-magnitude product: (mag XOR neg...neg) + neg.
        addend = prod_mag ^ prod_neg.replicate(ma + mw)
        ext = Mux(prod_neg, (1 << width) - (1 << (ma + mw)), 0)  # sign extension bits
        total = Signal(width)
        m.d.comb += total.eq((base + (addend | ext) + prod_neg)[:width])

        shadow = Signal(signed(width), reset_less=True)
        with m.If(self.acc_en):
            m.d.sync += acc.eq(total)
        with m.If(self.acc_en & self.capture):
            m.d.sync += shadow.eq(total)
        with m.Elif(self.shift):
            m.d.sync += shadow.eq(self.chain_in)
        m.d.comb += self.chain_out.eq(shadow)
        return m

