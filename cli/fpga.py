"""``sfx synth`` and ``sfx build-board``.

Exit status (both commands): 0 success; 2 bad arguments; 3 the explicit ``--freq`` was
missed (numbers are still printed); 4 the design does not fit the device; 5 a tool failed
or timed out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from superfloat.sw import sfx

EXIT_OK, EXIT_USAGE, EXIT_TIMING, EXIT_FIT, EXIT_TOOL = 0, 2, 3, 4, 5


def _err(msg: str) -> None:
    print(f"sfx: error: {msg}", file=sys.stderr)


def _add_array_args(p: argparse.ArgumentParser, *, rows: int, cols: int, bits: int) -> None:
    p.add_argument("--rows", type=int, default=rows, help=f"PE rows (activation rows per tile, default {rows})")
    p.add_argument("--cols", type=int, default=cols, help=f"PE columns (output channels per tile, default {cols})")
    p.add_argument("--a-bits", type=int, default=bits, help=f"SFx width of activations (default {bits})")
    p.add_argument("--w-bits", type=int, default=None, help="SFx width of weights (default: --a-bits)")
    p.add_argument("--out-bits", type=int, default=None, help="SFx width of results (default: --a-bits)")
    p.add_argument("--k-max", type=int, default=sfx.DEFAULT_K_MAX,
                   help=f"longest reduction the hardware accepts (default {sfx.DEFAULT_K_MAX})")
    p.add_argument("--dsp-budget", type=int, default=None,
                   help="use at most this many DSP blocks (default: all of the device)")
    p.add_argument("--overlap-drain", dest="overlap_drain", action="store_true", default=None,
                   help="shadow registers in the PEs: a tile drains while the next accumulates "
                        "(default: the target's plan, docs/fpga.md)")
    p.add_argument("--no-overlap-drain", dest="overlap_drain", action="store_false",
                   help="no shadow registers: smaller PEs, the array stalls while a tile drains")
    p.add_argument("--chunk-k", type=int, default=None,
                   help="longest run of products a PE accumulates; longer reductions add partial sums in "
                        "block RAM (default: the target's plan)")
    p.add_argument("--mul-stages", type=int, default=None,
                   help="pipeline registers inside the PE multipliers (default: 1 for products of 8+ bits)")
    p.add_argument("--pipelined", dest="pipelined", action="store_true", default=None,
                   help="registers after the block-RAM reads of the drain stage (default: the target's plan)")
    p.add_argument("--no-pipelined", dest="pipelined", action="store_false", help="no such registers")


def _widths(args):
    w = args.a_bits if args.w_bits is None else args.w_bits
    o = args.a_bits if args.out_bits is None else args.out_bits
    return args.a_bits, w, o


def cmd_synth(args) -> int:
    from superfloat.hw.fpga.flow import TARGETS
    from superfloat.hw.fpga.report import format_result_table
    from superfloat.hw.fpga.synth import synthesize, write_summary

    if args.target not in TARGETS:
        _err(f"unknown target {args.target!r}: choose one of {', '.join(TARGETS)}")
        return EXIT_USAGE
    a, w, o = _widths(args)
    timeouts = None
    if args.timeout is not None:
        timeouts = {"yosys": args.timeout, "nextpnr": args.timeout, "pack": args.timeout}
    out_dir = Path(args.out) if args.out else None
    try:
        s = synthesize(target=args.target, rows=args.rows, cols=args.cols, a_bits=a, w_bits=w, out_bits=o,
                       k_max=args.k_max, freq_mhz=args.freq, dsp_budget=args.dsp_budget, kind=args.design,
                       out_dir=out_dir, timeouts=timeouts, seed=args.seed,
                       overlap_drain=args.overlap_drain, chunk_k=args.chunk_k, mul_stages=args.mul_stages,
                       pipelined=args.pipelined, core_pack=args.core_pack, place=not args.pack_only,
                       xmult=args.xmult)
    except (ValueError, TypeError) as e:
        _err(str(e))
        return EXIT_USAGE
    summary_path = write_summary(s, Path(s["out_dir"]) / "summary.json")
    s["summary_json"] = str(summary_path)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_result_table([s]))
        if s.get("dsp_plan"):
            print(f"DSP plan: {s['dsp_plan']['reason']}")
        if s.get("arch_plan"):
            print(f"array: {s['arch_plan']['reason']}")
        if s.get("core_logic") is not None:
            print(f"core alone, packed: {s['core_logic']} logic cells")
        print(f"core = {s['kind']} inside a scan wrapper ({s['wrapper']['scan_in_bits']} scan-in bits); "
              f"LUT4/FF/DSP/BRAM count the core, 'logic used' the whole placed design")
        print(f"summary: {summary_path}")
    code = EXIT_OK
    if "error" in s:
        _err(f"{s['error']}" + (f" (log: {s['log']})" if s.get("log") else ""))
        code = EXIT_FIT if s.get("step") == "fit" else EXIT_TOOL
    elif not s["met_timing"] and args.freq is not None and s.get("placed", True):
        _err(f"timing not met: Fmax {s['fmax_mhz']} MHz < --freq {args.freq:g} MHz on {args.target} "
             f"({s['config']})")
        code = EXIT_TIMING
    if args.update_baseline:
        if code != EXIT_OK:
            _err("not updating the baseline: the run failed")
            return code
        from superfloat.hw.fpga.regress import write_baseline

        path = write_baseline(s)
        print(f"baseline written: {path}", file=sys.stderr)
    return code


def cmd_build_board(args) -> int:
    from superfloat.hw.fpga.boards import BOARDS, build_board

    if args.board not in BOARDS:
        _err(f"unknown board {args.board!r}: choose one of {', '.join(BOARDS)}")
        return EXIT_USAGE
    a, w, o = _widths(args)
    try:
        r = build_board(args.board, rows=args.rows, cols=args.cols, a_bits=a, w_bits=w, out_bits=o,
                        k_max=args.k_max, baud=args.baud, clock_mhz=args.clock_mhz, dsp_budget=args.dsp_budget,
                        out_dir=Path(args.out) if args.out else None, timeout=args.timeout,
                        overlap_drain=args.overlap_drain, chunk_k=args.chunk_k, mul_stages=args.mul_stages,
                        pipelined=args.pipelined, xmult=args.xmult)
    except (ValueError, TypeError) as e:
        _err(str(e))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(r, indent=2))
    if "error" in r:
        _err(r["error"] + (f" (log: {r['log']})" if r.get("log") else ""))
        return EXIT_FIT if r.get("step") == "fit" else EXIT_TOOL
    if not args.json:
        for msg in r.get("messages", []):
            print(f"note: {msg}", file=sys.stderr)
        print(f"board {r['board']}: {r['config']} at {r['clock_mhz']:g} MHz from the PLL (Fmax {r['fmax_mhz']} MHz), "
              f"UART {r['baud']} baud ({r['bridge']}), logic {r['device_logic']}, DSP {r['dsps']}, "
              f"built in {r['seconds']:.1f} s", file=sys.stderr)
        print(r["bitstream"])
    if not r["met_timing"]:
        _err(f"timing not met: Fmax {r['fmax_mhz']} MHz < PLL clock {r['clock_mhz']:g} MHz "
             f"(try --clock-mhz below {r['fmax_mhz']})")
        return EXIT_TIMING
    return EXIT_OK


def register(sub) -> None:
    from superfloat.hw.fpga.flow import TARGETS
    from superfloat.hw.fpga.synth import KINDS, REFERENCE_MHZ

    from .argtypes import nonneg_int, positive_float

    p = sub.add_parser("synth", help="synthesize the accelerator for an FPGA (yowasp yosys + nextpnr)",
                       description="Synthesize, place and route an SFx accelerator (or a comparison PE array) "
                                   "inside a pin-light scan wrapper; report LUTs, FFs, DSPs, BRAMs and Fmax. "
                                   "See docs/fpga.md.")
    p.add_argument("--target", required=True, help=f"FPGA target: {' | '.join(TARGETS)}")
    _add_array_args(p, rows=4, cols=4, bits=8)
    p.add_argument("--freq", type=float, default=None,
                   help="clock target in MHz; missing it is an error (exit 3). Default: the target's reference "
                        "clock (" + ", ".join(f"{t} {m:g}" for t, m in REFERENCE_MHZ.items()) + "), reported but "
                        "not enforced")
    p.add_argument("--design", default="accel", choices=KINDS,
                   help="accel (default), or the bare PE arrays of the comparison: sm-array, tc-array")
    p.add_argument("--xmult", action="store_true",
                   help="the accelerator with the per-row activation multiplier (SPEC revision 2, sfx verilog --xmult)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="folder for summary.json, with the tool files in <out>/flow/ "
                                               "(default: build/fpga/synth/<target>/<design>/ of the current "
                                               "directory, or of $SFX_BUILD_DIR)")
    p.add_argument("--timeout", type=positive_float, default=None,
                   help="seconds allowed per tool run (default 1200/1800)")
    p.add_argument("--seed", type=nonneg_int, default=1, help="nextpnr placement seed (default 1)")
    p.add_argument("--core-pack", action="store_true",
                   help="also pack the core alone (nextpnr --pack-only): its logic cells as core_logic")
    p.add_argument("--pack-only", action="store_true",
                   help="pack the whole design without placing it: a quick fit check, no Fmax")
    p.add_argument("--update-baseline", action="store_true",
                   help="store the result as the CI baseline in hw/fpga/baselines/")
    p.set_defaults(func=cmd_synth)

    from superfloat.hw.fpga.boards import BOARDS

    b = sub.add_parser("build-board", help="build a bitstream of the accelerator with its UART host link",
                       description="Build the board top (accelerator + UART bridge) for a board and print the "
                                   "bitstream path. Offline: yowasp yosys, nextpnr, icepack/ecppack.")
    b.add_argument("--board", required=True, help=f"board: {' | '.join(BOARDS)}")
    _add_array_args(b, rows=2, cols=2, bits=8)
    b.add_argument("--clock-mhz", type=float, default=None,
                   help="system clock from the PLL in MHz (default: the board's, see docs/fpga.md)")
    b.add_argument("--baud", type=int, default=None,
                   help="UART baud rate (default: the fastest standard rate of the board's USB bridge that the "
                        "clock can make)")
    b.add_argument("--out", default=None, help="output folder (default build/fpga/board/<board>-.../ of the current "
                                               "directory, or of $SFX_BUILD_DIR)")
    b.add_argument("--timeout", type=positive_float, default=None, help="seconds allowed per tool run")
    b.add_argument("--xmult", action="store_true",
                   help="generate the per-row activation multiplier (SPEC revision 2) for act_scale='float' "
                        "checkpoints; the board's INFO reply reports it")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.set_defaults(func=cmd_build_board)
