"""Comparison PE arrays: SFx sign-magnitude PEs beside two's complement integer PEs.

"Sign-magnitude saves logic" is a claim to measure, not to assume. This module builds
two arrays that differ only in the processing element, so that the synthesis flow
(:mod:`superfloat.hw.fpga.flow`) can measure both the same way:

* ``kind="sm"``: the accelerator's own PE, :class:`superfloat.hw.pe.SFxPE` (an unsigned
  ``(a_bits-1) x (w_bits-1)`` magnitude multiplier, sign ``sa ^ sw``, conditional
  negation folded into the accumulator's adder);
* ``kind="tc"``: :class:`TwosComplementPE`, the same registers and accumulator with a
  signed ``a_bits x w_bits`` two's complement multiplier
  (:class:`TwosComplementMultiplier`: modified Baugh-Wooley partial products summed by
  the same balanced adder tree as the SFx LUT multiplier, so neither side gets a
  better adder structure).

Both take the same codes width, accumulate in the same ``A`` bits
(``sfx.accumulator_bits(a_bits, w_bits, k_max)``) and keep the same shadow/drain chain.
"""
from __future__ import annotations

import functools

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from superfloat.hw._checks import check_bits, check_impl, check_int, checking
from superfloat.hw.pe import SFxPE
from superfloat.sw import sfx

__all__ = ["KINDS", "TwosComplementMultiplier", "TwosComplementPE", "PEArrayCore"]

#: PE kinds of :class:`PEArrayCore`.
KINDS = ("sm", "tc")


def _tree_sum(terms):
    while len(terms) > 1:
        nxt = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
    return terms[0]


class TwosComplementMultiplier(wiring.Component):
    """Signed ``a_width x b_width`` two's complement multiplier, combinational.

    * ``impl="lut"``: modified Baugh-Wooley: ``b_width`` rows of ``a_width`` AND terms
      (the sign row and sign column inverted), plus the constant
      ``2**(a+b-1) + 2**(a-1) + 2**(b-1)``, summed by a balanced adder tree, modulo
      ``2**(a+b)``. No ``*``: Yosys never infers a DSP.
    * ``impl="dsp"``: the signed ``*`` operator.

    Latency 0; one product per cycle.

    Members: ``a`` In(signed(a_width)), ``b`` In(signed(b_width)), ``p``
    Out(signed(a_width + b_width)) ``== a * b``.
    """

    def __init__(self, *, a_width: int, b_width: int, impl: str = "lut"):
        with checking(self):
            self._a_width = check_int(a_width, "a_width", 2, 64)
            self._b_width = check_int(b_width, "b_width", 2, 64)
            self._impl = check_impl(impl)
        super().__init__({
            "a": In(signed(self._a_width)),
            "b": In(signed(self._b_width)),
            "p": Out(signed(self._a_width + self._b_width)),
        })

    a_width = property(lambda self: self._a_width)
    b_width = property(lambda self: self._b_width)
    impl = property(lambda self: self._impl)

    def elaborate(self, platform):
        m = Module()
        n, k = self._a_width, self._b_width
        if self._impl == "dsp":
            m.d.comb += self.p.eq(self.a * self.b)
            return m
        a = self.a.as_unsigned()
        b = self.b.as_unsigned()
        terms = []
        for j in range(k):
            bj = b[j].replicate(n)
            row = a & bj
            if j < k - 1:   # a_i b_j for i < n-1, then ~(a_{n-1} b_j)
                bits = Cat(row[:n - 1], ~row[n - 1])
            else:           # ~(a_i b_{m-1}) for i < n-1, then a_{n-1} b_{m-1}
                bits = Cat(~row[:n - 1], row[n - 1])
            terms.append(bits << j)
        const = (1 << (n + k - 1)) + (1 << (n - 1)) + (1 << (k - 1))
        terms.append(Const(const % (1 << (n + k)), n + k))
        m.d.comb += self.p.eq(_tree_sum(terms)[:n + k])
        return m


