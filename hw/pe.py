"""Processing element of the SFx MAC array: magnitude multiplier and accumulator.

SPEC section 3: a product of two sign-magnitude codes is
``(-1)**(sa ^ sw) * ma * mw``, an exact integer; products are accumulated exactly in an
``A``-bit two's complement register (``A = sfx.accumulator_bits(a_bits, w_bits, k_max)``).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal, signed
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

    * ``prod``: the product of the codes on ``a`` and ``w``, registered every cycle as a
      sign ``sa ^ sw`` and a magnitude ``ma * mw`` (:class:`SFxMagnitudeMultiplier`);
    * ``acc``: ``A``-bit two's complement accumulator. When ``acc_en``, it takes
      ``acc + prod`` (the product added in two's complement: ``acc + (mag ^ -neg) + neg``;
      a zero magnitude adds 0 whatever its sign);
    * ``shadow``: when ``clear``, it takes ``acc`` (the finished dot product of a tile)
      while ``acc`` returns to 0; else when ``shift`` it takes ``chain_in``.
      ``chain_out`` is the shadow register: PEs are chained so that a whole tile drains
      through one port while the accumulators already work on the next tile.

    ``clear`` must not coincide with ``acc_en`` (the array leaves one idle cycle between
    the last product of a tile and the first of the next). Copying the registered ``acc``
    (not the adder's output) keeps the shadow multiplexer a single LUT per bit; ``acc``
    starts at 0 after reset and after every ``clear``.

    With ``shadow=False`` there is no shadow register: ``chain_out`` is ``acc`` itself,
    ``clear`` only restarts it at 0, ``shift`` and ``chain_in`` are ignored (the array
    then reads the accumulators through a multiplexer and stalls while it does).

    Latency: the product of ``a``/``w`` presented in cycle ``c`` is added in cycle
    ``c + 1`` (``acc_en`` belongs to that cycle); with ``clear`` in cycle ``c + 2`` the sum
    is on ``chain_out`` from cycle ``c + 3``. Throughput: one MAC per cycle.

    Parameters
    ----------
    a_bits, w_bits : int
        SFx widths of activations and weights (2..16).
    acc_bits : int
        Accumulator width ``A`` (at least ``a_bits + w_bits``, at most 64).
    impl : str
        Multiplier implementation, ``"lut"`` or ``"dsp"`` (see
        :class:`SFxMagnitudeMultiplier`).
    shadow : bool
        Keep a shadow register (default ``True``).

    Members
    -------
    a : In(a_bits)
        Activation code (sign-magnitude).
    w : In(w_bits)
        Weight code (sign-magnitude).
    acc_en : In(1)
        The registered product is valid: accumulate it.
    clear : In(1)
        Move ``acc`` to the shadow register and restart ``acc`` at 0.
    shift : In(1)
        Load ``chain_in`` into the shadow register (ignored while clearing).
    chain_in : In(signed(acc_bits))
        Shadow value of the next PE in the drain chain.
    chain_out : Out(signed(acc_bits))
        This PE's shadow register (``shadow=False``: its accumulator).
    """

    def __init__(self, *, a_bits: int, w_bits: int, acc_bits: int, impl: str = "lut", shadow: bool = True):
        with checking(self):
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._acc_bits = check_int(acc_bits, "acc_bits", a_bits + w_bits, 64)
            self._impl = check_impl(impl)
            if not isinstance(shadow, bool):
                raise TypeError(f"shadow must be a bool, got {type(shadow).__name__} {shadow!r}")
            self._shadow = shadow
        super().__init__({
            "a": In(self._a_bits),
            "w": In(self._w_bits),
            "acc_en": In(1),
            "clear": In(1),
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

    @property
    def shadow(self) -> bool:
        return self._shadow

    def elaborate(self, platform):
        m = Module()
        ma, mw = self._a_bits - 1, self._w_bits - 1
        pw = ma + mw
        width = self._acc_bits
        m.submodules.mul = mul = SFxMagnitudeMultiplier(a_width=ma, b_width=mw, impl=self._impl)
        m.d.comb += [mul.a.eq(self.a[:ma]), mul.b.eq(self.w[:mw])]

        prod_mag = Signal(pw, reset_less=True)
        prod_neg = Signal(reset_less=True)
        m.d.sync += [prod_mag.eq(mul.p), prod_neg.eq(self.a[ma] ^ self.w[mw])]

        acc = Signal(width)   # reset to 0: the first tile after reset starts from 0
        # Two's complement of a sign-magnitude product: (mag XOR neg...neg) + neg.
        addend = Cat(prod_mag ^ prod_neg.replicate(pw), prod_neg.replicate(width - pw))
        total = Signal(width)
        m.d.comb += total.eq((acc + addend + prod_neg)[:width])

        if not self._shadow:
            with m.If(self.clear):
                m.d.sync += acc.eq(0)
            with m.Elif(self.acc_en):
                m.d.sync += acc.eq(total)
            m.d.comb += self.chain_out.eq(acc)
            return m

        shadow = Signal(signed(width), reset_less=True)
        with m.If(self.clear):
            m.d.sync += [shadow.eq(acc), acc.eq(0)]
        with m.Else():
            with m.If(self.acc_en):
                m.d.sync += acc.eq(total)
            with m.If(self.shift):
                m.d.sync += shadow.eq(self.chain_in)
        m.d.comb += self.chain_out.eq(shadow)
        return m
