"""Synthesis regression against committed baselines (``hw/fpga/baselines/*.json``).

One small accelerator per target is synthesized in CI (``tests/test_fpga_regression.py``)
and compared with its baseline:

* core LUT4s at most 10 % above the baseline,
* DSP blocks not above the baseline,
* Fmax not below 90 % of the baseline.

Regenerate every baseline (after an intended change, e.g. a new RTL feature or a new
YoWASP release) with::

    python -m superfloat.hw.fpga.regress --update

or one configuration with ``sfx synth ... --update-baseline``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["BASELINE_DIR", "REGRESSION_CONFIGS", "LUT_TOLERANCE", "FMAX_TOLERANCE", "baseline_path",
           "write_baseline", "load_baselines", "compare"]

BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
LUT_TOLERANCE = 0.10       # LUTs may grow by 10 %
FMAX_TOLERANCE = 0.90      # Fmax may drop to 90 %

#: The configurations CI checks, one per target: the flagships' widths, clocks and
#: architecture plans (hw/fpga/budget.py), on arrays small enough to run in a minute or two
#: (the 8x8 flagships take several minutes each; ``sfx bench fpga`` measures those).
REGRESSION_CONFIGS = {
    "ice40-up5k": dict(rows=4, cols=4, a_bits=4, w_bits=4, out_bits=4, k_max=16384, freq_mhz=48.0),
    "ecp5-25k": dict(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=16384, freq_mhz=125.0),
}

_KEYS = ("target", "kind", "config", "rows", "cols", "a_bits", "w_bits", "out_bits", "k_max", "freq_target_mhz",
         "luts", "ffs", "dsps", "brams", "fmax_mhz", "dsp_pes", "device_logic")


def baseline_path(summary: dict) -> Path:
    s = summary
    return BASELINE_DIR / (f"{s['target']}-{s['kind']}-{s['rows']}x{s['cols']}-a{s['a_bits']}w{s['w_bits']}"
                           f"o{s['out_bits']}-k{s['k_max']}.json")


def write_baseline(summary: dict) -> Path:
    """Store the numbers of a successful ``sfx synth`` run as a baseline."""
    if "error" in summary or not summary.get("fits"):
        raise ValueError(f"cannot store a failed run as a baseline: {summary.get('error', 'does not fit')}")
    from superfloat.bench import machine_info

    data: dict[str, Any] = {k: summary.get(k) for k in _KEYS}
    data["tools"] = {k: v for k, v in machine_info()["versions"].items() if "yowasp" in k or k == "amaranth"}
    data["regenerate"] = "python -m superfloat.hw.fpga.regress --update"
    path = baseline_path(summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_baselines() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(BASELINE_DIR.glob("*.json"))]


def compare(new: dict, base: dict) -> list[str]:
    """Regressions of ``new`` against ``base`` (empty when within tolerance)."""
    bad = []
    if "error" in new or not new.get("fits"):
        return [f"{base['target']} {base['config']}: the run failed: {new.get('error', 'does not fit')}"]
    tag = f"{base['target']} {base['config']}"
    if new["luts"] > base["luts"] * (1 + LUT_TOLERANCE):
        bad.append(f"{tag}: LUTs {new['luts']} > baseline {base['luts']} + {LUT_TOLERANCE:.0%}")
    if new["dsps"] > base["dsps"]:
        bad.append(f"{tag}: DSPs {new['dsps']} > baseline {base['dsps']}")
    if base.get("fmax_mhz") and (new["fmax_mhz"] or 0) < base["fmax_mhz"] * FMAX_TOLERANCE:
        bad.append(f"{tag}: Fmax {new['fmax_mhz']} MHz < {FMAX_TOLERANCE:.0%} of baseline {base['fmax_mhz']} MHz")
    return bad


def run_config(target: str, cfg: dict, **kw) -> dict:
    from .synth import synthesize

    args = {k: v for k, v in cfg.items() if k not in ("kind",)}
    args.update(kw)
    return synthesize(target=target, kind=cfg.get("kind", "accel"), **args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m superfloat.hw.fpga.regress",
                                 description="Check (default) or regenerate (--update) the FPGA synthesis baselines.")
    ap.add_argument("--update", action="store_true", help="rewrite hw/fpga/baselines/ from fresh runs")
    args = ap.parse_args(argv)
    failures = []
    if args.update:
        for old in BASELINE_DIR.glob("*.json"):
            old.unlink()
    for target, cfg in REGRESSION_CONFIGS.items():
        s = run_config(target, cfg)
        if args.update:
            print(write_baseline(s))
            continue
        base = [b for b in load_baselines() if b["target"] == target]
        if not base:
            failures.append(f"{target}: no baseline; run with --update")
            continue
        failures += compare(s, base[0])
        print(f"{target} {s['config']}: LUT {s['luts']} (base {base[0]['luts']}), DSP {s['dsps']} "
              f"(base {base[0]['dsps']}), Fmax {s['fmax_mhz']} (base {base[0]['fmax_mhz']})")
    for f in failures:
        print("REGRESSION:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