@functools.lru_cache(maxsize=None)
def _sm_pe_has_clear() -> bool:
    """Whether :class:`SFxPE` uses the ``clear`` protocol (else ``first``/``capture``)."""
    pe = SFxPE(a_bits=2, w_bits=2, acc_bits=4)
    pe._MustUse__silence = True   # a probe, never elaborated
    return "clear" in pe.signature.members


class TwosComplementPE(wiring.Component):
    """A two's complement integer PE with the registers and control of
    :class:`superfloat.hw.pe.SFxPE` (whichever control protocol that PE has).

    ``a`` and ``w`` are two's complement integers of ``a_bits`` / ``w_bits`` bits; the
    product is registered, then added to the ``A``-bit accumulator when ``acc_en``.

    * ``clear`` protocol: ``clear`` moves ``acc`` to the shadow register and restarts
      ``acc`` at 0; else ``shift`` loads ``chain_in`` into the shadow register.
    * ``first``/``capture`` protocol: ``acc = (first ? 0 : acc) + prod``; the shadow register
      captures the new sum on ``acc_en & capture`` or loads ``chain_in`` on ``shift``.

    Latency and members as :class:`~superfloat.hw.pe.SFxPE`.
    """

    def __init__(self, *, a_bits: int, w_bits: int, acc_bits: int, impl: str = "lut", clear: bool | None = None):
        with checking(self):
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._acc_bits = check_int(acc_bits, "acc_bits", a_bits + w_bits, 64)
            self._impl = check_impl(impl)
        self._clear = _sm_pe_has_clear() if clear is None else bool(clear)
        ctl = {"clear": In(1)} if self._clear else {"first": In(1), "capture": In(1)}
        super().__init__({
            "a": In(self._a_bits),
            "w": In(self._w_bits),
            "acc_en": In(1),
            **ctl,
            "shift": In(1),
            "chain_in": In(signed(self._acc_bits)),
            "chain_out": Out(signed(self._acc_bits)),
        })

    a_bits = property(lambda self: self._a_bits)
    w_bits = property(lambda self: self._w_bits)
    acc_bits = property(lambda self: self._acc_bits)
    impl = property(lambda self: self._impl)

    def elaborate(self, platform):
        m = Module()
        width = self._acc_bits
        m.submodules.mul = mul = TwosComplementMultiplier(a_width=self._a_bits, b_width=self._w_bits,
                                                          impl=self._impl)
        m.d.comb += [mul.a.eq(self.a.as_signed()), mul.b.eq(self.w.as_signed())]
        prod = Signal(signed(self._a_bits + self._w_bits), reset_less=True)
        m.d.sync += prod.eq(mul.p)
        shadow = Signal(signed(width), reset_less=True)
        total = Signal(signed(width))
        if self._clear:
            acc = Signal(signed(width))
            m.d.comb += total.eq(acc + prod)
            with m.If(self.clear):
                m.d.sync += [shadow.eq(acc), acc.eq(0)]
            with m.Else():
                with m.If(self.acc_en):
                    m.d.sync += acc.eq(total)
                with m.If(self.shift):
                    m.d.sync += shadow.eq(self.chain_in)
        else:
            acc = Signal(signed(width), reset_less=True)
            m.d.comb += total.eq(Mux(self.first, 0, acc) + prod)
            with m.If(self.acc_en):
                m.d.sync += acc.eq(total)
            with m.If(self.acc_en & self.capture):
                m.d.sync += shadow.eq(total)
            with m.Elif(self.shift):
                m.d.sync += shadow.eq(self.chain_in)
        m.d.comb += self.chain_out.eq(shadow)
        return m


