"""Fmax of an accelerator configuration from the FPGA reports (cycles -> time in ``sfx cosim``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


from superfloat.sw import sfx

from .engines import ArrayConfig


# --------------------------------------------------------------------------- FPGA timing


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _fmax_entries(obj: Any, source: str, out: list) -> None:
    if isinstance(obj, dict):
        if "fmax_mhz" in obj and "target" in obj and "rows" in obj:
            out.append((obj, source))
            return
        for v in obj.values():
            _fmax_entries(v, source, out)
    elif isinstance(obj, list):
        for v in obj:
            _fmax_entries(v, source, out)


def fmax_sources() -> list[Path]:
    """Files searched for synthesis results, in order of preference: the checked-in FPGA
    baselines (``hw/fpga/baselines/*.json``), the FPGA bench (``results/fpga.json``), then
    ``sfx synth`` summaries under ``build/fpga/`` (:func:`superfloat.hw.fpga.flow.build_root`:
    ``$SFX_BUILD_DIR`` or ``./build``)."""
    import superfloat.hw.fpga as fpga

    paths = sorted((Path(fpga.__file__).resolve().parent / "baselines").glob("*.json"))
    root = _repo_root()
    paths += [root / "results" / "fpga.json"]
    from superfloat.hw.fpga.flow import build_root

    paths += sorted((build_root() / "fpga").glob("**/summary.json"))
    return [p for p in paths if p.is_file()]


def find_fmax(array: ArrayConfig, target: str = "ecp5-25k", fmax_mhz: float | None = None,
              extra_sources: Sequence[Path] = ()) -> dict:
    """Fmax of the accelerator ``array`` on ``target`` from the FPGA reports (see :func:`fmax_sources`).

    Returns ``{"fmax_mhz", "source", "match", "config"}``: ``match`` is ``"given"`` (the
    ``fmax_mhz`` argument), ``"exact"`` (same target, array shape, widths and k_max),
    ``"nearest"`` (same target: the closest widths, then the closest array size; the time is
    an estimate) or ``"none"`` (``fmax_mhz`` None, ``source`` says how to get one).
    ``extra_sources`` are JSON files searched first (e.g. a bench's own ``fpga.json``)."""
    if fmax_mhz is not None:
        return {"fmax_mhz": float(fmax_mhz), "source": "--fmax (given)", "match": "given", "config": None,
                "target": target}
    entries: list = []
    for path in [Path(p) for p in extra_sources if Path(p).is_file()] + fmax_sources():
        try:
            _fmax_entries(json.loads(path.read_text()), str(path), entries)
        except (OSError, json.JSONDecodeError):
            continue
    want = (array.rows, array.cols, array.a_bits, array.w_bits, array.out_bits, array.k_max)
    best = None
    for e, src in entries:
        if e.get("target") != target or not e.get("fmax_mhz") or e.get("kind", "accel") != "accel" \
                or e.get("fits") is False or e.get("error"):
            continue
        try:
            have = (int(e["rows"]), int(e["cols"]), int(e["a_bits"]), int(e["w_bits"]),
                    int(e.get("out_bits", e["a_bits"])), int(e.get("k_max", sfx.DEFAULT_K_MAX)))
        except (KeyError, TypeError, ValueError):
            continue
        bits_apart = sum(abs(h - w) for h, w in zip(have[2:5], want[2:5]))  # widths set the PE and clamp paths
        score = (have != want, bits_apart, abs(have[0] * have[1] - want[0] * want[1]), have[5] != want[5])
        if best is None or score < best[0]:
            best = (score, e, src, have)
    cmd = (f"sfx synth --target {target} --rows {array.rows} --cols {array.cols} --a-bits {array.a_bits} "
           f"--w-bits {array.w_bits} --out-bits {array.out_bits} --k-max {array.k_max} --json")
    if best is None:
        return {"fmax_mhz": None, "match": "none", "config": None, "target": target,
                "source": f"no synthesis report for {target} found (run `{cmd}`, or pass --fmax MHZ)"}
    _, e, src, have = best
    try:
        src = str(Path(src).relative_to(_repo_root()))
    except ValueError:
        pass
    return {"fmax_mhz": float(e["fmax_mhz"]), "source": src, "match": "exact" if have == want else "nearest",
            "config": f"{have[0]}x{have[1]} a{have[2]}w{have[3]}o{have[4]} k_max={have[5]}", "target": target,
            "hint": None if have == want else f"for this exact array run `{cmd}`"}
