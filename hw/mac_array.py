"""Output-stationary array of SFx processing elements, with a drain chain."""
from __future__ import annotations

from amaranth.hdl import Array, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bits, check_bool, check_int, checking
from .pe import SFxPE

__all__ = ["SFxMacArray", "mac_array_in_layout", "mac_array_out_layout"]

#: Cycles from the transfer of a tile's last ``inp`` beat to its first valid ``out`` beat.
DRAIN_LATENCY = 4


def mac_array_in_layout(rows: int, cols: int, a_bits: int, w_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxMacArray.inp`: one reduction step of a tile."""
    return data.StructLayout({
        "act": data.ArrayLayout(a_bits, rows),
        "wgt": data.ArrayLayout(w_bits, cols),
        "last": 1,
        "rows_valid": range(rows + 1),
    })


def mac_array_out_layout(acc_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxMacArray.out`: one finished accumulator."""
    return data.StructLayout({"acc": signed(acc_bits), "last": 1})


class SFxMacArray(wiring.Component):
    """``rows x cols`` output-stationary MAC array (SPEC section 3).

    Dataflow: each ``inp`` beat carries one reduction step ``k`` of a tile: ``rows``
    activation codes ``X[i, k]`` and ``cols`` weight codes ``W[j, k]``. The codes are
    registered and broadcast (activation ``i`` along row ``i``, weight ``j`` down column
    ``j``); PE ``(i, j)`` accumulates ``X[i, k] * W[j, k]`` exactly in ``A`` bits, from 0
    (the bias is added after the array). The beat flagged ``last`` ends the tile: two
    cycles after its product is accumulated, the finished sums move to the PEs' shadow
    registers (the accumulators restart at 0) and drain through :attr:`out` in row-major
    order (``(0,0), (0,1), ...``), ``rows_valid * cols`` values, while the accumulators
    already work on the next tile.

    Flow control: the beat after a ``last`` beat is not accepted in the very next cycle
    (one idle cycle per tile lets the shadow copy the registered accumulator, which keeps
    it one LUT per bit); and the shadow registers hold one tile, so a ``last`` beat is not
    accepted (``inp.ready`` low while ``inp.payload.last``) until the previous drain has
    finished. All other beats are accepted at once: with ``K >= rows * cols + 3`` and
    no stall on :attr:`out`, every PE does one MAC per cycle except one cycle per tile.

    With ``overlap_drain=False`` the PEs have no shadow registers (about a third less
    logic per PE, for FPGAs where area is what matters): the finished sums are read
    through a ``rows * cols``-way multiplexer, and no beat is accepted from a tile's
    ``last`` beat until its drain is over (``rows_valid * cols`` cycles plus the latency
    below are lost per tile).

    Latency: a beat transferred in cycle ``c`` is multiplied in ``c + 1`` and accumulated
    in ``c + 2``; the first :attr:`out` beat of a tile is valid in cycle
    ``c + DRAIN_LATENCY`` (``c + 4``) after its ``last`` beat. Throughput: one ``inp``
    beat per cycle (``rows * cols`` MACs) between tile boundaries, one ``out`` beat per
    cycle.

    Parameters
    ----------
    rows, cols : int
        Array shape (1..64 each).
    a_bits, w_bits : int
        SFx widths of activations and weights (2..16).
    k_max : int
        Longest reduction (sets ``A = sfx.accumulator_bits(a_bits, w_bits, k_max)``);
        longer reductions would overflow and must be rejected upstream.
    dsp_pes : int
        The first ``dsp_pes`` PEs in row-major order use ``impl="dsp"`` multipliers, the
        others ``impl="lut"`` (0..rows*cols).
    overlap_drain : bool
        Shadow registers in the PEs, so that a tile drains while the next accumulates
        (default ``True``).

    Members
    -------
    inp : In(stream.Signature(mac_array_in_layout(...)))
        ``act``, ``wgt``: codes of one reduction step; ``last``: the last step of a tile;
        ``rows_valid`` (read with ``last``):
        how many rows of the tile to drain (1..rows; 0 or more than ``rows`` drains all).
    out : Out(stream.Signature(mac_array_out_layout(A)))
        Finished accumulators, row-major; ``last`` marks the final one of a tile.
    busy : Out(1)
        A beat is in the pipeline or a tile is waiting to drain.
    """

    def __init__(self, *, rows: int, cols: int, a_bits: int, w_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, dsp_pes: int = 0, overlap_drain: bool = True):
        with checking(self):
            self._rows = check_int(rows, "rows", 1, 64)
            self._cols = check_int(cols, "cols", 1, 64)
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._k_max = check_int(k_max, "k_max", 1, sfx.K_MAX_LIMIT)
            self._dsp_pes = check_int(dsp_pes, "dsp_pes", 0, self._rows * self._cols)
            self._overlap = check_bool(overlap_drain, "overlap_drain")
            self._acc_bits = sfx.accumulator_bits(self._a_bits, self._w_bits, self._k_max)
        super().__init__({
            "inp": In(stream.Signature(mac_array_in_layout(self._rows, self._cols, self._a_bits, self._w_bits))),
            "out": Out(stream.Signature(mac_array_out_layout(self._acc_bits))),
            "busy": Out(1),
        })

    rows = property(lambda self: self._rows, doc="Rows of PEs (activation lanes).")
    cols = property(lambda self: self._cols, doc="Columns of PEs (weight lanes / output channels).")
    a_bits = property(lambda self: self._a_bits, doc="SFx width of activations.")
    w_bits = property(lambda self: self._w_bits, doc="SFx width of weights.")
    k_max = property(lambda self: self._k_max, doc="Longest reduction accepted.")
    dsp_pes = property(lambda self: self._dsp_pes, doc="Number of PEs (row-major first) with DSP multipliers.")
    acc_bits = property(lambda self: self._acc_bits, doc="Accumulator width A (SPEC section 3).")
    overlap_drain = property(lambda self: self._overlap, doc="Whether a tile drains while the next accumulates.")

    def pe_impl(self, i: int, j: int) -> str:
        """Multiplier implementation of PE ``(i, j)``."""
        return "dsp" if i * self._cols + j < self._dsp_pes else "lut"

    def elaborate(self, platform):
        m = Module()
        rows, cols = self._rows, self._cols

        # Stage 0: the accepted beat, registered and broadcast.
        s0_valid, s0_last = Signal(), Signal()
        s0_act = Signal(data.ArrayLayout(self._a_bits, rows), reset_less=True)
        s0_wgt = Signal(data.ArrayLayout(self._w_bits, cols), reset_less=True)
        # Stage 1: products registered in the PEs. Stage 2: the tile's sums are complete.
        s1_valid, s1_last = Signal(), Signal()
        s2_cap = Signal()

        reserved = Signal()   # a tile's last beat was accepted; its drain has not finished
        draining = Signal()
        cap_rows = Signal(range(rows + 1))
        d_row = Signal(range(max(2, rows)))   # never zero-width (Verilog [-1:0] wires)
        d_col = Signal(range(max(2, cols)))

        inp = self.inp
        if self._overlap:
            m.d.comb += inp.ready.eq(~(inp.payload.last & reserved) & ~(s0_valid & s0_last))
        else:
            m.d.comb += inp.ready.eq(~reserved)
        in_xfer = inp.valid & inp.ready
        m.d.sync += [s0_valid.eq(in_xfer), s1_valid.eq(s0_valid), s1_last.eq(s0_last), s2_cap.eq(s1_valid & s1_last)]
        with m.If(in_xfer):
            m.d.sync += [
                s0_act.eq(inp.payload.act),
                s0_wgt.eq(inp.payload.wgt),
                s0_last.eq(inp.payload.last),
            ]
            with m.If(inp.payload.last):
                rv = inp.payload.rows_valid
                out_of_range = rv == 0
                if (1 << len(rv)) - 1 > rows:
                    out_of_range |= rv > rows
                m.d.sync += [
                    reserved.eq(1),
                    cap_rows.eq(Mux(out_of_range, rows, rv)),
                ]

        out_xfer = self.out.valid & self.out.ready
        pes = [[SFxPE(a_bits=self._a_bits, w_bits=self._w_bits, acc_bits=self._acc_bits,
                      impl=self.pe_impl(i, j), shadow=self._overlap) for j in range(cols)] for i in range(rows)]
        is_last = (d_row == cap_rows - 1) & (d_col == cols - 1)
        chain = [pe for row in pes for pe in row]  # row-major drain order
        for i in range(rows):
            for j in range(cols):
                pe = pes[i][j]
                m.submodules[f"pe_{i}_{j}"] = pe
                m.d.comb += [
                    pe.a.eq(s0_act[i]),
                    pe.w.eq(s0_wgt[j]),
                    pe.acc_en.eq(s1_valid),
                    # shadow: move the sums when complete; else: restart after the drain
                    pe.clear.eq(s2_cap if self._overlap else out_xfer & is_last),
                    pe.shift.eq(out_xfer),
                ]
        if self._overlap:
            # Drain: rows_valid * cols shadow values through chain[0].
            for p, pe in enumerate(chain):
                m.d.comb += pe.chain_in.eq(chain[p + 1].chain_out if p + 1 < len(chain) else 0)
            drained = chain[0].chain_out
        else:
            # Drain: the accumulators themselves, selected by (d_row, d_col).
            for pe in chain:
                m.d.comb += pe.chain_in.eq(0)
            drained = Array(Array(pe.chain_out for pe in row) for row in pes)[d_row][d_col]
        m.d.comb += [
            self.out.valid.eq(draining),
            self.out.payload.acc.eq(drained),
            self.out.payload.last.eq(is_last),
        ]
        with m.If(s2_cap):
            m.d.sync += [draining.eq(1), d_row.eq(0), d_col.eq(0)]
        with m.Elif(out_xfer):
            with m.If(is_last):
                m.d.sync += [draining.eq(0), reserved.eq(0)]
            with m.Elif(d_col == cols - 1):
                m.d.sync += [d_col.eq(0), d_row.eq(d_row + 1)]
            with m.Else():
                m.d.sync += d_col.eq(d_col + 1)

        m.d.comb += self.busy.eq(s0_valid | s1_valid | s2_cap | reserved)
        return m
