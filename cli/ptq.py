"""``sfx ptq``: the W4A4 study's post-training methods on SFx (``docs/ptq-methods.md``).

Subcommands::

    sfx ptq methods                                  # the methods, and which are hardware-executable
    sfx ptq eval --method awq -w 4 -a 4 --codes sfx  # perplexity (+ float baseline), packed size
    sfx ptq quantize --method awq -w 4 -a 8 -o DIR   # a WASQ checkpoint (hardware-executable configs)
    sfx ptq quantize --method awq-dyngroup -w 4 --packed FILE   # packed file, any config
    sfx ptq clip -a 8 4                              # activation clipping analysis, every strategy

Every command takes ``--codes sfx|int|int_asym`` (SFx codes or the integer baselines)
and prints one JSON object with ``--json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "build_config", "CLIError"]


class CLIError(Exception):
    """A user error: ``sfx ptq COMMAND: error: ...``, exit code 2."""


# --------------------------------------------------------------------------- arguments


def _add_common(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    from superfloat.sw.wasq.ptq.config import METHODS

    p.add_argument("--model", "-m", default="smollm2-135m",
                   help="smollm2-135m (offline; its 'float' weights are dequantized Q4_1), tiny-llama/tiny-opt/"
                        "tiny-gpt2, a local model directory or a hub id (default: smollm2-135m)")
    p.add_argument("--data", "-d", default="shakespeare",
                   help="evaluation/calibration text: shakespeare (offline, split by play), a text file, wikitext-2, "
                        "hf:NAME[:CONFIG] (default: shakespeare)")
    p.add_argument("--split", default=None, help="evaluation split (default: test; all for a text file)")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    p.add_argument("--calib-data", default=None, help="calibration text (default: --data, train split)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    p.add_argument("--search-tokens", type=int, default=256,
                   help="tokens used by the AWQ/clip/activation-range searches (default 256)")
    g = p.add_argument_group("quantization (PTQConfig)")
    if method:
        g.add_argument("--method", default="rtn", choices=list(METHODS),
                       help="PTQ method preset (default rtn); see 'sfx ptq methods'")
        g.add_argument("--weight-bits", "-w", type=int, default=4, help="weight bits (default 4)")
    g.add_argument("--codes", default="sfx", choices=("sfx", "int", "int_asym"),
                   help="SFx codes (default) or the integer baselines (symmetric, asymmetric)")
    if method:
        g.add_argument("--act-bits", "-a", type=int, default=None, help="activation bits (default: weight-only)")
        g.add_argument("--scale", dest="scale_kind", default="float", choices=("float", "pow2"),
                       help="SFx weight scales: float per row (hardware multiplier, default) or power of two")
        g.add_argument("--group-size", default=None,
                       help="per-group scales along K: an int or 'dynamic' (software only; default: per channel)")
        g.add_argument("--act-mode", default=None, choices=("dynamic", "static"),
                       help="activation ranges: per token (default) or static per layer")
        g.add_argument("--act-clip", default=None, choices=("max", "raw", "sigma", "percentile", "mse"),
                       help="static range strategy, searched per layer")
        g.add_argument("--act-scale", default=None, choices=("pow2", "float"), help="SFx static activation scale")
        g.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA", help="SmoothQuant alpha")
        g.add_argument("--awq-grid", type=int, default=None, help="AWQ alpha grid points (default 20)")
        g.add_argument("--adaround-iters", type=int, default=None, help="AdaRound Adam steps per layer (default 100)")
        g.add_argument("--mp-fraction", type=float, default=None, help="mixed precision: top fraction at high bits")
        g.add_argument("--mp-high-bits", type=int, default=None, help="mixed precision: the high width (default 8)")
        g.add_argument("--mp-ranking", default=None, choices=("own", "analyze", "auto"),
                       help="mixed precision ranking: own output error, sfx analyze's, or analyze when available")
        g.add_argument("--rounding", default=None, choices=("nearest_even", "toward_zero"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action="store_true", help="progress messages on stderr")


def build_config(args: argparse.Namespace):
    """The :class:`PTQConfig` the options ask for."""
    from superfloat.sw.wasq.ptq import PTQConfig

    kw: dict[str, Any] = {"weight_bits": args.weight_bits, "act_bits": args.act_bits, "codes": args.codes,
                          "scale_kind": args.scale_kind}
    if args.group_size is not None:
        gs = args.group_size
        if gs != "dynamic":
            try:
                gs = int(gs)
            except ValueError:
                raise CLIError(f"--group-size must be an int or 'dynamic', got {gs!r}") from None
        kw["group_size"] = gs
    for opt in ("act_mode", "act_clip", "act_scale", "smoothquant", "awq_grid", "adaround_iters", "mp_fraction",
                "mp_high_bits", "mp_ranking", "rounding"):
        v = getattr(args, opt)
        if v is not None:
            kw[opt] = v
    if args.method == "asym":
        kw["codes"] = "int_asym"
    try:
        return PTQConfig.preset(args.method, **kw)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def _load(spec: str):
    from superfloat.sw.wasq.models import load_model

    try:
        return load_model(spec, progress=False)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _ids(tokenizer, data: str, split: str | None, n: int):
    from superfloat.sw.wasq.data import load_text, tokenize

    if n is not None and n < 2:
        raise CLIError(f"token counts must be at least 2, got {n}")
    try:
        text = load_text(data, split)
    except ValueError as e:
        raise CLIError(str(e)) from None
    ids = tokenize(tokenizer, text, n)
    if ids.numel() < 2:
        raise CLIError(f"data {data!r} ({split or 'default split'}) has fewer than 2 tokens")
    return ids


def _calibration(args, lm, needs: bool):
    from superfloat.sw.wasq.data import calibration_batches

    if not needs:
        return None
    ids = _ids(lm.tokenizer, args.calib_data or args.data, "train" if not Path(args.calib_data or args.data)
               .is_file() else "all", args.calib_tokens)
    return list(calibration_batches(ids, args.context, args.calib_tokens))


def _quantize(args, lm, cfg):
    from superfloat.sw.wasq.ptq import ptq_quantize_

    batches = _calibration(args, lm, cfg.needs_calibration)
    try:
        return ptq_quantize_(lm.model, cfg, calibration=batches, search_tokens=args.search_tokens,
                             progress=args.progress)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _ppl(model, ids, context: int, pad: int) -> float:
    from superfloat.sw.wasq.evaluate import perplexity

    return perplexity(model, ids, context=context, pad_token_id=pad, progress=False).perplexity


def _packed_size(model) -> dict[str, int]:
    from superfloat.sw.wasq.ptq import save_packed

    with tempfile.TemporaryDirectory(prefix="sfx-ptq-") as d:
        return save_packed(model, Path(d) / "model.safetensors")


def _run(func):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CLIError as e:
            print(f"sfx ptq {args.ptq_command}: error: {e}", file=sys.stderr)
            return 2
    return wrapped


def _emit(args, out: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print("\n".join(lines))


# --------------------------------------------------------------------------- commands


def cmd_methods(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.ptq import PTQConfig
    from superfloat.sw.wasq.ptq.config import METHODS

    rows = []
    for name, (desc, _) in METHODS.items():
        codes = "int_asym" if name == "asym" else "sfx"
        cfg = PTQConfig.preset(name, weight_bits=4, act_bits=4, codes=codes)
        rows.append({"method": name, "description": desc, "hardware_executable_sfx": cfg.hardware_executable,
                     "notes": cfg.hardware_notes()})
    lines = [f"{'method':14s} {'W4A4 SFx on the accelerator':28s} description"]
    for r in rows:
        hw = "yes" if r["hardware_executable_sfx"] else "no (software only)"
        lines.append(f"{r['method']:14s} {hw:28s} {r['description']}")
        for n in r["notes"]:
            lines.append(f"{'':14s} {'':28s} needs {n}")
    lines.append("Integer codes (--codes int/int_asym) are baselines: software only.")
    _emit(args, {"methods": rows}, lines)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.ptq import float_bytes, memory_report

    cfg = build_config(args)
    lm = _load(args.model)
    if args.context < 1:
        raise CLIError(f"--context must be >= 1, got {args.context}")
    ids = _ids(lm.tokenizer, args.data, args.split, args.max_tokens)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out: dict[str, Any] = {"model": args.model, "data": args.data, "split": args.split or "test",
                           "context": args.context, "tokens": int(ids.numel()), "note": lm.note}
    lines = []
    if args.baseline:
        fp = _ppl(lm.model, ids, args.context, pad)
        out["float_perplexity"] = fp
        out["float_bytes"] = float_bytes(lm.model)
        lines.append(f"float: perplexity {fp:.4f}, {out['float_bytes'] / 1e6:.2f} MB (fp32 as loaded)")
    t0 = time.perf_counter()
    rep = _quantize(args, lm, cfg)
    tq = time.perf_counter() - t0
    ppl = _ppl(lm.model, ids, args.context, pad)
    mem = memory_report(lm.model)
    packed = _packed_size(lm.model)
    out.update({"method": cfg.method, "label": cfg.label(), "config": cfg.to_dict(), "perplexity": ppl,
                "hardware_executable": cfg.hardware_executable, "hardware_notes": cfg.hardware_notes(),
                "packed_file_bytes": packed["file_bytes"], "memory": mem, "quantize_seconds": round(tq, 2),
                "calib_tokens": rep.calib_tokens, "notes": rep.notes, "ranking": rep.ranking})
    hw = "yes" if cfg.hardware_executable else "no (" + "; ".join(cfg.hardware_notes()) + ")"
    lines += [f"{cfg.label()}: perplexity {ppl:.4f} over {ids.numel() - 1} tokens (context {args.context})",
              f"  packed file {packed['file_bytes'] / 1e6:.2f} MB ({mem['bits_per_weight']:.2f} bits per quantized "
              f"weight incl. scales; unquantized tensors {mem['unquantized'] / 1e6:.2f} MB)",
              f"  hardware-executable: {hw}", f"  quantized in {tq:.1f} s, {rep.calib_tokens} calibration tokens"]
    lines += [f"  note: {n}" for n in rep.notes]
    if lm.note:
        lines.append(f"note: {lm.note}")
    _emit(args, out, lines)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.ptq import memory_report, save_packed, save_ptq_checkpoint

    if not args.output and not args.packed:
        raise CLIError("give --output DIR (WASQ checkpoint, hardware-executable configs) and/or --packed FILE")
    cfg = build_config(args)
    if args.output and not cfg.hardware_executable:
        raise CLIError(f"{cfg.label()} is not hardware-executable ({'; '.join(cfg.hardware_notes())}): a WASQ "
                       f"checkpoint holds SFx codes with per-channel scales only; use --packed FILE")
    lm = _load(args.model)
    t0 = time.perf_counter()
    rep = _quantize(args, lm, cfg)
    out: dict[str, Any] = {"method": cfg.method, "label": cfg.label(), "config": cfg.to_dict(),
                           "hardware_executable": cfg.hardware_executable, "memory": memory_report(lm.model),
                           "quantize_seconds": round(time.perf_counter() - t0, 2), "note": lm.note}
    lines = [f"{cfg.label()}: {len(rep.layers)} layers quantized in {out['quantize_seconds']} s"]
    if args.packed:
        info = save_packed(lm.model, args.packed, metadata={"ptq": cfg.to_dict(), "model": args.model})
        out["packed"] = {"path": str(args.packed), **info}
        lines.append(f"  wrote {args.packed}: {info['file_bytes'] / 1e6:.2f} MB (packed codes "
                     f"{info['codes_bytes'] / 1e6:.2f} MB)")
    if args.output:
        try:
            mem = save_ptq_checkpoint(lm.model, args.output, tokenizer=lm.tokenizer, overwrite=args.overwrite,
                                      source=args.model, note=lm.note)
        except (FileExistsError, ValueError) as e:
            raise CLIError(str(e)) from None
        out["checkpoint"] = {"path": str(args.output), **mem}
        lines.append(f"  wrote WASQ checkpoint {args.output} ({mem['model_safetensors_bytes'] / 1e6:.2f} MB, codes "
                     f"one per uint8; 'sfx eval --model {args.output}' evaluates it)")
    if lm.note:
        lines.append(f"note: {lm.note}")
    _emit(args, out, lines)
    return 0


def clip_strategies() -> list[str]:
    return ["dynamic", "raw", "max", "sigma", "percentile", "mse", "float+-1"]


def run_clip_analysis(lm, ids, batches, act_bits_list, codes_list, context: int, *, weight_bits: int = 16,
                      search_tokens: int = 256, strategies: list[str] | None = None, progress: bool = False,
                      calib=None):
    """Perplexity of every activation clipping strategy (weights at ``weight_bits``, 16 = ~float).

    Returns rows ``{act_bits, codes, strategy, perplexity, hardware_executable}`` plus the
    float clamp at +-1 (no quantization) once."""
    from superfloat.sw.wasq.ptq import PTQConfig, ptq_quantize_
    from superfloat.sw.wasq.ptq.calib import Calibration
    from superfloat.sw.wasq.ptq.clipping import float_clip
    from superfloat.sw.wasq.quantize import candidate_layers
    from superfloat.sw.wasq.config import WASQConfig

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
                    kw.update(act_mode="static", act_clip=strat, act_scale="float" if codes == "sfx" else "pow2")
                cfg = PTQConfig(**kw)
                t0 = time.perf_counter()
                rep = ptq_quantize_(m, cfg, calibration=calib, search_tokens=search_tokens)
                ppl = _ppl(m, ids, context, pad)
                params = sorted({v.get("act", {}).get("param") for v in rep.layers.values()} - {None})
                rows.append({"act_bits": a, "codes": codes, "strategy": strat, "perplexity": ppl,
                             "hardware_executable": cfg.hardware_executable, "params": params[:8],
                             "seconds": round(time.perf_counter() - t0, 1)})
                if progress:
                    print(f"[clip] A{a} {codes} {strat}: {ppl:.3f}", file=sys.stderr, flush=True)
                if codes == "sfx" and strat not in ("dynamic", "raw"):  # also the power-of-two exponent version
                    m = copy.deepcopy(base)
                    cfg = PTQConfig(**{**kw, "act_scale": "pow2"})
                    ptq_quantize_(m, cfg, calibration=calib, search_tokens=search_tokens)
                    rows.append({"act_bits": a, "codes": codes, "strategy": strat + " (pow2)",
                                 "perplexity": _ppl(m, ids, context, pad), "hardware_executable": True,
                                 "params": [], "seconds": None})
    return rows


def cmd_clip(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.data import calibration_batches

    lm = _load(args.model)
    ids = _ids(lm.tokenizer, args.data, args.split, args.max_tokens)
    cal = _ids(lm.tokenizer, args.calib_data or args.data, "train", args.calib_tokens)
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
    p = sub.add_parser("ptq", help="post-training methods of the W4A4 study on SFx (SmoothQuant, AWQ, clipping, "
                                   "mixed precision, AdaRound, asymmetric int)",
                       description="Post-training quantization methods on SFx codes and on the integer baselines. "
                                   "See docs/ptq-methods.md.")
    ps = p.add_subparsers(dest="ptq_command", metavar="COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])

    q = ps.add_parser("methods", help="list the methods and which W4A4 configurations the hardware executes")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_run(cmd_methods))

    q = ps.add_parser("eval", help="quantize with a method and report perplexity and packed size")
    _add_common(q)
    q.add_argument("--baseline", action="store_true", help="also evaluate the float model")
    q.set_defaults(func=_run(cmd_eval))

    q = ps.add_parser("quantize", help="quantize with a method; write a WASQ checkpoint and/or a packed file")
    _add_common(q)
    q.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="WASQ checkpoint directory (hardware-executable configurations only)")
    q.add_argument("--packed", default=None, metavar="FILE", help="packed safetensors file (any configuration)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    q.set_defaults(func=_run(cmd_quantize))

    q = ps.add_parser("clip", help="activation clipping analysis: perplexity of every static clipping strategy")
    _add_common(q, method=False)
    q.set_defaults(codes="both")
    for a in q._actions:  # --codes gets a 'both' choice here
        if a.dest == "codes":
            a.choices = ("sfx", "int", "int_asym", "both")
            a.default = "both"
            a.help = "codes to analyse (default: both sfx and int)"
    q.add_argument("--act-bits", "-a", type=int, nargs="+", default=[8, 4], help="activation widths (default 8 4)")
    q.add_argument("--weight-bits", "-w", type=int, default=16,
                   help="weight bits (default 16: effectively float, so that only the activations differ)")
    q.add_argument("--strategies", nargs="+", default=None, choices=clip_strategies(),
                   help="strategies (default: all)")
    q.set_defaults(func=_run(cmd_clip))
