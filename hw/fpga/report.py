"""Parsing of Yosys / nextpnr outputs into resource counts and Fmax, and their tables.

Counts (per module and for the whole design, from Yosys ``stat -json`` after
technology mapping):

* ``luts``: 4-input LUTs. iCE40: ``SB_LUT4`` cells (a carry chain's sum LUTs are
  ``SB_LUT4`` cells too). ECP5: ``LUT4`` cells plus 2 per ``CCU2C`` (a carry cell
  occupies two LUT4s of a slice) plus 2 per ``TRELLIS_DPR16X4`` (LUT RAM).
* ``ffs``: flip-flops (``SB_DFF*`` / ``TRELLIS_FF``).
* ``carry``: carry cells (``SB_CARRY`` / ``CCU2C``), informative.
* ``dsps``: ``SB_MAC16`` / ``MULT18X18D`` (``ALU54B`` counted too).
* ``brams``: ``SB_RAM40_4K`` / ``DP16KD`` + ``PDPW16KD``; SPRAM (``SB_SPRAM256KA``) as ``sprams``.

From nextpnr's ``--report`` JSON: ``fmax_mhz`` (the smallest achieved frequency over
the design's clocks) and the utilization after packing (``ICESTORM_LC``,
``TRELLIS_COMB``, ...), which includes the wrapper and is what must fit the device.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = ["parse_yosys_stat", "parse_nextpnr_report", "first_error", "is_fit_error", "cell_counts",
           "format_result_table", "LOGIC_RESOURCE"]

#: nextpnr's name of the logic resource per family (what "fits" is judged on).
LOGIC_RESOURCE = {"ice40": "ICESTORM_LC", "ecp5": "TRELLIS_COMB"}


def cell_counts(by_type: dict[str, int], family: str) -> dict[str, int]:
    """Resource counts (see module doc) from Yosys' ``num_cells_by_type``."""
    g = lambda *names: sum(int(by_type.get(n, 0)) for n in names)  # noqa: E731
    if family == "ice40":
        ffs = sum(int(v) for k, v in by_type.items() if k.startswith("SB_DFF"))
        return {"luts": g("SB_LUT4"), "ffs": ffs, "carry": g("SB_CARRY"), "dsps": g("SB_MAC16"),
                "brams": g("SB_RAM40_4K"), "sprams": g("SB_SPRAM256KA")}
    if family == "ecp5":
        return {"luts": g("LUT4") + 2 * g("CCU2C") + 2 * g("TRELLIS_DPR16X4"), "ffs": g("TRELLIS_FF"),
                "carry": g("CCU2C"), "dsps": g("MULT18X18D", "ALU54B"), "brams": g("DP16KD", "PDPW16KD"),
                "sprams": 0}
    raise ValueError(f"unknown family {family!r}")


def parse_yosys_stat(path: Path | str, family: str) -> dict[str, Any]:
    """``{"modules": {name: counts}, "design": counts}`` from ``stat -json`` output.

    A module's counts are its own cells (a kept submodule is not included in its
    parent's counts); ``design`` counts every cell of the hierarchy.
    """
    text = Path(path).read_text()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON object in Yosys stat output")
    data = json.loads(text[start:])
    mods = {}
    for name, m in data.get("modules", {}).items():
        c = cell_counts(m.get("num_cells_by_type", {}), family)
        c["cells_by_type"] = {k: v for k, v in m.get("num_cells_by_type", {}).items() if not k.startswith("$scope")}
        mods[name.lstrip("\\")] = c
    d = data.get("design", {})
    design = cell_counts(d.get("num_cells_by_type", {}), family)
    design["cells_by_type"] = {k: v for k, v in d.get("num_cells_by_type", {}).items()
                               if not k.startswith("$scope") and k.lstrip("\\") not in mods}
    return {"modules": mods, "design": design}


