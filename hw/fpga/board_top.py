"""Board top: the SFx accelerator behind a UART host link (protocol: :mod:`.protocol`).

:class:`UARTBridge` is the whole design except the pins: UART receiver -> receive FIFO
(block RAM) -> frame parser -> one holding register per input stream -> accelerator ->
frame serializer -> UART transmitter. It is what the cocotb bench simulates
(``sim/tb_board.py``). :class:`BoardTop` adds the board's clock, UART pins and LEDs
through an amaranth-boards platform.

Data path (host -> board): the parser reads a frame's type byte from the FIFO; for a
stream frame it waits until that stream's holding register is empty, then shifts the
payload bytes in (little-endian) and raises the stream's ``valid``; the accelerator
takes the beat whenever it is ready. Frames for different streams fill different
registers, so the host's ``ACT``/``WGT`` interleaving (one of each per reduction step)
keeps both lockstep streams fed. ``STATUS`` / ``INFO`` set a request for the serializer;
``RESET`` resets the accelerator and clears the sticky link flags.

Board -> host: the serializer sends, by priority, an INFO reply, a STATUS reply, a
CREDIT frame (each time ``credit_chunk`` bytes were popped from the FIFO), or a RES frame
(one ``res`` beat).

Recovery: if a frame stays incomplete (or a beat stays unaccepted) while both lines are
idle for ``idle_timeout`` cycles, the bridge flushes the FIFO, resets the accelerator and
its own state, and sets the ``aborted`` flag (the host re-synchronises with RESET + INFO).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, ResetInserter, Signal
from amaranth.build import ResourceError
from amaranth.lib import io, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from superfloat.hw._checks import check_impl, check_int
from superfloat.hw.interface import AccelParams
from superfloat.sw import sfx

from .protocol import BOARD, HOST, STATUS_FLAGS, LinkLayout, encode_info, link_layout
from .uart import MIN_DIVISOR, UARTRx, UARTTx

__all__ = ["UARTBridge", "BoardTop"]

_STREAMS = ("cmd", "par", "act", "wgt")


class UARTBridge(wiring.Component):
    """The accelerator with its UART host link (everything but the pins).

    Latency: a beat reaches the accelerator one cycle after its frame's last byte leaves
    the FIFO; a RES frame starts when the serializer is idle. Throughput: bounded by the
    line, 10 bit times per byte each way (``divisor`` cycles per bit).

    Parameters
    ----------
    rows, cols, a_bits, w_bits, out_bits, k_max, dsp_pes, clamp_impl, overlap_drain, chunk_k, mul_stages, pipelined, xmult
        Those of :class:`superfloat.hw.accelerator.SFxAccelerator` (``xmult``: the per-row
        activation multiplier; INFO reports it).
    divisor : int
        UART bit time in clock cycles (>= 4).
    fifo_depth, credit_chunk : int or None
        Receive FIFO bytes and credit granularity (defaults: :func:`.protocol.link_layout`).
    idle_timeout : int
        Cycles of a stalled, idle link before the bridge resets itself (default 2**22).

    Members
    -------
    rx : In(1)
        UART line from the host (idle high).
    tx : Out(1)
        UART line to the host (idle high).
    busy, error, link_error : Out(1)
        Accelerator busy, its sticky error, any sticky link flag (for LEDs).
    """

    def __init__(self, *, rows: int, cols: int, a_bits: int, w_bits: int, out_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, dsp_pes: int = 0, clamp_impl: str = "dsp", divisor: int,
                 fifo_depth: int | None = None, credit_chunk: int | None = None, idle_timeout: int = 1 << 22,
                 overlap_drain: bool = True, chunk_k: int | None = None, mul_stages: int = 0,
                 pipelined: bool = False, xmult: bool = False):
        self._params = AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits,
                                   k_max=k_max, xmult=xmult)
        self._dsp_pes = check_int(dsp_pes, "dsp_pes", 0, rows * cols)
        self._clamp_impl = check_impl(clamp_impl, "clamp_impl")
        self._divisor = check_int(divisor, "divisor", MIN_DIVISOR, 1 << 24)
        self._layout = link_layout(self._params, fifo_depth=fifo_depth, credit_chunk=credit_chunk)
        self._idle_timeout = check_int(idle_timeout, "idle_timeout", 16, 1 << 32)
        if not isinstance(overlap_drain, bool):
            raise TypeError(f"overlap_drain must be a bool, got {overlap_drain!r}")
        self._overlap = overlap_drain
        self._chunk_k = chunk_k
        self._mul_stages = mul_stages
        self._pipelined = pipelined
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "busy": Out(1),
            "error": Out(1),
            "link_error": Out(1),
        })

    params = property(lambda self: self._params, doc="The accelerator's :class:`AccelParams`.")
    layout: LinkLayout = property(lambda self: self._layout, doc="Frame sizes and FIFO (:class:`LinkLayout`).")
    divisor = property(lambda self: self._divisor, doc="UART bit time in cycles.")
    dsp_pes = property(lambda self: self._dsp_pes)
    clamp_impl = property(lambda self: self._clamp_impl)
    idle_timeout = property(lambda self: self._idle_timeout)

    def elaborate(self, platform):
        from superfloat.hw.accelerator import SFxAccelerator

        m = Module()
        p, lay = self._params, self._layout
        abort = Signal()        # link stalled: reset everything, flush the FIFO
        soft_rst = Signal()     # RESET frame (or abort): reset the accelerator

        m.submodules.urx = urx = UARTRx(divisor=self._divisor)
        m.submodules.utx = utx = UARTTx(divisor=self._divisor)
        fifo = SyncFIFOBuffered(width=8, depth=lay.fifo_depth)
        m.submodules.fifo = ResetInserter(abort)(fifo)
        extra = {"overlap_drain": self._overlap, "chunk_k": self._chunk_k, "mul_stages": self._mul_stages,
                 "pipelined": self._pipelined}
        accel = SFxAccelerator(rows=p.rows, cols=p.cols, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits,
                               k_max=p.k_max, dsp_pes=self._dsp_pes, clamp_impl=self._clamp_impl, xmult=p.xmult,
                               **extra)
        # The accelerator's reset comes from one register, a cycle after the RESET frame or the
        # abort: decoded combinationally it put the parser and the watchdog's compare in front of
        # every flip-flop's reset (the board builds' critical paths, e.g. ``quiet`` ->
        # ``accel.array.first_row``), and one register can drive a global buffer.
        accel_rst = Signal()
        m.d.sync += accel_rst.eq(soft_rst | abort)
        m.submodules.accel = ResetInserter(accel_rst)(accel)

        flags = {name: Signal(name=f"flag_{name}") for name in ("overflow", "framing", "bad_type", "aborted")}
        clear_flags = Signal()

        # ---------------------------------------------------------------- receive
        m.d.comb += [urx.rx.eq(self.rx), urx.out.ready.eq(1), fifo.w_data.eq(urx.out.payload),
                     fifo.w_en.eq(urx.out.valid)]
        with m.If(urx.out.valid & ~fifo.w_rdy):
            m.d.sync += flags["overflow"].eq(1)
        with m.If(urx.frame_error):
            m.d.sync += flags["framing"].eq(1)

        # ---------------------------------------------------------------- parser
        regs = {s: Signal(8 * lay.payload_bytes[s], name=f"hold_{s}", reset_less=True) for s in _STREAMS}
        full = {s: Signal(name=f"full_{s}") for s in _STREAMS}
        ports = {"cmd": accel.cmd, "par": accel.par, "act": accel.act, "wgt": accel.wgt}
        for s in _STREAMS:
            port = ports[s]
            m.d.comb += [port.valid.eq(full[s]), port.payload.eq(regs[s][:lay.payload_bits[s]])]
            with m.If(port.valid & port.ready):
                m.d.sync += full[s].eq(0)

        sel = Signal(range(len(_STREAMS)))
        count = Signal(range(max(lay.payload_bytes[s] for s in _STREAMS) + 1))
        status_req, info_req = Signal(), Signal()
        pop = Signal()
        byte = fifo.r_data
        m.d.comb += fifo.r_en.eq(pop)
        info_pop = Signal()

        with m.FSM(name="parse") as parse:
            with m.State("TYPE"):
                with m.If(fifo.r_rdy):
                    for i, s in enumerate(_STREAMS):
                        with m.If(byte == HOST[s]):
                            with m.If(~full[s]):
                                m.d.comb += pop.eq(1)
                                m.d.sync += [sel.eq(i), count.eq(lay.payload_bytes[s])]
                                m.next = "PAYLOAD"
                    with m.If(byte == HOST["status"]):
                        with m.If(~status_req):
                            m.d.comb += pop.eq(1)
                            m.d.sync += status_req.eq(1)
                    with m.Elif(byte == HOST["info"]):
                        with m.If(~info_req):
                            m.d.comb += [pop.eq(1), info_pop.eq(1)]
                            m.d.sync += info_req.eq(1)
                    with m.Elif(byte == HOST["reset"]):
                        m.d.comb += [pop.eq(1), soft_rst.eq(1), clear_flags.eq(1)]
                        for s in _STREAMS:
                            m.d.sync += full[s].eq(0)
                    with m.Elif(~Cat(*(byte == v for v in HOST.values())).any()):
                        m.d.comb += pop.eq(1)
                        m.d.sync += flags["bad_type"].eq(1)
            with m.State("PAYLOAD"):
                with m.If(fifo.r_rdy):
                    m.d.comb += pop.eq(1)
                    m.d.sync += count.eq(count - 1)
                    for i, s in enumerate(_STREAMS):
                        with m.If(sel == i):
                            m.d.sync += regs[s].eq(Cat(regs[s][8:], byte))
                            with m.If(count == 1):
                                m.d.sync += full[s].eq(1)
                    with m.If(count == 1):
                        m.next = "TYPE"
                with m.If(abort):
                    m.next = "TYPE"

        # ---------------------------------------------------------------- credits
        freed = Signal(range(lay.fifo_depth + 1))
        credit_take = Signal(8)     # latched into a CREDIT frame this cycle
        m.d.sync += freed.eq(freed + pop - credit_take)
        with m.If(info_pop):        # the INFO reply grants a whole FIFO: forget earlier pops
            m.d.sync += freed.eq(0)

        # ---------------------------------------------------------------- serializer
        res_bytes = lay.payload_bytes["res"]
        frame_bytes = 1 + max(res_bytes, len(encode_info(lay)), 5, 1)
        frame = Signal(8 * frame_bytes, reset_less=True)
        left = Signal(range(frame_bytes + 1))
        m.d.comb += [utx.inp.payload.eq(frame[:8]), utx.inp.valid.eq(left != 0), self.tx.eq(utx.tx)]
        with m.If(utx.inp.valid & utx.inp.ready):
            m.d.sync += [frame.eq(frame[8:]), left.eq(left - 1)]

        info_bytes = encode_info(lay)
        flag_byte = Signal(8)
        m.d.comb += [
            flag_byte[STATUS_FLAGS["busy"]].eq(accel.busy),
            flag_byte[STATUS_FLAGS["error"]].eq(accel.error),
        ]
        for name, sig in flags.items():
            m.d.comb += flag_byte[STATUS_FLAGS[name]].eq(sig)
        with m.If(left == 0):
            with m.If(info_req):
                m.d.sync += [frame.eq(Cat(Const(BOARD["info"], 8), Const(int.from_bytes(info_bytes, "little"),
                                                                         8 * len(info_bytes)))),
                             left.eq(1 + len(info_bytes)), info_req.eq(0)]
            with m.Elif(status_req):
                m.d.sync += [frame.eq(Cat(Const(BOARD["status"], 8), flag_byte, accel.sat_count)),
                             left.eq(6), status_req.eq(0)]
            with m.Elif(freed >= lay.credit_chunk):
                m.d.comb += credit_take.eq(lay.credit_chunk)
                m.d.sync += [frame.eq(Cat(Const(BOARD["credit"], 8), Const(lay.credit_chunk, 8))), left.eq(2)]
            with m.Elif(accel.res.valid & ~accel_rst):   # nothing leaves an accelerator being reset
                m.d.comb += accel.res.ready.eq(1)
                m.d.sync += [frame.eq(Cat(Const(BOARD["res"], 8), accel.res.payload)), left.eq(1 + res_bytes)]

        # ---------------------------------------------------------------- stall watchdog
        stuck = fifo.r_rdy | ~parse.ongoing("TYPE") | Cat(*full.values()).any()
        quiet = Signal(range(self._idle_timeout + 1))
        activity = urx.busy | urx.out.valid | (left != 0) | utx.busy | accel.res.valid
        # (the timeout is registered and acted on a cycle later: the abort resets most of the
        # bridge, and the compare in front of that fan-out was a board build's critical path)
        expired = Signal()
        m.d.sync += expired.eq(0)
        with m.If(activity | ~stuck):
            m.d.sync += quiet.eq(0)
        with m.Elif(quiet == self._idle_timeout):
            m.d.sync += [quiet.eq(0), expired.eq(1)]
        with m.Else():
            m.d.sync += quiet.eq(quiet + 1)
        with m.If(expired):
            m.d.comb += abort.eq(1)
            m.d.sync += [quiet.eq(0), flags["aborted"].eq(1), freed.eq(0), status_req.eq(0), info_req.eq(0)]
            for s in _STREAMS:
                m.d.sync += full[s].eq(0)
        with m.If(clear_flags):
            for sig in flags.values():
                m.d.sync += sig.eq(0)

        m.d.comb += [
            self.busy.eq(accel.busy),
            self.error.eq(accel.error),
            self.link_error.eq(Cat(*flags.values()).any()),
        ]
        return m


class BoardTop(wiring.Component):
    """:class:`UARTBridge` on a board: the system clock from the FPGA's PLL (``pll``, a
    :class:`~superfloat.hw.fpga.pll.PllSettings`; ``None``: the board oscillator directly),
    ``uart`` 0 pins, LED 0 = busy, LED 1 = error or link error (where the board has them).

    With a PLL the ``sync`` domain runs on its output and is held in reset until the PLL
    reports lock (two synchronising flip-flops). iCE40: ``SB_PLL40_PAD`` on the oscillator
    pin (the board's clock pin feeds the PLL directly); ECP5: ``EHXPLLL`` fed from the
    oscillator's input buffer, feedback from its own output."""

    def __init__(self, *, bridge_kwargs: dict, baud: int, pll=None):
        self._bridge_kwargs = dict(bridge_kwargs)
        self._baud = baud
        self._pll = pll
        super().__init__({})

    def elaborate(self, platform):
        from amaranth.hdl import ClockDomain, Instance

        from .uart import divisor_for

        m = Module()
        if self._pll is None:
            clk_hz = platform.default_clk_frequency
        else:
            pll = self._pll
            clk_hz = pll.fout_mhz * 1e6
            m.domains.sync = cd_sync = ClockDomain("sync")
            lock = Signal()
            clk_pin = platform.request(platform.default_clk, dir="-")
            prm = {f"p_{k}": v for k, v in pll.params.items()}
            if pll.family == "ice40":
                m.submodules.pll = Instance("SB_PLL40_PAD", **prm, i_PACKAGEPIN=clk_pin.io, i_RESETB=Const(1),
                                            i_BYPASS=Const(0), o_PLLOUTGLOBAL=cd_sync.clk, o_LOCK=lock)
            else:
                m.submodules.clk_buf = clk_buf = io.Buffer("i", clk_pin)
                attrs = {f"a_{k}": v for k, v in pll.attrs.items()}
                m.submodules.pll = Instance("EHXPLLL", **prm, **attrs, i_CLKI=clk_buf.i, o_CLKOP=cd_sync.clk,
                                            i_CLKFB=cd_sync.clk, i_RST=Const(0), i_STDBY=Const(0),
                                            i_PHASESEL0=Const(0), i_PHASESEL1=Const(0), i_PHASEDIR=Const(1),
                                            i_PHASESTEP=Const(1), i_PHASELOADREG=Const(1), i_PLLWAKESYNC=Const(0),
                                            i_ENCLKOP=Const(0), o_LOCK=lock)
            lock_s = Signal(2, reset_less=True)
            m.d.sync += lock_s.eq(Cat(lock, lock_s[0]))
            m.d.comb += cd_sync.rst.eq(~lock_s[1])
            platform.add_clock_constraint(cd_sync.clk, clk_hz)
        bridge = UARTBridge(**self._bridge_kwargs, divisor=divisor_for(clk_hz, self._baud))
        m.submodules.bridge = bridge
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [bridge.rx.eq(rx_buf.i), tx_buf.o.eq(bridge.tx)]
        leds = []
        for i in range(2):
            try:
                led = platform.request("led", i, dir="-")
            except ResourceError:  # a board with fewer LEDs
                break
            m.submodules[f"led_{i}"] = buf = io.Buffer("o", led)
            leds.append(buf)
        if leds:
            m.d.comb += leds[0].o.eq(bridge.busy)
        if len(leds) > 1:
            m.d.comb += leds[1].o.eq(bridge.error | bridge.link_error)
        return m
