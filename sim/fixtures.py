"""Small stream components that test the bench infrastructure itself (runner, stream helpers).

:class:`AddOne` is a stream FIFO that adds 1 to every beat. With ``fault`` set it breaks
a stream rule on purpose, so that tests can prove that :class:`~superfloat.sim.streams.StreamSink`
notices:

* ``"drop_valid"``: after one stalled cycle (``valid & ~ready``) ``valid`` drops for a cycle;
* ``"change_payload"``: while stalled, the payload's bit 0 flips every cycle.
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["AddOne", "FAULTS"]

FAULTS = (None, "drop_valid", "change_payload")


class AddOne(wiring.Component):
    """``o = i + 1`` through a ``depth``-entry FIFO (``i.ready`` is the FIFO's ``w_rdy``).

    Latency 1 cycle (buffered FIFO), throughput one beat per cycle.

    Members
    -------
    i : In(stream.Signature(width))
    o : Out(stream.Signature(width))
    """

    def __init__(self, *, width: int = 16, depth: int = 4, fault: str | None = None):
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 4096:
            raise ValueError(f"width must be an int in 1..4096, got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 1024:
            raise ValueError(f"depth must be an int in 1..1024, got {depth!r}")
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        self._width, self._depth, self._fault = width, depth, fault
        super().__init__({"i": In(stream.Signature(width)), "o": Out(stream.Signature(width))})

    width = property(lambda self: self._width)
    depth = property(lambda self: self._depth)
    fault = property(lambda self: self._fault)

    def elaborate(self, platform):
        m = Module()
        m.submodules.q = q = fifo.SyncFIFOBuffered(width=self._width, depth=self._depth)
        stalled = Signal()  # o was valid & ~ready in the previous cycle
        m.d.sync += stalled.eq(self.o.valid & ~self.o.ready)
        m.d.comb += [
            q.w_data.eq(self.i.payload + 1),
            q.w_en.eq(self.i.valid),
            self.i.ready.eq(q.w_rdy),
        ]
        valid = q.r_rdy
        payload = q.r_data
        if self._fault == "drop_valid":
            valid = q.r_rdy & ~stalled
        elif self._fault == "change_payload":
            flip = Signal()
            m.d.sync += flip.eq(flip ^ (self.o.valid & ~self.o.ready))
            payload = q.r_data ^ flip
        m.d.comb += [
            self.o.valid.eq(valid),
            self.o.payload.eq(payload),
            q.r_en.eq(self.o.ready & valid),
        ]
        return m
