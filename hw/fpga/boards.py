"""Boards and ``sfx build-board``: the accelerator with its UART link, as a bitstream.

Boards (amaranth-boards platforms; pins and clock constraints in ``constraints/``):

============== ===================== ============================ ========== ========== =====================
name           FPGA                  USB-serial link (fastest     oscillator PLL clock  programming
                                     standard rate)                          (default)
============== ===================== ============================ ========== ========== =====================
icebreaker     iCE40 UP5K, SG48      FT2232H channel B (12 Mbaud)  12 MHz     48 MHz     ``iceprog top.bin``
ulx3s-25f      ECP5 LFE5U-25F, 381   FT231X (3 Mbaud)              25 MHz     100 MHz    ``openFPGALoader -b ulx3s``
orangecrab-25f ECP5 LFE5U-25F, 285   none on board: a 3.3 V USB    48 MHz     100 MHz    ``dfu-util`` (DFU
                                     serial adapter on header                            bootloader)
                                     pins 0 / 1 (3 Mbaud assumed:
                                     FT232R, CP2102N)
============== ===================== ============================ ========== ========== =====================

The system clock comes from the FPGA's PLL (:mod:`.pll`, :class:`.board_top.BoardTop`), at
``clock_mhz`` (default: the board's). The UART runs at the fastest standard rate of the
board's USB bridge that the clock can make (at least 4 clock cycles per bit, within 2 %):
12 Mbaud needs 48 MHz. ``sfx bench fpga`` picks each board's largest fitting SF4 and SF8
configurations and a PLL frequency that meets timing.

The design's RTLIL comes from the platform (``platform.prepare``: clock buffers, IO
cells); the pin file given to nextpnr is the committed one in ``constraints/`` (review it
against the board's schematic there). A test checks that the committed files equal what
amaranth-boards generates; regenerate them with
``python -m superfloat.hw.fpga.boards --write-constraints``.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from superfloat.sw import sfx

from .budget import plan_architecture, plan_dsp_pes
from .flow import TARGETS, FlowError, Target, build_root, run_flow
from .report import LOGIC_RESOURCE

__all__ = ["Board", "BOARDS", "REBUILDS", "RETRY_FMAX_FRACTION", "retry_clock", "CONSTRAINTS_DIR", "build_board",
           "generated_constraints", "make_platform", "link_baud"]

#: ``constraints/`` of the source checkout (an installed wheel has none: :func:`build_board` then
#: writes the pins amaranth-boards generates, which tests hold equal to these files, into its build).
CONSTRAINTS_DIR = Path(__file__).resolve().parents[2] / "constraints"

#: Standard rates of FTDI-style USB-serial bridges, fastest first.
STANDARD_BAUDS = (12_000_000, 6_000_000, 3_000_000, 2_000_000, 1_000_000, 921_600, 460_800, 230_400, 115_200)


@dataclass(frozen=True)
class Board:
    name: str
    platform: str            # "module:Class" of amaranth-boards
    target: str              # synthesis target of the same device (for the DSP budget)
    family: str
    nextpnr_args: tuple
    constraints: str         # file name in constraints/
    bridge: str              # the USB-serial bridge
    max_baud: int            # the bridge's fastest standard rate
    pll_mhz: float           # default system clock (PLL output)
    port_hint: str
    uart_on_header: bool = False

    @property
    def constraints_path(self) -> Path:
        return CONSTRAINTS_DIR / self.constraints


BOARDS = {
    "icebreaker": Board("icebreaker", "amaranth_boards.icebreaker:ICEBreakerPlatform", "ice40-up5k", "ice40",
                        ("--up5k", "--package", "sg48"), "icebreaker.pcf", "FT2232H", 12_000_000, 48.0,
                        "/dev/ttyUSB1"),
    "ulx3s-25f": Board("ulx3s-25f", "amaranth_boards.ulx3s:ULX3S_25F_Platform", "ecp5-25k", "ecp5",
                       ("--25k", "--package", "CABGA381", "--speed", "6"), "ulx3s-25f.lpf", "FT231X", 3_000_000,
                       100.0, "/dev/ttyUSB0"),
    "orangecrab-25f": Board("orangecrab-25f", "amaranth_boards.orangecrab_r0_2:OrangeCrabR0_2_25FPlatform",
                            "ecp5-25k", "ecp5", ("--25k", "--package", "CSFBGA285", "--speed", "8"),
                            "orangecrab-25f.lpf", "3.3 V USB-serial adapter (FT232R / CP2102N class)", 3_000_000,
                            100.0, "/dev/ttyUSB0 (your adapter)", uart_on_header=True),
}


def _board(name: str) -> Board:
    if not isinstance(name, str) or name not in BOARDS:
        raise ValueError(f"unknown board {name!r}: choose one of {', '.join(BOARDS)}")
    return BOARDS[name]


def make_platform(name: str):
    """The amaranth-boards platform of board ``name`` (OrangeCrab: plus ``uart`` 0 on the header)."""
    b = _board(name)
    mod, cls = b.platform.split(":")
    plat = getattr(importlib.import_module(mod), cls)()
    if b.uart_on_header:
        from amaranth.build import Attrs
        from amaranth_boards.resources import UARTResource

        plat.add_resources([UARTResource(0, rx="0", tx="1", conn=("io", 0), attrs=Attrs(IO_TYPE="LVCMOS33"))])
    return plat


def _prepare(name: str, top) -> dict[str, str]:
    plan = make_platform(name).prepare(top, name="top", emit_src=False)
    return {k: (v if isinstance(v, str) else v.decode()) for k, v in plan.files.items()}


def _strip(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _pins_only(lines: list[str]) -> list[str]:
    """Constraint lines without clock frequencies (the PLL's output constraint depends on
    the build's clock; the pins do not)."""
    return [ln for ln in lines if not ln.startswith(("set_frequency", "FREQUENCY"))]


def generated_constraints(name: str) -> str:
    """The pin/clock constraints amaranth-boards generates for the board top of ``name``
    (built with the board's default PLL clock)."""
    from .board_top import BoardTop
    from .pll import pll_settings

    b = _board(name)
    pll = pll_settings(b.family, make_platform(name).default_clk_frequency / 1e6, b.pll_mhz)
    top = BoardTop(bridge_kwargs=dict(rows=1, cols=1, a_bits=4, w_bits=4, out_bits=4, k_max=16),
                   baud=link_baud(name, pll.fout_mhz * 1e6), pll=pll)
    files = _prepare(name, top)
    ext = ".pcf" if b.family == "ice40" else ".lpf"
    body = "\n".join(_pins_only(_strip(files[f"top{ext}"])))
    return (f"# Pins of the Superfloat board top on {name} ({b.platform}).\n"
            f"# Generated from amaranth-boards; regenerate with\n"
            f"#   python -m superfloat.hw.fpga.boards --write-constraints\n"
            f"# (tests/test_fpga_boards.py checks that this file matches amaranth-boards). The clock\n"
            f"# constraint is the PLL's output, given to nextpnr by sfx build-board (--freq).\n{body}\n")


def link_baud(name: str, clk_hz: float) -> int:
    """The fastest standard rate, up to the board bridge's, that a ``clk_hz`` clock can make
    (:func:`.uart.divisor_for`: at least 4 cycles per bit, within 2 %)."""
    from .uart import divisor_for

    b = _board(name)
    for baud in STANDARD_BAUDS:
        if baud > b.max_baud:
            continue
        try:
            divisor_for(clk_hz, baud)
        except ValueError:
            continue
        return baud
    raise ValueError(f"no standard baud rate works at {clk_hz / 1e6:g} MHz")


def build_board(name: str, *, rows: int = 2, cols: int = 2, a_bits: int = 8, w_bits: int | None = None,
                out_bits: int | None = None, k_max: int = sfx.DEFAULT_K_MAX, baud: int | None = None,
                clock_mhz: float | None = None, dsp_budget: int | None = None, out_dir: Path | str | None = None,
                timeout: float | None = None, overlap_drain: bool | None = None, chunk_k: int | None = None,
                mul_stages: int | None = None, pipelined: bool | None = None, xmult: bool = False) -> dict[str, Any]:
    """Build the bitstream of the board top; return a report dict with ``bitstream`` (path),
    ``fmax_mhz``, ``clock_mhz`` (the PLL's achieved output), ``pll``, ``baud``, ``divisor``,
    ``met_timing``, resources, ``dsp_plan``, ``arch_plan`` and ``seconds``, or ``error`` /
    ``step`` on failure. Bad parameters raise ``ValueError``.

    ``clock_mhz``: the PLL target (default: the board's; when the design misses timing at
    it, the board is rebuilt, up to :data:`REBUILDS` times, at :func:`retry_clock`: under 95 %
    of the lowest Fmax reached, at a clock that makes the bridge's fastest UART rate; and
    ``messages`` say so);
    ``baud``: default the fastest standard rate of the board's bridge that the clock makes
    (:func:`link_baud`). ``xmult``: the
    per-row activation multiplier (SPEC revision 2)."""
    from .board_top import BoardTop
    from .pll import pll_settings
    from .uart import divisor_for

    b = _board(name)
    out_dir_given = out_dir
    w_bits = a_bits if w_bits is None else w_bits
    out_bits = a_bits if out_bits is None else out_bits
    plat = make_platform(name)
    target_mhz = b.pll_mhz if clock_mhz is None else clock_mhz
    if isinstance(target_mhz, bool) or not isinstance(target_mhz, (int, float)) or not 10 <= target_mhz <= 400:
        raise ValueError(f"clock_mhz must be a number in 10..400 MHz, got {clock_mhz!r}")
    from superfloat.hw.interface import AccelParams
    AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max,
                xmult=xmult)  # checks
    plan = plan_dsp_pes(b.target, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max, budget=dsp_budget)
    arch = plan_architecture(b.target, a_bits=a_bits, w_bits=w_bits, k_max=k_max, overlap_drain=overlap_drain,
                             chunk_k=chunk_k, mul_stages=mul_stages, pipelined=pipelined)
    t0 = time.perf_counter()
    try:
        pll = pll_settings(b.family, plat.default_clk_frequency / 1e6, float(target_mhz))
    except FlowError as e:
        raise ValueError(f"no PLL setting for {target_mhz:g} MHz on {name}: {e.reason}") from None
    clk_hz = pll.fout_mhz * 1e6
    baud_given = baud is not None
    baud = link_baud(name, clk_hz) if baud is None else baud
    divisor = divisor_for(clk_hz, baud)   # validates the baud rate early
    kw = dict(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max,
              dsp_pes=plan.dsp_pes, clamp_impl=plan.clamp_impl, overlap_drain=arch.overlap_drain,
              chunk_k=arch.chunk_k, mul_stages=arch.mul_stages, pipelined=arch.pipelined, xmult=xmult)
    files = _prepare(name, BoardTop(bridge_kwargs=kw, baud=baud, pll=pll))
    if out_dir is None:
        out_dir = (build_root() / "fpga" / "board" /
                   f"{name}-{rows}x{cols}-a{a_bits}w{w_bits}o{out_bits}-k{k_max}-{pll.fout_mhz:g}MHz-{baud}"
                   f"-{'ov' if arch.overlap_drain else 'noov'}-c{arch.chunk_k}-m{arch.mul_stages}"
                   f"{'-p' if arch.pipelined else ''}")
    out_dir = Path(out_dir)
    from .synth import config_name

    rep: dict[str, Any] = {"board": name, "config": config_name(rows, cols, a_bits, w_bits, out_bits),
                           "rows": rows, "cols": cols, "a_bits": a_bits, "w_bits": w_bits, "out_bits": out_bits,
                           "k_max": k_max, "baud": baud, "divisor": divisor, "bridge": b.bridge,
                           "clock_mhz": pll.fout_mhz, "clock_target_mhz": float(target_mhz), "pll": pll.as_dict(),
                           "oscillator_mhz": plat.default_clk_frequency / 1e6, "port_hint": b.port_hint,
                           "dsp_plan": plan.as_dict(), "dsp_pes": plan.dsp_pes, "arch_plan": arch.as_dict(),
                           "overlap_drain": arch.overlap_drain, "chunk_k": arch.chunk_k, "mul_stages": arch.mul_stages,
                           "out_dir": str(out_dir), "constraints": str(b.constraints_path), "met_timing": False,
                           "fmax_mhz": None}
    cons = b.constraints_path
    if not cons.is_file():  # installed without the source checkout (a wheel): the same pins, generated
        out_dir.mkdir(parents=True, exist_ok=True)
        cons = out_dir / b.constraints
        cons.write_text(generated_constraints(name))
        rep["constraints"] = str(cons)
        rep.setdefault("messages", []).append(
            f"no {b.constraints} in {CONSTRAINTS_DIR} (an installed package): using the pins amaranth-boards "
            f"generates, written to {cons}")
    ext = ".pcf" if b.family == "ice40" else ".lpf"
    if _pins_only(_strip(cons.read_text())) != _pins_only(_strip(files[f"top{ext}"])):
        rep.setdefault("messages", []).append(
            f"{cons.name} differs from the pins amaranth-boards generates for this design; using {cons.name}")
    tgt = Target(name=b.target, family=b.family, device=name, nextpnr_args=b.nextpnr_args,
                 capacity=TARGETS[b.target].capacity)
    timeouts = None if timeout is None else {"yosys": timeout, "nextpnr": timeout, "pack": timeout}
    try:
        res = run_flow(files["top.il"], target=tgt, out_dir=out_dir, freq_mhz=pll.fout_mhz,
                       constraints=cons, pack=True, timeouts=timeouts)
    except FlowError as e:
        rep.update(error=e.reason, step=e.step, log=str(e.log) if e.log else None,
                   seconds=round(time.perf_counter() - t0, 2))
        if e.result is not None:
            rep.update(luts=e.result.design.get("luts"), ffs=e.result.design.get("ffs"))
        return rep
    logic = res.device.get(LOGIC_RESOURCE[b.family])
    rep.update(bitstream=str(res.files["bitstream"]), fmax_mhz=round(res.fmax_mhz, 2) if res.fmax_mhz else None,
               met_timing=res.met_timing, luts=res.design.get("luts"), ffs=res.design.get("ffs"),
               dsps=res.design.get("dsps"), brams=res.design.get("brams"),
               device=res.device, device_logic=f"{logic['used']}/{logic['available']}" if logic else None,
               critical_path=res.critical_path,
               tool_seconds={k: round(v, 2) for k, v in res.seconds.items()},
               seconds=round(time.perf_counter() - t0, 2))
    if clock_mhz is None and not res.met_timing and res.fmax_mhz and retry_clock(res.fmax_mhz, name) >= 10:
        # the board's default clock is too fast for this design: rebuilds at a clock it reaches
        # (Fmax moves with the clock asked for: up to REBUILDS of them, each under 95 % of the
        # lowest Fmax so far)
        again, fmax, clocks = rep, res.fmax_mhz, []
        while len(clocks) < REBUILDS and retry_clock(fmax, name) >= 10:
            clocks.append(retry_clock(fmax, name))
            again = build_board(name, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits,
                                k_max=k_max, baud=baud if baud_given else None, clock_mhz=clocks[-1],
                                dsp_budget=dsp_budget, out_dir=out_dir_given, timeout=timeout,
                                overlap_drain=overlap_drain, chunk_k=chunk_k, mul_stages=mul_stages,
                                pipelined=pipelined, xmult=xmult)
            if again.get("error") or again.get("met_timing") or not again.get("fmax_mhz"):
                break
            fmax = min(fmax, again["fmax_mhz"])
        again.setdefault("messages", []).insert(
            0, f"timing not met at the board's default {pll.fout_mhz:g} MHz (Fmax {res.fmax_mhz:.2f} MHz): rebuilt "
               f"with the PLL at {' then '.join(f'{c:g}' for c in clocks)} MHz")
        again["first_attempt"] = {"clock_mhz": pll.fout_mhz, "fmax_mhz": round(res.fmax_mhz, 2),
                                  "seconds": rep["seconds"]}
        again["rebuilds"] = len(clocks)
        return again
    return rep


