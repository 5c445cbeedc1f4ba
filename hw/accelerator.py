"""The SFx LINEAR accelerator: MAC array + clamp unit behind the streams of ``interface.py``."""
from __future__ import annotations

import math

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bool, check_impl, check_int, checking
from .clamp import CLAMP_LATENCY, SHIFT_BITS, SFxClampUnit
from .interface import (AccelParams, act_layout, cmd_layout, par_layout, res_layout,
                        wgt_layout)
from .mac_array import SFxMacArray

__all__ = ["SFxAccelerator"]


class SFxAccelerator(wiring.Component):
    """LINEAR (SPEC section 5) on an output-stationary ``rows x cols`` SFx MAC array.

    The streams, their payload layouts and the order of the beats of an operation are
    those of :mod:`superfloat.hw.interface` (``cmd``, then per tile ``par``, ``K`` beats
    of ``act`` and ``wgt`` in lockstep, and ``min(rows, T - t0)`` beats of ``res``).

    Blocks (see ``docs/architecture.md``):

    * feed sequencer (``IDLE -> CHECK -> PAR -> STREAM -> NEXT -> PAR ... -> IDLE``):
      takes ``cmd`` and checks it in the next cycle (a malformed one, ``K = 0``,
      ``K > k_max``, ``T = 0`` or ``N = 0``, is consumed, sets :attr:`error`, and leaves
      the unit idle), then for each tile one ``par`` beat (bias, shift, mult of ``cols``
      channels; a bias of a valid channel with ``|bias| >= 2**(A-2)`` sets :attr:`error`)
      and ``K`` ``act``/``wgt`` beats, transferred together, and one cycle to step the
      tile counters;
    * :class:`SFxMacArray`: PE ``(i, j)`` accumulates ``X[t0+i, k] * W[n0+j, k]``; a
      finished tile moves to shadow registers and drains row-major while the next tile
      accumulates;
    * drain stage: adds ``bias[j]``, forms ``shift[j] + xexp[i]`` and feeds one
      accumulator per cycle to a single, time-multiplexed :class:`SFxClampUnit`
      (channels past ``N`` are fed as zero with ``r = 0``: code 0, never saturated);
    * result assembly: ``cols`` codes form one ``res`` beat, queued in a FIFO. A credit
      counter admits a row into the drain only when the FIFO has room for it, so the
      clamp pipeline never stalls and ``res`` back-pressure never loses a beat.

    Latency: the first ``res`` beat of a tile is valid ``4 + 1 + 6 + (cols - 1) + 2``
    cycles after its last ``act``/``wgt`` beat (array, drain stage, clamp, row assembly,
    FIFO).
    Throughput: one ``act``/``wgt`` beat pair per cycle (``rows * cols`` MACs) in steady
    state, plus two cycles per tile (``NEXT`` and the ``par`` beat); a tile's drain takes
    ``min(rows, T - t0) * cols`` cycles and overlaps the next tile's accumulation: a tile
    takes ``max(K + 2, min(rows, T - t0) * cols + 4)`` cycles. Measured: ``T = N = 64``,
    ``K = 1024`` on 8x8 takes 65 741 cycles, 99.7 % of the ideal.

    Status: :attr:`busy`; sticky :attr:`error` (malformed command, bias out of range, or a
    right shift ``r`` outside ``0..63`` in the clamp unit); :attr:`sat_count`, saturated
    outputs since reset (32 bits, saturating; padding lanes never count). A synchronous
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
        accumulates. ``False``: no shadow registers (about a third less logic per PE, for
        small FPGAs); the array stalls while a tile drains, which costs
        ``min(rows, T - t0) * cols`` cycles plus about 6 per tile.

    Members
    -------
    cmd : In(stream.Signature(interface.cmd_layout(p)))
        ``{k, t, n, relu, rounding, use_mult}``, one beat per operation.
    act : In(stream.Signature(interface.act_layout(p)))
        ``{codes[rows], exp[rows]}``: one reduction step of a tile's activations.
    wgt : In(stream.Signature(interface.wgt_layout(p)))
        ``codes[cols]``: one reduction step of a tile's weights.
    par : In(stream.Signature(interface.par_layout(p)))
        ``cols`` lanes of ``{bias, shift, mult}``: one beat per tile.
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
                 overlap_drain: bool = True):
        with checking(self):
            for name, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{name} must be an int in {sfx.MIN_BITS}..{sfx.MAX_BITS}, "
                                    f"got {type(v).__name__} {v!r}")
            self._params = AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits,
                                       out_bits=out_bits, k_max=k_max)
            self._dsp_pes = check_int(dsp_pes, "dsp_pes", 0, rows * cols)
            self._clamp_impl = check_impl(clamp_impl, "clamp_impl")
            self._overlap = check_bool(overlap_drain, "overlap_drain")
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

    @property
    def fifo_depth(self) -> int:
        """Depth (in ``res`` beats) of the result FIFO.

        A row admitted into the drain holds a credit for ``1 + CLAMP_LATENCY + 4``
        cycles (drain stage, clamp, FIFO write and output register, ``res`` transfer), so
        ``ceil(11 / cols)`` credits keep the drain at one accumulator per cycle (measured:
        fewer slow it down). At least 3: ``SyncFIFOBuffered`` of depth 2 refuses a write
        in the cycle after a write into its empty memory, which the credits do not model.
        """
        return max(3, math.ceil((1 + CLAMP_LATENCY + 4) / self.cols))

    def elaborate(self, platform):
        m = Module()
        p = self._params
        rows, cols, A = p.rows, p.cols, p.acc_bits
        mo = p.out_bits - 1

        m.submodules.array = array = SFxMacArray(rows=rows, cols=cols, a_bits=p.a_bits, w_bits=p.w_bits,
                                                 k_max=p.k_max, dsp_pes=self._dsp_pes, overlap_drain=self._overlap)
        m.submodules.clamp = clamp = SFxClampUnit(acc_bits=A, frac_bits=p.frac_bits, out_bits=p.out_bits,
                                                  mult_impl=self._clamp_impl)
        depth = self.fifo_depth
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=cols * p.out_bits, depth=depth)

        err = Signal()

        # ------------------------------------------------------------------ feed sequencer
        k_last = Signal(p.k_bits)          # K - 1
        k_left = Signal(p.k_bits)          # beats of the tile after the next one
        first = Signal()                   # the next beat is the tile's first (registered: timing)
        last = Signal()                    # the next beat is the tile's last
        n_len = Signal(16)
        t_rem = Signal(16)                 # T - t0 of the current tile
        n_rem = Signal(16)                 # N - n0 of the current tile
        n_end = Signal()                   # n_rem <= cols: last tile of a row of tiles (registered)
        t_end = Signal()                   # t_rem <= rows: last row of tiles (registered)
        op_relu, op_rnd, op_mult = Signal(), Signal(), Signal()
        nx_par = Signal(par_layout(p), reset_less=True)    # this tile's par beat
        nx_xexp = Signal(8 * rows, reset_less=True)       # this tile's row exponents

        bias_bad = Signal(cols)            # per lane: the last par beat's bias is out of range
        bias_ok = Signal(cols)             # per lane: ... and the channel exists
        with m.If((bias_bad & bias_ok).any()):
            m.d.sync += err.eq(1)

        rows_valid = Mux(t_rem >= rows, rows, t_rem)
        lane_ok = Cat(n_rem > j for j in range(cols))     # channel n0 + j < N

        cmd = self.cmd.payload
        cmd_bad = Signal(reset_less=True)
        m.d.comb += [
            array.inp.payload.act.eq(self.act.payload.codes),
            array.inp.payload.wgt.eq(self.wgt.payload),
            array.inp.payload.last.eq(last),
            array.inp.payload.rows_valid.eq(rows_valid),
        ]
        beat = Signal()   # one act/wgt pair transferred into the array this cycle
        m.d.comb += beat.eq(array.inp.valid & array.inp.ready)

        # Drain context of the tile whose last beat is transferred (the array accepts
        # that beat only when the previous drain is over, so the context is free).
        dr_par = Signal(par_layout(p), reset_less=True)
        dr_xexp = Signal(8 * rows, reset_less=True)
        dr_ok = Signal(cols, reset_less=True)
        dr_relu, dr_rnd, dr_mult = (Signal(reset_less=True, name=f"dr_{n}") for n in ("relu", "rnd", "mult"))

        with m.FSM(name="feed") as feed:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [
                        cmd_bad.eq((cmd.k == 0) | (cmd.k > p.k_max) | (cmd.t == 0) | (cmd.n == 0)),
                        k_last.eq(cmd.k - 1), n_len.eq(cmd.n), t_rem.eq(cmd.t), n_rem.eq(cmd.n),
                        op_relu.eq(cmd.relu), op_rnd.eq(cmd.rounding), op_mult.eq(cmd.use_mult),
                    ]
                    m.next = "CHECK"
            with m.State("CHECK"):   # the command acts from registers (timing)
                with m.If(cmd_bad):
                    m.d.sync += err.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += [n_end.eq(n_rem <= cols), t_end.eq(t_rem <= rows)]
                    m.next = "PAR"
            with m.State("PAR"):
                m.d.comb += self.par.ready.eq(1)
                with m.If(self.par.valid):
                    m.d.sync += [nx_par.eq(self.par.payload), k_left.eq(k_last), first.eq(1),
                                 last.eq(k_last == 0)]
                    # |bias| >= 2**(A-2) on a valid channel: flagged one cycle later (timing)
                    lim = 1 << (A - 2)
                    m.d.sync += [
                        bias_bad.eq(Cat((self.par.payload[j].bias.as_signed() >= lim) |
                                        (self.par.payload[j].bias.as_signed() <= -lim) for j in range(cols))),
                        bias_ok.eq(lane_ok),
                    ]
                    m.next = "STREAM"
            with m.State("STREAM"):
                m.d.comb += [
                    array.inp.valid.eq(self.act.valid & self.wgt.valid),
                    self.act.ready.eq(self.wgt.valid & array.inp.ready),
                    self.wgt.ready.eq(self.act.valid & array.inp.ready),
                ]
                with m.If(beat):
                    m.d.sync += [k_left.eq(k_left - 1), first.eq(0), last.eq(k_left == 1)]
                    with m.If(first):
                        m.d.sync += nx_xexp.eq(self.act.payload.exp)
                    with m.If(last):
                        m.d.sync += [
                            dr_par.eq(nx_par),
                            dr_xexp.eq(Mux(first, self.act.payload.exp, nx_xexp)),
                            dr_ok.eq(lane_ok),
                            dr_relu.eq(op_relu), dr_rnd.eq(op_rnd), dr_mult.eq(op_mult),
                        ]
                        m.next = "NEXT"
            with m.State("NEXT"):    # step to the next tile (a cycle of its own: timing)
                with m.If(n_end):
                    m.d.sync += [n_rem.eq(n_len), n_end.eq(n_len <= cols)]
                    with m.If(t_end):
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [t_rem.eq(t_rem - rows), t_end.eq(t_rem <= 2 * rows)]
                        m.next = "PAR"
                with m.Else():
                    m.d.sync += [n_rem.eq(n_rem - cols), n_end.eq(n_rem <= 2 * cols)]
                    m.next = "PAR"

        # ------------------------------------------------------------------ drain stage
        occ = Signal(range(depth + 1))    # rows admitted into the drain and not yet taken on res
        d_col = Signal(range(max(2, cols)))   # never zero-width (Verilog [-1:0] wires)
        d_row = Signal(range(max(2, rows)))
        row_start = d_col == 0
        pre_valid = Signal()
        m.d.comb += array.out.ready.eq((~row_start | (occ < depth)) & (~pre_valid | clamp.i.ready))
        take = array.out.valid & array.out.ready

        # Context of the accumulator being taken: channel d_col, activation row d_row.
        lane = dr_par[d_col]
        bias0 = lane.bias.as_signed()
        shift0 = lane.shift.as_signed()
        mult0 = lane.mult
        lane_ok0 = dr_ok.bit_select(d_col, 1)
        xexp0 = dr_xexp.word_select(d_row, 8).as_signed()
        pre_acc = Signal(signed(A), reset_less=True)
        pre_shift = Signal(signed(SHIFT_BITS), reset_less=True)
        pre_mult = Signal(16, reset_less=True)
        pre_relu, pre_rnd, pre_use = Signal(reset_less=True), Signal(reset_less=True), Signal(reset_less=True)
        # A padding channel goes through as acc = 0 with r = 0: code 0, no saturation, no error.
        neutral = Mux(dr_mult, p.frac_bits + sfx.MULT_FRAC_BITS - mo, p.frac_bits - mo)
        with m.If(take):
            m.d.sync += [
                pre_acc.eq(Mux(lane_ok0, (array.out.payload.acc + bias0)[:A], 0)),
                pre_shift.eq(Mux(lane_ok0, shift0 + xexp0, neutral)),
                pre_mult.eq(mult0),
                pre_relu.eq(dr_relu), pre_rnd.eq(dr_rnd), pre_use.eq(dr_mult),
            ]
            with m.If(array.out.payload.last):
                m.d.sync += [d_col.eq(0), d_row.eq(0)]
            with m.Elif(d_col == cols - 1):
                m.d.sync += [d_col.eq(0), d_row.eq(d_row + 1)]
            with m.Else():
                m.d.sync += d_col.eq(d_col + 1)
        with m.If(take):
            m.d.sync += pre_valid.eq(1)
        with m.Elif(clamp.i.ready):
            m.d.sync += pre_valid.eq(0)
        m.d.comb += [
            clamp.i.valid.eq(pre_valid),
            clamp.i.payload.acc.eq(pre_acc),
            clamp.i.payload.shift.eq(pre_shift),
            clamp.i.payload.mult.eq(pre_mult),
            clamp.i.payload.use_mult.eq(pre_use),
            clamp.i.payload.relu.eq(pre_relu),
            clamp.i.payload.rounding.eq(pre_rnd),
        ]

        # ------------------------------------------------------------------ result rows
        ow = p.out_bits
        row_buf = Signal(cols * ow, reset_less=True)
        o_col = Signal(range(max(2, cols)))
        m.d.comb += clamp.o.ready.eq(1)   # credits guarantee room in the FIFO
        assembled = Cat(row_buf[ow:], clamp.o.payload.code) if cols > 1 else clamp.o.payload.code
        with m.If(clamp.o.valid):
            m.d.sync += row_buf.eq(assembled)
            with m.If(o_col == cols - 1):
                m.d.sync += o_col.eq(0)
            with m.Else():
                m.d.sync += o_col.eq(o_col + 1)
        m.d.comb += [
            fifo.w_data.eq(assembled),
            fifo.w_en.eq(clamp.o.valid & (o_col == cols - 1)),
            self.res.payload.eq(fifo.r_data),
            self.res.valid.eq(fifo.r_rdy),
            fifo.r_en.eq(self.res.ready),
        ]
        res_take = self.res.valid & self.res.ready
        admit = take & row_start
        with m.If(admit & ~res_take):
            m.d.sync += occ.eq(occ + 1)
        with m.Elif(~admit & res_take):
            m.d.sync += occ.eq(occ - 1)

        # ------------------------------------------------------------------ status
        m.d.comb += [
            self.error.eq(err | clamp.error),
            self.sat_count.eq(clamp.sat_count),
            self.busy.eq(~feed.ongoing("IDLE") | array.busy | pre_valid | clamp.busy | (occ != 0)),
        ]
        return m
