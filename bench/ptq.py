"""``sfx bench ptq``: the W4A4 study's methods on SFx and on integer codes -> ``results/ptq_methods.md``.

Model SmolLM2-135M (offline; its "float" weights are the GGUF's dequantized Q4_1, so
every number is relative to an already 4-bit model), held-out Shakespeare test plays
(Hamlet, Macbeth, The Tempest, Twelfth Night; the first ``EVAL_TOKENS`` tokens),
context 512, calibration on the first ``CALIB_TOKENS`` tokens of the training plays.
One calibration pass of the float model serves every configuration (SmoothQuant and
AWQ keep the float function, so the captured inputs are rescaled, not recaptured).

For every method and each of W4A16, W4A8, W4A4, W8A8, with SFx codes and with integer
codes: perplexity, the real bytes of the packed file (:func:`save_packed`), bits per
quantized weight (codes + scales), and whether the SFx accelerator executes it. Then the
activation clipping analysis (weights at 16 bits, so that only the activations differ),
and a PNG of perplexity against bits.

``quick`` runs the same pipeline on tiny-llama with a few hundred tokens (a smoke test).
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from superfloat.bench import logger

__all__ = ["run", "CONFIGS", "METHOD_ORDER", "BUDGET"]

CONFIGS = ((4, None), (4, 8), (4, 4), (8, 8))  # (weight bits, activation bits)
METHOD_ORDER = ("rtn", "smoothquant", "awq", "awq-dyngroup", "clip", "mixed", "adaround", "asym", "sq-awq-mixed")
SFX_ONLY = ("sq-awq-mixed",)  # the combination, on SFx codes only (time budget)
#: token budget (full run, quick run)
BUDGET = {
    False: {"model": "smollm2-135m", "calib_tokens": 2048, "eval_tokens": 4096, "context": 512, "search_tokens": 256,
            "awq_grid": 10, "adaround_iters": 60, "clip_eval_tokens": 2048},
    True: {"model": "tiny-llama", "calib_tokens": 256, "eval_tokens": 384, "context": 128, "search_tokens": 64,
           "awq_grid": 3, "adaround_iters": 5, "clip_eval_tokens": 256},
}


def _hardware_short(cfg) -> str:
    """``"yes"`` or ``"no: ..."`` in a few words (for tables)."""
    parts = {"int": ["integer codes"], "int_asym": ["zero points"]}.get(cfg.codes, [])
    if cfg.group_size is not None:
        parts.append("groups along K")
    return "yes" if not parts else "no: " + ", ".join(parts)


def _label(w: int, a: int | None) -> str:
    return f"W{w}A{a or 16}"


def _cli_method(method: str) -> str:
    """The ``--method`` spelling of a method: round to nearest is ``vanilla`` on the command line
    (with ``--codes int`` it is the integer baseline)."""
    return "vanilla" if method == "rtn" else method


def _eval_cmd(method: str, w: int, a: int | None, codes: str, b: dict[str, Any]) -> str:
    return (f"sfx eval -m {b['model']} --method {_cli_method(method)} -w {w}" + (f" -a {a}" if a else "") +
            f" --codes {codes} --max-tokens {b['eval_tokens']} --calib-tokens {b['calib_tokens']} "
            f"--context {b['context']} --awq-grid {b['awq_grid']} --adaround-iters {b['adaround_iters']}")


def run(out_dir: Path | str, quick: bool = False) -> None:
    import torch

    from superfloat.bench import write_report
    from superfloat.cli.methods import _ppl, run_clip_analysis
    from superfloat.sw.wasq.config import WASQConfig
    from superfloat.sw.wasq.data import calibration_batches, load_text, tokenize
    from superfloat.sw.wasq.models import load_model
    from superfloat.sw.wasq.packing import float_bytes, memory_report, save_packed
    from superfloat.sw.wasq.ptq import Calibration
    from superfloat.sw.wasq.quantize import candidate_layers, quantize_, quantize_report

    b = BUDGET[bool(quick)]
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    partial = Path("build") / "ptq_bench_partial.json"  # progress, in case a long run is interrupted
    out_dir = Path(out_dir)
    lm = load_model(b["model"], progress=False)
    base, tok = lm.model, lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = tokenize(tok, load_text("shakespeare", "test"), b["eval_tokens"])
    cal_ids = tokenize(tok, load_text("shakespeare", "train"), b["calib_tokens"])
    batches = list(calibration_batches(cal_ids, b["context"], b["calib_tokens"]))
    t0 = time.perf_counter()
    calib = Calibration.collect(base, batches, list(candidate_layers(base, WASQConfig())))
    t_calib = time.perf_counter() - t0
    fp = _ppl(base, ids, b["context"], pad)
    f_bytes = float_bytes(base)
    _say(f"float perplexity {fp:.3f}, calibration {t_calib:.1f} s")

    rows: list[dict[str, Any]] = []
    cache: dict = {}  # the same clip-searched / AdaRound weights serve W4A16, W4A8 and W4A4
    for method in METHOD_ORDER:
        for w, a in CONFIGS:
            for codes in (("int_asym",) if method == "asym" else ("sfx",) if method in SFX_ONLY else ("sfx", "int")):
                if method == "clip" and a is None:
                    continue  # clipping acts on activations only: W4A16 is the rtn row
                cfg = WASQConfig(method=method, weight_bits=w, act_bits=a, codes=codes,
                                 method_options={"awq_grid": b["awq_grid"], "adaround_iters": b["adaround_iters"]})
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                try:
                    quantize_(m, cfg, calibration=calib, search_tokens=b["search_tokens"],
                                  weight_cache=cache if method == "adaround" else None)
                    rep = quantize_report(m)
                    tq = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ppl = _ppl(m, ids, b["context"], pad)
                    te = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - record it, keep the other configurations
                    _say(f"{method} {codes} {_label(w, a)} FAILED: {type(e).__name__}: {e}")
                    rows.append({"method": method, "codes": codes, "weight_bits": w, "act_bits": a,
                                 "config": _label(w, a), "error": f"{type(e).__name__}: {e}"})
                    continue
                mem = memory_report(m)
                with tempfile.TemporaryDirectory(prefix="ptq-bench-") as d:
                    packed = save_packed(m, Path(d) / "m.safetensors")
                layers_info = rep.layers if rep is not None else {}
                hb = sum(1 for v in layers_info.values() if v.get("bits", w) > w)
                rows.append({"method": method, "codes": codes, "weight_bits": w, "act_bits": a,
                             "config": _label(w, a), "perplexity": ppl, "delta_pct": 100 * (ppl / fp - 1),
                             "packed_file_bytes": packed["file_bytes"], "quantized_bytes": packed["quantized_bytes"],
                             "bits_per_weight": mem["bits_per_weight"], "hardware_executable": cfg.hardware_executable,
                             "hardware_notes": cfg.hardware_notes(), "hardware": _hardware_short(cfg),
                             "quantize_seconds": round(tq, 1),
                             "eval_seconds": round(te, 1), "layers_high_bits": hb,
                             "notes": rep.notes if rep is not None else [],
                             "ranking": rep.ranking if rep is not None else None,
                             "stage_seconds": {k: round(v, 1) for k, v in (rep.seconds if rep is not None else {}).items()},
                             "command": _eval_cmd(method, w, a, codes, b)})
                _say(f"{method:13s} {codes:8s} {_label(w, a)}: {ppl:10.3f} ({tq:.0f} s + {te:.0f} s)")
                del m
                if not quick:
                    partial.parent.mkdir(exist_ok=True)
                    partial.write_text(json.dumps({"float": fp, "rows": rows}, indent=1, default=str))

    t0 = time.perf_counter()
    clip_ids = ids[: b["clip_eval_tokens"]]
    clip_rows = run_clip_analysis(lm, clip_ids, batches, [8, 4], ["sfx", "int"], b["context"], weight_bits=16,
                                  search_tokens=b["search_tokens"], calib=calib)
    clip_fp = _ppl(base, clip_ids, b["context"], pad)
    t_clip = time.perf_counter() - t0
    _say(f"clipping analysis {t_clip:.0f} s")

    png = out_dir / "ptq_methods.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, fp, png, b)
    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    sections = _sections(rows, clip_rows, fp, clip_fp, f_bytes, b, lm.note, t_calib, t_clip, seconds, png.name, quick,
                         cpu, failed)
    data = {"budget": b, "float_perplexity": fp, "float_bytes": f_bytes, "rows": rows, "clip_rows": clip_rows,
            "clip_float_perplexity": clip_fp, "seconds": seconds, "cpu_seconds": cpu, "note": lm.note,
            "threads": torch.get_num_threads(), "failed": failed}
    write_report(out_dir, "ptq_methods", "PTQ methods of the W4A4 study on SFx and integer codes", sections, data,
                 "sfx bench ptq" + (" --quick" if quick else ""))


_say = logger("ptq")


def _fmt_ppl(p: float) -> str:
    if not math.isfinite(p):
        return "inf"
    return f"{p:.2f}" if p < 1000 else f"{p:.3g}"


def _sections(rows, clip_rows, fp, clip_fp, f_bytes, b, note, t_calib, t_clip, seconds, png, quick, cpu=0.0,
              failed=()):
    from superfloat.bench import markdown_table

    cfgs = [_label(w, a) for w, a in CONFIGS]
    by = {(r["method"], r["codes"], r["config"]): r for r in rows}
    keys = []
    for r in rows:
        k = (r["method"], r["codes"])
        if k not in keys:
            keys.append(k)

    def pivot(cell, tail) -> list[list[str]]:
        """A row per (method, codes): ``cell(row or None)`` per configuration, then ``tail(W4A4 row or None)``."""
        return [[meth, codes, *(cell(by.get((meth, codes, c))) for c in cfgs), *tail(by.get((meth, codes, "W4A4")))]
                for meth, codes in keys]

    # perplexity pivot
    head = ["method", "codes", *cfgs, "W4A4 on the SFx accelerator"]
    body = pivot(lambda r: "(= rtn)" if r is None else f"{_fmt_ppl(r['perplexity'])} ({r['delta_pct']:+.0f} %)",
                 lambda r4: [r4["hardware"] if r4 else ""])
    main = (f"Float (as loaded): perplexity **{fp:.2f}** over {b['eval_tokens'] - 1} scored tokens, "
            f"{f_bytes / 1e6:.1f} MB (fp32).\n\n" + markdown_table(head, body) +
            "\n\nEach cell: `" + _eval_cmd("METHOD", 4, 4, "CODES", b).replace(" -w 4 -a 4", " -w W [-a A]") + "`."
            " The `clip` method has no W4A16 row: it acts on activations only. `mixed` at W8A8 promotes nothing "
            "(already at the high width).")
    # size pivot
    head2 = ["method", "codes", *[f"{c} MB" for c in cfgs], "W4A4 quantized layers MB", "W4A4 bits/weight"]
    body2 = pivot(lambda r: "" if r is None else f"{r['packed_file_bytes'] / 1e6:.1f}",
                  lambda r4: [f"{r4['quantized_bytes'] / 1e6:.1f}", f"{r4['bits_per_weight']:.2f}"] if r4 else ["", ""])
    size = ("Real bytes of the packed file (`save_packed`: codes bit-packed at their width, scales/zero points/"
            "exponents as stored, biases, and every unquantized tensor -- embeddings, norms -- in fp32), in MB "
            f"(10^6 bytes); the float model is {f_bytes / 1e6:.1f} MB. Everything that is not a quantized layer "
            f"(mostly the tied fp32 embedding) takes {_emb_mb(rows, f_bytes):.1f} MB and dominates at 4 bits. "
            "'quantized layers MB' = packed codes + scales + biases of the quantized layers; bits/weight = codes "
            "plus scales per quantized weight. Activation bits do not change the weights, except where mixed "
            "precision promotes layers.\n\n" + markdown_table(head2, body2) +
            f"\n\nCommand: `sfx quantize -m {b['model']} --method M -w W --codes C --packed FILE` writes the "
            "same file.")
    # clipping
    head3 = ["activations", "codes", "strategy", "perplexity", "vs float", "on the accelerator"]
    body3 = []
    for r in clip_rows:
        a = "float" if r["act_bits"] is None else f"A{r['act_bits']}"
        body3.append([a, r["codes"], r["strategy"], _fmt_ppl(r["perplexity"]),
                      f"{100 * (r['perplexity'] / clip_fp - 1):+.0f} %", "yes" if r["hardware_executable"] else "no"])
    clip = (f"Weights at 16 bits (effectively float) so that only the activations differ; first "
            f"{b['clip_eval_tokens']} test tokens (float perplexity {clip_fp:.2f}). `dynamic` = one scale (SFx: a "
            "power-of-two exponent) per token, no static clipping. `raw` = the upstream static +-1 clamp: for SFx "
            "this is SFx **without exponents** (E = 0, saturation at 1 - 2^-M). `float+-1` clamps to +-1 without "
            "quantizing (the clip alone). `max`, `sigma` (mean +- k std), `percentile`, `mse` (fraction of the "
            "range) are static per-layer ranges, the parameter searched per layer on the layer's output error; "
            "SFx rows use a float per-tensor activation scale (folds into the per-lane multiplier), `(pow2)` rows a "
            "power-of-two exponent (the range snaps up to the next power of two).\n\n" +
            markdown_table(head3, body3) +
            f"\n\nCommand: `sfx clip-analysis -m {b['model']} -a 8 4 --max-tokens {b['clip_eval_tokens']} "
            f"--calib-tokens {b['calib_tokens']}`.")
    hw = ("* **Executable by the SFx accelerator** (SPEC section 5): SFx codes with one scale per output channel "
          "(float, through the per-lane multiplier, or a power-of-two exponent) and activations with one exponent "
          "per token (or one static scale per layer). SmoothQuant and AWQ scales are folded into the float model "
          "before quantization, clipping changes only values, and mixed precision stores SF4 codes that widen "
          "exactly to SF8 (magnitude << 4) on an accelerator generated for 8 bits: all executable.\n"
          "* **Software only**: per-group scales along K (`awq-dyngroup`; the accelerator applies scales per whole "
          "output channel), zero points (`asym`), and every integer-code row (baselines; integer per-token "
          "activation scales would need a multiplier per row).\n"
          "* `WASQConfig.hardware_executable` / `hardware_notes()` give the same answer in the API; "
          "`sfx quantize -o DIR` writes a WASQ checkpoint only for executable configurations.")
    setup = (f"* Model: {b['model']}. " + (f"**{note}.**" if note else "") + "\n"
             f"* Evaluation: held-out Shakespeare test plays (Hamlet, Macbeth, The Tempest, Twelfth Night), the "
             f"first {b['eval_tokens']} tokens, context {b['context']}, disjoint windows, every token scored once "
             f"(superfloat.sw.wasq.evaluate).\n"
             f"* Calibration: the first {b['calib_tokens']} tokens of the training plays, captured once "
             f"({t_calib:.0f} s); searches use {b['search_tokens']} evenly spaced tokens; AWQ grid {b['awq_grid']}, "
             f"AdaRound {b['adaround_iters']} Adam steps per layer (its weights do not depend on the "
             f"activation width: computed once per weight format and reused); mixed precision: top 5 % of layers "
             f"at 8 bits (weights and activations), ranked by {_rankings(rows)}. `sq-awq-mixed` (SmoothQuant, "
             f"then AWQ, then mixed precision) runs on SFx codes only.\n"
             f"* Token budget chosen so that the whole bench takes about 30-40 minutes on 2 idle cores (about "
             f"40 CPU-minutes). This run took {seconds / 60:.0f} min of wall time and {cpu / 60:.0f} CPU-minutes "
             f"of this process (clipping analysis {t_clip / 60:.0f} min); wall time above the CPU time means the "
             f"machine was shared. Timings per configuration are in `ptq_methods.json`.\n"
             f"* Plot: `{png}` (perplexity against activation bits for W4, and against packed size).\n"
             + ("* QUICK smoke run on a random tiny model: the numbers mean nothing.\n" if quick else "")
             + "".join(f"* FAILED: {r['method']} {r['codes']} {r['config']}: {r['error']}\n" for r in failed))
    return [("Setup", setup), ("Perplexity", main), ("Packed size", size), ("Hardware", hw),
            ("Activation clipping", clip)]


def _rankings(rows) -> str:
    r = sorted({x["ranking"] for x in rows if x.get("ranking")})
    names = {"analyze": "`sfx analyze`'s rel_error", "own": "each layer's own output error"}
    return " / ".join(names.get(x, x) for x in r) or "-"


def _emb_mb(rows, f_bytes) -> float:
    r = next((r for r in rows if r["method"] == "rtn" and r["codes"] == "sfx"), None)
    if r is None:
        return 0.0
    return (r["packed_file_bytes"] - r["quantized_bytes"]) / 1e6


def _plot(rows, fp, path: Path, b) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for i, meth in enumerate(methods):
        for codes, style in (("sfx", "-"), ("int", "--"), ("int_asym", ":")):
            pts = sorted(((r["act_bits"] or 16, r["perplexity"]) for r in rows
                          if r["method"] == meth and r["codes"] == codes and r["weight_bits"] == 4),
                         key=lambda p: p[0])
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=cmap(i % 10),
                         label=f"{meth} {codes}")
            pts2 = [(r["packed_file_bytes"] / 1e6, r["perplexity"]) for r in rows
                    if r["method"] == meth and r["codes"] == codes]
            if pts2:
                ax2.scatter([p[0] for p in pts2], [p[1] for p in pts2], color=cmap(i % 10),
                            marker={"sfx": "o", "int": "x", "int_asym": "^"}[codes], s=28)
    for ax in (ax1, ax2):
        ax.axhline(fp, color="k", lw=0.8, ls="-.", label="float (dequantized Q4_1)" if ax is ax1 else None)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylabel("perplexity (log)")
    ax1.set_xticks([4, 8, 16])
    ax1.set_xlabel("activation bits (weights: 4 bits)")
    ax1.set_title("W4: perplexity against activation bits (solid SFx, dashed int)")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("packed file size, MB (W4 left cluster, W8 right)")
    ax2.set_title("all configurations: perplexity against size (o SFx, x int, ^ asym)")
    fig.suptitle(f"{b['model']}, Shakespeare test, {b['eval_tokens']} tokens, context {b['context']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