#: Rebuilds of a board whose default clock is missed, at most.
REBUILDS = 2
#: A build that misses its clock is rebuilt at this fraction of the Fmax it reached
#: (``build_board`` without ``clock_mhz``, and ``sfx bench fpga``'s board builds).
RETRY_FMAX_FRACTION = 0.95


def retry_clock(fmax_mhz: float, board: str | None = None) -> float:
    """The clock (MHz) of the rebuild after a build that reached ``fmax_mhz`` and missed its
    clock: :data:`RETRY_FMAX_FRACTION` of it, rounded down to 0.25 MHz. With ``board``, the
    highest clock up to that which makes the fastest standard rate of the board's bridge
    (a whole number of cycles per bit: the host link, not the array, is what a board's
    clock buys; e.g. 30 MHz for 6 Mbaud rather than 31 MHz for 1 Mbaud on the iCEBreaker)."""
    limit = math.floor(fmax_mhz * RETRY_FMAX_FRACTION * 4) / 4
    if board is None:
        return limit
    from .uart import MIN_DIVISOR

    for baud in STANDARD_BAUDS:
        cycles = math.floor(limit * 1e6 / baud)
        if baud <= _board(board).max_baud and cycles >= MIN_DIVISOR:
            return baud * cycles / 1e6
    return limit


def write_constraints(names=None) -> list[Path]:
    out = []
    for name in names or BOARDS:
        p = _board(name).constraints_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(generated_constraints(name))
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m superfloat.hw.fpga.boards",
                                 description="Regenerate constraints/ from amaranth-boards.")
    ap.add_argument("--write-constraints", action="store_true")
    args = ap.parse_args(argv)
    if not args.write_constraints:
        ap.print_help()
        return 2
    for p in write_constraints():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
