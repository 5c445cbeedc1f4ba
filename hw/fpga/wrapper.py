"""Pin-light synthesis wrapper: every port of a core through scan registers.

The accelerator's stream ports are hundreds of bits wide, far more than the 39 user
pins of an iCE40 UP5K in SG48. To measure the core, and not the package, ``sfx synth``
places it inside :class:`ScanWrapper`:

* every input bit of the core (payloads, ``valid`` of input streams, ``ready`` of
  output streams) comes from one long shift register loaded serially from the
  ``scan_in`` pin while ``scan_en`` is high (so no input is constant and no logic can
  be optimised away);
* every output bit goes through a registered XOR-compression tree (groups of 4, one
  LUT level between registers) into a multiple-input signature register (MISR) whose
  bit 0 drives ``scan_out``: every output bit stays observable, and no path from the
  core crosses more than one LUT before a register, so the wrapper does not limit Fmax.

Ports: ``scan_in``, ``scan_en`` In(1), ``scan_out`` Out(1), plus ``clk`` and ``rst``.
The core is the submodule ``top.core`` (the wrapper's own logic is ``top.scan``). The flow
synthesizes ``top.core`` alone for the core's cell counts and the whole design, flat,
for place and route (see :func:`superfloat.hw.fpga.flow.run_flow`).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ScanWrapper", "CORE_NAME", "SCAN_NAME"]

#: Name of the core submodule (the RTLIL module is ``top.core``).
CORE_NAME = "core"
#: Name of the wrapper's own logic (``top.scan``).
SCAN_NAME = "scan"

_MISR_WIDTH = 32


def _leaves(core: wiring.Component):
    ins, outs = [], []
    for _path, flow, value in core.signature.flatten(core):
        if isinstance(value, Const):   # e.g. the ready of an always-ready stream
            continue
        (ins if flow.flow == wiring.In else outs).append(value)
    return ins, outs


class _ScanLogic(wiring.Component):
    """The wrapper's own logic (its own hierarchy level, kept by the flow): the scan-in
    shift register driving ``chain`` and the compressor/MISR observing ``observe``."""

    def __init__(self, in_bits: int, out_bits: int):
        super().__init__({"scan_in": In(1), "scan_en": In(1), "scan_out": Out(1),
                          "chain": Out(max(1, in_bits)), "observe": In(max(1, out_bits))})

    def elaborate(self, platform):
        m = Module()
        chain = Signal.like(self.chain)
        with m.If(self.scan_en):
            m.d.sync += chain.eq(Cat(chain[1:], self.scan_in))
        m.d.comb += self.chain.eq(chain)
        level = self.observe
        while len(level) > _MISR_WIDTH:
            bits = []
            for i in range(0, len(level), 4):
                r = Signal(name=f"xor_{len(level)}_{i}")
                m.d.sync += r.eq(level[i:i + 4].xor())
                bits.append(r)
            level = Cat(*bits)
        misr = Signal(_MISR_WIDTH)
        m.d.sync += misr.eq(Cat(misr[1:], misr[0]) ^ level)
        m.d.comb += self.scan_out.eq(misr[0])
        return m


class ScanWrapper(wiring.Component):
    """Wrap ``core`` (any :class:`~amaranth.lib.wiring.Component` without clock domains
    of its own beyond ``sync``) behind a serial scan chain and an output MISR.

    Latency and throughput are meaningless: this wrapper exists only so that place and
    route sees the core with realistic registers on every port and a handful of pins.

    Attributes: ``core`` (the wrapped component), ``in_bits`` and ``out_bits`` (widths
    of the core's inputs and outputs).
    """

    def __init__(self, core: wiring.Component):
        if not isinstance(core, wiring.Component):
            self._MustUse__used = True   # rejected: no "created but never used" warning
            raise TypeError(f"core must be an amaranth.lib.wiring.Component, got {type(core).__name__}")
        self._core = core
        ins, outs = _leaves(core)
        self._in_bits = sum(len(Value.cast(v)) for v in ins)
        self._out_bits = sum(len(Value.cast(v)) for v in outs)
        super().__init__({"scan_in": In(1), "scan_en": In(1), "scan_out": Out(1)})

    core = property(lambda self: self._core)
    in_bits = property(lambda self: self._in_bits)
    out_bits = property(lambda self: self._out_bits)

    def elaborate(self, platform):
        m = Module()
        m.submodules[CORE_NAME] = core = self._core
        m.submodules[SCAN_NAME] = scan = _ScanLogic(self._in_bits, self._out_bits)
        ins, outs = _leaves(core)
        m.d.comb += [scan.scan_in.eq(self.scan_in), scan.scan_en.eq(self.scan_en), self.scan_out.eq(scan.scan_out)]
        pos = 0
        for v in ins:
            w = len(Value.cast(v))
            m.d.comb += v.eq(scan.chain[pos:pos + w])
            pos += w
        if outs:
            m.d.comb += scan.observe.eq(Cat(*[Value.cast(v) for v in outs]))
        return m
