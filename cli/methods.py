"""``sfx methods`` and ``sfx clip-analysis``: the post-training methods (``docs/ptq-methods.md``).

Quantizing and evaluating with a method is ``sfx quantize`` / ``sfx eval --method M``
(one path for every method). These two commands do what only they do::

    sfx methods                          # the methods, and which are hardware-executable
    sfx clip-analysis -a 8 4             # activation clipping analysis, every strategy

Both print one JSON object with ``--json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

from superfloat.cli.argtypes import int_range, positive_int, sfx_bits
from superfloat.cli.wasq import _load, _run, load_ids

__all__ = ["register", "clip_strategies", "run_clip_analysis"]


def _ppl(model, ids, context: int, pad: int) -> float:
    from superfloat.sw.wasq.evaluate import perplexity

    return perplexity(model, ids, context=context, pad_token_id=pad, progress=False).perplexity


def _emit(args, out: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print("\n".join(lines))


# --------------------------------------------------------------------------- commands


def cmd_methods(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq import WASQConfig
    from superfloat.sw.wasq.ptq.config import METHODS

    rows = []
    for name, (desc, _, _) in METHODS.items():
        cfg = WASQConfig(method=name, weight_bits=4, act_bits=4)
        rows.append({"method": name, "description": desc, "hardware_executable_sfx": cfg.hardware_executable,
                     "notes": cfg.hardware_notes()})
    lines = [f"{'method':14s} {'W4A4 SFx on the accelerator':28s} description"]
    for r in rows:
        hw = "yes" if r["hardware_executable_sfx"] else "no (software only)"
        lines.append(f"{r['method']:14s} {hw:28s} {r['description']}")
        for n in r["notes"]:
            lines.append(f"{'':14s} {'':28s} needs {n}")
    lines.append("Integer codes (--codes int/int_asym) are baselines: software only. "
                 "Use a method with: sfx quantize/eval --method M")
    _emit(args, {"methods": rows}, lines)
    return 0


def clip_strategies() -> list[str]:
    return ["dynamic", "raw", "max", "sigma", "percentile", "mse", "float+-1"]


def run_clip_analysis(lm, ids, batches, act_bits_list, codes_list, context: int, *, weight_bits: int = 16,
                      search_tokens: int = 256, strategies: list[str] | None = None, progress: bool = False,
                      calib=None):
    """Perplexity of every activation clipping strategy (weights at ``weight_bits``, 16 = ~float).

    Returns rows ``{act_bits, codes, strategy, perplexity, hardware_executable}`` plus the
    float clamp at +-1 (no quantization) once."""
    from superfloat.sw.wasq import WASQConfig, quantize_, quantize_report
    from superfloat.sw.wasq.ptq.calib import Calibration
    from superfloat.sw.wasq.ptq.clipping import float_clip
    from superfloat.sw.wasq.quantize import candidate_layers

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    base = lm.model
    names = list(candidate_layers(base, WASQConfig()))
    calib = calib if calib is not None else Calibration.collect(base, batches, names)
    strategies = strategies or clip_strategies()
    rows = []
    if "float+-1" in strategies:
        hs = float_clip(base, names, 1.0)
        try:
            rows.append({"act_bits": None, "codes": "float", "strategy": "float+-1",
                         "perplexity": _ppl(base, ids, context, pad), "hardware_executable": False})
        finally:
            for h in hs:
                h.remove()
    for a in act_bits_list:
        for codes in codes_list:
            for strat in strategies:
                if strat == "float+-1":
                    continue
                m = copy.deepcopy(base)
                kw = {"weight_bits": weight_bits, "act_bits": a, "codes": codes}
                if strat != "dynamic":
                    kw.update(method="clip", act_exponent="static", method_options={"act_clip": strat},
                              act_scale="float" if codes == "sfx" else "pow2")
                cfg = WASQConfig(**kw)
                t0 = time.perf_counter()
                quantize_(m, cfg, calibration=calib, search_tokens=search_tokens)
                rep = quantize_report(m)
                layers_info = rep.layers.values() if rep is not None else []
                ppl = _ppl(m, ids, context, pad)
                params = sorted({v.get("act", {}).get("param") for v in layers_info} - {None})
                rows.append({"act_bits": a, "codes": codes, "strategy": strat, "perplexity": ppl,
                             "hardware_executable": cfg.hardware_executable, "params": params[:8],
                             "seconds": round(time.perf_counter() - t0, 1)})
                if progress:
                    print(f"[clip] A{a} {codes} {strat}: {ppl:.3f}", file=sys.stderr, flush=True)
                if codes == "sfx" and strat not in ("dynamic", "raw"):  # also the power-of-two exponent version
                    m = copy.deepcopy(base)
                    cfg = WASQConfig(**{**kw, "act_scale": "pow2"})
                    quantize_(m, cfg, calibration=calib, search_tokens=search_tokens)
                    rows.append({"act_bits": a, "codes": codes, "strategy": strat + " (pow2)",
                                 "perplexity": _ppl(m, ids, context, pad), "hardware_executable": True,
                                 "params": [], "seconds": None})
    return rows


def cmd_clip(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.data import calibration_batches

    lm = _load(args.model)
    ids = load_ids(args, lm.tokenizer, max_tokens=args.max_tokens)
    cal = load_ids(args, lm.tokenizer, data=args.calib_data or args.data, split="train", max_tokens=args.calib_tokens)
    batches = list(calibration_batches(cal, args.context, args.calib_tokens))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    fp = _ppl(lm.model, ids, args.context, pad)
    codes = [args.codes] if args.codes != "both" else ["sfx", "int"]
    rows = run_clip_analysis(lm, ids, batches, args.act_bits, codes, args.context, weight_bits=args.weight_bits,
                             search_tokens=args.search_tokens, strategies=args.strategies, progress=args.progress)
    lines = [f"float: perplexity {fp:.4f} ({ids.numel() - 1} tokens); weights at {args.weight_bits} bits",
             f"{'act':6s} {'codes':6s} {'strategy':18s} perplexity"]
    for r in rows:
        a = "float" if r["act_bits"] is None else f"A{r['act_bits']}"
        lines.append(f"{a:6s} {r['codes']:6s} {r['strategy']:18s} {r['perplexity']:.4f}")
    _emit(args, {"model": args.model, "float_perplexity": fp, "weight_bits": args.weight_bits, "rows": rows,
                 "note": lm.note}, lines)
    return 0


# --------------------------------------------------------------------------- registration


def register(sub) -> None:
    q = sub.add_parser("methods", help="list the post-training methods and which W4A4 configurations the "
                                       "accelerator executes (use one with sfx quantize/eval --method M)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_run(cmd_methods))

    q = sub.add_parser("clip-analysis", help="activation clipping analysis: perplexity of every static clipping "
                                             "strategy (docs/ptq-methods.md)")
    q.add_argument("--model", "-m", default="smollm2-135m",
                   help="smollm2-135m (offline; its 'float' weights are dequantized Q4_1), tiny-llama/tiny-opt/"
                        "tiny-gpt2, a local model directory or a hub id (default: smollm2-135m)")
    q.add_argument("--data", "-d", default="shakespeare", help="evaluation/calibration text (default: shakespeare)")
    q.add_argument("--split", default=None, help="evaluation split (default: test; all for a text file)")
    q.add_argument("--context", type=positive_int, default=512, help="window length (default 512)")
    q.add_argument("--max-tokens", type=int_range(2, None), default=4096, help="evaluation tokens (default 4096)")
    q.add_argument("--calib-data", default=None, help="calibration text (default: --data, train split)")
    q.add_argument("--calib-tokens", type=positive_int, default=2048, help="calibration tokens (default 2048)")
    q.add_argument("--search-tokens", type=positive_int, default=256, help="tokens of the range searches (default 256)")
    q.add_argument("--codes", default="both", choices=("sfx", "int", "int_asym", "both"),
                   help="codes to analyse (default: both sfx and int)")
    q.add_argument("--act-bits", "-a", type=sfx_bits, nargs="+", default=[8, 4], help="activation widths (default 8 4)")
    q.add_argument("--weight-bits", "-w", type=sfx_bits, default=16,
                   help="weight bits (default 16: effectively float, so that only the activations differ)")
    q.add_argument("--strategies", nargs="+", default=None, choices=clip_strategies(),
                   help="strategies (default: all)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--progress", action="store_true", help="progress messages on stderr")
    q.set_defaults(func=_run(cmd_clip))
