"""Boards and ``sfx build-board``: the accelerator with its UART link, as a bitstream.

Boards (amaranth-boards platforms; pins and clock constraints in ``constraints/``):

============== ===================== ============================ ======= =====================
name           FPGA                  USB-serial link              clock   programming
============== ===================== ============================ ======= =====================
icebreaker     iCE40 UP5K, SG48      FT2232H channel B (pins 6/9)  12 MHz  ``iceprog top.bin``
ulx3s-25f      ECP5 LFE5U-25F, 381   FT231X (pins M1/L4)           25 MHz  ``openFPGALoader -b ulx3s``
orangecrab-25f ECP5 LFE5U-25F, 285   none on board: a 3.3 V USB    48 MHz  ``dfu-util`` (DFU
                                     serial adapter on header                bootloader)
                                     pins 0 (RX in) / 1 (TX out)
============== ===================== ============================ ======= =====================

The design's RTLIL comes from the platform (``platform.prepare``: clock buffers, IO
cells, power-on reset); the pin file given to nextpnr is the committed one in
``constraints/`` (review it against the board's schematic there). A test checks that the
committed files equal what amaranth-boards generates; regenerate them with
``python -m superfloat.hw.fpga.boards --write-constraints``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from superfloat.sw import sfx

from .budget import plan_dsp_pes
from .flow import FlowError, Target, build_root, run_flow
from .report import LOGIC_RESOURCE

__all__ = ["Board", "BOARDS", "CONSTRAINTS_DIR", "build_board", "generated_constraints", "make_platform"]

#: ``constraints/`` of the source checkout.
CONSTRAINTS_DIR = Path(__file__).resolve().parents[2] / "constraints"


@dataclass(frozen=True)
class Board:
    name: str
    platform: str            # "module:Class" of amaranth-boards
    target: str              # synthesis target of the same device (for the DSP budget)
    family: str
    nextpnr_args: tuple
    constraints: str         # file name in constraints/
    default_baud: int
    port_hint: str
    uart_on_header: bool = False

    @property
    def constraints_path(self) -> Path:
        return CONSTRAINTS_DIR / self.constraints


BOARDS = {
    "icebreaker": Board("icebreaker", "amaranth_boards.icebreaker:ICEBreakerPlatform", "ice40-up5k", "ice40",
                        ("--up5k", "--package", "sg48"), "icebreaker.pcf", 115200, "/dev/ttyUSB1"),
    "ulx3s-25f": Board("ulx3s-25f", "amaranth_boards.ulx3s:ULX3S_25F_Platform", "ecp5-25k", "ecp5",
                       ("--25k", "--package", "CABGA381", "--speed", "6"), "ulx3s-25f.lpf", 115200, "/dev/ttyUSB0"),
    "orangecrab-25f": Board("orangecrab-25f", "amaranth_boards.orangecrab_r0_2:OrangeCrabR0_2_25FPlatform",
                            "ecp5-25k", "ecp5", ("--25k", "--package", "CSFBGA285", "--speed", "8"),
                            "orangecrab-25f.lpf", 115200, "/dev/ttyUSB0 (your adapter)", uart_on_header=True),
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


def generated_constraints(name: str) -> str:
    """The pin/clock constraints amaranth-boards generates for the board top of ``name``."""
    from .board_top import BoardTop

    b = _board(name)
    top = BoardTop(bridge_kwargs=dict(rows=1, cols=1, a_bits=4, w_bits=4, out_bits=4, k_max=16),
                   baud=b.default_baud)
    files = _prepare(name, top)
    ext = ".pcf" if b.family == "ice40" else ".lpf"
    body = "\n".join(_strip(files[f"top{ext}"]))
    return (f"# Pins and clock of the Superfloat board top on {name} ({b.platform}).\n"
            f"# Generated from amaranth-boards; regenerate with\n"
            f"#   python -m superfloat.hw.fpga.boards --write-constraints\n"
            f"# (tests/test_fpga_boards.py checks that this file matches amaranth-boards).\n{body}\n")


def build_board(name: str, *, rows: int = 2, cols: int = 2, a_bits: int = 8, w_bits: int | None = None,
                out_bits: int | None = None, k_max: int = sfx.DEFAULT_K_MAX, baud: int | None = None,
                dsp_budget: int | None = None, out_dir: Path | str | None = None,
                timeout: float | None = None, overlap_drain: bool = True) -> dict[str, Any]:
    """Build the bitstream of the board top; return a report dict with ``bitstream`` (path),
    ``fmax_mhz``, ``clock_mhz``, ``met_timing``, resources, ``dsp_plan`` and ``seconds``,
    or ``error`` / ``step`` on failure. Bad parameters raise ``ValueError``."""
    from .board_top import BoardTop
    from .uart import divisor_for

    b = _board(name)
    w_bits = a_bits if w_bits is None else w_bits
    out_bits = a_bits if out_bits is None else out_bits
    baud = b.default_baud if baud is None else baud
    plat = make_platform(name)
    clk_hz = plat.default_clk_frequency
    divisor_for(clk_hz, baud)   # validates the baud rate early
    plan = plan_dsp_pes(b.target, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max, budget=dsp_budget)
    kw = dict(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max,
              dsp_pes=plan.dsp_pes, clamp_impl=plan.clamp_impl, overlap_drain=overlap_drain)
    from superfloat.hw.interface import AccelParams
    AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max)  # checks
    t0 = time.perf_counter()
    files = _prepare(name, BoardTop(bridge_kwargs=kw, baud=baud))
    if out_dir is None:
        out_dir = (build_root() / "fpga" / "board" /
                   f"{name}-{rows}x{cols}-a{a_bits}w{w_bits}o{out_bits}-k{k_max}-{baud}{'' if overlap_drain else '-nooverlap'}")
    out_dir = Path(out_dir)
    from .synth import config_name

    rep: dict[str, Any] = {"board": name, "config": config_name(rows, cols, a_bits, w_bits, out_bits),
                           "rows": rows, "cols": cols, "a_bits": a_bits, "w_bits": w_bits, "out_bits": out_bits,
                           "k_max": k_max, "baud": baud, "clock_mhz": clk_hz / 1e6, "port_hint": b.port_hint,
                           "dsp_plan": plan.as_dict(), "dsp_pes": plan.dsp_pes, "overlap_drain": overlap_drain,
                           "out_dir": str(out_dir),
                           "constraints": str(b.constraints_path), "met_timing": False, "fmax_mhz": None}
    cons = b.constraints_path
    if not cons.is_file():
        raise ValueError(f"missing constraints file {cons}: run python -m superfloat.hw.fpga.boards --write-constraints")
    ext = ".pcf" if b.family == "ice40" else ".lpf"
    if _strip(cons.read_text()) != _strip(files[f"top{ext}"]):
        rep.setdefault("messages", []).append(
            f"{cons.name} differs from the pins amaranth-boards generates for this design; using {cons.name}")
    tgt = Target(name=b.target, family=b.family, device=name, nextpnr_args=b.nextpnr_args,
                 capacity={"ice40-up5k": {"luts": 5280, "ffs": 5280, "dsps": 8, "brams": 30},
                           "ecp5-25k": {"luts": 24288, "ffs": 24288, "dsps": 28, "brams": 56}}[b.target])
    timeouts = None if timeout is None else {"yosys": timeout, "nextpnr": timeout, "pack": timeout}
    try:
        res = run_flow(files["top.il"], target=tgt, out_dir=out_dir, freq_mhz=clk_hz / 1e6,
                       constraints=cons, pack=True, timeouts=timeouts)
    except FlowError as e:
        rep.update(error=e.reason, step=e.step, log=str(e.log) if e.log else None,
                   seconds=round(time.perf_counter() - t0, 2))
        return rep
    logic = res.device.get(LOGIC_RESOURCE[b.family])
    rep.update(bitstream=str(res.files["bitstream"]), fmax_mhz=round(res.fmax_mhz, 2) if res.fmax_mhz else None,
               met_timing=res.met_timing, luts=res.design.get("luts"), ffs=res.design.get("ffs"),
               dsps=res.design.get("dsps"), brams=res.design.get("brams"),
               device=res.device, device_logic=f"{logic['used']}/{logic['available']}" if logic else None,
               tool_seconds={k: round(v, 2) for k, v in res.seconds.items()},
               seconds=round(time.perf_counter() - t0, 2))
    return rep


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
