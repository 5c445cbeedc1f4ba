"""PLL settings for the boards' system clock (iCE40 ``SB_PLL40_PAD``, ECP5 ``EHXPLLL``).

The divider values come from the FPGA projects' own calculators, run offline from PyPI
(``yowasp-icepll`` of IceStorm, ``yowasp-ecppll`` of Project Trellis), so that they are
exactly what those projects consider valid (VCO and phase-detector ranges, loop filter,
output phase). :func:`pll_settings` returns the achieved frequency too: a calculator
gives the nearest frequency it can make, which is the one the design is then timed at.
"""
from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .flow import FlowError, _tool, build_root, yowasp_env

__all__ = ["PllSettings", "pll_settings"]


@dataclass(frozen=True)
class PllSettings:
    """One PLL configuration: ``family``, input and achieved output frequency (MHz), and the
    primitive's parameters (``params``, as Amaranth ``Instance`` keywords without the ``p_``)."""

    family: str
    fin_mhz: float
    fout_mhz: float
    params: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(argv: list[str], out_file: str | None = None) -> tuple[str, str]:
    work = build_root() / "fpga" / "pll"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        try:
            r = subprocess.run(argv, cwd=tmp, env=yowasp_env(), capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise FlowError("pll", f"{Path(argv[0]).name} failed: {e}") from None
        text = r.stdout + r.stderr
        if r.returncode != 0:
            raise FlowError("pll", f"{Path(argv[0]).name} exited with status {r.returncode}: {text.strip()[-300:]}")
        extra = (Path(tmp) / out_file).read_text() if out_file and (Path(tmp) / out_file).exists() else ""
    return text, extra


@functools.lru_cache(maxsize=None)
def _ice40(fin: float, fout: float) -> PllSettings:
    text, _ = _run([_tool("yowasp-icepll"), "-i", f"{fin:g}", "-o", f"{fout:g}"])
    got = {k: int(v) for k, v in re.findall(r"^(DIVR|DIVF|DIVQ|FILTER_RANGE):\s+(\d+)", text, re.M)}
    ach = re.search(r"F_PLLOUT:\s+([\d.]+) MHz \(achieved\)", text)
    if len(got) != 4 or not ach:
        raise FlowError("pll", f"icepll gave no settings for {fin:g} -> {fout:g} MHz: {text.strip()[-300:]}")
    params = {"FEEDBACK_PATH": "SIMPLE", "DIVR": got["DIVR"], "DIVF": got["DIVF"], "DIVQ": got["DIVQ"],
              "FILTER_RANGE": got["FILTER_RANGE"]}
    return PllSettings("ice40", fin, float(ach.group(1)), params)


@functools.lru_cache(maxsize=None)
def _ecp5(fin: float, fout: float) -> PllSettings:
    text, verilog = _run([_tool("yowasp-ecppll"), "-i", f"{fin:g}", "-o", f"{fout:g}", "-f", "pll.v"], "pll.v")
    ach = re.search(r"clkout0 frequency:\s+([\d.]+) MHz", text)
    params = {k: (int(v) if v.isdigit() else v.strip('"'))
              for k, v in re.findall(r"\.(\w+)\(([^()]*)\)", verilog.split(") pll_i")[0])}
    attrs = dict(re.findall(r'\(\* (\w+)="([^"]*)" \*\)', verilog))
    if not ach or "CLKOP_DIV" not in params:
        raise FlowError("pll", f"ecppll gave no settings for {fin:g} -> {fout:g} MHz: {text.strip()[-300:]}")
    return PllSettings("ecp5", fin, float(ach.group(1)), params, attrs)


def pll_settings(family: str, fin_mhz: float, fout_mhz: float) -> PllSettings:
    """The PLL settings nearest to ``fout_mhz`` from a ``fin_mhz`` reference (``FlowError``
    when the calculator cannot make it)."""
    if family not in ("ice40", "ecp5"):
        raise ValueError(f"unknown FPGA family {family!r}: choose ice40 or ecp5")
    for name, v in (("fin_mhz", fin_mhz), ("fout_mhz", fout_mhz)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 1000:
            raise ValueError(f"{name} must be a number in 1..1000 MHz, got {v!r}")
    return (_ice40 if family == "ice40" else _ecp5)(float(fin_mhz), float(fout_mhz))
