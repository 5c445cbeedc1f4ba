"""8N1 UART receiver and transmitter (one start bit, 8 data bits LSB first, one stop bit).

The bit time is ``divisor`` clock cycles (``round(clk_hz / baud)``, at least 4; the
simulation benches use 4-8 to keep runs short).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from superfloat.hw._checks import check_int

__all__ = ["UARTRx", "UARTTx", "divisor_for", "MIN_DIVISOR"]

#: Smallest supported bit time in clock cycles.
MIN_DIVISOR = 4


def divisor_for(clk_hz: float, baud: int) -> int:
    """Cycles per bit for ``baud`` at ``clk_hz``; ``ValueError`` if the rate error exceeds 2 %
    or the divisor would be below :data:`MIN_DIVISOR`."""
    if isinstance(baud, bool) or not isinstance(baud, int) or baud <= 0:
        raise ValueError(f"baud must be a positive int, got {baud!r}")
    div = round(clk_hz / baud)
    if div < MIN_DIVISOR:
        raise ValueError(f"baud {baud} is too fast for a {clk_hz / 1e6:g} MHz clock (needs at least "
                         f"{MIN_DIVISOR} cycles per bit; the fastest is {int(clk_hz // MIN_DIVISOR)})")
    err = abs(clk_hz / div - baud) / baud
    if err > 0.02:
        raise ValueError(f"baud {baud} is {err:.1%} off at {clk_hz / 1e6:g} MHz (divisor {div}); "
                         f"choose a rate within 2 %")
    return div


class UARTRx(wiring.Component):
    """UART receiver.

    ``rx`` is synchronised by two flip-flops; a falling edge starts a byte, the start bit
    is checked at its middle, data bits are sampled at their middles, and the stop bit
    must be high (else ``frame_error`` pulses and the byte is dropped).

    Latency: a byte is presented on ``out`` half a bit time after its stop bit starts.
    Throughput: one byte per 10 bit times. ``out`` has no back-pressure that can stop
    the line: ``out.valid`` stays high until ``out.ready``; a byte completing while the
    previous one is still waiting replaces it and pulses ``overrun``.

    Parameters: ``divisor`` (cycles per bit, >= 4).

    Members: ``rx`` In(1) (line, idle high); ``out`` Out(stream.Signature(8));
    ``frame_error``, ``overrun`` Out(1) (one-cycle pulses); ``busy`` Out(1) (a byte is
    being received).
    """

    def __init__(self, *, divisor: int):
        self._divisor = check_int(divisor, "divisor", MIN_DIVISOR, 1 << 24)
        super().__init__({
            "rx": In(1, init=1),
            "out": Out(stream.Signature(8)),
            "frame_error": Out(1),
            "overrun": Out(1),
            "busy": Out(1),
        })

    divisor = property(lambda self: self._divisor)

    def elaborate(self, platform):
        m = Module()
        d = self._divisor
        sync1 = Signal(init=1)
        line = Signal(init=1)
        m.d.sync += [sync1.eq(self.rx), line.eq(sync1)]

        timer = Signal(range(d + 1))
        bit = Signal(range(10))
        shreg = Signal(8)
        valid = Signal()
        data = Signal(8)
        m.d.comb += [self.out.valid.eq(valid), self.out.payload.eq(data)]
        with m.If(self.out.ready):
            m.d.sync += valid.eq(0)

        with m.FSM(name="rx") as fsm:
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += [timer.eq(d // 2 - 1), bit.eq(0)]
                    m.next = "START"
            with m.State("START"):
                with m.If(timer == 0):
                    with m.If(line):   # a glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += timer.eq(d - 1)
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], line)), timer.eq(d - 1), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("STOP"):
                with m.If(timer == 0):
                    with m.If(line):
                        m.d.sync += [data.eq(shreg), valid.eq(1)]
                        m.d.comb += self.overrun.eq(valid & ~self.out.ready)
                    with m.Else():
                        m.d.comb += self.frame_error.eq(1)
                    m.next = "WAIT_IDLE"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("WAIT_IDLE"):   # a broken stop bit: wait for the line to go high
                with m.If(line):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


class UARTTx(wiring.Component):
    """UART transmitter.

    Latency: the start bit begins the cycle after a byte is accepted. Throughput: one
    byte per 10 bit times plus one cycle (``inp.ready`` is high only between bytes).

    Parameters: ``divisor`` (cycles per bit, >= 4).

    Members: ``inp`` In(stream.Signature(8)); ``tx`` Out(1) (idle high); ``busy`` Out(1).
    """

    def __init__(self, *, divisor: int):
        self._divisor = check_int(divisor, "divisor", MIN_DIVISOR, 1 << 24)
        super().__init__({
            "inp": In(stream.Signature(8)),
            "tx": Out(1, init=1),
            "busy": Out(1),
        })

    divisor = property(lambda self: self._divisor)

    def elaborate(self, platform):
        m = Module()
        d = self._divisor
        timer = Signal(range(d))
        bits = Signal(10, init=0x3FF)   # start, data[0..7], stop: shifted out LSB first
        left = Signal(range(12))        # bit periods still to run (11: one to load the start bit)
        line = Signal(init=1)
        m.d.comb += [self.tx.eq(line), self.busy.eq(left != 0), self.inp.ready.eq(left == 0)]
        with m.If(left == 0):
            with m.If(self.inp.valid):
                m.d.sync += [bits.eq(Cat(0, self.inp.payload, 1)), left.eq(11), timer.eq(0)]
        with m.Elif(timer == 0):
            m.d.sync += [left.eq(left - 1), timer.eq(d - 1)]
            with m.If(left != 1):
                m.d.sync += [line.eq(bits[0]), bits.eq(Cat(bits[1:], 1))]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m