class PEArrayCore(wiring.Component):
    """``rows x cols`` output-stationary PE array for the sign-magnitude vs two's
    complement comparison (no streams, no requantization).

    The codes on ``act`` / ``wgt`` are registered and broadcast (activation ``i`` along
    row ``i``, weight ``j`` down column ``j``), as in :class:`superfloat.hw.mac_array.SFxMacArray`;
    the control bits are delayed to match the PE pipeline; the PEs' shadow registers
    form one drain chain read at ``out``.

    Latency: codes presented in cycle ``c`` are accumulated in ``c + 2``; a tile's sums
    reach the drain chain two cycles after its ``last`` step. With PEs of the ``clear``
    protocol, ``first`` is ignored (the accumulators restart at 0 after each tile) and
    the step after ``last`` must not be a product of the next tile (leave ``en`` low for
    one cycle). Throughput: one MAC per PE per cycle.

    Parameters: ``kind`` (``"sm"`` or ``"tc"``), ``rows``, ``cols`` (1..64),
    ``a_bits``, ``w_bits`` (2..16), ``k_max`` (sets ``A``), ``impl`` (``"lut"`` or
    ``"dsp"``, every PE).

    Members: ``act`` In(rows x a_bits), ``wgt`` In(cols x w_bits), ``en``, ``first``,
    ``last``, ``shift`` In(1), ``out`` Out(signed(A)).
    """

    def __init__(self, *, kind: str, rows: int, cols: int, a_bits: int, w_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, impl: str = "lut"):
        with checking(self):
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
            self._kind = kind
            self._rows = check_int(rows, "rows", 1, 64)
            self._cols = check_int(cols, "cols", 1, 64)
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._k_max = check_int(k_max, "k_max", 1, sfx.K_MAX_LIMIT)
            self._impl = check_impl(impl)
        self._acc_bits = sfx.accumulator_bits(a_bits, w_bits, k_max)
        super().__init__({
            "act": In(data.ArrayLayout(self._a_bits, self._rows)),
            "wgt": In(data.ArrayLayout(self._w_bits, self._cols)),
            "en": In(1),
            "first": In(1),
            "last": In(1),
            "shift": In(1),
            "out": Out(signed(self._acc_bits)),
        })

    kind = property(lambda self: self._kind)
    rows = property(lambda self: self._rows)
    cols = property(lambda self: self._cols)
    a_bits = property(lambda self: self._a_bits)
    w_bits = property(lambda self: self._w_bits)
    acc_bits = property(lambda self: self._acc_bits)
    impl = property(lambda self: self._impl)

    def elaborate(self, platform):
        m = Module()
        clear = _sm_pe_has_clear()
        act = Signal.like(self.act, reset_less=True)
        wgt = Signal.like(self.wgt, reset_less=True)
        s0 = Signal(3)
        s1 = Signal(3)
        s2_last = Signal()
        m.d.sync += [act.eq(self.act), wgt.eq(self.wgt), s0.eq(Cat(self.en, self.first, self.last)), s1.eq(s0),
                     s2_last.eq(s1[0] & s1[2])]
        pes = []
        for i in range(self._rows):
            for j in range(self._cols):
                kw = dict(a_bits=self._a_bits, w_bits=self._w_bits, acc_bits=self._acc_bits, impl=self._impl)
                pe = SFxPE(**kw) if self._kind == "sm" else TwosComplementPE(**kw, clear=clear)
                m.submodules[f"pe_{i}_{j}"] = pe
                m.d.comb += [pe.a.eq(act[i]), pe.w.eq(wgt[j]), pe.acc_en.eq(s1[0]), pe.shift.eq(self.shift)]
                if clear:   # the cycle after a tile's last product: move the sums to the shadows
                    m.d.comb += pe.clear.eq(s2_last)
                else:
                    m.d.comb += [pe.first.eq(s1[1]), pe.capture.eq(s1[2])]
                pes.append(pe)
        for p, pe in enumerate(pes):
            m.d.comb += pe.chain_in.eq(pes[p + 1].chain_out if p + 1 < len(pes) else 0)
        m.d.comb += self.out.eq(pes[0].chain_out)
        return m
