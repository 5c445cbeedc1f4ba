"""IP packaging of the accelerator: a FuseSoC core, a self-checking Verilog testbench, test vectors.

:func:`write_ip` (``sfx verilog ... --ip DIR``) writes a directory that a hardware engineer
drops into an existing flow (``docs/ip.md``)::

    DIR/
      <name>.core                FuseSoC CAPI2 core superfloat:sfx:<name>:<version>
                                 (targets default, sim, sim_axi with the wrapper, lint)
      rtl/<name>.v               the accelerator (superfloat.hw.verilog.generate_verilog)
      rtl/<name>_axis.v          AXI4-Stream-named wrapper (axi=True only)
      rtl/verilator_lint.vlt     the justified Verilator waivers of the generated Verilog
      tb/<name>_tb.v             self-checking plain-Verilog testbench ($readmemh, no cocotb)
      vectors/*.hex              beats of a few LINEAR operations and their expected results
      vectors/ops.json           the operations' arguments and expected codes, readable
      README.md                  this configuration's port map and the commands to run
      ip.json                    parameters, VLNV and the list of files written (manifest)

The test vectors are the beats of :func:`random_ops` operations (or the caller's),
packed by :func:`superfloat.sim.linear.linear_traffic` with the layouts and the beat order
of :mod:`superfloat.hw.interface`; the expected result codes come from
:func:`superfloat.sw.sfx.linear_with_stats` (no arithmetic here). The testbench drives the
streams with deterministic ``valid``/``ready`` stalls, compares every ``res`` lane, checks
``error``, ``busy`` and ``sat_count`` at the end, prints ``PASS`` or ``FAIL`` with counts,
and ends with ``$fatal`` (non-zero exit status of ``vvp``) on any mismatch.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from superfloat.sw import sfx

from .interface import (AccelParams, act_layout, cmd_layout, pack_lanes, par_layout, res_layout, tile_schedule,
                        wgt_layout)
from .verilog import LINT_WAIVERS, generate_verilog

__all__ = ["IpPackage", "ResBeat", "write_ip", "random_ops", "vector_files", "axis_wrapper_verilog",
           "testbench_verilog", "core_file", "VENDOR", "LIBRARY", "MANIFEST", "DRIVEN"]

VENDOR = "superfloat"
LIBRARY = "sfx"
#: The manifest of an IP directory (also what a later :func:`write_ip` may replace).
MANIFEST = "ip.json"
#: The input streams, in the order the testbench declares them.
DRIVEN = ("cmd", "par", "act", "wgt")
#: Commands in flight whose ``res`` beats the AXI wrapper tracks for ``tlast`` (a further
#: command waits: ``s_axis_cmd_tready`` low).
AXIS_OPS_IN_FLIGHT = 4


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("superfloat")
    except Exception:   # pragma: no cover - running from a tree that is not installed
        return "0.0.0"


@dataclass(frozen=True)
class ResBeat:
    """One expected ``res`` beat: operation ``op``, output row ``t``, channels ``n0 ..
    n0 + nv - 1`` in lanes ``0 .. nv - 1`` (lanes past ``nv`` are code 0), packed ``word``."""

    op: int
    t: int
    n0: int
    nv: int
    word: int
    last: bool   # last res beat of its operation (tlast of the AXI wrapper)


@dataclass(frozen=True)
class IpPackage:
    """What :func:`write_ip` wrote."""

    root: Path
    vlnv: str
    core: Path
    verilog: Path
    wrapper: Path | None
    testbench: Path
    vectors: Path
    files: tuple[Path, ...]
    res_beats: tuple[ResBeat, ...]
    n_ops: int
    n_saturated: int


# --------------------------------------------------------------------------- test vectors


def random_ops(p: AccelParams, *, seed: int = 0, n_ops: int = 4) -> list[dict[str, Any]]:
    """``n_ops`` random legal LINEAR operations for ``p`` as keyword arguments of
    :func:`superfloat.sw.sfx.linear` (without the widths). Shapes are random with partial
    row and column tiles and ``K > rows`` where ``k_max`` allows; every operation has a
    bias and per-row exponents; operation ``i`` has a per-channel ``mult`` when ``i`` is
    odd, ``relu`` when ``i % 4 >= 2``, and rounding ``toward_zero`` when ``i % 4`` is 1 or
    2 (four operations cover every combination). Shifts aim at the top of the output range
    so that results round and some saturate."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(n_ops, bool) or not isinstance(n_ops, int) or not 1 <= n_ops <= 64:
        raise ValueError(f"n_ops must be an int in 1..64, got {n_ops!r}")
    rng = np.random.default_rng(seed)
    ops = []
    for i in range(n_ops):
        t = int(rng.integers(1, 2 * p.rows + 2))
        n = int(rng.integers(1, 2 * p.cols + 2))
        k = int(min(p.k_max, rng.integers(p.rows + 1, p.rows + 10)))
        use_mult = i % 2 == 1
        relu = i % 4 >= 2
        rounding = sfx.ROUNDINGS[1] if i % 4 in (1, 2) else sfx.ROUNDINGS[0]
        x = rng.integers(0, 1 << p.a_bits, (t, k))
        w = rng.integers(0, 1 << p.w_bits, (n, k))
        blim = (1 << (p.acc_bits - 2)) - 1
        lim = min(blim, 1 << p.frac_bits)
        bias = rng.integers(-lim, lim + 1, n)
        mult = rng.integers(1 << 15, 1 << 16, n) if use_mult else None
        f = p.frac_bits + (sfx.MULT_FRAC_BITS if use_mult else 0)
        mo = p.out_bits - 1
        xexp = rng.integers(-2, 3, t)
        # output magnitude ~ 2**(F - 2 + log2(K)/2 - r) with r = f - mo - shift - xexp in 0..63
        shift = int(round(1 - 0.5 * math.log2(k))) + rng.integers(-2, 3, n)
        shift = np.clip(shift, max(f - mo - 61, sfx.INT8_MIN), min(f - mo - 2, sfx.INT8_MAX))
        ops.append(dict(x_codes=x, w_codes=w, bias=bias, shift=shift, mult=mult, x_exponent=xexp, relu=relu,
                        rounding=rounding))
    return ops


