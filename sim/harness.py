"""Stream drivers and monitors that run inside the simulation (the default co-simulation path).

The per-cycle Python engine of :mod:`superfloat.sim.streams` enters Python twice per clock
cycle. Here the bench hands a whole operation (or a batch of operations) to the simulator
at once, and a plain-Verilog wrapper, :func:`harness_verilog` (top ``sfx_harness``),
feeds and collects the streams cycle by cycle without returning to Python:

* per driven stream (``cmd``, ``par``, ``act``, ``wgt``) a beat memory and a segment list,
  loaded in bulk by ``$fread`` from binary files that the host writes (:func:`write_job`).
  A beat is stored once (an activation block of ``K`` beats per row tile, a weight block per
  column tile, a parameter beat per column tile) and the segment list ``(base, length)``
  says in which order the stream sends them (:func:`superfloat.hw.interface.tile_schedule`,
  computed on the host): an operation's file holds ``T*K + N*K`` codes, not ``T*N*K/rows``;
* the ``res`` beats it collects go to a memory written back by ``$writememh``, with a
  statistics record;
* per stream a 32-bit xorshift stall generator, seeded from the job's seed: a driver
  offers its next beat unless a gap is running (``valid`` low), a gap starts with
  probability ``thr / 65536`` in a cycle and lasts ``1 + (r & mask)`` cycles; the ``res``
  sink holds ``ready`` low the same way. ``valid`` never drops before its beat is taken
  and the payload of an offered beat never changes (by construction);
* the ``res`` monitor checks the producer every cycle: ``valid`` dropped before its beat
  was taken, payload changed while ``valid & ~ready``, X/Z on ``valid``/payload (and X/Z
  on the inputs' ``ready``; Icarus is 4-state) set bits of ``proto``;
* the DUT's reset is asserted for ``reset_cycles`` at the start of a job; a job can be
  cut by a reset (``abort``: after N ``act`` beats, after N ``res`` beats, or at a cycle),
  for the reset tests; after the last beat it waits for ``busy`` to fall, then runs
  ``tail_cycles`` more cycles (results that should not come are still collected).

cocotb stays the orchestrator (:mod:`superfloat.sim.tb_harness`): it toggles ``go``,
waits for ``done`` to toggle, and the host reads the results (:func:`read_result`) and
checks every code against ``sfx.linear``. Python touches the simulator twice per job.

Beat files: ``ceil(width / 8)`` bytes per beat, most significant byte first (what
``$fread`` of a memory reads on Verilator and Icarus alike); segment files: one 64-bit
big-endian word per segment, ``base << 32 | length``.

Cycle numbers count rising edges from the job's start (its reset included); ``cycles``
of an operation is ``res_last - cmd_last + 1``, as the per-cycle engine counts it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - imported lazily: the simulator's bench imports this module
    from superfloat.hw.interface import AccelParams

__all__ = ["HARNESS_TOPLEVEL", "STREAMS", "DRIVEN", "Stalls", "Beats", "HarnessJob", "HarnessResult",
           "harness_verilog", "depths_for", "pack_beats", "words_bytes", "raw_beats", "linear_beats", "batch_beats",
           "batch_job", "expand_beats", "write_job", "read_result", "read_res_text", "res_codes", "parse_hex_words",
           "CFG", "STATS", "PROTO_BITS"]

HARNESS_TOPLEVEL = "sfx_harness"
#: Where the harness's clock comes from (see :func:`harness_verilog`); builds with waves use
#: ``"internal"`` instead of ``"pulse"`` (:func:`superfloat.sim.linear.build_harness`).
CLOCK = os.environ.get("SFX_SIM_HARNESS_CLOCK", "pulse")
DRIVEN = ("cmd", "par", "act", "wgt")
STREAMS = DRIVEN + ("res",)

#: Index of each word in the configuration file (``sfx_cfg.hex``, 32-bit words).
CFG = {name: i for i, name in enumerate(
    ["n_cmd", "n_par", "n_act", "n_wgt", "n_res", "seed", "reset_cycles", "max_cycles", "tail_cycles",
     "thr_cmd", "thr_par", "thr_act", "thr_wgt", "thr_res", "mask_cmd", "mask_par", "mask_act", "mask_wgt",
     "mask_res", "abort_kind", "abort_at"])}
#: Index of each word in the statistics file (``sfx_stats.hex``, 32-bit words).
STATS = {name: i for i, name in enumerate(
    ["cycles", "cmd_first", "cmd_last", "res_first", "res_last", "got_cmd", "got_par", "got_act", "got_wgt",
     "got_res", "sat_count", "error", "busy", "proto", "rst_busy", "rst_error", "rst_sat", "timeout", "aborted"])}
#: Bits of the ``proto`` statistic: what the monitors saw.
PROTO_BITS = {0: "res valid dropped before its beat was taken", 1: "res payload changed while valid & ~ready",
              2: "res valid or payload held X/Z", 3: "an input stream's ready held X/Z",
              4: "busy or status outputs held X/Z"}
ABORT_KINDS = {None: 0, "act": 1, "res": 2, "cycle": 3}
_DATA = {s: f"sfx_{s}.bin" for s in DRIVEN}
_SEGS = {s: f"sfx_{s}.seg" for s in DRIVEN}
_RES_FILE, _CFG_FILE, _STATS_FILE = "sfx_res.hex", "sfx_cfg.hex", "sfx_stats.hex"


def _widths(p: AccelParams) -> dict[str, int]:
    from superfloat.hw.interface import act_layout, cmd_layout, par_layout, res_layout, wgt_layout

    return {"cmd": cmd_layout(p).size, "par": par_layout(p).size, "act": act_layout(p).size,
            "wgt": wgt_layout(p).size, "res": res_layout(p).size}


def depths_for(simulator: str) -> dict[str, int]:
    """Memory depths (log2 entries): beats per driven stream and ``res``, segments (``seg``).
    Verilator stores 2 states compactly, Icarus 4 (and allocates every word)."""
    if simulator == "verilator":
        return {"cmd": 14, "par": 21, "act": 21, "wgt": 21, "res": 19, "seg": 18}
    return {"cmd": 12, "par": 17, "act": 18, "wgt": 18, "res": 16, "seg": 15}


def harness_verilog(p: AccelParams, *, depths: Mapping[str, int], clock: str = "internal") -> str:
    """The wrapper module ``sfx_harness`` around ``sfx_accelerator`` (plain Verilog-2005 plus
    ``$fread`` / ``$readmemh`` / ``$writememh``), for accelerator parameters ``p`` and memory
    depths (log2 entries, :func:`depths_for`). ``clock="internal"`` (default) generates the
    clock inside (``always #5``, a 10-unit period; Verilator needs ``--timing``);
    ``"pulse"`` generates one rising edge per 10-unit period and falls back in the same time
    step (a nonblocking assignment), so that the simulator runs one time step per cycle
    instead of two (every logic in the design is on the rising edge; Verilator 8x8 SF8,
    measured: 0.98 M -> 1.16 M cycles per CPU second; a trace then shows ``hclk`` low, so
    builds with waves use ``"internal"``); ``"port"`` takes it from a ``clk`` input (cocotb's
    GPI clock)."""
    if clock not in ("internal", "pulse", "port"):
        raise ValueError(f"clock must be 'internal', 'pulse' or 'port', got {clock!r}")
    w = _widths(p)
    ncfg, nst = len(CFG), len(STATS)
    dg = depths["seg"]
    # The generated clock is not named clk: cocotb starts its GPI clock when the top has a
    # signal clk (tb_harness), and Icarus shows it internal signals too.
    if clock == "internal":
        head = ["module sfx_harness(go, done);", "  reg hclk = 1'b0;", "  always #5 hclk = ~hclk;"]
    elif clock == "pulse":
        head = ["module sfx_harness(go, done);", "  reg hclk = 1'b0;",
                "  always #10 begin hclk = 1'b1; hclk <= 1'b0; end"]
    else:
        head = ["module sfx_harness(clk, go, done);", "  input clk;"]
    clk = "clk" if clock == "port" else "hclk"
    lines = [f"// generated by superfloat.sim.harness for {p}", *head,
             "  input go;", "  output reg done;",
             f"  reg [31:0] cfg [0:{ncfg - 1}];", f"  reg [31:0] st [0:{nst - 1}];",
             "  localparam S_IDLE = 3'd0, S_LOAD = 3'd1, S_RST = 3'd2, S_RUN = 3'd3, S_TAIL = 3'd4, S_FIN = 3'd5, "
             "S_DUMP = 3'd6, S_PREP = 3'd7;",
             "  reg [2:0] state; reg go_q; reg [31:0] cyc; reg [31:0] cnt; reg dut_rst; reg snap;",
             "  integer i, fd, nr;",
             "  initial begin state = S_IDLE; go_q = 1'b0; done = 1'b0; dut_rst = 1'b1; cyc = 0; cnt = 0;",
             f"    for (i = 0; i < {ncfg}; i = i + 1) cfg[i] = 0;",
             f"    for (i = 0; i < {nst}; i = i + 1) st[i] = 0;", "  end",
             "  wire feeding = state == S_RUN;"]
    for s in STREAMS:
        lines += [f"  reg [{w[s] - 1}:0] m_{s} [0:{(1 << depths[s]) - 1}];",
                  f"  reg [31:0] x_{s}; reg [7:0] g_{s}; reg [31:0] n_{s}; reg [31:0] p_{s};",
                  f"  wire [31:0] xn_{s} = x_{s} ^ (x_{s} << 13);",
                  f"  wire [31:0] xm_{s} = xn_{s} ^ (xn_{s} >> 17);",
                  f"  wire [31:0] xo_{s} = xm_{s} ^ (xm_{s} << 5);",
                  f"  wire [16:0] thr_{s} = cfg[{CFG['thr_' + s]}][16:0];",
                  f"  wire [7:0] mask_{s} = cfg[{CFG['mask_' + s]}][7:0];",
                  f"  wire ok_{s} = g_{s} == 8'd0 && {{1'b0, x_{s}[15:0]}} >= thr_{s};"]
    for s in DRIVEN:  # segment walker: beat address = base of the current segment + offset in it
        lines += [f"  reg [63:0] sg_{s} [0:{(1 << dg) - 1}];",
                  f"  reg [31:0] si_{s}, so_{s}, sb_{s}, sl_{s};",
                  f"  wire [31:0] sn_{s} = si_{s} + 32'd1;",
                  f"  wire [63:0] sgn_{s} = sg_{s}[sn_{s}[{dg - 1}:0]];",
                  f"  wire [31:0] sa_{s} = sb_{s} + so_{s};"]
    # DUT ports
    lines += ["  wire res__valid; wire [%d:0] res__payload; reg res__ready;" % (w["res"] - 1),
              "  wire busy, error; wire [31:0] sat_count;"]
    for s in DRIVEN:
        lines += [f"  reg {s}__valid; wire {s}__ready; wire [{w[s] - 1}:0] {s}__payload = "
                  f"m_{s}[sa_{s}[{depths[s] - 1}:0]];"]
    conns = ", ".join([f".{s}__valid({s}__valid), .{s}__ready({s}__ready), .{s}__payload({s}__payload)"
                       for s in DRIVEN])
    lines += [f"  sfx_accelerator dut(.clk({clk}), .rst(dut_rst), {conns}, .res__valid(res__valid), "
              ".res__ready(res__ready), .res__payload(res__payload), .busy(busy), .error(error), "
              ".sat_count(sat_count));"]
    # monitor state
    lines += ["  reg pv; reg pr; reg [%d:0] pp; reg [7:0] proto; reg timeout; reg aborted;" % (w["res"] - 1),
              "  reg [31:0] cmd_first, cmd_last, res_first, res_last;",
              "  wire inputs_done = " + " && ".join(f"p_{s} == n_{s} && !{s}__valid" for s in DRIVEN) + ";",
              "  wire [31:0] abort_kind = cfg[%d]; wire [31:0] abort_at = cfg[%d];" % (CFG["abort_kind"],
                                                                                     CFG["abort_at"]),
              "  wire abort_now = (abort_kind == 1 && p_act >= abort_at) || (abort_kind == 2 && p_res >= abort_at)"
              " || (abort_kind == 3 && cyc >= abort_at);"]
    lines += ["  wire xx_res, x_rdy, x_st;",
              "`ifndef VERILATOR",  # Icarus is 4-state: X/Z on the outputs
              "  assign xx_res = (^{res__valid}) === 1'bx || (res__valid && (^res__payload) === 1'bx);",
              "  assign x_rdy = (^{" + ", ".join(f"{s}__ready" for s in DRIVEN) + "}) === 1'bx;",
              "  assign x_st = (^{busy, error, sat_count}) === 1'bx;",
              "`else",
              "  assign xx_res = 1'b0; assign x_rdy = 1'b0; assign x_st = 1'b0;",
              "`endif",
              "  wire drop = pv && !pr && !res__valid;",
              "  wire chg = pv && !pr && res__valid && res__payload != pp;"]
    seq = [f"  always @(posedge {clk}) begin",
           "    case (state)",
           "    S_IDLE: if (go != go_q) begin go_q <= go; state <= S_LOAD; end",
           "    S_LOAD: begin",
           f'      $readmemh("{_CFG_FILE}", cfg);']
    for s in DRIVEN:
        for mem, fname in ((f"m_{s}", _DATA[s]), (f"sg_{s}", _SEGS[s])):
            seq += [f'      fd = $fopen("{fname}", "rb");',
                    f"      if (fd != 0) begin nr = $fread({mem}, fd); $fclose(fd); end"]
    seq += ["      state <= S_PREP; cyc <= 0; cnt <= 0; proto <= 0; timeout <= 0; aborted <= 0;",
            "      cmd_first <= 0; cmd_last <= 0; res_first <= 0; res_last <= 0;",
            "      pv <= 0; pr <= 0; pp <= 0; res__ready <= 0;"]
    for s in STREAMS:
        seq += [f"      p_{s} <= 0; g_{s} <= 0;" + (f" {s}__valid <= 0;" if s in DRIVEN else "")]
    seq += ["    end",
            "    S_PREP: begin"]
    for k, s in enumerate(STREAMS):
        salt = f"32'h{0x9E3779B9 * (k + 1) & 0xFFFFFFFF:08x}"
        seq += [f"      n_{s} <= cfg[{CFG['n_' + s]}]; x_{s} <= (cfg[{CFG['seed']}] ^ {salt}) == 0 ? 32'h1 : "
                f"(cfg[{CFG['seed']}] ^ {salt});"]
    for s in DRIVEN:
        seq += [f"      si_{s} <= 0; so_{s} <= 0; sb_{s} <= sg_{s}[0][63:32]; sl_{s} <= sg_{s}[0][31:0];"]
    seq += [f"      dut_rst <= cfg[{CFG['reset_cycles']}] != 0; cnt <= 0; snap <= 1;",
            f"      state <= cfg[{CFG['reset_cycles']}] != 0 ? S_RST : S_RUN;",
            "    end",
            "    S_RST: begin",
            "      cyc <= cyc + 1; cnt <= cnt + 1;",
            f"      if (cnt + 1 >= cfg[{CFG['reset_cycles']}]) begin dut_rst <= 0; state <= S_RUN; end",
            "    end",
            "    S_RUN, S_TAIL: begin",
            "      cyc <= cyc + 1; snap <= 0;",
            "      if (snap) begin st[14] <= {31'b0, busy}; st[15] <= {31'b0, error}; st[16] <= sat_count; end"]
    for s in STREAMS:
        seq += [f"      x_{s} <= xo_{s};",
                f"      if (g_{s} != 0) g_{s} <= g_{s} - 1;",
                f"      else if ({{1'b0, x_{s}[15:0]}} < thr_{s}) g_{s} <= x_{s}[23:16] & mask_{s};"]
    for s in DRIVEN:
        seq += [f"      if ({s}__valid && {s}__ready) begin",
                f"        p_{s} <= p_{s} + 1; {s}__valid <= feeding && p_{s} + 1 < n_{s} && ok_{s};",
                f"        if (so_{s} + 32'd1 >= sl_{s}) begin",
                f"          si_{s} <= sn_{s}; so_{s} <= 0; sb_{s} <= sgn_{s}[63:32]; sl_{s} <= sgn_{s}[31:0];",
                f"        end else so_{s} <= so_{s} + 32'd1;"]
        if s == "cmd":
            seq += ["        if (p_cmd == 0) cmd_first <= cyc; cmd_last <= cyc;"]
        seq += [f"      end else if (!{s}__valid) {s}__valid <= feeding && p_{s} < n_{s} && ok_{s};"]
    seq += ["      res__ready <= ok_res;",
            "      pv <= res__valid; pr <= res__ready; pp <= res__payload;",
            "      proto <= proto | {3'b0, x_st, x_rdy, xx_res, chg, drop};",
            "      if (res__valid && res__ready) begin",
            f"        if (p_res < {1 << depths['res']}) m_res[p_res[{depths['res'] - 1}:0]] <= res__payload;",
            "        p_res <= p_res + 1; res_last <= cyc; if (p_res == 0) res_first <= cyc;",
            "      end",
            f"      if (cyc >= cfg[{CFG['max_cycles']}]) begin timeout <= 1; state <= S_FIN; end",
            "      else if (state == S_RUN && abort_now) begin aborted <= 1; state <= S_FIN; end",
            "      else if (state == S_RUN && inputs_done && p_res >= n_res && !busy) begin",
            f"        state <= cfg[{CFG['tail_cycles']}] == 0 ? S_FIN : S_TAIL; cnt <= 0;",
            "      end else if (state == S_TAIL) begin",
            "        cnt <= cnt + 1;",
            f"        if (cnt + 1 >= cfg[{CFG['tail_cycles']}]) state <= S_FIN;",
            "      end",
            "    end",
            "    S_FIN: begin",
            "      st[0] <= cyc; st[1] <= cmd_first; st[2] <= cmd_last; st[3] <= res_first; st[4] <= res_last;",
            "      st[5] <= p_cmd; st[6] <= p_par; st[7] <= p_act; st[8] <= p_wgt; st[9] <= p_res;",
            "      st[10] <= sat_count; st[11] <= {31'b0, error}; st[12] <= {31'b0, busy}; st[13] <= {24'b0, proto};",
            "      st[17] <= {31'b0, timeout}; st[18] <= {31'b0, aborted};",
            "      cmd__valid <= 0; par__valid <= 0; act__valid <= 0; wgt__valid <= 0; res__ready <= 0;",
            "      state <= S_DUMP;",
            "    end",
            "    S_DUMP: begin",
            f"      if (p_res != 0) $writememh(\"{_RES_FILE}\", m_res, 0, "
            f"(p_res > {1 << depths['res']} ? {1 << depths['res']} : p_res) - 1);",
            f'      $writememh("{_STATS_FILE}", st);',
            "      done <= ~done; state <= S_IDLE;",
            "    end",
            "    default: state <= S_IDLE;",
            "    endcase",
            "  end",
            "endmodule"]
    return "\n".join(lines + seq) + "\n"


# --------------------------------------------------------------------------- host side: beats


def pack_beats(fields: Sequence[tuple], width: int, beats: int) -> np.ndarray:
    """Beats as ``$fread`` reads them: uint8 ``[beats, ceil(width / 8)]``, most significant byte
    first. Each beat is the OR of ``fields``: ``(values [beats, lanes] or [1, lanes],
    lane_width, offset)``, lane ``i`` of a field at bit ``offset + i * lane_width`` (the packing
    of :func:`superfloat.hw.interface.pack_lanes`; negative values two's complement).
    Byte-aligned fields (SF8/SF16 codes, exponents, ...) are placed as bytes; others go
    through a bit matrix. ``tests/test_sim_harness.py`` checks it against ``pack_lanes`` /
    ``linear_traffic``."""
    nb = -(-width // 8)
    le = np.zeros((beats, nb), dtype=np.uint8)  # little-endian: column j holds bits 8j .. 8j+7
    slow = []
    for f in fields:
        vals, lw, off = f
        v = np.asarray(vals)
        if v.shape[0] == 1 and beats != 1:
            v = np.broadcast_to(v, (beats, v.shape[1]))
        lanes = v.shape[1]
        if lw % 8 == 0 and off % 8 == 0 and lw <= 64:
            vb = lw // 8
            by = np.ascontiguousarray(v, dtype="<i8").view(np.uint8).reshape(beats, lanes, 8)[:, :, :vb]
            le[:, off // 8:off // 8 + lanes * vb] |= by.reshape(beats, lanes * vb)
        else:
            slow.append((v, lw, off))
    if slow:
        bits = np.zeros((beats, nb * 8), dtype=np.uint8)
        for v, lw, off in slow:
            b = ((np.asarray(v, dtype=np.int64)[:, :, None] >> np.arange(lw, dtype=np.int64)) & 1).astype(np.uint8)
            lanes = b.shape[1]
            bits[:, off:off + lanes * lw] |= b.reshape(beats, lanes * lw)
        le |= np.packbits(bits.reshape(beats, nb, 8), axis=2, bitorder="little").reshape(beats, nb)
    top = width - 8 * (nb - 1)  # bits used in the most significant byte
    if top < 8:
        le[:, nb - 1] &= (1 << top) - 1
    return le[:, ::-1]


def words_bytes(words: Sequence[int], width: int) -> np.ndarray:
    """Python int beats (few: commands, parameters, tests) as :func:`pack_beats` lays them out."""
    nb = -(-width // 8)
    mask = (1 << width) - 1
    return np.frombuffer(b"".join((int(w) & mask).to_bytes(nb, "big") for w in words), dtype=np.uint8).reshape(
        len(words), nb)


@dataclass
class Beats:
    """The stream contents of one or more operations: per driven stream the distinct beats
    (``data``: uint8 ``[words, bytes]``, :func:`pack_beats`) and the order in which they are
    sent (``segs``: int64 ``[m, 2]`` rows ``(base, length)`` into ``data``); ``counts``: beats
    sent per stream (``res``: beats expected back)."""

    data: dict[str, np.ndarray]
    segs: dict[str, np.ndarray]
    counts: dict[str, int]

    @property
    def words(self) -> dict[str, int]:
        return {s: int(self.data[s].shape[0]) for s in DRIVEN}


def _segs(bases: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[m, 2]`` segments with contiguous neighbours merged and empty ones dropped."""
    b = np.asarray(bases, dtype=np.int64).reshape(-1)
    ln = np.asarray(lens, dtype=np.int64).reshape(-1)
    keep = ln > 0
    b, ln = b[keep], ln[keep]
    if b.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    start = np.ones(b.size, dtype=bool)
    start[1:] = b[1:] != b[:-1] + ln[:-1]
    idx = np.flatnonzero(start)
    return np.stack([b[idx], np.add.reduceat(ln, idx)], axis=1)


def raw_beats(words: Mapping[str, Sequence[int]], p: AccelParams, *, res: int = 0) -> Beats:
    """Beats given as Python ints per stream, sent once in order (tests: malformed commands,
    hand-made parameter beats); ``res``: the beats expected back."""
    w = _widths(p)
    data = {s: words_bytes(list(words.get(s, [])), w[s]) for s in DRIVEN}
    segs = {s: _segs([0], [data[s].shape[0]]) for s in DRIVEN}
    counts = {s: int(data[s].shape[0]) for s in DRIVEN}
    counts["res"] = int(res)
    return Beats(data, segs, counts)


def _offsets(layout) -> dict[str, int]:
    return {name: f.offset for name, f in layout}


def linear_beats(args, p: AccelParams) -> Beats:
    """The beats of one validated LINEAR operation (``sfx.LinearArgs``), in the order of
    :func:`superfloat.hw.interface.tile_schedule`: the same streams as
    :func:`superfloat.sim.linear.linear_traffic` (padding rows and lanes included), each
    activation / weight block stored once and packed with numpy."""
    from superfloat.hw.interface import TN_BITS, act_layout, par_layout, tile_schedule

    from .packing import cmd_word, xmult_lanes

    t_total, n_total, k = args.T, args.N, args.K
    rows, cols = p.rows, p.cols
    if t_total > (1 << TN_BITS) - 1 or n_total > (1 << TN_BITS) - 1:
        raise ValueError(f"T={t_total} and N={n_total} must be < {1 << TN_BITS} (16-bit command fields)")
    use_mult = args.mult is not None
    w = _widths(p)
    cmd = cmd_word(p, k=k, t=t_total, n=n_total, relu=args.relu, rounding=args.rounding, use_mult=use_mult,
                   use_xmult=args.xmult is not None)
    act_off = _offsets(act_layout(p))
    lane_off = _offsets(par_layout(p))
    n_tt, n_tn = -(-t_total // rows), -(-n_total // cols)
    # activations: one block of K beats per row tile; beat j of block tt holds x[tt*rows + i, j] in lane i
    xp = np.zeros((n_tt * rows, k), dtype=np.asarray(args.x).dtype)
    xp[:t_total] = args.x
    xa = xp.reshape(n_tt, rows, k).transpose(0, 2, 1).reshape(n_tt * k, rows)
    e = np.zeros(n_tt * rows, dtype=np.int64)
    e[:t_total] = np.asarray(args.x_exponent, dtype=np.int64)
    ea = np.repeat(e.reshape(n_tt, 1, rows), k, axis=1).reshape(n_tt * k, rows) & 0xFF
    fields = [(xa, p.a_bits, act_off["codes"]), (ea, 8, act_off["exp"])]
    if p.xmult:
        xm = xmult_lanes(args, n_tt * rows)
        fields.append((np.repeat(xm.reshape(n_tt, 1, rows), k, axis=1).reshape(n_tt * k, rows), 16, act_off["xmult"]))
    act = pack_beats(fields, w["act"], n_tt * k)
    # weights: one block of K beats per column tile
    wp = np.zeros((n_tn * cols, k), dtype=np.asarray(args.w).dtype)
    wp[:n_total] = args.w
    wgt = pack_beats([(wp.reshape(n_tn, cols, k).transpose(0, 2, 1).reshape(n_tn * k, cols), p.w_bits, 0)],
                     w["wgt"], n_tn * k)
    # parameters: one beat per channel, cols per column tile; padding lanes repeat the last valid channel's
    # shift/mult, bias 0
    ch = np.minimum(np.arange(n_tn * cols), n_total - 1)
    valid = np.arange(n_tn * cols) < n_total
    bias = np.where(valid, np.asarray(args.bias, dtype=np.int64)[ch], 0) & ((1 << p.acc_bits) - 1)
    shift = np.asarray(args.shift, dtype=np.int64)[ch] & 0xFF
    mult = (np.asarray(args.mult, dtype=np.int64)[ch] if use_mult else np.full(ch.size, 0xA5A5)) & 0xFFFF
    par = pack_beats([(bias[:, None], p.acc_bits, lane_off["bias"]), (shift[:, None], 8, lane_off["shift"]),
                      (mult[:, None], 16, lane_off["mult"])], w["par"], n_tn * cols)
    sched = tile_schedule(t_total, n_total, rows, cols)
    tt = np.array([t0 // rows for t0, _, _, _ in sched], dtype=np.int64)
    tn = np.array([n0 // cols for _, _, n0, _ in sched], dtype=np.int64)
    ones = np.ones(len(sched), dtype=np.int64)
    data = {"cmd": words_bytes([cmd], w["cmd"]), "par": par, "act": act, "wgt": wgt}
    segs = {"cmd": _segs([0], [1]), "par": _segs(tn * cols, ones * cols), "act": _segs(tt * k, ones * k),
            "wgt": _segs(tn * k, ones * k)}
    counts = {"cmd": 1, "par": len(sched) * cols, "act": len(sched) * k, "wgt": len(sched) * k,
              "res": sum(tv for _, tv, _, _ in sched)}
    return Beats(data, segs, counts)


def batch_beats(ops: Sequence[Beats]) -> Beats:
    """The beats of several operations sent back to back."""
    data, segs = {}, {}
    for s in DRIVEN:
        base = 0
        parts, sg = [], []
        for b in ops:
            parts.append(b.data[s])
            sg.append(b.segs[s] + np.array([base, 0], dtype=np.int64))
            base += b.data[s].shape[0]
        data[s] = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.uint8)
        sgc = np.concatenate(sg) if sg else np.zeros((0, 2), dtype=np.int64)
        segs[s] = _segs(sgc[:, 0], sgc[:, 1])
    counts = {s: sum(int(b.counts[s]) for b in ops) for s in STREAMS}
    return Beats(data, segs, counts)


def expand_beats(b: Beats, stream: str) -> list[int]:
    """The beats of ``stream`` in the order they are sent, as Python ints (tests)."""
    d = b.data[stream]
    words = [int.from_bytes(row.tobytes(), "big") for row in d]
    out = []
    for base, ln in b.segs[stream].tolist():
        out += words[base:base + ln]
    return out


# --------------------------------------------------------------------------- jobs


@dataclass
class Stalls:
    """Random stalls of one job: per stream the probability that a gap (``valid`` or
    ``ready`` low) starts in a cycle, and its longest length (1..``max_len`` cycles,
    rounded up to a power of two). ``Stalls()`` is full rate."""

    prob: dict[str, float] = field(default_factory=dict)
    max_len: dict[str, int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, prob: float, max_len: int = 6, res_prob: float | None = None,
                res_max_len: int | None = None) -> "Stalls":
        pr = {s: prob for s in DRIVEN}
        pr["res"] = prob if res_prob is None else res_prob
        ml = {s: max_len for s in DRIVEN}
        ml["res"] = max_len if res_max_len is None else res_max_len
        return cls(pr, ml)

    def cfg(self) -> dict[str, int]:
        out = {}
        for s in STREAMS:
            p = float(self.prob.get(s, 0.0))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"stall probability of {s} must be in 0..1, got {p}")
            ml = int(self.max_len.get(s, 1))
            if not 1 <= ml <= 256:
                raise ValueError(f"longest stall of {s} must be in 1..256 cycles, got {ml}")
            out[f"thr_{s}"] = int(round(p * 65536))
            out[f"mask_{s}"] = (1 << math.ceil(math.log2(ml))) - 1 if ml > 1 else 0
        return out

    def describe(self) -> str:
        if not any(self.prob.values()):
            return "no stalls"
        return ", ".join(f"{s} {self.prob.get(s, 0):.2f}x{self.max_len.get(s, 1)}" for s in STREAMS)


@dataclass
class HarnessJob:
    """What one ``go`` runs: the beats (:class:`Beats`) and the configuration."""

    beats: Beats
    seed: int = 1
    stalls: Stalls = field(default_factory=Stalls)
    reset_cycles: int = 2
    max_cycles: int | None = None
    tail_cycles: int = 0
    abort: tuple[str, int] | None = None  # ("act" | "res" | "cycle", N)

    @property
    def counts(self) -> dict[str, int]:
        return self.beats.counts

    def cfg_words(self) -> list[int]:
        c = {f"n_{s}": int(self.counts.get(s, 0)) for s in STREAMS}
        budget = self.max_cycles
        if budget is None:
            slow = 1 + 8 * max([self.stalls.prob.get(s, 0.0) * self.stalls.max_len.get(s, 1) for s in STREAMS] + [0])
            budget = int(slow * 4 * (c["n_act"] + c["n_res"] + c["n_par"] + c["n_cmd"])) + 5000
        c.update(seed=int(self.seed) & 0xFFFFFFFF, reset_cycles=int(self.reset_cycles),
                 max_cycles=min(budget, (1 << 32) - 1), tail_cycles=int(self.tail_cycles), **self.stalls.cfg())
        kind, at = self.abort if self.abort else (None, 0)
        if kind not in ABORT_KINDS:
            raise ValueError(f"abort must be one of {list(ABORT_KINDS)[1:]}, got {kind!r}")
        c.update(abort_kind=ABORT_KINDS[kind], abort_at=int(at))
        return [c[name] for name in CFG]


def batch_job(ops: Sequence, p: AccelParams, **kw) -> HarnessJob:
    """One job that runs the operations ``ops`` back to back (``sfx.LinearArgs`` each, or
    :class:`Beats`); ``kw`` go to :class:`HarnessJob`."""
    return HarnessJob(batch_beats([op if isinstance(op, Beats) else linear_beats(op, p) for op in ops]), **kw)


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` (the old one unlinked first): truncating a file
    that still has unwritten data makes ext4 (``auto_da_alloc``) flush it on close, measured
    20-24 ms per job of 8 files on this machine's disk against 1 ms for unlink and write."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    with open(path, "wb") as f:
        f.write(data)


def write_job(run_dir: str | Path, job: HarnessJob, depths: Mapping[str, int]) -> None:
    """Write the job's files into the simulator's working folder ``run_dir``. Raises
    ValueError (saying what to split) when the job does not fit the harness's memories.
    The results of the previous job (``res`` beats, statistics) are removed, so that the
    simulator's ``$writememh`` creates new files instead of truncating old ones."""
    run_dir = Path(run_dir)
    b = job.beats
    for s in DRIVEN:
        n = b.data[s].shape[0]
        if n > 1 << depths[s]:
            raise ValueError(f"{n} distinct {s} beats do not fit the harness's {1 << depths[s]}-beat memory: split "
                             f"the operation (fewer rows T or channels N per call)")
        if b.segs[s].shape[0] > 1 << depths["seg"]:
            raise ValueError(f"{b.segs[s].shape[0]} {s} segments do not fit the harness's {1 << depths['seg']}-entry "
                             f"segment list: split the operation (fewer tiles per call)")
        if int(b.segs[s][:, 1].sum()) != int(b.counts[s]):
            raise ValueError(f"{s}: the segments hold {int(b.segs[s][:, 1].sum())} beats, the counts say "
                             f"{b.counts[s]}")
        _write_new(run_dir / _DATA[s], np.ascontiguousarray(b.data[s]).tobytes())
        sg = b.segs[s] if b.segs[s].shape[0] else np.zeros((1, 2), dtype=np.int64)
        _write_new(run_dir / _SEGS[s], ((sg[:, 0].astype(np.uint64) << np.uint64(32))
                                        | sg[:, 1].astype(np.uint64)).astype(">u8").tobytes())
    if int(b.counts.get("res", 0)) > 1 << depths["res"]:
        raise ValueError(f"{b.counts['res']} res beats do not fit the harness's {1 << depths['res']}-beat memory: "
                         f"split the operation")
    for name in (_RES_FILE, _STATS_FILE):
        try:
            os.unlink(run_dir / name)
        except FileNotFoundError:
            pass
    _write_new(run_dir / _CFG_FILE, "".join(f"{w:08x}\n" for w in job.cfg_words()).encode())


def parse_hex_words(path: str | Path) -> list[int]:
    """Words of a ``$writememh`` file (comments and address lines skipped; X/Z is an error)."""
    out = []
    for ln in Path(path).read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("//") or ln.startswith("@"):
            continue
        try:
            out.append(int(ln, 16))
        except ValueError:
            raise ValueError(f"{path}: the simulator wrote {ln!r} (X/Z in a result or status)") from None
    return out


@dataclass
class HarnessResult:
    """What the harness measured for a job (see :data:`STATS`), and the ``res`` beats."""

    res: list[int]
    stats: dict[str, int]

    @property
    def cycles(self) -> int:
        """Cycles from the last ``cmd`` beat taken to the last ``res`` beat taken, both included."""
        s = self.stats
        return s["res_last"] - s["cmd_last"] + 1 if s["got_res"] else 0

    @property
    def protocol_errors(self) -> list[str]:
        return [msg for bit, msg in PROTO_BITS.items() if self.stats["proto"] >> bit & 1]


def read_result(run_dir: str | Path, *, words: bool = True) -> HarnessResult:
    """The statistics that the harness wrote into ``run_dir``, and (``words``) the ``res``
    beats as Python ints (:func:`res_codes` reads them vectorized instead)."""
    run_dir = Path(run_dir)
    vals = parse_hex_words(run_dir / _STATS_FILE)
    stats = {name: vals[i] for name, i in STATS.items()}
    res_path = run_dir / _RES_FILE
    res = parse_hex_words(res_path) if words and stats["got_res"] and res_path.exists() else []
    return HarnessResult(res, stats)


def remove_job_files(run_dir: str | Path) -> None:
    for name in list(_DATA.values()) + list(_SEGS.values()) + [_RES_FILE, _CFG_FILE, _STATS_FILE]:
        try:
            os.unlink(Path(run_dir) / name)
        except FileNotFoundError:
            pass


def read_res_text(run_dir: str | Path) -> bytes:
    path = Path(run_dir) / _RES_FILE
    return path.read_bytes() if path.exists() else b""


_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _LUT[_c] = _i
_LUT[ord("A"):ord("F") + 1] = _LUT[ord("a"):ord("f") + 1]


def res_words_lanes(words_text: bytes | str, p: AccelParams) -> np.ndarray:
    """``$writememh`` text of ``res`` beats to int64 ``[beats, cols]`` lanes (vectorized)."""
    ob, cols = p.out_bits, p.cols
    text = words_text.encode() if isinstance(words_text, str) else words_text
    lines = [ln for ln in (x.strip() for x in text.splitlines()) if ln and not ln.startswith(b"//")
             and not ln.startswith(b"@")]
    if not lines:
        return np.zeros((0, cols), dtype=np.int64)
    nd = -(-(ob * cols) // 4)
    if any(len(ln) > nd for ln in lines):
        raise ValueError("res beats wider than the res payload")
    arr = np.frombuffer(b"".join(ln.rjust(nd, b"0") for ln in lines), dtype=np.uint8).reshape(len(lines), nd)
    nib = _LUT[arr]
    if (nib == 255).any():
        raise ValueError("the simulator wrote X/Z or a non-hex character in a res beat")
    nib = nib[:, ::-1].astype(np.int64)  # least significant nibble first
    bits = ((nib[:, :, None] >> np.arange(4)) & 1).reshape(len(lines), nd * 4)
    return bits[:, :ob * cols].reshape(len(lines), cols, ob) @ (1 << np.arange(ob, dtype=np.int64))


def res_codes(words_text: bytes | str, t_total: int, n_total: int, p: AccelParams) -> tuple[np.ndarray, int]:
    """``$writememh`` text of ``res`` beats to ``[T, N]`` codes (dtype ``sfx.code_dtype(out_bits)``)
    and the number of nonzero padding lanes (channels past ``N``), vectorized; the inverse of
    the ``res`` packing (:func:`superfloat.hw.interface.unpack_lanes`)."""
    lanes = res_words_lanes(words_text, p)
    return lanes_to_codes(lanes, t_total, n_total, p)


def lanes_to_codes(lanes: np.ndarray, t_total: int, n_total: int, p: AccelParams) -> tuple[np.ndarray, int]:
    """``[beats, cols]`` ``res`` lanes of one operation to its ``[T, N]`` codes and the number of
    nonzero padding lanes."""
    from superfloat.hw.interface import tile_schedule
    from superfloat.sw import sfx

    cols = p.cols
    sched = tile_schedule(t_total, n_total, p.rows, cols)
    expect = sum(tv for _, tv, _, _ in sched)
    if lanes.shape[0] != expect:
        raise ValueError(f"{lanes.shape[0]} res beats for an operation that has {expect}")
    out = np.zeros((t_total, n_total), dtype=sfx.code_dtype(p.out_bits))
    if not expect:
        return out, 0
    n_tn = -(-n_total // cols)
    full_t = t_total // p.rows * p.rows
    padding = 0
    if full_t:  # full row tiles: the beats of row tile tt are [tn][row] -> reshape
        nb = full_t // p.rows * n_tn * p.rows
        blk = lanes[:nb].reshape(full_t // p.rows, n_tn, p.rows, cols).transpose(0, 2, 1, 3).reshape(
            full_t, n_tn * cols)
        out[:full_t] = blk[:, :n_total]
        padding += int(np.count_nonzero(blk[:, n_total:]))
    if full_t < t_total:
        tv = t_total - full_t
        blk = lanes[lanes.shape[0] - n_tn * tv:].reshape(n_tn, tv, cols).transpose(1, 0, 2).reshape(tv, n_tn * cols)
        out[full_t:] = blk[:, :n_total]
        padding += int(np.count_nonzero(blk[:, n_total:]))
    return out, padding


def split_lanes(lanes: np.ndarray, ops: Sequence[tuple[int, int]], p: AccelParams) -> list[np.ndarray]:
    """The ``res`` lanes of a batch split per operation (``ops``: ``(T, N)`` of each, in order)."""
    out, i = [], 0
    for t, n in ops:
        nb = -(-n // p.cols) * t
        out.append(lanes[i:i + nb])
        i += nb
    if i != lanes.shape[0]:
        raise ValueError(f"{lanes.shape[0]} res beats for a batch that has {i}")
    return out
