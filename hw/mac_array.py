"""Output-stationary array of SFx processing elements with a destructive XOR readout."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from superfloat.sw import sfx

from ._checks import check_bits, check_bool, check_int, checking
from .pe import PE_KINDS, SFxPE

__all__ = ["SFxMacArray", "mac_array_in_layout", "mac_array_out_layout", "xor_tree_levels", "sum_bits",
           "TAG_BITS"]

#: Width of the tag a tile carries through the array (read with its last beat, returned
#: with each of its values); the accelerator marks partial sums with it.
TAG_BITS = 2


def sum_bits(a_bits: int, w_bits: int, k: int, kind: str = "sm") -> int:
    """Two's complement bits that hold any sum of ``k`` products of ``a_bits`` x ``w_bits``
    codes exactly (at least ``a_bits + w_bits``, the PE's own minimum).

    SFx: ``|product| <= (2**(a_bits-1) - 1) * (2**(w_bits-1) - 1)``; two's complement:
    ``|product| <= 2**(a_bits + w_bits - 2)``. The array needs no room for the bias (it is
    added after the array, in SPEC's ``A`` bits), so this is at most SPEC's ``A - 1``."""
    if kind == "sm":
        biggest = ((1 << (a_bits - 1)) - 1) * ((1 << (w_bits - 1)) - 1)
    else:
        biggest = 1 << (a_bits + w_bits - 2)
    return max(a_bits + w_bits, (k * biggest).bit_length() + 1)


def mac_array_in_layout(rows: int, cols: int, a_bits: int, w_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxMacArray.inp`: one reduction step of a tile."""
    return data.StructLayout({
        "act": data.ArrayLayout(a_bits, rows),
        "wgt": data.ArrayLayout(w_bits, cols),
        "last": 1,
        "rows_valid": range(rows + 1),
        "tag": TAG_BITS,
    })


def mac_array_out_layout(acc_bits: int) -> data.StructLayout:
    """Payload of :attr:`SFxMacArray.out`: one finished accumulator."""
    return data.StructLayout({"acc": signed(acc_bits), "last": 1, "tag": TAG_BITS})


def xor_tree_levels(pes: int) -> int:
    """Register levels of the readout tree over ``pes`` PEs (4-input XORs per level)."""
    levels = 0
    while pes > 1:
        pes = -(-pes // 4)
        levels += 1
    return levels


class SFxMacArray(wiring.Component):
    """``rows x cols`` output-stationary MAC array (SPEC section 3).

    Dataflow: each ``inp`` beat carries one reduction step ``k`` of a tile: ``rows``
    activation codes ``X[i, k]`` and ``cols`` weight codes ``W[j, k]``. The codes are
    registered and broadcast (activation ``i`` along row ``i``, weight ``j`` down column
    ``j``; in a cycle without a beat both are code 0, so every PE adds 0 and no PE
    needs an enable, whatever the payload holds between beats); PE ``(i, j)`` accumulates ``X[i, k] * W[j, k]`` exactly in
    ``A`` bits, from 0 (the bias is added after the array). The beat flagged ``last`` ends
    the tile.

    Readout (docs/architecture.md, "Drain"): the finished sums are read destructively, one
    PE per cycle in row-major order (``(0,0), (0,1), ...``, ``rows_valid * cols`` values).
    A pipelined tree of 4-input XORs (:func:`xor_tree_levels` register levels) keeps the
    XOR of every PE's readout register; clearing the register of the PE being read changes
    that XOR by exactly its value, so ``value = XOR(before) ^ XOR(after)``. This costs about
    a third of a LUT4 per accumulator bit and PE (a multiplexer or a shift chain costs one
    or more) and needs no select lines, only a row token and a column token.

    * ``overlap_drain=True``: the PEs have shadow registers. Two cycles after a tile's last
      product is accumulated its sums move to the shadows and the accumulators restart at
      0, so a tile drains while the next one accumulates. The beat after a ``last`` beat is
      not accepted in the very next cycle (the move drops the product added in its cycle),
      and a ``last`` beat is not accepted while the previous tile is still draining (the
      shadows hold one tile).
    * ``overlap_drain=False``: no shadow registers (the smallest PE, for the iCE40): the
      accumulators themselves are read and cleared; no beat is accepted from a tile's
      ``last`` beat until its drain has finished (``rows_valid * cols`` cycles plus a few).

    Flow control of the drain: a row (``cols`` values, one per cycle) starts only in a
    cycle where :attr:`row_ok` is high (:attr:`row_take` pulses then); once started it runs
    to its end. :attr:`out` has no back-pressure: its consumer grants rows it has room for.

    Latency: a ``last`` beat transferred in cycle ``c`` completes its sums in cycle
    ``c + 1 + pe_latency`` (:attr:`pe_latency` ``= 2 + mul_stages``); a row started in cycle
    ``s`` puts its values on :attr:`out` in cycles ``s + 1 + readout_latency`` ...
    (:attr:`readout_latency` ``= xor_tree_levels(rows * cols) + 1``; the value is the XOR of
    two registers, one LUT level: the consumer registers it). Throughput: one
    ``inp`` beat (``rows * cols`` MACs) per cycle between tiles; one readout value per
    cycle.

    Parameters
    ----------
    rows, cols : int
        Array shape (1..64 each).
    a_bits, w_bits : int
        Code widths of activations and weights (2..16).
    k_max : int
        Longest reduction a tile may have: the accumulators have
        ``sum_bits(a_bits, w_bits, k_max)`` bits (:attr:`acc_bits`), which hold any such sum
        exactly; longer reductions would overflow and must be split or rejected upstream.
    dsp_pes : int
        The first ``dsp_pes`` PEs in row-major order use ``impl="dsp"`` multipliers, the
        others ``impl="lut"`` (0..rows*cols).
    overlap_drain : bool
        Shadow registers in the PEs (default ``True``).
    mul_stages : int
        Pipeline registers inside every PE's multiplier (0..4, default 0): wide logic
        multipliers (SF8 and up) need one to reach the clock of the rest of the array.
    pe_kind : str
        ``"sm"`` (SFx, default) or ``"tc"`` (two's complement integer PEs of the same width:
        a synthesis baseline, not the SFx function).

    Members
    -------
    inp : In(stream.Signature(mac_array_in_layout(...)))
        ``act``, ``wgt``: codes of one reduction step; ``last``: the last step of a tile;
        ``rows_valid`` (read with ``last``): how many rows of the tile to drain (1..rows;
        0 or more than ``rows`` drains all); ``tag`` (read with ``last``): returned with
        every value of the tile.
    out : Out(stream.Signature(mac_array_out_layout(acc_bits), always_ready=True))
        Finished accumulators, row-major; ``last`` marks the final one of a tile; ``tag``
        the tile's tag.
    row_ok : In(1)
        The consumer can take one more row of ``cols`` values.
    row_take : Out(1)
        A row starts draining this cycle (it took the grant of :attr:`row_ok`).
    drain_tag : Out(TAG_BITS)
        The tag of the tile being drained (or waiting to be).
    busy : Out(1)
        A beat is in the pipeline, a tile waits to drain or is draining.
    """

    def __init__(self, *, rows: int, cols: int, a_bits: int, w_bits: int,
                 k_max: int = sfx.DEFAULT_K_MAX, dsp_pes: int = 0, overlap_drain: bool = True,
                 mul_stages: int = 0, pe_kind: str = "sm"):
        with checking(self):
            self._rows = check_int(rows, "rows", 1, 64)
            self._cols = check_int(cols, "cols", 1, 64)
            self._a_bits = check_bits(a_bits, "a_bits")
            self._w_bits = check_bits(w_bits, "w_bits")
            self._k_max = check_int(k_max, "k_max", 1, sfx.K_MAX_LIMIT)
            self._dsp_pes = check_int(dsp_pes, "dsp_pes", 0, self._rows * self._cols)
            self._overlap = check_bool(overlap_drain, "overlap_drain")
            self._mul_stages = check_int(mul_stages, "mul_stages", 0, 4)
            if not isinstance(pe_kind, str) or pe_kind not in PE_KINDS:
                raise ValueError(f"pe_kind must be one of {', '.join(map(repr, PE_KINDS))}, got {pe_kind!r}")
            self._pe_kind = pe_kind
            self._acc_bits = sum_bits(self._a_bits, self._w_bits, self._k_max, self._pe_kind)
        super().__init__({
            "inp": In(stream.Signature(mac_array_in_layout(self._rows, self._cols, self._a_bits, self._w_bits))),
            "out": Out(stream.Signature(mac_array_out_layout(self._acc_bits), always_ready=True)),
            "row_ok": In(1),
            "row_take": Out(1),
            "drain_tag": Out(TAG_BITS),
            "busy": Out(1),
        })

    rows = property(lambda self: self._rows, doc="Rows of PEs (activation lanes).")
    cols = property(lambda self: self._cols, doc="Columns of PEs (weight lanes / output channels).")
    a_bits = property(lambda self: self._a_bits, doc="Code width of activations.")
    w_bits = property(lambda self: self._w_bits, doc="Code width of weights.")
    k_max = property(lambda self: self._k_max, doc="Longest reduction accepted.")
    dsp_pes = property(lambda self: self._dsp_pes, doc="Number of PEs (row-major first) with DSP multipliers.")
    acc_bits = property(lambda self: self._acc_bits, doc="Accumulator width: sum_bits(a_bits, w_bits, k_max).")
    overlap_drain = property(lambda self: self._overlap, doc="Whether a tile drains while the next accumulates.")
    mul_stages = property(lambda self: self._mul_stages, doc="Pipeline registers inside the PE multipliers.")
    pe_kind = property(lambda self: self._pe_kind, doc="'sm' (SFx) or 'tc' (two's complement baseline).")

    @property
    def pe_latency(self) -> int:
        """Cycles from codes at a PE to their product in its accumulator (``2 + mul_stages``)."""
        return 2 + self._mul_stages

    @property
    def readout_latency(self) -> int:
        """Cycles from a row start to its first value on :attr:`out`, minus one."""
        return xor_tree_levels(self._rows * self._cols) + 1

    def pe_impl(self, i: int, j: int) -> str:
        """Multiplier implementation of PE ``(i, j)``."""
        return "dsp" if i * self._cols + j < self._dsp_pes else "lut"

    def elaborate(self, platform):
        m = Module()
        rows, cols, A = self._rows, self._cols, self._acc_bits
        pe_lat = self.pe_latency

        reserved = Signal()   # a tile's last beat was accepted; its drain has not finished
        s0_last = Signal()    # the beat accepted in the previous cycle was a tile's last
        inp = self.inp
        if self._overlap:
            m.d.comb += inp.ready.eq(~(inp.payload.last & reserved) & ~s0_last)
        else:
            m.d.comb += inp.ready.eq(~reserved)
        in_xfer = inp.valid & inp.ready
        last_xfer = in_xfer & inp.payload.last

        # Stage 0: the accepted beat, registered and broadcast. Without a beat the codes
        # are 0: every product is 0 and the accumulators keep their sums. Both operands are
        # zeroed (the flip-flops' synchronous reset, no logic): the payload offered between
        # beats may be anything, X in a 4-state simulator, and X * 0 is X there.
        a_reg = Signal(data.ArrayLayout(self._a_bits, rows), reset_less=True)
        w_reg = Signal(data.ArrayLayout(self._w_bits, cols), reset_less=True)
        m.d.sync += [a_reg.eq(Mux(in_xfer, inp.payload.act, 0)), w_reg.eq(Mux(in_xfer, inp.payload.wgt, 0)),
                     s0_last.eq(last_xfer)]

        # A tile's last beat (cycle c) is in the accumulators from cycle c + 1 + pe_lat.
        lp = [s0_last]
        for k in range(pe_lat):
            r = Signal(name=f"last_p{k + 1}")
            m.d.sync += r.eq(lp[-1])
            lp.append(r)
        # lp[k] is high in cycle c + 1 + k; done = lp[pe_lat].
        cap_rows = Signal(range(rows + 1))
        cap_tag = Signal(TAG_BITS)
        with m.If(last_xfer):
            rv = inp.payload.rows_valid
            out_of_range = rv == 0
            if (1 << len(rv)) - 1 > rows:
                out_of_range |= rv > rows
            m.d.sync += [reserved.eq(1), cap_rows.eq(Mux(out_of_range, rows, rv)), cap_tag.eq(inp.payload.tag)]
        m.d.comb += self.drain_tag.eq(cap_tag)

        # zero: the accumulators restart at 0 (shadows take the sums). High for one cycle
        # after reset too, so that the first tile starts from 0.
        zero = Signal(init=1)
        if self._overlap:
            m.d.sync += zero.eq(lp[pe_lat - 1])       # high in cycle c + 1 + pe_lat: capture

        # Drain sequencer: one-hot row and column tokens; PE (i, j) is read when both are set.
        # The tile's sums are complete in the accumulators (or the shadows, from the capture
        # at the end of that cycle) in cycle c + 1 + pe_lat; its first row may start then.
        ct = Signal(cols, name="col_tok")
        rt = Signal(rows, name="row_tok")
        rows_left = Signal(range(rows + 1))
        first_row = Signal()
        tile_open = Signal()     # the reserved tile is being read
        with m.If(lp[pe_lat - 1]):
            m.d.sync += [rows_left.eq(cap_rows), first_row.eq(1), tile_open.eq(1)]
        in_row = ct.any()
        row_end = ~in_row | ct[cols - 1]
        start = tile_open & (rows_left != 0) & self.row_ok & row_end
        m.d.comb += self.row_take.eq(start)
        tile_done = Signal()     # the last PE of the tile is read this cycle
        m.d.comb += tile_done.eq(ct[cols - 1] & (rows_left == 0) & tile_open)
        with m.If(start):
            m.d.sync += [ct.eq(1), rows_left.eq(rows_left - 1), first_row.eq(0),
                         rt.eq(Mux(first_row, 1, rt << 1) if rows > 1 else 1)]
        with m.Elif(ct[cols - 1]):
            m.d.sync += ct.eq(0)
        with m.Else():
            m.d.sync += ct.eq(ct << 1)
        with m.If(tile_done):
            m.d.sync += [tile_open.eq(0), reserved.eq(0)]
        if not self._overlap:
            # After the drain, clear what was not read (rows past rows_valid).
            m.d.sync += zero.eq(tile_done)

        # PEs.
        pes = []
        for i in range(rows):
            for j in range(cols):
                pe = SFxPE(a_bits=self._a_bits, w_bits=self._w_bits, acc_bits=A, impl=self.pe_impl(i, j),
                           shadow=self._overlap, mul_stages=self._mul_stages, kind=self._pe_kind)
                m.submodules[f"pe_{i}_{j}"] = pe
                m.d.comb += [pe.a.eq(a_reg[i]), pe.w.eq(w_reg[j]), pe.zero.eq(zero), pe.dclr.eq(rt[i] & ct[j])]
                pes.append(pe)

        # Readout: registered XOR tree over every PE's readout register.
        level = [pe.out.as_unsigned() for pe in pes]
        depth = 0
        while len(level) > 1:
            nxt = []
            for g in range(0, len(level), 4):
                r = Signal(A, name=f"xor_l{depth + 1}_{g // 4}", reset_less=True)
                x = level[g]
                for v in level[g + 1:g + 4]:
                    x = x ^ v
                m.d.sync += r.eq(x)
                nxt.append(r)
            level = nxt
            depth += 1
        root = level[0]
        prev = Signal(A, reset_less=True)
        m.d.sync += prev.eq(root)
        value = root ^ prev   # combinational: the consumer registers it (one LUT level)
        # Flags of the PE read in cycle t reach `value` in cycle t + depth + 1.
        fv, fl, ft = in_row, tile_done, cap_tag
        flags = []
        for k in range(depth + 1):
            nv, nl = Signal(name=f"rd_valid{k}"), Signal(name=f"rd_last{k}")
            nt = Signal(TAG_BITS, name=f"rd_tag{k}", reset_less=True)
            m.d.sync += [nv.eq(fv), nl.eq(fl), nt.eq(ft)]
            flags += [nv]
            fv, fl, ft = nv, nl, nt
        m.d.comb += [
            self.out.valid.eq(fv),
            self.out.payload.acc.eq(value),
            self.out.payload.last.eq(fl),
            self.out.payload.tag.eq(ft),
        ]
        m.d.comb += self.busy.eq(Cat(s0_last, *lp, reserved, tile_open, in_row, *flags).any())
        return m
