"""``sfx bench accel``: perplexity of what the FPGA computes (writes ``results/accelerator.md``).

Every row is one ``sfx eval ... --backend both --json`` (its command line is printed beside
it): the same configuration evaluated with fake quantization and then accelerator-exact
(SPEC section 8: activation codes streamed per token, exact integer LINEAR, the 16-bit
per-lane multiplier, requantization with rounding and saturation, static output exponents
calibrated on the training plays) on the same tokens, back to back, with one float pass for
the float perplexity and the top-1 agreement. The time of the two backends comes from the
same run (``time_ratio``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from superfloat.bench import logger, sfx_json

__all__ = ["run", "ROWS", "TARGETS"]

MODEL = "smollm2-135m"
#: (label, extra ``sfx eval`` arguments, target key or None)
ROWS: list[tuple[str, list[str], str | None]] = [
    ("SF8 weights, SF16 activations, vanilla", ["-w", "8", "-a", "16"], "w8a16"),
    ("SF8 weights, SF16 activations, AWQ", ["-w", "8", "-a", "16", "--method", "awq"], "w8a16"),
    ("W8A8, vanilla", ["-w", "8", "-a", "8"], "w8a8"),
    ("W8A8, SmoothQuant", ["-w", "8", "-a", "8", "--method", "smoothquant"], "w8a8"),
    ("W8A8, AWQ", ["-w", "8", "-a", "8", "--method", "awq"], "w8a8"),
    ("W8A8, AdaRound", ["-w", "8", "-a", "8", "--method", "adaround"], "w8a8"),
    ("W8A8, AWQ, SF8 outputs", ["-w", "8", "-a", "8", "--method", "awq", "--out-bits", "8"], None),
    ("W4A8, vanilla", ["-w", "4", "-a", "8"], None),
    ("W4A8, AWQ", ["-w", "4", "-a", "8", "--method", "awq"], None),
]
#: the static output exponent rule: output width x headroom, W8A8 vanilla (accelerator-exact only)
SWEEP = [(ob, hr) for ob in (16, 8) for hr in (1, 2, 4, 8)]
#: key -> (what, largest perplexity increase over float in %, smallest top-1 agreement or None)
TARGETS = {
    "w8a8": ("W8A8 accelerator-exact within +2 % of float, top-1 agreement >= 90 %", 2.0, 0.90),
    "w8a16": ("SF8 weights with 16-bit activations, accelerator-exact, within +0.5 % of float", 0.5, None),
}
TIME_TARGET = 2.0  # accelerator-exact evaluation at most this many times the fake-quantized one


_log = logger("accel")


def _eval(args: list[str]) -> dict[str, Any]:
    """One ``sfx eval ... --json`` in this process; its JSON object."""
    return sfx_json("eval", args)


def _pct(ppl: float, ref: float) -> float:
    return 100.0 * (ppl / ref - 1.0)


def _met(r: dict[str, Any]) -> str:
    goal = TARGETS.get(r["target"])
    if goal is None:
        return "-"
    ok = r["delta_pct"] <= goal[1] and (goal[2] is None or r["top1_agreement"] >= goal[2])
    return "yes" if ok else "no"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh([i + 0.2 for i in y], [r["fake_delta_pct"] for r in rows], height=0.4, label="fake quantization")
    ax.barh([i - 0.2 for i in y], [r["delta_pct"] for r in rows], height=0.4, label="accelerator-exact")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=2.0)
    ax.axvline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("perplexity vs float (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path | str, quick: bool = False, *, model: str | None = None) -> dict[str, Any]:
    from superfloat.bench import markdown_table, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model or ("tiny-llama" if quick else MODEL)
    base = ["--model", model, "--data", "shakespeare", "--split", "test"]
    base += ["--context", "64", "--max-tokens", "256", "--calib-tokens", "256", "--search-tokens", "64",
             "--adaround-iters", "5", "--awq-grid", "4"] if quick else ["--context", "512", "--max-tokens", "8192"]
    rows_def = ROWS[:3] + [ROWS[4], ROWS[6]] if quick else ROWS
    t_start = time.perf_counter()
    rows = []
    for label, extra, target in rows_def:
        _log(f"{label} ...")
        args = base + extra + ["--backend", "both"]
        r = _eval(args)
        r.update(label=label, eval_label=r.get("label"), target=target, args=args)
        r["delta_pct"] = _pct(r["perplexity"], r["float_perplexity"])
        r["fake_delta_pct"] = _pct(r["fake"]["perplexity"], r["float_perplexity"])
        rows.append(r)
        _log(f"  fake {r['fake']['perplexity']:.4f}, accelerator {r['perplexity']:.4f} (float "
             f"{r['float_perplexity']:.4f}), top-1 {100 * r['top1_agreement']:.1f} %, {r['time_ratio']}x time, "
             f"{r['cpu_time_ratio']}x CPU time")
    fp = {r["float_perplexity"] for r in rows}
    assert len(fp) == 1, f"the float pass differs between rows: {fp}"  # same tokens, same float model
    fpv = fp.pop()
    table = [[r["label"], f"{r['fake']['perplexity']:.3f} ({r['fake_delta_pct']:+.2f} %)",
              f"{100 * r['fake']['top1_agreement']:.1f} %",
              f"**{r['perplexity']:.3f}** ({r['delta_pct']:+.2f} %)", f"{100 * r['top1_agreement']:.1f} %",
              f"{r['saturated']} / {r['outputs']}", f"{r['output_calibration']['out_bits'][0]}",
              f"{r['fake']['cpu_seconds']:.0f} / {r['cpu_seconds']:.0f} s (**{r['cpu_time_ratio']:.2f}x**)",
              f"{r['fake']['seconds']:.0f} / {r['seconds']:.0f} s ({r['time_ratio']:.2f}x)", _met(r),
              "`sfx eval " + " ".join(r["args"]) + "`"] for r in rows]
    summary = []
    for key, (what, limit, top1) in TARGETS.items():
        cands = [r for r in rows if r["target"] == key]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["perplexity"])
        summary.append(f"* {what}: best **{best['label']}**, {best['delta_pct']:+.2f} %, top-1 "
                       f"{100 * best['top1_agreement']:.1f} % ({'met' if _met(best) == 'yes' else '**missed**'}).")
    worst = max(rows, key=lambda r: r["cpu_time_ratio"])
    w8a8 = [r for r in rows if r["target"] == "w8a8"]
    ratios = ", ".join(f"{r['label']} {r['cpu_time_ratio']:.2f}x" for r in rows)
    summary.append(f"* Accelerator-exact evaluation at most {TIME_TARGET:g}x the fake-quantized one (CPU time of the "
                   f"two passes; wall-clock ratios are in the table): W8A8 rows "
                   f"{min(r['cpu_time_ratio'] for r in w8a8):.2f}-{max(r['cpu_time_ratio'] for r in w8a8):.2f}x; "
                   f"largest {worst['cpu_time_ratio']:.2f}x ({worst['label']}) "
                   f"({'met' if worst['cpu_time_ratio'] <= TIME_TARGET else 'missed for the rows above ' + f'{TIME_TARGET:g}x'})"
                   f". Each ratio: {ratios}.")
    sweep = []
    for ob, hr in (SWEEP[:2] if quick else SWEEP):
        args = base + ["-w", "8", "-a", "8", "--backend", "accelerator", "--out-bits", str(ob), "--headroom", str(hr)]
        _log(f"output rule: SF{ob} outputs, headroom {hr}x ...")
        r = _eval(args)
        r.update(out_bits=ob, headroom=hr, args=args, delta_pct=_pct(r["perplexity"], r["float_perplexity"]))
        sweep.append(r)
    sweep_table = markdown_table(
        ["outputs", "headroom", "accelerator-exact", "top-1", "saturated", "command"],
        [[f"SF{r['out_bits']}", f"{r['headroom']:g}x", f"{r['perplexity']:.3f} ({r['delta_pct']:+.2f} %)",
          f"{100 * r['top1_agreement']:.1f} %", f"{r['saturated']} / {r['outputs']}",
          "`sfx eval " + " ".join(r["args"]) + "`"] for r in sweep])
    _plot(rows, out_dir / "accelerator.png")
    setup = (f"Model `{model}`; held-out Shakespeare test plays, the first {base[base.index('--max-tokens') + 1]} "
             f"tokens, context {base[base.index('--context') + 1]}, disjoint windows (the `sfx eval` protocol of "
             f"docs/wasq.md); float perplexity **{fpv:.3f}** on these tokens. Methods and static output exponents "
             f"calibrate on the first {base[base.index('--calib-tokens') + 1] if '--calib-tokens' in base else 2048} "
             f"tokens of the training plays. Outputs are SF16 with the 4x "
             f"headroom rule unless the row says otherwise (docs/accelerator-exact.md). Top-1 agreement: share of "
             f"scored positions whose argmax equals the float model's. Saturated: output codes that saturated in "
             f"the accelerator-exact pass, of all output codes. Times: the fake-quantized and the "
             f"accelerator-exact pass of the same run (the float pass excluded), back to back, in CPU seconds "
             f"of the process (what the target is judged on: other jobs on a shared machine stretch the wall "
             f"clock of one pass and not the other) and in wall seconds, "
             f"{'torch threads: ' + str(_threads())}. "
             + ("**Quick smoke run: numbers mean nothing.**" if quick else
                "smollm2-135m's 'float' weights are the GGUF's dequantized Q4_1."))
    sections = [("Setup", setup), ("Targets", "\n".join(summary)),
                ("Perplexity: fake quantization against what the accelerator computes",
                 markdown_table(["configuration", "fake", "fake top-1", "accelerator-exact", "accelerator top-1",
                                 "saturated", "out bits", "CPU time fake / accel", "wall time fake / accel",
                                 "target met", "command"], table)
                 + "\n\n![fake vs accelerator-exact](accelerator.png)"),
                ("Static output exponents: output width and headroom (W8A8, vanilla)",
                 "Each layer's output exponent per channel is the smallest power of two that holds headroom x "
                 "the largest output seen on the calibration text; the default is 4x for outputs of 12 bits and "
                 "more, 1x below (`superfloat.sw.wasq.accelerator.default_headroom`).\n\n" + sweep_table),
                ("Run time", f"{(time.perf_counter() - t_start) / 60:.1f} min for the {len(rows) + len(sweep)} "
                             f"evaluations.")]
    data = {"model": model, "quick": quick, "float_perplexity": fpv, "rows": rows, "output_rule": sweep}
    write_report(out_dir, "accelerator", "Accelerator-exact perplexity of SmolLM2-135M", sections, data,
                 command="sfx bench accel" + (" --quick" if quick else ""))
    return data


def _threads() -> int:
    import torch

    return torch.get_num_threads()
