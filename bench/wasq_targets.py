"""``sfx bench wasq-targets``: the WASQ issue's SF8 targets with the PTQ methods (writes
``results/wasq_targets.md``).

``sfx bench wasq`` measures plain round-to-nearest (``vanilla``), which misses two targets
on SmolLM2-135M (SF8 weight-only within 0.5 % of float, W8A8 within 3 %). This bench runs
the hardware-executable PTQ methods of ``sfx bench ptq`` (AWQ, AdaRound, SmoothQuant;
per-channel scales folded into the per-lane multiplier, one exponent per token) at the
same protocol as ``sfx bench wasq`` (first 8192 held-out Shakespeare test tokens,
context 512), each row one ``sfx eval`` call whose command line is printed beside it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from superfloat.bench import logger, sfx_json

__all__ = ["run", "ROWS"]

MODEL = "smollm2-135m"
#: (label, extra ``sfx eval`` arguments, target name or None)
ROWS: list[tuple[str, list[str], str | None]] = [
    ("float", [], None),
    ("SF8 weight-only, vanilla (round to nearest)", ["--weight-bits", "8"], "w8"),
    ("SF8 weight-only, AWQ", ["--weight-bits", "8", "--method", "awq"], "w8"),
    ("SF8 weight-only, AdaRound", ["--weight-bits", "8", "--method", "adaround"], "w8"),
    ("W8A8 SF8, vanilla", ["--weight-bits", "8", "--act-bits", "8"], "w8a8"),
    ("W8A8 SF8, SmoothQuant", ["--weight-bits", "8", "--act-bits", "8", "--method", "smoothquant"], "w8a8"),
    ("W8A8 SF8, AWQ", ["--weight-bits", "8", "--act-bits", "8", "--method", "awq"], "w8a8"),
]
TARGETS = {"w8": ("SF8 weight-only within 0.5 % of float", 0.5), "w8a8": ("W8A8 within 3 % of float", 3.0)}


_log = logger("wasq-targets")


def _eval(args: list[str]) -> dict[str, Any]:
    """One ``sfx eval ... --json`` in this process; its JSON object."""
    return sfx_json("eval", args)


def run(out_dir: Path | str, quick: bool = False, *, model: str | None = None) -> dict[str, Any]:
    from superfloat.bench import markdown_table, write_report

    model = model or ("tiny-llama" if quick else MODEL)
    base = ["--model", model, "--data", "shakespeare", "--split", "test"]
    base += ["--context", "64", "--max-tokens", "256", "--calib-tokens", "128"] if quick else \
        ["--context", "512", "--max-tokens", "8192"]
    t_start = time.perf_counter()
    rows = []
    for label, extra, target in ROWS:
        _log(f"{label} ...")
        r = _eval(base + extra)
        rows.append({**r, "eval_label": r.get("label"), "label": label, "target": target, "args": base + extra})
        _log(f"  perplexity {r['perplexity']:.4f} ({r['seconds']:.0f} s)")
    fp = rows[0]["perplexity"]
    for r in rows:
        r["delta_pct"] = 100.0 * (r["perplexity"] / fp - 1.0)
    table = []
    for r in rows:
        goal = TARGETS.get(r["target"])
        met = "-" if goal is None else ("yes" if r["delta_pct"] <= goal[1] else "no")
        table.append([r["label"], f"{r['perplexity']:.3f}", "-" if r["target"] is None else f"{r['delta_pct']:+.2f} %",
                      "yes" if r.get("hardware_executable", True) else "no", met,
                      "`sfx eval " + " ".join(r["args"]) + "`"])
    summary = []
    for key, (what, limit) in TARGETS.items():
        cands = [r for r in rows if r["target"] == key and r.get("hardware_executable", True)]
        best = min(cands, key=lambda r: r["perplexity"])
        summary.append(f"* {what}: best hardware-executable method **{best['label']}**, {best['delta_pct']:+.2f} % "
                       f"({'met' if best['delta_pct'] <= limit else '**missed**'}).")
    setup = (f"Model `{model}`; held-out Shakespeare test plays, the first {base[base.index('--max-tokens') + 1]} "
             f"tokens, context {base[base.index('--context') + 1]}, disjoint windows (the `sfx eval` protocol of "
             f"docs/wasq.md, the same as `sfx bench wasq`). PTQ methods calibrate on the training plays "
             f"(`sfx eval`'s default calibration budget). Every configuration here is executable by the SFx "
             f"accelerator: per-output-channel float scales (the per-lane multiplier), activations with one "
             f"exponent per token. " + ("**Quick smoke run: numbers mean nothing.**" if quick else
                                         "smollm2-135m's 'float' weights are the GGUF's dequantized Q4_1."))
    sections = [("Setup", setup), ("Targets", "\n".join(summary)),
                ("Perplexity", markdown_table(["configuration", "perplexity", "vs float", "on the accelerator",
                                               "target met", "command"], table)),
                ("Run time", f"{(time.perf_counter() - t_start) / 60:.1f} min for the {len(rows)} evaluations.")]
    data = {"model": model, "quick": quick, "rows": rows}
    write_report(out_dir, "wasq_targets", "WASQ SF8 targets with the PTQ methods", sections, data,
                 command="sfx bench wasq-targets" + (" --quick" if quick else ""))
    return data
