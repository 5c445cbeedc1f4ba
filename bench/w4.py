"""``sfx bench w4``: 4-bit weights on the accelerator, accelerator-exact (writes ``results/w4.md``).

SmolLM2-135M (its "float" weights are the GGUF's dequantized Q4_1, groups of 32: every
number is relative to an already 4-bit model), held-out Shakespeare test plays, context
512, methods calibrated on the training plays. Every row is one
``sfx eval ... --backend both --no-baseline --json`` (command printed beside it): the
configuration fake-quantized and then accelerator-exact (SPEC section 8: activation codes
streamed per token, exact integer LINEAR, the 16-bit per-lane multiplier, per-token
``xmult`` where the row says so, requantization to SF16 outputs with static output
exponents) on the same tokens. The float perplexity of these tokens comes from one
``sfx eval`` of the float model (the first row), so the rows skip their own float pass
(``--no-baseline``: same tokens, same float model, a third of each row's time saved).

The method's run time (the PTQ passes: rotation, calibration capture, searches, GPTQ) is the
``method_seconds["total"]`` that the row's ``sfx eval --json`` reports, and the row's wall and CPU
seconds are beside it (the machine is shared: wall above CPU means others were running).

Rows are appended to ``build/w4_partial.json`` as they finish; a rerun with the same
settings resumes from there (``--fresh``-like behaviour: delete the file).

Targets (issue 15): W4A16 <= +15 % of float, W4A8 <= +20 %, W4A4 <= +100 %.

``SFX_BENCH_W4_ROWS="20-22"`` runs some rows only (1-based, as in :data:`ROWS`); the report
names the rows left out and the command carries the setting.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from superfloat.bench import Partial, logger, sfx_json

__all__ = ["run", "ROWS", "TARGETS"]

MODEL = "smollm2-135m"
TARGETS = {16: 15.0, 8: 20.0, 4: 100.0}  # activation bits -> largest perplexity increase over float (%)
_XM = ["--act-scale", "float"]
_BEST = ["--method", "rotate-gptq-clip", "--gptq-damp", "0.05", "--calib-tokens", "4096"]
#: (activation bits, method label, extra ``sfx eval`` arguments); weights SF4 with float per-channel scales
ROWS: list[tuple[int, str, list[str]]] = [
    (16, "rtn", []),
    (16, "awq", ["--method", "awq"]),
    (16, "adaround", ["--method", "adaround"]),
    (16, "gptq", ["--method", "gptq"]),
    (16, "rotate-gptq", ["--method", "rotate-gptq"]),
    (8, "rtn", []),
    (8, "awq", ["--method", "awq"]),
    (8, "adaround", ["--method", "adaround"]),
    (8, "gptq", ["--method", "gptq"]),
    (8, "rotate-gptq", ["--method", "rotate-gptq"]),
    (8, "rotate-gptq, xmult", ["--method", "rotate-gptq", *_XM]),
    (4, "rtn", []),
    (4, "awq", ["--method", "awq"]),
    (4, "adaround", ["--method", "adaround"]),
    (4, "gptq", ["--method", "gptq"]),
    (4, "rotate", ["--method", "rotate"]),
    (4, "rotate-gptq", ["--method", "rotate-gptq"]),
    (4, "rotate, xmult", ["--method", "rotate", *_XM]),
    (4, "rotate-gptq, xmult", ["--method", "rotate-gptq", *_XM]),
    # the best recipe of the 1024-token prototype: weight-MSE clip, damping 0.05, 4096 calibration tokens
    (16, "rotate-gptq-clip, damp 0.05, 4096 calib", _BEST),
    (8, "rotate-gptq-clip, damp 0.05, 4096 calib", _BEST),
    (4, "rotate-gptq-clip, damp 0.05, 4096 calib, xmult", [*_BEST, *_XM]),
    # activation clipping: each token's scale 0.8 of its max (2048-token screening: 0.65-1.0 -> 0.8)
    (4, "rotate-gptq-clip, damp 0.05, 4096 calib, xmult, act clip 0.8", [*_BEST, *_XM, "--act-clip-ratio", "0.8"]),
]
QUICK_ROWS = [ROWS[0], ROWS[3], ROWS[16], ROWS[18]]
#: a subset of :data:`ROWS`: ``SFX_BENCH_W4_ROWS="20-22"`` (1-based numbers and ranges, comma-separated)
ROWS_ENV = "SFX_BENCH_W4_ROWS"


def select_rows(spec: str | None) -> list[int]:
    """0-based indices of :data:`ROWS` chosen by ``spec`` (:data:`ROWS_ENV`'s syntax; None or
    empty: every row), in table order."""
    if not spec or not spec.strip():
        return list(range(len(ROWS)))
    chosen = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{ROWS_ENV}={spec!r}: {part.strip()!r} is not a row number or a range "
                             f"such as 20-22 (rows 1..{len(ROWS)})") from None
        if not 1 <= a <= b <= len(ROWS):
            raise ValueError(f"{ROWS_ENV}={spec!r}: rows are 1..{len(ROWS)}, got {part.strip()!r}")
        chosen.update(range(a - 1, b))
    return sorted(chosen)


_log = logger("w4")


def _pct(ppl: float, ref: float) -> float:
    return 100.0 * (ppl / ref - 1.0)


def _fmt_ppl(p: float, ref: float) -> str:
    return f"{p:.2f} ({_pct(p, ref):+.1f} %)" if p < 1e4 else f"{p:.3g} ({_pct(p, ref):+.3g} %)"


def _plot(rows: list[dict[str, Any]], fpv: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=False)
    for ax, a in zip(axes, (16, 8, 4)):
        rs = [r for r in rows if r["act_bits"] == a]
        y = range(len(rs))
        ax.barh([i + 0.2 for i in y], [max(_pct(r["fake"]["perplexity"], fpv), 0.1) for r in rs], height=0.4,
                label="fake quantization")
        ax.barh([i - 0.2 for i in y], [max(_pct(r["perplexity"], fpv), 0.1) for r in rs], height=0.4,
                label="accelerator-exact")
        ax.set_yticks(list(y), [r["method"] for r in rs])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(TARGETS[a], color="grey", lw=0.8, ls="--")
        ax.set_title(f"W4A{a} (target +{TARGETS[a]:g} %)")
        ax.set_xlabel("perplexity vs float (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path | str, quick: bool = False, *, model: str | None = None,
        partial: Path | str | None = None) -> dict[str, Any]:
    from superfloat.bench import markdown_table, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model or ("tiny-llama" if quick else MODEL)
    base = ["--model", model, "--data", "shakespeare", "--split", "test"]
    base += (["--context", "64", "--max-tokens", "256", "--calib-tokens", "256", "--search-tokens", "64",
              "--adaround-iters", "5", "--awq-grid", "4"] if quick else ["--context", "512", "--max-tokens", "8192"])
    spec = None if quick else os.environ.get(ROWS_ENV)
    picked = select_rows(spec)
    rows_def = QUICK_ROWS if quick else [ROWS[i] for i in picked]
    part = Partial(partial if partial is not None else (None if quick else Path("build") / "w4_partial.json"), base,
                   _log)  # finished rows, kept as they finish
    done, keep = part.rows, part.keep
    t_start = time.perf_counter()

    if "float" not in done:
        _log("float model ...")
        t0, c0 = time.perf_counter(), time.process_time()
        r = sfx_json("eval", base)
        r.update(args=list(base), wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
        keep("float", r)
    fpv = done["float"]["perplexity"]
    rows = []
    resumed = 0
    for a, label, extra in rows_def:
        args = base + ["-w", "4", "-a", str(a), *extra, "--backend", "both", "--no-baseline"]
        key = " ".join(args)
        if key not in done:
            _log(f"W4A{a} {label} ...")
            t0, c0 = time.perf_counter(), time.process_time()
            r = sfx_json("eval", args)  # its method_seconds: the PTQ passes' time (None for round to nearest)
            r.update(args=args, wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
            keep(key, r)
            resumed -= 1
            _log(f"  fake {r['fake']['perplexity']:.3f}, accelerator {r['perplexity']:.3f} (float {fpv:.3f}), "
                 f"{r['wall_s']:.0f} s")
        resumed += 1
        r = dict(done[key], act_bits=a, method=label)
        r["delta_pct"] = _pct(r["perplexity"], fpv)
        r["fake_delta_pct"] = _pct(r["fake"]["perplexity"], fpv)
        r["met"] = r["delta_pct"] <= TARGETS[a]
        rows.append(r)

    table = []
    for r in rows:
        ms = r["method_seconds"]
        table.append([f"W4A{r['act_bits']}", r["method"], _fmt_ppl(r["fake"]["perplexity"], fpv),
                      f"**{_fmt_ppl(r['perplexity'], fpv)}**", f"{r['saturated']} / {r['outputs']}",
                      "-" if not ms else f"{ms['total']:.0f} s", f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} s",
                      "yes" if r["met"] else "no", "`sfx eval " + " ".join(r["args"]) + "`"])
    summary = []
    for a, limit in TARGETS.items():
        cands = [r for r in rows if r["act_bits"] == a]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["perplexity"])
        summary.append(f"* W4A{a} <= +{limit:g} % of float: best **{best['method']}**, accelerator-exact "
                       f"{_fmt_ppl(best['perplexity'], fpv)} (fake {_fmt_ppl(best['fake']['perplexity'], fpv)}): "
                       f"{'met' if best['met'] else '**missed**'}.")
    _plot(rows, fpv, out_dir / "w4.png")
    fl = done["float"]
    setup = (f"Model `{model}`" + ("" if quick else " (its 'float' weights are the GGUF's dequantized Q4_1, groups "
                                   "of 32: every number is relative to an already 4-bit model)")
             + f"; held-out Shakespeare test plays, the first {base[base.index('--max-tokens') + 1]} tokens, "
             f"context {base[base.index('--context') + 1]}, disjoint windows; float perplexity **{fpv:.3f}** "
             f"(`sfx eval {' '.join(fl['args'])}`, {fl['tokens']} scored tokens). Weights SF4 with a float scale "
             f"per output channel (the accelerator's per-lane multiplier); activations SF16 (W4A16), SF8 or SF4, "
             f"one power-of-two exponent per token, or with `--act-scale float` a float scale per token (the "
             f"accelerator's per-row multiplier `xmult`, SPEC revision 2: 'xmult' rows). Outputs SF16 with "
             f"static output exponents (4x headroom), calibrated, like the methods, on the first "
             f"{base[base.index('--calib-tokens') + 1] if '--calib-tokens' in base else 2048} tokens of the "
             f"training plays. Rotations: residual stream, value/output heads and the down_proj input "
             f"(randomized Hadamards; the down_proj input rotation is a float op on the host, every linear "
             f"layer runs on the accelerator; docs/ptq-methods.md). 'saturated': output codes that saturated in "
             f"the accelerator-exact pass. 'method': the PTQ passes' time (rotation, calibration capture, "
             f"searches, GPTQ); 'row wall / CPU': the whole `sfx eval` (model load, method, output "
             f"calibration, both passes) in wall and CPU seconds of this process; torch threads "
             f"{_threads()}." + (" **Quick smoke run: numbers mean nothing.**" if quick else ""))
    if len(rows_def) < len(ROWS) and not quick:
        left = [f"W4A{a} {label}" for i, (a, label, _) in enumerate(ROWS) if i not in picked]
        summary.append(f"* Rows run: {len(rows_def)} of {len(ROWS)} ({ROWS_ENV}={spec}); not run: "
                       + "; ".join(left) + ".")
    sections = [("Setup", setup), ("Targets (accelerator-exact)", "\n".join(summary)),
                ("Perplexity: fake quantization and what the accelerator computes",
                 markdown_table(["config", "method", "fake", "accelerator-exact", "saturated", "method", "row wall / CPU",
                                 "target met", "command"], table) + "\n\n![W4 methods](w4.png)"),
                ("Run time", f"{(time.perf_counter() - t_start) / 60:.1f} min for the rows run now "
                             f"({len(rows)} rows, {resumed} of them resumed from an earlier run of the same settings).")]
    data = {"model": model, "quick": quick, "float_perplexity": fpv, "float": fl, "rows": rows, "targets": TARGETS}
    write_report(out_dir, "w4", "4-bit weights on the accelerator: GPTQ, rotations, per-token scales", sections, data,
                 command=(f"{ROWS_ENV}={spec} " if spec and not quick else "") + "sfx bench w4"
                 + (" --quick" if quick else ""))
    return data


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1] if len(sys.argv) > 1 else "results", quick="--quick" in sys.argv)
