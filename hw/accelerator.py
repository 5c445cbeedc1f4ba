"""The SFx LINEAR accelerator: MAC array + clamp unit behind the streams of ``interface.py``."""
from __future__ import annotations

import math

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bool, check_impl, check_int, checking
from .clamp import CLAMP_LATENCY, SHIFT_BITS, SFxClampUnit
from .fifo import RAM_ATTRS as _RAM_ATTRS, MemFIFO, StreamSlice
from .interface import AccelParams, act_layout, cmd_layout, par_layout, res_layout, wgt_layout
from .mac_array import SFxMacArray
from .pe import PE_KINDS

__all__ = ["SFxAccelerator"]

#: Pipeline stages between the array's output and the clamp unit's input (context read
#: from the tile memories, then bias and shift added).
DRAIN_STAGES = 2


def _lane_store_layout(p: AccelParams) -> data.StructLayout:
    """One channel's drain context, as stored in the par memory."""
    fields = {
        "bias": p.acc_bits,
        "shift": 8,
        "ok": 1,        # the channel exists (n0 + j < N)
        "use_mult": 1,
    }
    if p.xmult:
        fields["use_xmult"] = 1
    return data.StructLayout(fields)


def _lane_late_layout(p: AccelParams) -> data.StructLayout:
    """The part of a channel's context the clamp unit takes directly from memory (read a
    cycle later than the rest, so no register holds it on the way)."""
    fields = {
        "mult": 16,     # 1 when the operation does not use mult
        "relu": 1,
        "rnd": 1,
        "use_mult": 1,
    }
    if p.xmult:
        fields["use_xmult"] = 1
    return data.StructLayout(fields)


