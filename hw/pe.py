"""Processing element of the SFx MAC array: magnitude multiplier and accumulator.

SPEC section 3: a product of two sign-magnitude codes is
``(-1)**(sa ^ sw) * ma * mw``, an exact integer; products are accumulated exactly in an
``A``-bit two's complement register (``A = sfx.accumulator_bits(a_bits, w_bits, k_max)``).

The physical cost of a PE is what this module is written around (docs/architecture.md,
"Processing element"): an unsigned ``(a_bits-1) x (w_bits-1)`` magnitude product, its sign
``sa ^ sw`` folded into the accumulator's adder (the product enters as its ones'
complement ``mag ^ neg`` with ``neg`` as the adder's carry-in: one LUT4 per accumulator
bit on the carry chain), and the ``A`` accumulator bits themselves. Everything else the
array needs (broadcast registers, drain) lives outside the PE.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._checks import check_bits, check_bool, check_impl, check_int, checking

__all__ = ["SFxMagnitudeMultiplier", "TwosComplementMultiplier", "SFxPE", "PE_KINDS"]

#: Kinds of :class:`SFxPE`: ``"sm"`` (SFx sign-magnitude codes, the accelerator's
#: function) and ``"tc"`` (two's complement integer codes of the same width: the
#: integer baseline of the synthesis comparison, docs/fpga.md).
PE_KINDS = ("sm", "tc")


def _tree_sum(terms, m=None, stages=0):
    """Sum ``terms`` with a balanced tree of two-input adders; with ``stages`` the partial
    sums are registered after the first ``stages`` levels (``m.d.sync``)."""
    level = 0
    while len(terms) > 1:
        nxt = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
        level += 1
        if level <= stages:
            regs = []
            for k, t in enumerate(terms):
                r = Signal(len(t), name=f"sum_l{level}_{k}", reset_less=True)
                m.d.sync += r.eq(t)
                regs.append(r)
            terms = regs
    out = terms[0]
    for extra in range(level, stages):   # fewer levels than stages: pad the latency
        r = Signal(len(out), name=f"sum_pad{extra}", reset_less=True)
        m.d.sync += r.eq(out)
        out = r
    return out


def _delay(m, value, cycles: int, name: str):
    """``value`` delayed by ``cycles`` registers (``value`` itself for 0)."""
    for k in range(cycles):
        r = Signal(value.shape(), name=f"{name}_d{k}", reset_less=True)
        m.d.sync += r.eq(value)
        value = r
    return value


def _dsp_product(m, a, b, stages: int):
    """``a * b`` for a DSP block with ``stages`` registers: the first on the operands (a DSP
    block sits in a fixed column, far from the broadcast registers: the register next to it,
    or inside it, takes the long route), the others after the product."""
    if stages:
        a = _delay(m, a, 1, "a_in")
        b = _delay(m, b, 1, "b_in")
    return _delay(m, a * b, max(0, stages - 1), "prod")


class SFxMagnitudeMultiplier(wiring.Component):
    """Unsigned ``a_width x b_width`` multiplier, combinational or pipelined.

    Two implementations, bit-identical (``p == a * b`` for every input):

    * ``impl="lut"``: ``b_width`` partial products ``(a AND b[k]) << k`` summed by a
      balanced adder tree. There is no ``*`` operator, so Yosys never infers a DSP
      block: use it to keep a design within the DSP budget of a small FPGA.
    * ``impl="dsp"``: the ``*`` operator; Yosys maps it to DSP blocks (iCE40
      ``SB_MAC16``, ECP5 ``MULT18X18D``) when the synthesis script allows DSPs.

    Latency: ``stages`` cycles (0: combinational). With ``impl="lut"`` the adder tree is
    cut by registers after its first ``stages`` levels (the partial sums of a wide
    product in one cycle are what limits the clock of a logic multiplier); with
    ``impl="dsp"`` the first register holds the operands (next to, or inside, the DSP
    block), the others the product.
    Throughput: one product per cycle.

    Parameters
    ----------
    a_width : int
        Width of ``a`` (1..64).
    b_width : int
        Width of ``b`` (1..64).
    impl : str
        ``"lut"`` or ``"dsp"``.
    stages : int
        Pipeline registers inside the multiplier (0..4, default 0).

    Members
    -------
    a : In(a_width)
        First magnitude.
    b : In(b_width)
        Second magnitude.
    p : Out(a_width + b_width)
        Exact product ``a * b`` of the operands presented ``stages`` cycles earlier.
    """

    def __init__(self, *, a_width: int, b_width: int, impl: str = "lut", stages: int = 0):
        with checking(self):
            self._a_width = check_int(a_width, "a_width", 1, 64)
            self._b_width = check_int(b_width, "b_width", 1, 64)
            self._impl = check_impl(impl)
            self._stages = check_int(stages, "stages", 0, 4)
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

    @property
    def stages(self) -> int:
        return self._stages

    def elaborate(self, platform):
        m = Module()
        if self._impl == "dsp":
            m.d.comb += self.p.eq(_dsp_product(m, self.a, self.b, self._stages))
            return m
        # Shifted-AND partial products, summed pairwise (a balanced tree of adders).
        terms = [(self.a & self.b[k].replicate(self._a_width)) << k for k in range(self._b_width)]
        m.d.comb += self.p.eq(_tree_sum(terms, m, self._stages))
        return m


class TwosComplementMultiplier(wiring.Component):
    """Signed ``a_width x b_width`` two's complement multiplier, combinational or pipelined.

    * ``impl="lut"``: modified Baugh-Wooley: ``b_width`` rows of ``a_width`` AND terms
      (the sign row and sign column inverted), plus the constant
      ``2**(a+b-1) + 2**(a-1) + 2**(b-1)``, summed by the same balanced adder tree as
      :class:`SFxMagnitudeMultiplier` (so neither kind gets a better adder structure),
      modulo ``2**(a+b)``. No ``*``: Yosys never infers a DSP.
    * ``impl="dsp"``: the signed ``*`` operator.

    Latency ``stages`` cycles (as :class:`SFxMagnitudeMultiplier`); one product per cycle.

    Members: ``a`` In(signed(a_width)), ``b`` In(signed(b_width)), ``p``
    Out(signed(a_width + b_width)) ``== a * b``.
    """

    def __init__(self, *, a_width: int, b_width: int, impl: str = "lut", stages: int = 0):
        with checking(self):
            self._a_width = check_int(a_width, "a_width", 2, 64)
            self._b_width = check_int(b_width, "b_width", 2, 64)
            self._impl = check_impl(impl)
            self._stages = check_int(stages, "stages", 0, 4)
        super().__init__({
            "a": In(signed(self._a_width)),
            "b": In(signed(self._b_width)),
            "p": Out(signed(self._a_width + self._b_width)),
        })

    a_width = property(lambda self: self._a_width)
    b_width = property(lambda self: self._b_width)
    impl = property(lambda self: self._impl)
    stages = property(lambda self: self._stages)

    def elaborate(self, platform):
        m = Module()
        n, k = self._a_width, self._b_width
        if self._impl == "dsp":
            m.d.comb += self.p.eq(_dsp_product(m, self.a, self.b, self._stages))
            return m
        a = self.a.as_unsigned()
        b = self.b.as_unsigned()
        terms = []
        for j in range(k):
            row = a & b[j].replicate(n)
            if j < k - 1:   # a_i b_j for i < n-1, then ~(a_{n-1} b_j)
                bits = Cat(row[:n - 1], ~row[n - 1])
            else:           # ~(a_i b_{m-1}) for i < n-1, then a_{n-1} b_{m-1}
                bits = Cat(~row[:n - 1], row[n - 1])
            terms.append(bits << j)
        const = (1 << (n + k - 1)) + (1 << (n - 1)) + (1 << (k - 1))
        terms.append(Const(const % (1 << (n + k)), n + k))
        m.d.comb += self.p.eq(_tree_sum(terms, m, self._stages)[:n + k])
        return m


class SFxPE(wiring.Component):
    """One processing element: registered product, exact accumulation, optional shadow.

    Registers:

    * the product of the codes on ``a`` and ``w``: for ``kind="sm"`` the ones' complement
      ``mag ^ neg`` of the magnitude product ``mag = ma * mw`` and its sign
      ``neg = sa ^ sw`` (``mag`` from :class:`SFxMagnitudeMultiplier`, pipelined by
      ``mul_stages``); for ``kind="tc"`` the two's complement product of the codes read as
      signed integers (:class:`TwosComplementMultiplier`);
    * ``acc``: the ``A``-bit two's complement accumulator. Every cycle it takes
      ``acc + product`` (``kind="sm"``: ``acc + (mag ^ neg) + neg``, the sign is the carry
      into the adder, one LUT4 per bit on the carry chain; a zero magnitude adds 0 whatever
      its sign), or 0 when ``zero`` is high (the product added in that cycle is dropped).
      There is no enable: the array presents code 0 (product 0) in idle cycles;
    * with ``shadow``: ``shadow`` takes ``acc`` when ``zero`` is high (the finished sum of a
      tile moves out while ``acc`` restarts), else takes 0 when ``dclr`` is high.

    ``out`` is the register the array reads (``shadow``, or ``acc`` without one). The array
    reads it destructively: ``dclr`` clears it (without a shadow ``dclr`` clears ``acc``
    like ``zero``), and the array's XOR readout tree recovers the value from the change
    (:class:`superfloat.hw.mac_array.SFxMacArray`).

    Latency: the product of the codes on ``a``/``w`` in cycle ``c`` is in ``acc`` from
    cycle ``c + 2 + mul_stages`` (:attr:`latency` ``= 2 + mul_stages``). Throughput: one MAC
    per cycle.

    Parameters
    ----------
    a_bits, w_bits : int
        Code widths of activations and weights (2..16).
    acc_bits : int
        Accumulator width ``A`` (at least ``a_bits + w_bits``, at most 64).
    impl : str
        Multiplier implementation, ``"lut"`` or ``"dsp"``.
    shadow : bool
        Keep a shadow register (default ``True``).
    mul_stages : int
        Pipeline registers inside the multiplier (0..4, default 0).
    kind : str
        ``"sm"`` (SFx, default) or ``"tc"`` (two's complement integers, for comparisons).

    Members
    -------
    a : In(a_bits)
        Activation code.
    w : In(w_bits)
        Weight code.
    zero : In(1)
        ``acc`` takes 0 (with a shadow: and ``shadow`` takes ``acc``).
    dclr : In(1)
        Clear ``out``'s register (readout of the drain).
    out : Out(signed(acc_bits))
        ``shadow`` (or ``acc`` without a shadow).
    """

    def __init__(self, *, a_bits: int, w_bits: int, acc_bits: int, impl: str = "lut", shadow: bool = True,
                 mul_stages: int = 0, kind: str = "sm"):
        with checking(self):
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._acc_bits = check_int(acc_bits, "acc_bits", a_bits + w_bits, 64)
            self._impl = check_impl(impl)
            self._shadow = check_bool(shadow, "shadow")
            self._mul_stages = check_int(mul_stages, "mul_stages", 0, 4)
            if not isinstance(kind, str) or kind not in PE_KINDS:
                raise ValueError(f"kind must be one of {', '.join(map(repr, PE_KINDS))}, got {kind!r}")
            self._kind = kind
        super().__init__({
            "a": In(self._a_bits),
            "w": In(self._w_bits),
            "zero": In(1),
            "dclr": In(1),
            "out": Out(signed(self._acc_bits)),
        })

    a_bits = property(lambda self: self._a_bits, doc="Activation code width.")
    w_bits = property(lambda self: self._w_bits, doc="Weight code width.")
    acc_bits = property(lambda self: self._acc_bits, doc="Accumulator width A.")
    impl = property(lambda self: self._impl, doc="Multiplier implementation.")
    shadow = property(lambda self: self._shadow, doc="Whether the PE has a shadow register.")
    mul_stages = property(lambda self: self._mul_stages, doc="Pipeline registers inside the multiplier.")
    kind = property(lambda self: self._kind, doc="'sm' (SFx) or 'tc' (two's complement).")

    @property
    def latency(self) -> int:
        """Cycles from codes on ``a``/``w`` to their product being in ``acc``."""
        return 2 + self._mul_stages

    def elaborate(self, platform):
        m = Module()
        width = self._acc_bits
        acc = Signal(width, reset_less=True)   # the array clears it after reset (zero / dclr)

        if self._kind == "sm":
            ma, mw = self._a_bits - 1, self._w_bits - 1
            pw = ma + mw
            m.submodules.mul = mul = SFxMagnitudeMultiplier(a_width=ma, b_width=mw, impl=self._impl,
                                                            stages=self._mul_stages)
            m.d.comb += [mul.a.eq(self.a[:ma]), mul.b.eq(self.w[:mw])]
            neg_in = _delay(m, self.a[ma] ^ self.w[mw], self._mul_stages, "neg")
            mag_x = Signal(pw, reset_less=True)     # ones' complement of the product
            neg = Signal(reset_less=True)
            m.d.sync += [mag_x.eq(mul.p ^ neg_in.replicate(pw)), neg.eq(neg_in)]
            # acc + (-1)**neg * mag == acc + (mag ^ neg...neg) + neg  (mod 2**A)
            addend = Cat(mag_x, neg.replicate(width - pw))
            total = (acc + addend + neg)[:width]
        else:
            m.submodules.mul = mul = TwosComplementMultiplier(a_width=self._a_bits, b_width=self._w_bits,
                                                              impl=self._impl, stages=self._mul_stages)
            m.d.comb += [mul.a.eq(self.a.as_signed()), mul.b.eq(self.w.as_signed())]
            prod = Signal(signed(self._a_bits + self._w_bits), reset_less=True)
            m.d.sync += prod.eq(mul.p)
            total = (acc + prod)[:width]

        if not self._shadow:
            with m.If(self.zero | self.dclr):
                m.d.sync += acc.eq(0)
            with m.Else():
                m.d.sync += acc.eq(total)
            m.d.comb += self.out.eq(acc)
            return m

        shadow = Signal(width, reset_less=True)
        with m.If(self.zero):
            m.d.sync += [acc.eq(0), shadow.eq(acc)]
        with m.Else():
            m.d.sync += acc.eq(total)
            with m.If(self.dclr):
                m.d.sync += shadow.eq(0)
        m.d.comb += self.out.eq(shadow)
        return m
