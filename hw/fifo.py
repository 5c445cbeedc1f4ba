"""A first-word-fall-through FIFO whose storage is one synchronous-read memory (block RAM)."""
from __future__ import annotations

from amaranth.hdl import Module, Shape, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ._checks import check_int, checking

__all__ = ["MemFIFO", "StreamSlice", "RAM_ATTRS"]

#: Attributes of the design's memories: block RAM, and no read/write collision logic. The
#: design never reads a word in the cycle it writes it (the FIFO reads only words written
#: in an earlier cycle; the accelerator's context and partial-sum memories are written and
#: read in different phases), so Yosys need not add registers and multiplexers that emulate
#: a defined result for a collision (it otherwise does, on iCE40: about 200 flip-flops).
RAM_ATTRS = {"ram_style": "block", "no_rw_check": 1}
_RAM_ATTRS = RAM_ATTRS


class MemFIFO(wiring.Component):
    """FIFO of ``depth`` words in a memory with one synchronous read port, plus the read
    port's own output register (so ``depth + 1`` words in all).

    The memory is marked ``ram_style = "block"`` (:data:`RAM_ATTRS`): on the FPGAs it goes
    into block RAM (iCE40 ``SB_RAM40_4K``, ECP5 ``DP16KD``), not into logic cells. The output is the
    read port's data register, which changes only when the next word is fetched, so
    :attr:`r` is a proper stream (payload stable while ``valid & ~ready``).

    Latency: a word written in cycle ``c`` is on :attr:`r` from cycle ``c + 2`` (empty
    FIFO). Throughput: one write and one read per cycle.

    A word may be written in parts (``lanes > 1``): ``w_en`` has one bit per lane of
    ``width // lanes`` bits (a masked write into the word being filled), and ``w_commit``
    appends the word. This spares a register that would assemble the word first.

    With ``out_reg`` the memory's read register feeds one more register in the fabric, which
    drives :attr:`r` (block-RAM clock-to-output is long on some FPGAs; one more word held,
    one more cycle of latency).

    Parameters: ``width`` (1..4096), ``depth`` (2..65536), ``lanes`` (1.., divides ``width``),
    ``out_reg`` (bool, default ``False``).

    Members
    -------
    w_en : In(lanes)
        Write the enabled lanes of ``w_data`` into the word being filled.
    w_commit : In(1)
        Append the word being filled (it may be written in the same cycle); the writer must
        not overflow (:attr:`level` tells).
    w_data : In(width)
    r : Out(stream.Signature(width))
        The oldest word.
    level : Out(range(depth + 2))
        Words held (memory and output register).
    """

    def __init__(self, *, width: int, depth: int, lanes: int = 1, out_reg: bool = False):
        with checking(self):
            self._width = check_int(width, "width", 1, 4096)
            self._depth = check_int(depth, "depth", 2, 1 << 16)
            self._lanes = check_int(lanes, "lanes", 1, self._width)
            if self._width % self._lanes:
                raise ValueError(f"lanes must divide width {self._width}, got {lanes}")
            if not isinstance(out_reg, bool):
                raise TypeError(f"out_reg must be a bool, got {type(out_reg).__name__} {out_reg!r}")
            self._out_reg = out_reg
        super().__init__({
            "w_en": In(self._lanes),
            "w_commit": In(1),
            "w_data": In(self._width),
            "r": Out(stream.Signature(self._width)),
            "level": Out(range(self._depth + 3)),
        })

    out_reg = property(lambda self: self._out_reg)
    width = property(lambda self: self._width)
    depth = property(lambda self: self._depth)
    lanes = property(lambda self: self._lanes)

    def elaborate(self, platform):
        m = Module()
        d = self._depth
        m.submodules.mem = mem = Memory(shape=self._width, depth=d, init=[], attrs=_RAM_ATTRS)
        wp = mem.write_port(granularity=self._width // self._lanes) if self._lanes > 1 else mem.write_port()
        rp = mem.read_port()
        w_ptr = Signal(range(d))
        r_ptr = Signal(range(d))
        count = Signal(range(d + 1))   # words in the memory
        valid = Signal()               # the read port's register holds a word

        if self._out_reg:
            q_valid = Signal()
            q_data = Signal(self._width, reset_less=True)
            q_taken = q_valid & self.r.ready
            move = valid & (~q_valid | q_taken)     # read register -> output register
            taken = move
            with m.If(move):
                m.d.sync += [q_data.eq(rp.data), q_valid.eq(1)]
            with m.Elif(q_taken):
                m.d.sync += q_valid.eq(0)
            m.d.comb += [self.r.payload.eq(q_data), self.r.valid.eq(q_valid),
                         self.level.eq(count + valid + q_valid)]
        else:
            taken = self.r.valid & self.r.ready
            m.d.comb += [self.r.payload.eq(rp.data), self.r.valid.eq(valid), self.level.eq(count + valid)]
        fetch = (count != 0) & (~valid | taken)
        m.d.comb += [
            wp.addr.eq(w_ptr), wp.data.eq(self.w_data), wp.en.eq(self.w_en),
            rp.addr.eq(r_ptr), rp.en.eq(fetch),
        ]
        with m.If(self.w_commit):
            with m.If(w_ptr == d - 1):
                m.d.sync += w_ptr.eq(0)
            with m.Else():
                m.d.sync += w_ptr.eq(w_ptr + 1)
        with m.If(fetch):
            with m.If(r_ptr == d - 1):
                m.d.sync += r_ptr.eq(0)
            with m.Else():
                m.d.sync += r_ptr.eq(r_ptr + 1)
        m.d.sync += count.eq(count + self.w_commit - fetch)
        with m.If(fetch):
            m.d.sync += valid.eq(1)
        with m.Elif(taken):
            m.d.sync += valid.eq(0)
        return m


class StreamSlice(wiring.Component):
    """A registered stream stage (skid buffer): :attr:`i` to :attr:`o`, with ``valid``,
    ``payload`` and ``i.ready`` all driven by registers, so no combinational path crosses it
    in either direction (a long route on a large FPGA, e.g. a handshake between a sequencer
    and a big array, becomes two short ones).

    Latency: a beat taken on :attr:`i` in cycle ``c`` is offered on :attr:`o` from cycle
    ``c + 1``. Throughput: one beat per cycle; beats are neither lost, duplicated nor
    reordered under any ``valid``/``ready`` pattern. Holds up to two beats (the output
    register and the skid register that catches the beat taken in the cycle ``o`` stalls).

    Parameters
    ----------
    shape : shape-castable
        The payload's shape (a layout, ``unsigned(n)``, ...).

    Members
    -------
    i : In(stream.Signature(shape))
        Beats in; ``i.ready`` is a register (low while the skid register is full).
    o : Out(stream.Signature(shape))
        Beats out, from registers.
    busy : Out(1)
        A beat is held.
    """

    def __init__(self, *, shape):
        with checking(self):
            try:
                Shape.cast(shape)
            except TypeError:
                raise TypeError(f"shape must be shape-castable (a layout, unsigned(n), an int width, ...), got "
                                f"{type(shape).__name__} {shape!r}") from None
        self._shape = shape
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape)), "busy": Out(1)})

    shape = property(lambda self: self._shape, doc="The payload's shape.")

    def elaborate(self, platform):
        m = Module()
        skid = Signal(self._shape, reset_less=True)
        skid_valid = Signal()
        out = Signal(self._shape, reset_less=True)
        out_valid = Signal()
        m.d.comb += [self.i.ready.eq(~skid_valid), self.o.valid.eq(out_valid), self.o.payload.eq(out),
                     self.busy.eq(out_valid | skid_valid)]
        take = self.i.valid & ~skid_valid
        with m.If(~out_valid | self.o.ready):      # the output register is free after this cycle
            with m.If(skid_valid):
                m.d.sync += [out.eq(skid), out_valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [out.eq(self.i.payload), out_valid.eq(self.i.valid)]
        with m.Elif(take):                          # the output stalls: catch the beat
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m