class SFxAccelerator(wiring.Component):
    """LINEAR (SPEC section 5) on an output-stationary ``rows x cols`` SFx MAC array.

    The streams, their payload layouts and the order of the beats of an operation are
    those of :mod:`superfloat.hw.interface` (``cmd``, then per tile ``cols`` beats of
    ``par``, ``K`` beats of ``act`` and ``wgt`` in lockstep, and ``min(rows, T - t0)``
    beats of ``res``).

    Blocks (see ``docs/architecture.md``):

    * feed sequencer (``IDLE -> CHECK -> TILE -> STREAM -> NEXT -> TILE ... -> IDLE``):
      takes ``cmd`` and checks it in the next cycle (a malformed one, ``K = 0``,
      ``K > k_max``, ``T = 0`` or ``N = 0``, is consumed, sets :attr:`error`, and leaves
      the unit idle). ``TILE`` copies the tile's context into two small memories (block
      RAM on an FPGA), one word per cycle: the tile's ``cols`` ``par`` beats, one channel
      each (bias, shift, mult; a bias of a valid channel with ``|bias| >= 2**(A-2)`` sets
      :attr:`error`), and, reading the offered beat in place (a stream's payload is stable
      until it is taken), the ``rows`` row exponents (with ``xmult``, and row multipliers)
      of the tile's first ``act`` beat. ``STREAM``
      then passes the ``K`` ``act``/``wgt`` beats, together, to the array; ``NEXT`` steps
      the tile counters. The memories hold two tiles, so a tile's copy overlaps the
      previous tile's drain;
    * :class:`SFxMacArray`: PE ``(i, j)`` accumulates ``X[t0+i, k] * W[n0+j, k]``; finished
      sums are read one per cycle, row-major, through the array's XOR readout;
    * drain stage: reads channel ``j``'s and row ``i``'s context from the memories, adds
      ``bias[j]``, forms ``shift[j] + xexp[i]`` (with ``xmult``, passes ``xmult[i]``) and feeds one accumulator per cycle to a
      single, time-multiplexed :class:`SFxClampUnit` (channels past ``N`` are fed as zero
      with ``r = 0``: code 0, never saturated);
    * result assembly: ``cols`` codes form one ``res`` beat, queued in a FIFO in block RAM
      (:class:`~superfloat.hw.fifo.MemFIFO`). The array starts draining a row only when
      the FIFO has room for it (credits), so nothing after the array ever stalls and
      ``res`` back-pressure never loses a beat.

    Latency: the first ``res`` beat of a tile is valid about ``pe_latency + 2 +
    readout_latency + cols + 2 + 6 + 2`` cycles after its last ``act``/``wgt`` beat (array,
    readout, row, drain stage, clamp, FIFO). Throughput: one ``act``/``wgt`` beat pair per
    cycle (``rows * cols`` MACs) in steady state, plus per tile ``max(rows, cols) + 2``
    cycles of context copy; with ``overlap_drain`` a tile's drain
    (``min(rows, T - t0) * cols`` cycles) overlaps the next tile's accumulation, without it
    the array waits for it.

    Status: :attr:`busy`; sticky :attr:`error` (malformed command, bias out of range, or a
    right shift ``r`` outside ``0..63`` in the clamp unit); :attr:`sat_count`, saturated
    outputs since reset (32 bits, saturating; padding lanes never count; exact whenever
    ``busy`` is low, see :class:`SFxClampUnit`). A synchronous
    reset returns every block to idle and clears the status.

    Parameters
    ----------
    rows, cols : int
        Array shape (1..64): activation rows and output channels per tile.
    a_bits, w_bits, out_bits : int
        SFx widths of activations, weights and results (2..16).
    k_max : int
        Longest reduction accepted (1..2**20); sets the accumulator width
        ``A = sfx.accumulator_bits(a_bits, w_bits, k_max)``.
    dsp_pes : int
        The first ``dsp_pes`` PEs (row-major) multiply with DSP blocks, the others with
        LUTs (0..rows*cols).
    clamp_impl : str
        Multiplier of the clamp unit (``A x 16`` bits): ``"dsp"`` (default) or ``"lut"``.
    overlap_drain : bool
        ``True`` (default): shadow registers in the PEs; a tile drains while the next one
        accumulates. ``False``: no shadow registers (the smallest PE, for small FPGAs); the
        array stalls while a tile drains, which costs ``min(rows, T - t0) * cols`` cycles
        plus about 8 per tile.
    mul_stages : int
        Pipeline registers inside every PE multiplier (0..4, default 0; wide logic
        multipliers need one for a fast clock).
    chunk_k : int or None
        The longest run of products a PE accumulates (default: ``k_max``). With
        ``chunk_k < k_max`` a tile's reduction is cut into chunks of ``chunk_k`` steps: the
        PEs need only ``sum_bits(a_bits, w_bits, chunk_k)`` accumulator bits (the iCE40's
        logic cells are mostly accumulator bits), and the drain stage adds each chunk's
        partial sums to a partial-sum memory (block RAM, ``rows * cols`` words of ``A``
        bits); the sum of a tile is still exact in ``A`` bits. Every chunk is drained (a
        tile of ``K > chunk_k`` costs an extra drain per chunk without ``overlap_drain``).
    pipelined : bool
        ``True``: a register after every block-RAM read of the drain stage and after the
        result FIFO's, one more in the clamp unit's multiplier, and a
        :class:`~superfloat.hw.fifo.StreamSlice` between the feed sequencer and the array
        (one cycle more latency each; for fast clocks, e.g. the ECP5 at 125 MHz, where
        block-RAM clock-to-output and the routes across a large array dominate). Default
        ``False``.
    pe_kind : str
        ``"sm"`` (default): SFx PEs, the accelerator of SPEC section 5. ``"tc"``: two's
        complement integer PEs of the same widths, for the synthesis comparison only (the
        codes are then read as two's complement integers; this is not LINEAR).
    xmult : bool
        Generate the per-row activation multiplier of SPEC revision 2 (section 4 step 0b;
        default ``False``): ``cmd`` gains ``use_xmult``, ``act`` a 16-bit ``xmult`` per row
        (read with the row exponents), and the clamp unit a second 16-bit multiplier (one
        cycle more latency, three with ``clamp_impl="lut"``; the product
        ``|acc| * mult * xmult`` has up to ``A + 32`` bits). An accelerator without it
        cannot carry ``xmult``: the host packing (:mod:`superfloat.sim.packing`) refuses
        such an operation.

    Members
    -------
    cmd : In(stream.Signature(interface.cmd_layout(p)))
        ``{k, t, n, relu, rounding, use_mult}`` (and ``use_xmult`` with ``xmult``), one
        beat per operation.
    act : In(stream.Signature(interface.act_layout(p)))
        ``{codes[rows], exp[rows]}`` (and ``xmult[rows]`` with ``xmult``): one reduction
        step of a tile's activations.
    wgt : In(stream.Signature(interface.wgt_layout(p)))
        ``codes[cols]``: one reduction step of a tile's weights.
    par : In(stream.Signature(interface.par_layout(p)))
        ``{bias, shift, mult}`` of one output channel: ``cols`` beats per tile.
    res : Out(stream.Signature(interface.res_layout(p)))
        ``cols`` SF``out_bits`` codes: one output row of a tile per beat.
    busy : Out(1)
        An operation or a result is in flight.
    error : Out(1)
        Sticky error flag (cleared by reset only).
    sat_count : Out(32)
        Saturated results since reset.
    """

    def __init__(self, *, rows: int, cols: int, a_bits: int, w_bits: int, out_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, dsp_pes: int = 0, clamp_impl: str = "dsp",
                 overlap_drain: bool = True, mul_stages: int = 0, pe_kind: str = "sm",
                 chunk_k: int | None = None, pipelined: bool = False, xmult: bool = False):
        with checking(self):
            for name, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{name} must be an int in {sfx.MIN_BITS}..{sfx.MAX_BITS}, "
                                    f"got {type(v).__name__} {v!r}")
            self._params = AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits,
                                       out_bits=out_bits, k_max=k_max, xmult=check_bool(xmult, "xmult"))
            self._dsp_pes = check_int(dsp_pes, "dsp_pes", 0, rows * cols)
            self._clamp_impl = check_impl(clamp_impl, "clamp_impl")
            self._overlap = check_bool(overlap_drain, "overlap_drain")
            self._mul_stages = check_int(mul_stages, "mul_stages", 0, 4)
            if not isinstance(pe_kind, str) or pe_kind not in PE_KINDS:
                raise ValueError(f"pe_kind must be one of {', '.join(map(repr, PE_KINDS))}, got {pe_kind!r}")
            self._pe_kind = pe_kind
            if chunk_k is None:
                chunk_k = self._params.k_max
            self._chunk_k = min(check_int(chunk_k, "chunk_k", 1, sfx.K_MAX_LIMIT), self._params.k_max)
            self._pipelined = check_bool(pipelined, "pipelined")
        p = self._params
        super().__init__({
            "cmd": In(stream.Signature(cmd_layout(p))),
            "act": In(stream.Signature(act_layout(p))),
            "wgt": In(stream.Signature(wgt_layout(p))),
            "par": In(stream.Signature(par_layout(p))),
            "res": Out(stream.Signature(res_layout(p))),
            "busy": Out(1),
            "error": Out(1),
            "sat_count": Out(32),
        })

    params = property(lambda self: self._params, doc="The :class:`~superfloat.hw.interface.AccelParams`.")
    rows = property(lambda self: self._params.rows, doc="Rows of PEs (activation rows per tile).")
    cols = property(lambda self: self._params.cols, doc="Columns of PEs (output channels per tile).")
    a_bits = property(lambda self: self._params.a_bits, doc="SFx width of activations.")
    w_bits = property(lambda self: self._params.w_bits, doc="SFx width of weights.")
    out_bits = property(lambda self: self._params.out_bits, doc="SFx width of results.")
    k_max = property(lambda self: self._params.k_max, doc="Longest reduction accepted.")
    acc_bits = property(lambda self: self._params.acc_bits, doc="Accumulator width A.")
    frac_bits = property(lambda self: self._params.frac_bits, doc="Fraction bits F = Ma + Mw.")
    dsp_pes = property(lambda self: self._dsp_pes, doc="PEs (row-major first) with DSP multipliers.")
    clamp_impl = property(lambda self: self._clamp_impl, doc="Clamp unit multiplier implementation.")
    overlap_drain = property(lambda self: self._overlap, doc="Whether a tile drains while the next accumulates.")
    mul_stages = property(lambda self: self._mul_stages, doc="Pipeline registers inside the PE multipliers.")
    pe_kind = property(lambda self: self._pe_kind, doc="'sm' (SFx) or 'tc' (two's complement baseline).")
    chunk_k = property(lambda self: self._chunk_k, doc="Longest run of products a PE accumulates (<= k_max).")
    pipelined = property(lambda self: self._pipelined, doc="Registers after the block-RAM reads (fast clocks).")
    xmult = property(lambda self: self._params.xmult, doc="Whether the per-row activation multiplier is generated.")

    @property
    def chunked(self) -> bool:
        """Whether reductions longer than :attr:`chunk_k` are split (``chunk_k < k_max``)."""
        return self._chunk_k < self._params.k_max

    def _array(self) -> SFxMacArray:
        p = self._params
        return SFxMacArray(rows=p.rows, cols=p.cols, a_bits=p.a_bits, w_bits=p.w_bits, k_max=self._chunk_k,
                           dsp_pes=self._dsp_pes, overlap_drain=self._overlap, mul_stages=self._mul_stages,
                           pe_kind=self._pe_kind)

    @property
    def fifo_depth(self) -> int:
        """Depth (in ``res`` beats) of the result FIFO's memory.

        A row admitted into the drain holds a credit from its start until its ``res`` beat
        is taken: ``cols`` cycles of readout plus the readout latency, the drain stages,
        the clamp unit and the FIFO (about ``cols + 16`` cycles). Enough credits for that
        time keep the drain at one accumulator per cycle with a consumer that takes every
        beat; the FIFO is in block RAM, so a few more rows cost nothing.
        """
        arr = self._array()
        arr._MustUse__silence = True
        latency = (self.cols + arr.readout_latency + DRAIN_STAGES + 3 * self._pipelined + CLAMP_LATENCY
                   + 3 * self._params.xmult + 4)
        return max(4, math.ceil(latency / self.cols) + 2)

    def elaborate(self, platform):
        m = Module()
        p = self._params
        rows, cols, A = p.rows, p.cols, p.acc_bits
        mo = p.out_bits - 1
        chunk = self._chunk_k

        m.submodules.array = array = self._array()
        m.submodules.clamp = clamp = SFxClampUnit(acc_bits=A, frac_bits=p.frac_bits, out_bits=p.out_bits,
                                                  mult_impl=self._clamp_impl, mult_premuxed=True,
                                                  mult_stages=int(self._pipelined), xmult=p.xmult)
        depth = self.fifo_depth
        m.submodules.fifo = fifo = MemFIFO(width=cols * p.out_bits, depth=depth, lanes=cols, out_reg=self._pipelined)

        err = Signal()

        # Tile context memories: two tiles (slot = tile number mod 2), written in TILE,
        # read by the drain stage. With chunks, a partial-sum memory (one word per PE).
        cbits = max(1, (cols - 1).bit_length())
        rbits = max(1, (rows - 1).bit_length())
        lane_lay = _lane_store_layout(p)
        m.submodules.par_mem = par_mem = Memory(shape=lane_lay, depth=2 << cbits, init=[],
                                                attrs=_RAM_ATTRS)
        m.submodules.xexp_mem = xexp_mem = Memory(shape=signed(8), depth=2 << rbits, init=[],
                                                  attrs=_RAM_ATTRS)
        m.submodules.late_mem = late_mem = Memory(shape=_lane_late_layout(p), depth=2 << cbits, init=[],
                                                  attrs=_RAM_ATTRS)
        if p.xmult:   # the row multipliers, beside the row exponents (same addresses)
            m.submodules.xm_mem = xm_mem = Memory(shape=16, depth=2 << rbits, init=[], attrs=_RAM_ATTRS)
            xm_wr, xm_rd = xm_mem.write_port(), xm_mem.read_port()
        late_wr = late_mem.write_port()
        late_rd = late_mem.read_port()
        par_wr = par_mem.write_port()
        par_rd = par_mem.read_port()
        x_wr = xexp_mem.write_port()
        x_rd = xexp_mem.read_port()

        # ------------------------------------------------------------------ feed sequencer
        # Counters run down and their sign bits are the end conditions (the sign is the
        # carry out of the decrement: no comparator on the 16-bit fields).
        kb = p.k_bits + 1
        k_init = Signal(signed(kb))        # K - 2
        k_cnt = Signal(signed(kb))         # K - 2 - (beats of the tile taken)
        last = Signal()                    # the next beat is the tile's last
        nb = 18
        n_first = Signal(signed(nb))       # N - cols - 1
        nd = Signal(signed(nb))            # (N - n0) - cols - 1: < 0 in the last tile of a row of tiles
        td = Signal(signed(nb))            # (T - t0) - rows - 1: < 0 in the last row of tiles
        n_end = nd[-1]
        t_end = td[-1]
        cols_ok = Signal(range(cols + 1))  # min(N - n0, cols): channels of the tile (registered)
        rows_ok = Signal(range(rows + 1))  # min(T - t0, rows): rows of the tile (registered)
        op_relu, op_rnd, op_mult, op_xmult = Signal(), Signal(), Signal(), Signal()
        fd_slot = Signal()                 # memory slot of the tile being fed
        lane = Signal(range(max(2, cols)))  # par lane being copied
        xrow = Signal(range(max(2, rows)))  # row exponent being copied
        par_done, x_done = Signal(), Signal()
        # Tiles fed and not yet through the drain stage's context read: the memories hold
        # two, so a third tile's copy waits.
        slots_used = Signal(range(3))
        slots_full = Signal()              # slots_used == 2, as a register of its own (timing)

        # Bias range check (SPEC 3: |bias| < 2**(A-2)), a cycle after the copy (timing):
        # |b| >= 2**(A-2) <=> the two top bits differ, or b == -2**(A-2).
        bias_bad = Signal()
        with m.If(bias_bad):
            m.d.sync += err.eq(1)
        m.d.sync += bias_bad.eq(0)

        # Channels and rows of the current tile, registered from n_rem / t_rem (one cycle
        # behind them: lane 0 is valid in any tile, later lanes are copied later).
        lanes_ok = Signal(cols)           # thermometer: lane j < min(N - n0, cols)
        m.d.sync += [cols_ok.eq(Mux(n_end, (nd + cols + 1)[:len(cols_ok)], cols)),
                     rows_ok.eq(Mux(t_end, (td + rows + 1)[:len(rows_ok)], rows)),
                     lanes_ok.eq(Cat(~n_end | (j < (nd + cols + 1)[:len(cols_ok)]) for j in range(cols)))]

        # Chunks: the array's "last" ends a chunk of at most chunk_k steps; its tag tells
        # the drain stage whether the chunk is the tile's first and / or final one.
        clast = Signal()                   # the next beat ends a chunk
        first_chunk = Signal()
        if chunk < p.k_max:
            # steps left in the current chunk after the next beat, minus 1: its sign bit says
            # "the next beat ends the chunk" (no comparator)
            kcd = Signal(signed(max(2, chunk.bit_length() + 1)))
        cmd = self.cmd.payload
        cmd_bad = Signal(reset_less=True)
        # With ``pipelined``, a register stage between the sequencer and the array: the
        # array's ready (from its drain state) and the sequencer's beat logic are then far
        # apart on a large FPGA without a combinational path between them.
        feed = array.inp
        if self._pipelined:
            m.submodules.feed_slice = feed_slice = StreamSlice(shape=array.inp.payload.shape())
            wiring.connect(m, feed_slice.o, array.inp)
            feed = feed_slice.i
        feed_busy = feed_slice.busy if self._pipelined else Const(0, 1)
        m.d.comb += [
            feed.payload.act.eq(self.act.payload.codes),
            feed.payload.wgt.eq(self.wgt.payload),
            feed.payload.last.eq(clast),
            feed.payload.rows_valid.eq(rows_ok),
            feed.payload.tag.eq(Cat(first_chunk, last)),
        ]
        beat = Signal()   # one act/wgt pair transferred towards the array this cycle
        m.d.comb += beat.eq(feed.valid & feed.ready)

        # The copies are pipelined: in the cycle a par beat is taken, or a row exponent of the
        # offered act beat is selected (one-hot, so each select drives one AND term per bit),
        # it is registered; the next cycle writes it.
        lane_oh = Signal(cols, init=1)
        xrow_oh = Signal(rows, init=1)

        def select(values, onehot, width):
            acc = Const(0, width)
            for j, v in enumerate(values):
                acc = acc | (v.as_value() if hasattr(v, "as_value") else v) & onehot[j].replicate(width)
            return acc

        par_q = Signal(par_layout(p), reset_less=True)
        x_q = Signal(signed(8), reset_less=True)
        xm_q = Signal(16, reset_less=True)
        cp_par, cp_x, cp_ok = Signal(), Signal(), Signal(reset_less=True)
        cp_laddr = Signal(cbits, reset_less=True)
        cp_xaddr = Signal(rbits, reset_less=True)
        m.d.sync += [cp_par.eq(0), cp_x.eq(0)]
        m.d.comb += [
            par_wr.addr.eq(Cat(cp_laddr, fd_slot)), par_wr.en.eq(cp_par),
            par_wr.data.bias.eq(par_q.bias), par_wr.data.shift.eq(par_q.shift),
            par_wr.data.ok.eq(cp_ok), par_wr.data.use_mult.eq(op_mult),
            late_wr.addr.eq(Cat(cp_laddr, fd_slot)), late_wr.en.eq(cp_par),
            late_wr.data.mult.eq(Mux(op_mult, par_q.mult, 1)), late_wr.data.relu.eq(op_relu),
            late_wr.data.rnd.eq(op_rnd), late_wr.data.use_mult.eq(op_mult),
            x_wr.addr.eq(Cat(cp_xaddr, fd_slot)), x_wr.en.eq(cp_x), x_wr.data.eq(x_q),
        ]
        if p.xmult:
            m.d.comb += [
                par_wr.data.use_xmult.eq(op_xmult), late_wr.data.use_xmult.eq(op_xmult),
                xm_wr.addr.eq(x_wr.addr), xm_wr.en.eq(cp_x), xm_wr.data.eq(Mux(op_xmult, xm_q, 1)),
            ]
        b_top = par_q.bias[A - 2:]
        m.d.sync += bias_bad.eq(cp_par & cp_ok & ((b_top == 0b01) | (b_top == 0b10) |
                                                  ((b_top == 0b11) & (par_q.bias[:A - 2] == 0))))

        # One adder each: N (T) - (cols + 1) when the command is checked, then - cols per tile.
        in_check = Signal()
        nd_step = Signal(signed(nb))
        td_step = Signal(signed(nb))
        m.d.comb += [nd_step.eq(nd - Mux(in_check, cols + 1, cols)), td_step.eq(td - Mux(in_check, rows + 1, rows))]

        # The sequencer's states are one-hot registers (IDLE -> CHECK -> TILE -> STREAM ->
        # NEXT -> TILE ... -> IDLE), so that no handshake decodes a state: a beat into the
        # array is one LUT of s_stream, the two valids and the array's ready.
        s_idle, s_check, s_tile, s_stream, s_next = (Signal(init=int(n == "idle"), name=f"feed_{n}")
                                                     for n in ("idle", "check", "tile", "stream", "next"))
        m.d.comb += [in_check.eq(s_check), self.cmd.ready.eq(s_idle)]
        with m.If(s_idle & self.cmd.valid):
            m.d.sync += [
                cmd_bad.eq((cmd.k == 0) | (cmd.k > p.k_max) | (cmd.t == 0) | (cmd.n == 0)),
                k_init.eq(cmd.k - 2), nd.eq(cmd.n), td.eq(cmd.t),
                op_relu.eq(cmd.relu), op_rnd.eq(cmd.rounding), op_mult.eq(cmd.use_mult),
                s_idle.eq(0), s_check.eq(1),
            ]
            if p.xmult:
                m.d.sync += op_xmult.eq(cmd.use_xmult)
        with m.If(s_check):   # the command acts from registers (timing)
            m.d.sync += s_check.eq(0)
            with m.If(cmd_bad):
                m.d.sync += [err.eq(1), s_idle.eq(1)]
            with m.Else():
                m.d.sync += [lane.eq(0), xrow.eq(0), lane_oh.eq(1), xrow_oh.eq(1), par_done.eq(0),
                             x_done.eq(0), nd.eq(nd_step), n_first.eq(nd_step), td.eq(td_step), s_tile.eq(1)]
        # TILE. par: one beat (channel) per cycle into the memory.
        m.d.comb += self.par.ready.eq(s_tile & ~par_done & ~slots_full)
        with m.If(self.par.valid & self.par.ready):
            m.d.sync += [cp_par.eq(1), par_q.eq(self.par.payload),
                         cp_ok.eq((lane_oh & lanes_ok).any()), cp_laddr.eq(lane[:cbits] if cols > 1 else 0)]
            with m.If(lane_oh[cols - 1]):
                m.d.sync += par_done.eq(1)
            with m.Else():
                m.d.sync += [lane.eq(lane + 1), lane_oh.eq(lane_oh << 1)]
        # The first act beat's row exponents, one per cycle (the beat stays offered).
        with m.If(s_tile & ~x_done & self.act.valid & ~slots_full):
            m.d.sync += [cp_x.eq(1), x_q.eq(select(self.act.payload.exp, xrow_oh, 8)),
                         cp_xaddr.eq(xrow[:rbits] if rows > 1 else 0)]
            if p.xmult:
                m.d.sync += xm_q.eq(select(self.act.payload.xmult, xrow_oh, 16))
            with m.If(xrow_oh[rows - 1]):
                m.d.sync += x_done.eq(1)
            with m.Else():
                m.d.sync += [xrow.eq(xrow + 1), xrow_oh.eq(xrow_oh << 1)]
        with m.If(s_tile & par_done & x_done):
            m.d.sync += [k_cnt.eq(k_init), last.eq(k_init[-1]), first_chunk.eq(1),
                         clast.eq(k_init[-1] | (chunk == 1)), s_tile.eq(0), s_stream.eq(1)]
            if chunk < p.k_max:
                m.d.sync += kcd.eq(chunk - 2)
        # STREAM: the K act/wgt beats, together, into the array.
        m.d.comb += [
            feed.valid.eq(s_stream & self.act.valid & self.wgt.valid),
            self.act.ready.eq(s_stream & self.wgt.valid & feed.ready),
            self.wgt.ready.eq(s_stream & self.act.valid & feed.ready),
        ]
        with m.If(beat):
            k_dec = Signal(signed(kb))
            m.d.comb += k_dec.eq(k_cnt - 1)
            m.d.sync += [k_cnt.eq(k_dec), last.eq(k_dec[-1])]
            if chunk < p.k_max:
                kcd_next = Signal.like(kcd)
                m.d.comb += kcd_next.eq(Mux(clast, chunk - 2, kcd - 1))
                m.d.sync += [kcd.eq(kcd_next), clast.eq(k_dec[-1] | kcd_next[-1])]
            else:
                m.d.sync += clast.eq(k_dec[-1])
            with m.If(clast):
                m.d.sync += first_chunk.eq(0)
            with m.If(last):
                m.d.sync += [fd_slot.eq(~fd_slot), s_stream.eq(0), s_next.eq(1)]
        with m.If(s_next):    # step to the next tile (a cycle of its own: timing)
            m.d.sync += [lane.eq(0), xrow.eq(0), lane_oh.eq(1), xrow_oh.eq(1), par_done.eq(0), x_done.eq(0),
                         s_next.eq(0)]
            with m.If(n_end):
                m.d.sync += nd.eq(n_first)
                with m.If(t_end):
                    m.d.sync += s_idle.eq(1)
                with m.Else():
                    m.d.sync += [td.eq(td_step), s_tile.eq(1)]
            with m.Else():
                m.d.sync += [nd.eq(nd_step), s_tile.eq(1)]

        # ------------------------------------------------------------------ drain stage
        # D0: a value leaves the array; its channel's and row's context (and, with chunks,
        # the PE's partial sum) is read.
        dr_slot = Signal()
        d_col = Signal(range(max(2, cols)))
        d_row = Signal(range(max(2, rows)))
        out = array.out
        final_out = out.payload.tag[1]
        m.d.comb += [
            par_rd.addr.eq(Cat(d_col[:cbits] if cols > 1 else Const(0, 1), dr_slot)),
            x_rd.addr.eq(Cat(d_row[:rbits] if rows > 1 else Const(0, 1), dr_slot)),
            par_rd.en.eq(out.valid), x_rd.en.eq(out.valid),
        ]
        if p.xmult:
            m.d.comb += [xm_rd.addr.eq(x_rd.addr), xm_rd.en.eq(out.valid)]
        d1_valid, d1_first, d1_final = Signal(), Signal(), Signal()
        d1_acc = Signal(signed(array.acc_bits), reset_less=True)
        m.d.sync += [d1_valid.eq(out.valid), d1_first.eq(out.payload.tag[0]), d1_final.eq(final_out)]
        with m.If(out.valid):
            m.d.sync += d1_acc.eq(out.payload.acc)
            with m.If(out.payload.last):
                m.d.sync += [d_col.eq(0), d_row.eq(0)]
                with m.If(final_out):
                    m.d.sync += dr_slot.eq(~dr_slot)
            with m.Elif(d_col == cols - 1):
                m.d.sync += [d_col.eq(0), d_row.eq(d_row + 1)]
            with m.Else():
                m.d.sync += d_col.eq(d_col + 1)

        # D1: the tile's sum so far: the bias (first chunk) or the partial sum, plus the
        # array's value; a partial sum goes back to the memory, a final one to the clamp
        # unit. A padding channel goes through as acc = 0 with r = 0: code 0, no
        # saturation, no error. With ``pipelined``, every memory output is registered
        # first (D1 -> D1b): block RAM clock-to-output is long on the ECP5.
        def stage(value, name):
            if not self._pipelined:
                return value
            r = Signal.like(value, name=name, reset_less=True) if not hasattr(value, "shape") else \
                Signal(value.shape(), name=name, reset_less=True)
            m.d.sync += r.eq(value)
            return r

        d1_laddr = Signal(cbits + 1, reset_less=True)
        m.d.sync += d1_laddr.eq(par_rd.addr)
        m.d.comb += [late_rd.addr.eq(d1_laddr), late_rd.en.eq(d1_valid)]
        ctx = stage(par_rd.data, "ctx_q")
        xexp = stage(x_rd.data, "xexp_q")
        e_valid = stage(d1_valid, "e_valid")
        e_first = stage(d1_first, "e_first")
        e_final = stage(d1_final, "e_final")
        e_acc = stage(d1_acc, "e_acc")
        base = ctx.bias.as_signed()
        if self.chunked:
            m.submodules.psum_mem = psum_mem = Memory(shape=A, depth=1 << (cbits + rbits), init=[],
                                                      attrs=_RAM_ATTRS)
            ps_rd = psum_mem.read_port()
            ps_wr = psum_mem.write_port()
            pe_addr = Cat(d_col[:cbits] if cols > 1 else Const(0, 1), d_row[:rbits] if rows > 1 else Const(0, 1))
            wr_addr = pe_addr
            for k in range(2 + self._pipelined):
                nxt = Signal(cbits + rbits, name=f"ps_addr{k}", reset_less=True)
                m.d.sync += nxt.eq(wr_addr)
                wr_addr = nxt
            m.d.comb += [ps_rd.addr.eq(pe_addr), ps_rd.en.eq(out.valid)]
            base = Mux(e_first, base, stage(ps_rd.data, "psum_q").as_signed())
        total = Signal(A)
        m.d.comb += total.eq(e_acc + base)
        partial_valid = Signal()   # pre_acc holds a partial sum (written back a cycle later: timing)
        m.d.sync += partial_valid.eq(e_valid & ~e_final)
        neutral = Mux(ctx.use_mult, p.frac_bits + sfx.MULT_FRAC_BITS - mo, p.frac_bits - mo)
        if p.xmult:
            neutral = neutral + Mux(ctx.use_xmult, sfx.MULT_FRAC_BITS, 0)
        pre_valid = Signal()
        pre_acc = Signal(signed(A), reset_less=True)
        pre_shift = Signal(signed(SHIFT_BITS), reset_less=True)
        m.d.sync += [
            pre_valid.eq(e_valid & e_final),
            pre_acc.eq(Mux(ctx.ok, total, 0)),
            pre_shift.eq(Mux(ctx.ok, ctx.shift.as_signed() + xexp, neutral)),
        ]
        if self.chunked:   # padding channels store 0: their sums are never used
            m.d.comb += [ps_wr.addr.eq(wr_addr), ps_wr.data.eq(pre_acc), ps_wr.en.eq(partial_valid)]
        late = stage(late_rd.data, "late_q")
        if p.xmult:   # the row multiplier, read with the row exponent, waits a cycle beside pre_shift
            pre_xm = Signal(16, reset_less=True)
            m.d.sync += pre_xm.eq(stage(xm_rd.data, "xm_rd_q"))
            m.d.comb += [clamp.i.payload.xmult.eq(pre_xm), clamp.i.payload.use_xmult.eq(late.use_xmult)]
        m.d.comb += [
            clamp.i.valid.eq(pre_valid),
            clamp.i.payload.acc.eq(pre_acc),
            clamp.i.payload.shift.eq(pre_shift),
            clamp.i.payload.mult.eq(late.mult),
            clamp.i.payload.use_mult.eq(late.use_mult),
            clamp.i.payload.relu.eq(late.relu),
            clamp.i.payload.rounding.eq(late.rnd),
        ]

        # A tile's last beat went in a cycle ago (registered: on the ECP5 the array's handshake
        # and this counter are placed far apart). The copy of the tile after next, the first
        # reader of slots_full, starts two cycles after that beat (NEXT, then TILE).
        tile_fed = Signal()
        m.d.sync += tile_fed.eq(beat & last)
        tile_read = out.valid & out.payload.last & final_out
        with m.If(tile_fed & ~tile_read):
            m.d.sync += [slots_used.eq(slots_used + 1), slots_full.eq(slots_used == 1)]
        with m.Elif(~tile_fed & tile_read):
            m.d.sync += [slots_used.eq(slots_used - 1), slots_full.eq(0)]

        # ------------------------------------------------------------------ result rows
        # Each code goes straight into its lane of the FIFO's next word (masked write).
        ow = p.out_bits
        o_oh = Signal(cols, init=1)
        m.d.comb += clamp.o.ready.eq(1)   # credits guarantee room in the FIFO
        with m.If(clamp.o.valid):
            m.d.sync += o_oh.eq(o_oh.rotate_left(1))
        m.d.comb += [
            fifo.w_data.eq(clamp.o.payload.code.replicate(cols)),
            fifo.w_en.eq(Mux(clamp.o.valid, o_oh, 0)),
            fifo.w_commit.eq(clamp.o.valid & o_oh[cols - 1]),
            self.res.payload.eq(fifo.r.payload),
            self.res.valid.eq(fifo.r.valid),
            fifo.r.ready.eq(self.res.ready),
        ]
        # Credits: rows of final chunks admitted into the drain and not yet taken on res
        # (rows of partial sums need no room in the FIFO).
        occ = Signal(range(depth + 2))
        res_take = self.res.valid & self.res.ready
        final_drain = array.drain_tag[1]
        admit = array.row_take & final_drain
        # (registered, from the previous cycle's count: one credit of margin covers the row
        # that may start in that cycle)
        room = Signal()
        m.d.sync += room.eq(occ < depth - 1)
        m.d.comb += array.row_ok.eq(~final_drain | room)
        with m.If(admit & ~res_take):
            m.d.sync += occ.eq(occ + 1)
        with m.Elif(~admit & res_take):
            m.d.sync += occ.eq(occ - 1)

        # ------------------------------------------------------------------ status
        m.d.comb += [
            self.error.eq(err | clamp.error),
            self.sat_count.eq(clamp.sat_count),
            self.busy.eq(~s_idle | feed_busy | array.busy | d1_valid | e_valid | pre_valid | partial_valid | clamp.busy
                        | (occ != 0)),
        ]
        return m