def parse_nextpnr_report(path: Path | str) -> dict[str, Any]:
    """``{"fmax_mhz": float | None, "clocks": {name: {achieved, constraint}}, "utilization": {...}}``."""
    data = json.loads(Path(path).read_text())
    clocks = {name: {"achieved": float(v["achieved"]), "constraint": float(v["constraint"])}
              for name, v in data.get("fmax", {}).items()}
    fmax = min((v["achieved"] for v in clocks.values()), default=None)
    util = {k: {"used": int(v["used"]), "available": int(v["available"])}
            for k, v in data.get("utilization", {}).items()}
    return {"fmax_mhz": fmax, "clocks": clocks, "utilization": util,
            "critical_path": critical_path(data.get("critical_paths", []))}


def _signal_of(cell: str) -> str:
    """A readable signal name from a packed cell name (``core.k_last_SB_DFFESR_Q_14_D_SB_LUT4_O_LC`` ->
    ``core.k_last``)."""
    name = re.split(r"_SB_|_TRELLIS_|_LUT4|_CCU2C|_DFF|\$", cell, maxsplit=1)[0]
    return name[:80]


def critical_path(paths: list) -> dict | None:
    """The slowest register-to-register path of nextpnr's report: start and end (as signal
    names), total delay (ns), logic and routing parts, number of logic cells crossed."""
    best = None
    for p in paths:
        if not str(p.get("from", "")).startswith("posedge") or not str(p.get("to", "")).startswith("posedge"):
            continue
        segs = p.get("path", [])
        if not segs:
            continue
        total = sum(float(x.get("delay", 0)) for x in segs)
        if best is None or total > best["delay_ns"]:
            logic = [x for x in segs if x.get("type") == "logic"]
            best = {"from": _signal_of(segs[0]["from"]["cell"]), "to": _signal_of(segs[-1]["to"]["cell"]),
                    "delay_ns": round(total, 2), "logic_ns": round(sum(float(x["delay"]) for x in logic), 2),
                    "routing_ns": round(sum(float(x["delay"]) for x in segs if x.get("type") == "routing"), 2),
                    "logic_levels": len(logic)}
    return best


def first_error(log: Path | str) -> str | None:
    """The first ``ERROR:`` message of a tool log (with its continuation lines), or None."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        if "ERROR:" in line:
            msg = [line.split("ERROR:", 1)[1].strip()]
            for nxt in lines[i + 1:i + 4]:
                if not nxt.strip() or nxt.startswith(("Info:", "Warning:", "ERROR:", "End of")):
                    break
                msg.append(nxt.strip())
            return " ".join(msg)
    return None


_FIT_PATTERNS = re.compile(
    r"no BELs remaining|Unable to place|unable to place|too many|Design uses|exceeds|not enough|"
    r"Failed to find a legal|Unable to find legal placement|utili[sz]ation limit|failed to legali[sz]e|"
    r"No wires left|has no bel|Failed to expand region", re.I)

_UTIL_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", re.M)


def over_capacity(log: Path | str) -> list[str]:
    """The resources that nextpnr's "Device utilisation" table shows above 100 %
    (e.g. ``"ICESTORM_LC 6883/5280 (130 %)"``); empty when none or no log."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return []
    return [f"{name} {used}/{total} ({100 * int(used) // int(total)} %)"
            for name, used, total in _UTIL_LINE.findall(text) if int(total) and int(used) > int(total)]


def is_fit_error(reason: str) -> bool:
    """Whether a nextpnr error message means "the design does not fit the device"."""
    return bool(_FIT_PATTERNS.search(reason or ""))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def format_result_table(rows: Iterable[dict[str, Any]]) -> str:
    """A plain-text table of summary dicts (as printed by ``sfx synth``)."""
    cols = [("target", "target"), ("config", "config"), ("luts", "LUT4 (core)"), ("ffs", "FF (core)"),
            ("dsps", "DSP"), ("brams", "BRAM"), ("device_logic", "logic used/avail"),
            ("fmax_mhz", "Fmax MHz"), ("freq_target_mhz", "target MHz"), ("met_timing", "met"),
            ("fits", "fits")]
    rows = list(rows)
    table = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    out = []
    for n, r in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