def _hex_lines(words: Sequence[int], width: int, comment: str) -> str:
    digits = max(1, -(-width // 4))
    lines = [f"// {line}" for line in comment.splitlines()]
    lines += [format(int(wd), f"0{digits}x") for wd in words]
    return "\n".join(lines) + "\n"


def vector_files(p: AccelParams, ops: Sequence[Mapping[str, Any]], *, name: str = "sfx_accelerator"
                 ) -> tuple[dict[str, str], list[ResBeat], dict[str, Any]]:
    """The test-vector files of ``ops`` (keyword arguments of :func:`superfloat.sw.sfx.linear`
    without the widths and ``k_max``) for ``p``: ``({file name: text}, expected res beats,
    summary)``. Beats are packed by :func:`superfloat.sim.linear.linear_traffic` (the
    layouts and beat order of :mod:`superfloat.hw.interface`); expected codes and the
    saturation count come from :func:`superfloat.sw.sfx.linear_with_stats`.

    Raises:
        ValueError, TypeError: an operation that ``sfx.check_linear_args`` rejects (same
            messages, prefixed with the operation's index), or one with ``xmult`` (the
            accelerator has no per-row multiplier).
    """
    from superfloat.sim.linear import linear_traffic

    if not ops:
        raise ValueError("ops must hold at least one LINEAR operation")
    streams: dict[str, list[int]] = {s: [] for s in DRIVEN}
    res: list[ResBeat] = []
    ends: list[tuple[int, int, int]] = []
    described = []
    sat_total = 0
    for i, op in enumerate(ops):
        op = dict(op)
        if op.get("xmult") is not None:
            raise ValueError(f"operation {i}: xmult (a per-row multiplier) is not supported by the IP package "
                             f"(it is generated without the xmult option)")
        for key in ("a_bits", "w_bits", "out_bits", "k_max"):
            if key in op:
                raise ValueError(f"operation {i}: {key} comes from the IP's parameters, do not pass it")
        kw = dict(a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max)
        x, w = op.pop("x_codes"), op.pop("w_codes")
        try:
            args = sfx.check_linear_args(x, w, **kw, **op)
            codes, stats = sfx.linear_with_stats(x, w, **kw, **op)
        except (TypeError, ValueError) as e:
            raise type(e)(f"operation {i}: {e}") from None
        tr = linear_traffic(args, p)
        streams["cmd"].append(tr.cmd)
        streams["par"] += tr.par
        streams["act"] += tr.act
        streams["wgt"] += tr.wgt
        codes = np.asarray(codes, dtype=np.int64)
        sched = tile_schedule(args.T, args.N, p.rows, p.cols)
        for si, (t0, tv, n0, nv) in enumerate(sched):
            blk = np.zeros((tv, p.cols), dtype=np.int64)
            blk[:, :nv] = codes[t0:t0 + tv, n0:n0 + nv]
            for r, word in enumerate(pack_lanes(blk, p.out_bits)):
                res.append(ResBeat(i, t0 + r, n0, nv, word, si == len(sched) - 1 and r == tv - 1))
        ends.append((len(streams["par"]), len(streams["act"]), len(res)))
        sat_total += stats.n_saturated
        described.append({
            "T": args.T, "N": args.N, "K": args.K, "relu": args.relu, "rounding": args.rounding,
            "x_codes": args.x.tolist(), "w_codes": args.w.tolist(), "bias": args.bias.tolist(),
            "shift": args.shift.tolist(), "mult": None if args.mult is None else args.mult.tolist(),
            "x_exponent": args.x_exponent.tolist(), "expected_codes": codes.tolist(),
            "n_saturated": stats.n_saturated, "tiles": len(sched),
            "beats": {"par": len(tr.par), "act": len(tr.act), "wgt": len(tr.wgt), "res": tr.res_beats},
        })
    widths = {"cmd": cmd_layout(p).size, "par": par_layout(p).size, "act": act_layout(p).size,
              "wgt": wgt_layout(p).size, "res": res_layout(p).size}
    src = f"{name} test vectors (superfloat.hw.ip; layouts and beat order: superfloat/hw/interface.py)"
    files = {}
    what = {"cmd": "cmd beats {k, t, n, relu, rounding, use_mult}, one per operation",
            "par": "par beats, {bias, shift, mult} of one output channel, cols per tile",
            "act": "act beats, rows codes then rows int8 exponents, K per tile",
            "wgt": "wgt beats, cols codes, K per tile"}
    for s in DRIVEN:
        files[f"{s}.hex"] = _hex_lines(streams[s], widths[s], f"{src}\n{what[s]}: {len(streams[s])} beats of "
                                       f"{widths[s]} bits, lane/field 0 in the least significant bits")
    files["res.hex"] = _hex_lines([b.word for b in res], widths["res"],
                                  f"{src}\nexpected res beats (superfloat.sw.sfx.linear), cols codes of "
                                  f"{p.out_bits} bits: {len(res)} beats of {widths['res']} bits")
    files["res_tag.hex"] = _hex_lines([(b.op << 48) | (b.t << 32) | (b.n0 << 16) | b.nv for b in res], 64,
                                      f"{src}\nper expected res beat: op[63:48] t[47:32] n0[31:16] nv[15:0] "
                                      "(operation, output row, first channel, valid lanes)")
    files["ops.hex"] = _hex_lines([(r << 64) | (a << 32) | pp for pp, a, r in ends], 96,
                                  f"{src}\nper operation, cumulative beat counts at its end: res[95:64] "
                                  "act/wgt[63:32] par[31:0]")
    meta = [len(ops), len(streams["cmd"]), len(streams["par"]), len(streams["act"]), len(res), sat_total]
    files["meta.hex"] = _hex_lines(meta, 32, f"{src}\nn_ops, cmd beats, par beats, act/wgt beats, res beats, "
                                             "expected sat_count")
    summary = {"params": {"rows": p.rows, "cols": p.cols, "a_bits": p.a_bits, "w_bits": p.w_bits,
                          "out_bits": p.out_bits, "k_max": p.k_max},
               "counts": {"ops": len(ops), **{s: len(streams[s]) for s in DRIVEN}, "res": len(res)},
               "widths": widths, "n_saturated": sat_total, "ops": described}
    files["ops.json"] = json.dumps(summary, indent=1) + "\n"
    return files, res, summary


# --------------------------------------------------------------------------- Verilog


def _bytes_width(width: int) -> int:
    return 8 * -(-width // 8)


def axis_wrapper_verilog(p: AccelParams, *, name: str = "sfx_accelerator") -> str:
    """Verilog of ``<name>_axis``: the accelerator ``name`` behind AXI4-Stream-named ports.

    Ports: ``aclk``, ``aresetn`` (synchronous, active low); per input stream ``s`` of
    ``cmd``, ``par``, ``act``, ``wgt``: ``s_axis_<s>_tdata`` (the payload zero-padded to
    whole bytes; padding bits are ignored), ``_tvalid``, ``_tready``, ``_tlast`` (accepted
    and ignored: the command says how many beats follow; the testbench drives it high on
    an operation's last beat of each stream); ``m_axis_res_tdata`` (padding bits 0),
    ``_tvalid``, ``_tready``, ``_tlast`` (high on the last ``res`` beat of an operation);
    ``busy``, ``error``, ``sat_count`` as on the core.

    ``tlast`` on ``res`` is counted here: every well-formed command accepted (``k`` in
    ``1..k_max``, ``t > 0``, ``n > 0``: malformed ones produce no result) queues its ``T``
    and ``N``; the ``res`` beats then walk the tiles in the order of
    :func:`superfloat.hw.interface.tile_schedule`. At most ``AXIS_OPS_IN_FLIGHT``
    commands wait for their results; a further command waits (``s_axis_cmd_tready`` low).
    No cycle of latency is added on any stream (the wrapper's logic is beside the data).
    """
    w = {"cmd": cmd_layout(p).size, "par": par_layout(p).size, "act": act_layout(p).size,
         "wgt": wgt_layout(p).size, "res": res_layout(p).size}
    tw = {s: _bytes_width(v) for s, v in w.items()}
    kb = p.k_bits
    qd = AXIS_OPS_IN_FLIGHT
    qa = qd.bit_length() - 1   # qd is a power of two >= 2
    ports = ["  input  wire aclk,", "  input  wire aresetn,",
             "  // the inputs' tlast and tdata padding bits are unused by design (see above)",
             "  /* verilator lint_off UNUSEDSIGNAL */"]
    for s in DRIVEN:
        ports += [f"  input  wire [{tw[s] - 1}:0] s_axis_{s}_tdata,", f"  input  wire s_axis_{s}_tvalid,",
                  f"  output wire s_axis_{s}_tready,", f"  input  wire s_axis_{s}_tlast,"]
    ports += ["  /* verilator lint_on UNUSEDSIGNAL */",
              f"  output wire [{tw['res'] - 1}:0] m_axis_res_tdata,", "  output wire m_axis_res_tvalid,",
              "  input  wire m_axis_res_tready,", "  output wire m_axis_res_tlast,",
              "  output wire busy,", "  output wire error,", "  output wire [31:0] sat_count"]
    pad = tw["res"] - w["res"]
    res_data = f"{{{pad}'b0, res_payload}}" if pad else "res_payload"
    t_hi, n_hi = kb + 15, kb + 31
    lines = [
        f"// {name}_axis: {name} (SFx LINEAR accelerator) with AXI4-Stream-named ports.",
        "// Generated by superfloat.hw.ip; do not edit. Port map and tlast: docs/ip.md.",
        f"// rows={p.rows} cols={p.cols} a_bits={p.a_bits} w_bits={p.w_bits} out_bits={p.out_bits} k_max={p.k_max}",
        "//",
        "// * aclk: every transfer on its rising edge; aresetn: synchronous, active low.",
        "// * s_axis_<s>_tdata carries the core's <s>__payload in its low bits (zero-padded to whole",
        "//   bytes; the padding bits are ignored). Payload layouts: superfloat/hw/interface.py.",
        "// * s_axis_<s>_tlast is accepted and ignored (the cmd beat says how many beats follow);",
        "//   by convention a master raises it on the last beat of an operation on each stream.",
        "// * m_axis_res_tlast is high on the last res beat of an operation (tile order of",
        "//   interface.tile_schedule). m_axis_res_tdata padding bits are 0.",
        "// * act and wgt beats are taken together (as on the core): a master must offer either",
        "//   without waiting for the other's tready (AXI4-Stream: tvalid never waits for tready).",
        f"// * at most {qd} commands wait for their results; a further command waits (cmd tready low).",
        "// * No latency is added: the core's valid/ready/payload pass straight through.",
        f"module {name}_axis (",
        *ports,
        ");",
        "  wire rst = ~aresetn;",
        f"  wire [{w['res'] - 1}:0] res_payload;",
        "  wire res_valid;",
        "  wire core_cmd_ready;",
        "  wire cmd_valid;",
        f"  localparam [{kb - 1}:0] K_MAX = {kb}'d{p.k_max};",
        "",
        "  // results pending: T and N of every well-formed command accepted, oldest first",
        f"  reg [15:0] q_t [0:{qd - 1}];",
        f"  reg [15:0] q_n [0:{qd - 1}];",
        f"  reg [{qa}:0] q_wr;",
        f"  reg [{qa}:0] q_rd;",
        f"  wire q_full = (q_wr[{qa}] != q_rd[{qa}]) && (q_wr[{qa - 1}:0] == q_rd[{qa - 1}:0]);",
        f"  wire [{kb - 1}:0] cmd_k = s_axis_cmd_tdata[{kb - 1}:0];",
        f"  wire [15:0] cmd_t = s_axis_cmd_tdata[{t_hi}:{kb}];",
        f"  wire [15:0] cmd_n = s_axis_cmd_tdata[{n_hi}:{kb + 16}];",
        "  wire cmd_ok = (cmd_k != 0) && (cmd_k <= K_MAX) && (cmd_t != 16'd0) && (cmd_n != 16'd0);",
        "  assign cmd_valid = s_axis_cmd_tvalid & ~q_full;",
        "  assign s_axis_cmd_tready = core_cmd_ready & ~q_full;",
        "  wire cmd_fire = s_axis_cmd_tvalid & s_axis_cmd_tready;",
        "",
        "  // position of the next res beat in the oldest pending operation",
        "  reg [16:0] r_t0;  // first row of the tile",
        "  reg [16:0] r_n0;  // first channel of the tile",
        "  reg [16:0] r_i;   // row within the tile",
        f"  wire [16:0] h_t = {{1'b0, q_t[q_rd[{qa - 1}:0]]}};",
        f"  wire [16:0] h_n = {{1'b0, q_n[q_rd[{qa - 1}:0]]}};",
        f"  wire tile_row_last = (r_t0 + r_i + 17'd1 == h_t) || (r_i == 17'd{p.rows - 1});",
        f"  wire tile_col_last = (r_n0 + 17'd{p.cols} >= h_n);",
        f"  wire tile_t_last = (r_t0 + 17'd{p.rows} >= h_t);",
        "  wire res_last = tile_row_last & tile_col_last & tile_t_last;",
        "  wire res_fire = res_valid & m_axis_res_tready;",
        "",
        "  always @(posedge aclk) begin",
        "    if (rst) begin",
        f"      q_wr <= {qa + 1}'d0;",
        f"      q_rd <= {qa + 1}'d0;",
        "      r_t0 <= 17'd0;",
        "      r_n0 <= 17'd0;",
        "      r_i <= 17'd0;",
        "    end else begin",
        "      if (cmd_fire && cmd_ok) begin",
        f"        q_t[q_wr[{qa - 1}:0]] <= cmd_t;",
        f"        q_n[q_wr[{qa - 1}:0]] <= cmd_n;",
        f"        q_wr <= q_wr + {qa + 1}'d1;",
        "      end",
        "      if (res_fire) begin",
        "        if (!tile_row_last) begin",
        "          r_i <= r_i + 17'd1;",
        "        end else begin",
        "          r_i <= 17'd0;",
        "          if (!tile_col_last) begin",
        f"            r_n0 <= r_n0 + 17'd{p.cols};",
        "          end else begin",
        "            r_n0 <= 17'd0;",
        "            if (!tile_t_last) begin",
        f"              r_t0 <= r_t0 + 17'd{p.rows};",
        "            end else begin",
        "              r_t0 <= 17'd0;",
        f"              q_rd <= q_rd + {qa + 1}'d1;",
        "            end",
        "          end",
        "        end",
        "      end",
        "    end",
        "  end",
        "",
        f"  assign m_axis_res_tdata = {res_data};",
        "  assign m_axis_res_tvalid = res_valid;",
        "  assign m_axis_res_tlast = res_last;",
        "",
        f"  {name} core (",
        "    .clk(aclk),",
        "    .rst(rst),",
        f"    .cmd__payload(s_axis_cmd_tdata[{w['cmd'] - 1}:0]),",
        "    .cmd__valid(cmd_valid),",
        "    .cmd__ready(core_cmd_ready),",
    ]
    for s in ("par", "act", "wgt"):
        lines += [f"    .{s}__payload(s_axis_{s}_tdata[{w[s] - 1}:0]),", f"    .{s}__valid(s_axis_{s}_tvalid),",
                  f"    .{s}__ready(s_axis_{s}_tready),"]
    lines += [
        "    .res__payload(res_payload),",
        "    .res__valid(res_valid),",
        "    .res__ready(m_axis_res_tready),",
        "    .busy(busy),",
        "    .error(error),",
        "    .sat_count(sat_count)",
        "  );",
        "endmodule",
    ]
    return "\n".join(lines) + "\n"


def _max_cycles(summary: Mapping[str, Any], p: AccelParams) -> int:
    """A generous cycle limit for the testbench at full stall rate 64/256 (x16 margin)."""
    est = 200
    for op in summary["ops"]:
        est += op["tiles"] * (op["K"] + p.rows * p.cols + p.rows + p.cols + 40) + 20
    return 16 * est


def testbench_verilog(p: AccelParams, summary: Mapping[str, Any], *, name: str = "sfx_accelerator",
                      axi: bool = False) -> str:
    """The self-checking testbench ``<name>_tb`` for the vectors described by ``summary``
    (from :func:`vector_files`). Plain Verilog-2005 (Icarus ``iverilog``); the vectors are
    read with ``$readmemh`` from the folder given by the ``VECTORS`` parameter. With
    ``axi`` the parameter ``AXI = 1`` runs it against ``<name>_axis`` instead of the core
    (and checks ``m_axis_res_tlast``)."""
    c = summary["counts"]
    w = summary["widths"]
    ob, cols = p.out_bits, p.cols
    n = {"cmd": c["cmd"], "par": c["par"], "act": c["act"], "wgt": c["act"], "res": c["res"]}
    tw = {s: _bytes_width(v) for s, v in w.items()}
    max_cycles = _max_cycles(summary, p)
    L = [
        f"// {name}_tb: self-checking testbench of {name} (SFx LINEAR accelerator).",
        "// Generated by superfloat.hw.ip; do not edit. How to run it: README.md, docs/ip.md.",
        f"// rows={p.rows} cols={p.cols} a_bits={p.a_bits} w_bits={p.w_bits} out_bits={p.out_bits} k_max={p.k_max}",
        "//",
        "// Reads the beats of every input stream and the expected res beats with $readmemh from",
        "// VECTORS (expected codes: superfloat.sw.sfx.linear), drives the streams with",
        "// deterministic valid/ready stalls (xorshift32 per stream from SEED; a source idles and the",
        "// res sink is not ready in a cycle with probability STALL/256), compares every res lane,",
        "// then checks error == 0, sat_count and busy == 0. Prints PASS or FAIL with counts; a",
        "// mismatch names the element (operation, Y[t][n]) and ends with $fatal (exit status 1).",
        f"module {name}_tb;",
        "  parameter VECTORS = \"vectors\";   // folder of the .hex files, relative to where vvp runs",
        "  parameter SEED = 1;               // stall pattern",
        "  parameter STALL = 64;             // 0..255: idle / not-ready probability per cycle, in 256ths",
        f"  parameter MAX_CYCLES = {max_cycles};   // fail (timeout) after this many cycles",
        f"  parameter AXI = 0;                // 1: run against {name}_axis (AXI4-Stream names)"
        + ("" if axi else ": not generated for this IP"),
        "  parameter MAX_REPORTS = 20;       // mismatches printed in full",
        "  parameter IDLE_X = 0;             // 1: payloads are X (not junk) between beats: a 4-state X check",
        f"  localparam N_OPS = {c['ops']};",
        *[f"  localparam N_{s.upper()} = {n[s]};" for s in ("cmd", "par", "act", "res")],
        *[f"  localparam W_{s.upper()} = {w[s]};" for s in ("cmd", "par", "act", "wgt", "res")],
        f"  localparam COLS = {cols};",
        f"  localparam OB = {ob};",
        "",
        "  reg clk = 1'b0;",
        "  always #5 clk = ~clk;",
        "  reg rst = 1'b1;",
        "  reg go = 1'b0;",
        "  integer cycle = 0;",
        "",
        "  // vectors",
        "  reg [W_CMD-1:0] cmd_mem [0:N_CMD-1];",
        "  reg [W_PAR-1:0] par_mem [0:N_PAR-1];",
        "  reg [W_ACT-1:0] act_mem [0:N_ACT-1];",
        "  reg [W_WGT-1:0] wgt_mem [0:N_ACT-1];",
        "  reg [W_RES-1:0] res_mem [0:N_RES-1];",
        "  reg [63:0] tag_mem [0:N_RES-1];",
        "  reg [95:0] ops_mem [0:N_OPS-1];",
        "  reg [31:0] meta_mem [0:5];",
        "  initial begin",
        "    $readmemh({VECTORS, \"/cmd.hex\"}, cmd_mem);",
        "    $readmemh({VECTORS, \"/par.hex\"}, par_mem);",
        "    $readmemh({VECTORS, \"/act.hex\"}, act_mem);",
        "    $readmemh({VECTORS, \"/wgt.hex\"}, wgt_mem);",
        "    $readmemh({VECTORS, \"/res.hex\"}, res_mem);",
        "    $readmemh({VECTORS, \"/res_tag.hex\"}, tag_mem);",
        "    $readmemh({VECTORS, \"/ops.hex\"}, ops_mem);",
        "    $readmemh({VECTORS, \"/meta.hex\"}, meta_mem);",
        "    if (meta_mem[0] !== N_OPS || meta_mem[1] !== N_CMD || meta_mem[2] !== N_PAR || meta_mem[3] !== N_ACT",
        "        || meta_mem[4] !== N_RES) begin",
        "      $display(\"FAIL: the vectors in %0s (%0d ops, %0d res beats) are not the ones this testbench was generated for (%0d ops, %0d res beats): regenerate the IP (sfx verilog ... --ip DIR)\",",
        "               VECTORS, meta_mem[0], meta_mem[4], N_OPS, N_RES);",
        "      $fatal(1, \"vectors do not match the testbench\");",
        "    end",
        "  end",
        "",
        "  // stall generators: xorshift32 per stream",
        "  function [31:0] xs32;",
        "    input [31:0] x;",
        "    reg [31:0] y;",
        "    begin",
        "      y = x ^ (x << 13);",
        "      y = y ^ (y >> 17);",
        "      xs32 = y ^ (y << 5);",
        "    end",
        "  endfunction",
        "",
        "  // DUT streams",
    ]
    for s in DRIVEN:
        L += [f"  reg {s}_valid = 1'b0;", f"  reg [W_{s.upper()}-1:0] {s}_data = {w[s]}'d0;",
              f"  reg {s}_last = 1'b0;", f"  wire {s}_ready;"]
    L += ["  wire res_valid;", "  wire [W_RES-1:0] res_data;", "  wire res_last;", "  reg res_ready = 1'b0;",
          "  wire busy;", "  wire error;", "  wire [31:0] sat_count;", ""]
    # sources
    for si, s in enumerate(DRIVEN + ("res",)):
        L += [f"  reg [31:0] rng_{s};", f"  initial rng_{s} = (32'h9E3779B9 * (SEED + {si + 1})) | 32'd1;",
              f"  always @(posedge clk) rng_{s} <= xs32(rng_{s});",
              f"  wire stall_{s} = (rng_{s}[15:8] < STALL);"]
    L.append("")
    mem_n = {"cmd": "N_CMD", "par": "N_PAR", "act": "N_ACT", "wgt": "N_ACT"}
    junk = {s: -(-w[s] // 32) for s in DRIVEN}
    end_bits = {"par": "31:0", "act": "63:32", "wgt": "63:32"}
    for s in DRIVEN:
        L += [f"  // {s} source: a registered AXI-style source (valid held until the beat is taken)",
              f"  integer {s}_i = 0;   // next beat to offer",
              f"  integer {s}_op = 0;  // operation of that beat",
              f"  always @(posedge clk) begin",
              f"    if (!{s}_valid || {s}_ready) begin",
              f"      if (go && {s}_i < {mem_n[s]} && !stall_{s}) begin",
              f"        {s}_valid <= 1'b1;",
              f"        {s}_data <= {s}_mem[{s}_i];"]
        if s == "cmd":
            L += ["        cmd_last <= 1'b1;", "        cmd_op <= cmd_op + 1;"]
        else:
            L += [f"        {s}_last <= ({s}_i + 1 == ops_mem[{s}_op][{end_bits[s]}]);",
                  f"        if ({s}_i + 1 == ops_mem[{s}_op][{end_bits[s]}]) {s}_op <= {s}_op + 1;"]
        L += [f"        {s}_i <= {s}_i + 1;",
              "      end else begin   // no beat: junk payload and tlast (the DUT must ignore them)",
              f"        {s}_valid <= 1'b0;",
              f"        {s}_data <= IDLE_X != 0 ? {{W_{s.upper()}{{1'bx}}}} : {{{junk[s]}{{rng_{s} ^ 32'h5A5A5A5A}}}};",
              f"        {s}_last <= rng_{s}[0];",
              "      end",
              "    end",
              "  end",
              ""]
    # sink and checker
    L += [
        "  // res sink and checker",
        "  integer res_i = 0;",
        "  integer res_op = 0;",
        "  integer fails = 0;",
        "  integer checked = 0;   // result codes (lanes of real channels)",
        "  integer padded = 0;    // padding lanes (channels past N: code 0)",
        "  integer extra = 0;",
        "  integer j;",
        "  reg [OB-1:0] got;",
        "  reg [OB-1:0] want;",
        "  reg [63:0] tag;",
        "  reg want_last;",
        "  always @(posedge clk) begin",
        "    if (go) res_ready <= !stall_res;",
        "    if (go && res_valid && res_ready) begin",
        "      if (res_i >= N_RES) begin",
        "        extra = extra + 1;",
        "        fails = fails + 1;",
        "        if (fails <= MAX_REPORTS)",
        "          $display(\"MISMATCH unexpected res beat %0d (only %0d expected): 0x%h\", res_i, N_RES, res_data);",
        "      end else begin",
        "        tag = tag_mem[res_i];",
        "        want_last = (res_i + 1 == ops_mem[tag[63:48]][95:64]);",
        "        for (j = 0; j < COLS; j = j + 1) begin",
        "          got = res_data[j*OB +: OB];",
        "          want = res_mem[res_i][j*OB +: OB];",
        "          if (j < tag[15:0]) checked = checked + 1; else padded = padded + 1;",
        "          if (got !== want) begin",
        "            fails = fails + 1;",
        "            if (fails <= MAX_REPORTS) begin",
        "              if (j < tag[15:0])",
        "                $display(\"MISMATCH op %0d Y[%0d][%0d] (res beat %0d, lane %0d): got 0x%h, expected 0x%h\",",
        "                         tag[63:48], tag[47:32], tag[31:16] + j, res_i, j, got, want);",
        "              else",
        "                $display(\"MISMATCH op %0d padding lane %0d of row %0d (res beat %0d): got 0x%h, expected 0x%h\",",
        "                         tag[63:48], j, tag[47:32], res_i, got, want);",
        "            end",
        "          end",
        "        end",
        "        if (AXI != 0 && res_last !== want_last) begin",
        "          fails = fails + 1;",
        "          if (fails <= MAX_REPORTS)",
        "            $display(\"MISMATCH op %0d res beat %0d: m_axis_res_tlast %0d, expected %0d\", tag[63:48], res_i,",
        "                     res_last, want_last);",
        "        end",
        "      end",
        "      res_i = res_i + 1;",
        "    end",
        "  end",
        "",
        "  // the DUT",
    ]
    native = [f"  {name} dut (", "    .clk(clk),", "    .rst(rst),"]
    for s in DRIVEN:
        native += [f"    .{s}__payload({s}_data),", f"    .{s}__valid({s}_valid),", f"    .{s}__ready({s}_ready),"]
    native += ["    .res__payload(res_data),", "    .res__valid(res_valid),", "    .res__ready(res_ready),",
               "    .busy(busy),", "    .error(error),", "    .sat_count(sat_count)", "  );"]
    if not axi:
        L += native
        L += ["  assign res_last = 1'b0;",
              "  initial if (AXI != 0) begin",
              f"    $display(\"FAIL: AXI=1 but this IP has no {name}_axis: regenerate it with sfx verilog ... --ip DIR --axi\");",
              "    $fatal(1, \"no AXI wrapper\");",
              "  end"]
    else:
        L += ["  generate", "    if (AXI == 0) begin : native"]
        L += ["  " + line for line in native]
        L += ["      assign res_last = 1'b0;", "    end else begin : axis"]
        for s in DRIVEN:
            pad = tw[s] - w[s]
            drv = f"{{{{{pad}{{1'b1}}}}, {s}_data}}" if pad else f"{s}_data"
            L.append(f"      wire [{tw[s] - 1}:0] {s}_tdata = {drv};  // padding bits driven 1: ignored")
        L += [f"      wire [{tw['res'] - 1}:0] res_tdata;", f"      {name}_axis dut (", "        .aclk(clk),",
              "        .aresetn(!rst),"]
        for s in DRIVEN:
            L += [f"        .s_axis_{s}_tdata({s}_tdata),", f"        .s_axis_{s}_tvalid({s}_valid),",
                  f"        .s_axis_{s}_tready({s}_ready),", f"        .s_axis_{s}_tlast({s}_last),"]
        L += ["        .m_axis_res_tdata(res_tdata),", "        .m_axis_res_tvalid(res_valid),",
              "        .m_axis_res_tready(res_ready),", "        .m_axis_res_tlast(res_last),",
              "        .busy(busy),", "        .error(error),", "        .sat_count(sat_count)", "      );",
              "      assign res_data = res_tdata[W_RES-1:0];"]
        if tw["res"] > w["res"]:
            L += ["      always @(posedge clk)",
                  f"        if (res_valid && res_tdata[{tw['res'] - 1}:{w['res']}] !== {tw['res'] - w['res']}'d0) begin",
                  "          $display(\"FAIL: m_axis_res_tdata padding bits are not 0: 0x%h\", res_tdata);",
                  "          $fatal(1, \"m_axis_res_tdata padding\");",
                  "        end"]
        L += ["    end", "  endgenerate"]
    L += [
        "",
        "  // run: reset, stream everything, drain, check the status, report",
        "  integer tail;",
        "  initial begin",
        "    repeat (4) @(posedge clk);",
        "    rst <= 1'b0;",
        "    go <= 1'b1;",
        "    while (res_i < N_RES && cycle < MAX_CYCLES) begin",
        "      @(posedge clk);",
        "      cycle = cycle + 1;",
        "    end",
        "    if (res_i < N_RES) begin",
        "      $display(\"FAIL: timeout after %0d cycles: %0d of %0d res beats (beats taken: cmd %0d/%0d, par %0d/%0d, act %0d/%0d, wgt %0d/%0d); error=%0d busy=%0d\",",
        "               cycle, res_i, N_RES,",
        "               cmd_i - cmd_valid, N_CMD, par_i - par_valid, N_PAR, act_i - act_valid, N_ACT,",
        "               wgt_i - wgt_valid, N_ACT, error, busy);",
        "      $fatal(1, \"timeout\");",
        "    end",
        "    for (tail = 0; tail < 64; tail = tail + 1) @(posedge clk);   // extra beats? busy falls?",
        "    if (error !== 1'b0) begin",
        "      fails = fails + 1;",
        "      $display(\"MISMATCH error output is %b, expected 0\", error);",
        "    end",
        "    if (busy !== 1'b0) begin",
        "      fails = fails + 1;",
        "      $display(\"MISMATCH busy output is %b 64 cycles after the last res beat, expected 0\", busy);",
        "    end",
        "    if (sat_count !== meta_mem[5]) begin",
        "      fails = fails + 1;",
        "      $display(\"MISMATCH sat_count %0d, expected %0d (superfloat.sw.sfx.linear_with_stats)\", sat_count,",
        "               meta_mem[5]);",
        "    end",
        "    if (fails == 0) begin",
        "      $write(\"PASS: %0d result codes and %0d padding lanes in %0d res beats of %0d operations match superfloat.sw.sfx.linear; sat_count %0d, error 0 (%0d cycles, SEED %0d, STALL %0d/256, \",",
        "             checked, padded, N_RES, N_OPS, sat_count, cycle, SEED, STALL);",
        f"      if (AXI != 0) $display(\"DUT {name}_axis)\");",
        f"      else $display(\"DUT {name})\");",
        "      $finish;",
        "    end else begin",
        "      $display(\"FAIL: %0d mismatches (%0d result codes and %0d padding lanes checked in %0d res beats of %0d operations, %0d unexpected beats)\",",
        "               fails, checked, padded, res_i < N_RES ? res_i : N_RES, N_OPS, extra);",
        "      $fatal(1, \"FAIL\");",
        "    end",
        "  end",
        "endmodule",
    ]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- core file and directory


def _regen_command(p: AccelParams, opts: Mapping[str, Any], name: str, axi: bool, seed: int, n_ops: int,
                   custom: bool) -> str:
    cmd = (f"sfx verilog --rows {p.rows} --cols {p.cols} --a-bits {p.a_bits} --w-bits {p.w_bits} "
           f"--out-bits {p.out_bits} --k-max {p.k_max} --dsp-pes {opts['dsp_pes']} --clamp-impl {opts['clamp_impl']}")
    if not opts["overlap_drain"]:
        cmd += " --no-overlap-drain"
    if name != "sfx_accelerator":
        cmd += f" --name {name}"
    cmd += " --ip DIR" + (" --axi" if axi else "")
    if custom:
        return cmd + "   (vectors: caller's operations, superfloat.hw.ip.write_ip(ops=...))"
    return cmd + f" --seed {seed} --ops {n_ops}"


def core_file(p: AccelParams, *, name: str, vlnv: str, axi: bool, vector_names: Sequence[str], regen: str,
              opts: Mapping[str, Any]) -> str:
    """The CAPI2 ``.core`` text of the IP directory."""
    top = f"{name}_axis" if axi else name
    rtl = [f"rtl/{name}.v"] + ([f"rtl/{name}_axis.v"] if axi else [])
    L = [
        "CAPI=2:",
        "# Generated by superfloat.hw.ip; do not edit. Regenerate with:",
        f"#   {regen}",
        "# Generation parameters (fixed in rtl/: the Verilog is generated for them, so they are",
        "# not FuseSoC parameters):",
        f"#   rows={p.rows} cols={p.cols}: PE array (activation rows x output channels per tile)",
        f"#   a_bits={p.a_bits} w_bits={p.w_bits} out_bits={p.out_bits}: SFx widths of activations, weights, results",
        f"#   k_max={p.k_max}: longest reduction K (accumulator A={p.acc_bits} bits, k field {p.k_bits} bits)",
        f"#   dsp_pes={opts['dsp_pes']} clamp_impl={opts['clamp_impl']} overlap_drain={opts['overlap_drain']}",
        "# Ports, payload layouts, tlast and the testbench: README.md here and docs/ip.md.",
        "# Targets: default (the RTL, for cores that depend on this one), sim (the self-checking",
        "# testbench on Icarus)" + (", sim_axi (the same against the AXI4-Stream wrapper)" if axi else "")
        + ", lint (Verilator -Wall).",
        f"name: {vlnv}",
        f"description: \"SFx LINEAR accelerator, {p.rows}x{p.cols} PEs, SF{p.a_bits} x SF{p.w_bits} -> "
        f"SF{p.out_bits} (superfloat)\"",
        "",
        "filesets:",
        "  rtl:",
        "    files:",
        *[f"      - {f}" for f in rtl],
        "    file_type: verilogSource",
        "  lint_waivers:",
        "    files:",
        "      - rtl/verilator_lint.vlt",
        "    file_type: vlt",
        "  tb:",
        "    files:",
        f"      - tb/{name}_tb.v",
        "    file_type: verilogSource",
        "  vectors:",
        "    files:",
        *[f"      - vectors/{v}: {{copyto: vectors/{v}}}" for v in vector_names],
        "    file_type: user",
        "",
        "targets:",
        "  default:",
        "    filesets: [rtl]",
        f"    toplevel: {top}",
        "  sim:",
        "    flow: sim",
        "    flow_options:",
        "      tool: icarus",
        "    filesets: [rtl, tb, vectors]",
        "    parameters: [SEED, STALL, MAX_CYCLES, IDLE_X]",
        f"    toplevel: {name}_tb",
    ]
    if axi:
        L += [
            "  sim_axi:",
            "    flow: sim",
            "    flow_options:",
            "      tool: icarus",
            "    filesets: [rtl, tb, vectors]",
            "    parameters: [SEED, STALL, MAX_CYCLES, IDLE_X, AXI=1]",
            f"    toplevel: {name}_tb",
        ]
    L += [
        "  lint:",
        "    flow: lint",
        "    flow_options:",
        "      tool: verilator",
        "      verilator_options: [-Wall]",
        "    filesets: [rtl, lint_waivers]",
        f"    toplevel: {top}",
        "",
        "parameters:",
        "  SEED:",
        "    datatype: int",
        "    default: 1",
        "    description: seed of the testbench's valid/ready stall pattern (xorshift32 per stream)",
        "    paramtype: vlogparam",
        "  STALL:",
        "    datatype: int",
        "    default: 64",
        "    description: 0..255, probability in 256ths that a source idles / the res sink is not ready in a cycle",
        "    paramtype: vlogparam",
        "  IDLE_X:",
        "    datatype: int",
        "    default: 0",
        "    description: 1 drives X instead of junk on the input payloads between beats (4-state X-propagation check)",
        "    paramtype: vlogparam",
        "  MAX_CYCLES:",
        "    datatype: int",
        "    description: the testbench fails with a timeout after this many cycles (default in the testbench)",
        "    paramtype: vlogparam",
    ]
    if axi:
        L += [
            "  AXI:",
            "    datatype: int",
            "    default: 0",
            f"    description: 1 runs the testbench against {name}_axis (AXI4-Stream names, checks tlast)",
            "    paramtype: vlogparam",
        ]
    return "\n".join(L) + "\n"


def _port_tables(p: AccelParams, name: str, axi: bool, native_ports) -> str:
    w = {"cmd": cmd_layout(p).size, "par": par_layout(p).size, "act": act_layout(p).size,
         "wgt": wgt_layout(p).size, "res": res_layout(p).size}
    L = [f"## Ports of `{name}` (native)", "", "| port | dir | width | meaning |", "|---|---|---|---|"]
    L += [f"| `{pt.name}` | {pt.direction} | {pt.width} | {pt.meaning} |" for pt in native_ports]
    if axi:
        L += ["", f"## Ports of `{name}_axis` (AXI4-Stream names)", "", "| port | dir | width | meaning |",
              "|---|---|---|---|",
              "| `aclk` | input | 1 | clock |", "| `aresetn` | input | 1 | synchronous reset, active low |"]
        for s in DRIVEN:
            L += [f"| `s_axis_{s}_tdata` | input | {_bytes_width(w[s])} | `{s}__payload` in bits "
                  f"[{w[s] - 1}:0]; padding ignored |",
                  f"| `s_axis_{s}_tvalid` / `_tready` | input / output | 1 | `{s}__valid` / `{s}__ready` |",
                  f"| `s_axis_{s}_tlast` | input | 1 | ignored (convention: last beat of an operation) |"]
        L += [f"| `m_axis_res_tdata` | output | {_bytes_width(w['res'])} | `res__payload` in bits [{w['res'] - 1}:0]; "
              "padding 0 |",
              "| `m_axis_res_tvalid` / `_tready` | output / input | 1 | `res__valid` / `res__ready` |",
              "| `m_axis_res_tlast` | output | 1 | last res beat of an operation |",
              "| `busy`, `error`, `sat_count` | output | 1, 1, 32 | as on the core |"]
    return "\n".join(L) + "\n"


def _readme(p: AccelParams, *, name: str, vlnv: str, axi: bool, regen: str, summary: Mapping[str, Any],
            native_ports) -> str:
    c = summary["counts"]
    L = [
        f"# {vlnv}: SFx LINEAR accelerator IP",
        "",
        f"{p.rows}x{p.cols} PEs, SF{p.a_bits} activations x SF{p.w_bits} weights -> SF{p.out_bits} results, "
        f"k_max {p.k_max}. Generated by `superfloat.hw.ip` (documentation: `docs/ip.md` of the superfloat "
        "repository); do not edit. Regenerate with:",
        "",
        f"    {regen}",
        "",
        "## Run the testbench",
        "",
        "With FuseSoC (Icarus Verilog on PATH):",
        "",
        f"    fusesoc --cores-root . run --target sim {vlnv}",
    ]
    if axi:
        L += [f"    fusesoc --cores-root . run --target sim_axi {vlnv}   # against {name}_axis"]
    L += [
        f"    fusesoc --cores-root . run --target sim {vlnv} --SEED 7 --STALL 128",
        f"    fusesoc --cores-root . run --target lint {vlnv}   # Verilator -Wall",
        "",
        "Without FuseSoC, from this folder:",
        "",
        f"    iverilog -g2005 -o {name}_tb.vvp -s {name}_tb rtl/*.v tb/{name}_tb.v && vvp -n {name}_tb.vvp",
    ]
    if axi:
        L += [f"    iverilog -g2005 -P{name}_tb.AXI=1 -o {name}_tb_axi.vvp -s {name}_tb rtl/*.v tb/{name}_tb.v "
              f"&& vvp -n {name}_tb_axi.vvp"]
    L += [
        "",
        f"The vectors (`vectors/`) hold {c['ops']} LINEAR operations: {c['cmd']} cmd, {c['par']} par, "
        f"{c['act']} act and wgt beats, {c['res']} expected res beats; `vectors/ops.json` lists their arguments "
        "and expected codes. The testbench prints `PASS: ...` and exits 0, or `MISMATCH op I Y[t][n] ...` lines, "
        "`FAIL: ...` and exits 1 (`$fatal`).",
        "",
        _port_tables(p, name, axi, native_ports),
    ]
    return "\n".join(L)


def _lint_waivers(name: str) -> str:
    """``hw/verilator_lint.vlt`` with its waivers limited to the generated core ``<name>.v``
    (the wrapper is lint-clean on its own)."""
    text = LINT_WAIVERS.read_text()
    if '-file "*"' not in text:   # pragma: no cover - the waiver file changed its form
        raise RuntimeError(f"{LINT_WAIVERS} has no '-file \"*\"' waivers to limit to {name}.v")
    head = (f"// superfloat.hw.ip: the waivers below apply to the generated core ({name}.v) only;\n"
            f"// the AXI4-Stream wrapper is linted without waivers.\n")
    lines = text.splitlines(keepends=True)
    return lines[0] + head + "".join(lines[1:]).replace('-file "*"', f'-file "*{name}.v"')


def _check_target(root: Path) -> set[Path]:
    """Files a previous :func:`write_ip` wrote in ``root`` (to replace); error if ``root`` holds
    other things and no manifest."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory: choose a new or empty folder for the IP")
    if not root.exists():
        return set()
    man = root / MANIFEST
    if man.is_file():
        try:
            files = json.loads(man.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{man} is not an IP manifest of superfloat.hw.ip ({e}): choose a new or empty "
                             "folder, or remove it") from None
        return {root / f for f in files}
    if any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no {MANIFEST} of an earlier 'sfx verilog --ip': choose a "
                         "new or empty folder for the IP")
    return set()


def write_ip(out_dir: str | Path, *, rows: int, cols: int, a_bits: int, w_bits: int, out_bits: int,
             k_max: int = sfx.DEFAULT_K_MAX, dsp_pes: int = 0, clamp_impl: str = "dsp", overlap_drain: bool = True,
             name: str = "sfx_accelerator", axi: bool = False, seed: int = 0, n_ops: int = 4,
             ops: Sequence[Mapping[str, Any]] | None = None, verilog: str | None = None) -> IpPackage:
    """Write the IP directory of an accelerator configuration (module docstring; ``docs/ip.md``).

    Args:
        out_dir: the folder; created if missing. It must be new, empty, or an earlier IP
            folder (its ``ip.json`` lists the files that are replaced; other files stay).
        rows ... name: as :func:`superfloat.hw.verilog.generate_verilog`.
        axi: also write the AXI4-Stream wrapper ``<name>_axis`` and a ``sim_axi`` target.
        seed, n_ops: test vectors from :func:`random_ops` (ignored with ``ops``).
        ops: the operations of the test vectors instead, keyword arguments of
            :func:`superfloat.sw.sfx.linear` without the widths and ``k_max``.
        verilog: the accelerator's Verilog if already generated with these parameters
            (``sfx verilog -o F --ip D`` generates it once).

    Returns:
        An :class:`IpPackage` (paths, VLNV, the expected ``res`` beats).

    Raises:
        TypeError, ValueError: a bad parameter or operation, or an ``out_dir`` that is a
            file or a non-empty folder not written by this function.
    """
    if not isinstance(axi, bool):
        raise TypeError(f"axi must be a bool, got {axi!r}")
    root = Path(out_dir)
    p = AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max)
    custom = ops is not None
    if ops is None:
        ops = random_ops(p, seed=seed, n_ops=n_ops)
    files, res, summary = vector_files(p, ops, name=name)
    if verilog is None:
        verilog = generate_verilog(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits,
                                   k_max=k_max, dsp_pes=dsp_pes, clamp_impl=clamp_impl, overlap_drain=overlap_drain,
                                   name=name)
    elif f"module {name}(" not in verilog:
        raise ValueError(f"verilog does not define module {name}")
    old = _check_target(root)
    from .accelerator import SFxAccelerator
    from .verilog import port_list
    accel = SFxAccelerator(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max,
                           dsp_pes=dsp_pes, clamp_impl=clamp_impl, overlap_drain=overlap_drain)
    accel._MustUse__silence = True   # only its signature is read (no elaboration)
    ports = port_list(accel)
    opts = {"dsp_pes": dsp_pes, "clamp_impl": clamp_impl, "overlap_drain": overlap_drain}
    version = _version()
    vlnv = f"{VENDOR}:{LIBRARY}:{name}:{version}"
    regen = _regen_command(p, opts, name, axi, seed, n_ops if not custom else len(ops), custom)
    vec_names = sorted(f for f in files if f.endswith(".hex")) + ["ops.json"]
    out: dict[str, str] = {f"rtl/{name}.v": verilog, "rtl/verilator_lint.vlt": _lint_waivers(name)}
    if axi:
        out[f"rtl/{name}_axis.v"] = axis_wrapper_verilog(p, name=name)
    out[f"tb/{name}_tb.v"] = testbench_verilog(p, summary, name=name, axi=axi)
    out.update({f"vectors/{f}": text for f, text in files.items()})
    out[f"{name}.core"] = core_file(p, name=name, vlnv=vlnv, axi=axi, vector_names=[v for v in vec_names
                                                                                     if v.endswith(".hex")],
                                    regen=regen, opts=opts)
    out["README.md"] = _readme(p, name=name, vlnv=vlnv, axi=axi, regen=regen, summary=summary, native_ports=ports)
    manifest = {"vlnv": vlnv, "generator": "superfloat.hw.ip", "command": regen,
                "params": {**summary["params"], **opts, "name": name, "axi": axi},
                "vectors": {"seed": None if custom else seed, **summary["counts"], "n_saturated": summary["n_saturated"]},
                "files": sorted(list(out) + [MANIFEST])}
    out[MANIFEST] = json.dumps(manifest, indent=1) + "\n"
    for f in sorted(old):
        if f.is_file() and f.relative_to(root).as_posix() not in out:
            f.unlink()
    for rel, text in out.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    for sub in ("rtl", "tb", "vectors"):   # folders an earlier IP used and this one does not
        d = root / sub
        if d.is_dir() and not any(d.iterdir()):
            shutil.rmtree(d)
    return IpPackage(root=root, vlnv=vlnv, core=root / f"{name}.core", verilog=root / f"rtl/{name}.v",
                     wrapper=root / f"rtl/{name}_axis.v" if axi else None, testbench=root / f"tb/{name}_tb.v",
                     vectors=root / "vectors", files=tuple(root / f for f in sorted(out)), res_beats=tuple(res),
                     n_ops=len(ops), n_saturated=summary["n_saturated"])
