"""``sfx quantize``, ``sfx eval`` and ``sfx generate``.

Extension point: modules listed in :data:`EXTENSION_MODULES` (:mod:`superfloat.cli.train`:
``finetune``, ``analyze``, ``sweep``) are imported if present and their ``register(subparsers)``
is called after ours. They should reuse the argument helpers below
(:func:`add_model_args`, :func:`add_quant_args`, :func:`add_data_args`,
:func:`add_window_args`, :func:`config_from_args`, :func:`prepare_model`,
:func:`load_ids`) so that every WASQ command spells its options the same way.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import textwrap
import time
from typing import Any, Sequence

from superfloat.cli.argtypes import float_range, int_range, nonneg_int, positive_float, positive_int, probability, sfx_bits

__all__ = ["register", "EXTENSION_MODULES", "add_model_args", "add_quant_args", "add_data_args", "add_window_args",
           "config_from_args", "prepare_model", "load_ids", "CLIError"]

#: Modules (by import name) that add more WASQ subcommands; missing ones are skipped.
EXTENSION_MODULES = ["superfloat.cli.train"]

#: ``--method`` spellings of round to nearest: SFx (``vanilla``, the upstream name) and the integer baseline
RTN_CHOICES = ("vanilla", "rtn-int", "sfx", "int")


class CLIError(Exception):
    """A user error: printed as ``sfx COMMAND: error: ...`` with exit code 2."""


# --------------------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser, *, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", "-m", default=default, metavar="M",
                   help="smollm2-135m (offline; dequantized Q4_1, see docs/wasq.md), tiny-gpt2/tiny-opt/tiny-llama, "
                        "a local model dir, a .gguf file, a WASQ checkpoint dir, or a hub id (needs a network)"
                        + (f" (default: {default})" if default else ""))


def add_quant_args(p: argparse.ArgumentParser, *, bits_required: bool = False, multi_bits: bool = False,
                   ptq: bool = False) -> None:
    """The WASQConfig options. ``ptq=True`` (``sfx quantize``/``sfx eval``) also offers the
    post-training methods of :mod:`superfloat.sw.wasq.ptq` as ``--method`` with their knobs."""
    from superfloat.sw.wasq.ptq.config import ACT_CLIPS, METHODS

    g = p.add_argument_group("quantization (WASQConfig; defaults in docs/wasq.md)")
    if multi_bits:
        g.add_argument("--weight-bits", "-w", type=sfx_bits, nargs="+", metavar="X", help="SFx weight width(s), 2..16")
    else:
        g.add_argument("--weight-bits", "-w", type=sfx_bits, required=bits_required, metavar="X",
                       help="SFx weight width, 2..16" + ("" if bits_required else " (default: evaluate the float model)"))
    g.add_argument("--act-bits", "-a", type=sfx_bits, metavar="Y",
                   help="quantize every quantized layer's input to SF Y (default: weight-only)")
    methods = RTN_CHOICES + (tuple(m for m in METHODS if m != "rtn") if ptq else ())
    g.add_argument("--method", default="vanilla", choices=methods,
                   help="vanilla = SFx round-to-nearest (default); rtn-int = symmetric per-channel integer RTN "
                        "baseline" + ("; the others are post-training methods ('sfx methods', docs/ptq-methods.md; "
                                      "calibrated on --calib-data/--calib-tokens)" if ptq else ""))
    g.add_argument("--codes", default="sfx", choices=("sfx", "int", "int_asym"),
                   help="code family: SFx (default; what the accelerator runs) or the integer baselines, symmetric "
                        "(int) or asymmetric (int_asym); see docs/ptq-methods.md")
    g.add_argument("--scale", dest="scale_kind", default="float", choices=("float", "pow2"),
                   help="weight scale: float per-row scale folded into the hardware multiplier (default) or "
                        "power-of-two exponents")
    g.add_argument("--weight-scale", default="channel", choices=("channel", "tensor"),
                   help="one weight scale per output channel (default) or per tensor")
    g.add_argument("--act-exponent", default="dynamic", choices=("dynamic", "static"),
                   help="activation exponents: per token, on the fly (default), or per tensor, calibrated")
    g.add_argument("--rounding", default="nearest_even", choices=("nearest_even", "toward_zero"))
    g.add_argument("--skip", nargs="*", metavar="GLOB", default=None,
                   help="module-name globs kept float (default: lm_head, embeddings, norms)")
    g.add_argument("--calib-data", metavar="D", default=None,
                   help="calibration text for the methods and --act-exponent static (default: --data, train split)")
    g.add_argument("--calib-tokens", type=positive_int, default=2048, metavar="N",
                   help="calibration tokens (default 2048)")
    if ptq:
        k = p.add_argument_group("post-training method knobs (override the --method preset)")
        k.add_argument("--group-size", default=None,
                       help="per-group scales along K: an int or 'dynamic' (software only; default: per channel)")
        k.add_argument("--act-scale", default="pow2", choices=("pow2", "float"),
                       help="SFx activation scale: power of two (default); float: with dynamic activations a float "
                            "scale per token, applied by the accelerator's per-row multiplier (xmult, SPEC rev. 2; "
                            "an RTL generation option), with static ones a float scale (software only)")
        k.add_argument("--act-clip-ratio", type=float_range(0.0, 1.0, open_low=True), default=1.0, metavar="R",
                       help="with --act-scale float: each token's scale is R times its max / (1 - 2**-M), values "
                            "above saturate (activation clipping; default 1: none; 0.8 helps at 4 bits)")
        k.add_argument("--act-clip", default=None, choices=ACT_CLIPS, help="static range strategy, searched per layer")
        k.add_argument("--smoothquant", type=float_range(0.0, 1.0), default=None, metavar="ALPHA", help="SmoothQuant alpha")
        k.add_argument("--awq-grid", type=positive_int, default=None, help="AWQ alpha grid points (default 20)")
        k.add_argument("--adaround-iters", type=nonneg_int, default=None, help="AdaRound Adam steps per layer (default 100)")
        k.add_argument("--mp-fraction", type=float_range(0.0, 1.0), default=None, help="mixed precision: top fraction at high bits")
        k.add_argument("--mp-high-bits", type=sfx_bits, default=None, help="mixed precision: the high width (default 8)")
        k.add_argument("--mp-ranking", default=None, choices=("own", "analyze", "auto"),
                       help="mixed precision ranking: own output error, sfx analyze's, or analyze when available")
        k.add_argument("--gptq-damp", type=float_range(0.0, 1.0), default=None, metavar="F",
                       help="GPTQ damping: fraction of the Hessian's mean diagonal added to it (default 0.01)")
        k.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=None,
                       help="GPTQ: columns by decreasing Hessian diagonal (default on)")
        k.add_argument("--gptq-block", type=positive_int, default=None, help="GPTQ lazy block size (default 128)")
        k.add_argument("--gptq-mse-clip", action=argparse.BooleanOptionalAction, default=None,
                       help="GPTQ: per-row clip ratio from a weight-MSE search first (default: preset's)")
        k.add_argument("--rotate", default=None, choices=("hadamard", "random"),
                       help="fold a rotation of the residual stream into the model first (docs/ptq-methods.md)")
        k.add_argument("--rotate-online", default=None, choices=("host", "none"),
                       help="the rotation before down_proj: a float op on the host (default) or none")
        k.add_argument("--rotate-seed", type=nonneg_int, default=None, help="seed of the rotations' random signs")
        k.add_argument("--search-tokens", type=positive_int, default=256,
                       help="tokens used by the AWQ/clip/activation-range searches (default 256)")
        k.add_argument("--progress", action="store_true", help="progress messages of the method on stderr")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "-d", default="shakespeare", metavar="D",
                   help="a text file, shakespeare[:PLAY] (offline, split by play), wikitext-2, or hf:NAME[:CONFIG] "
                        "(default: shakespeare)")
    p.add_argument("--split", default=None, choices=("train", "validation", "test", "all"),
                   help="default: test (all for a text file)")


def add_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=positive_int, default=512, metavar="N", help="window length in tokens (default 512)")
    p.add_argument("--stride", type=positive_int, default=None, metavar="S", help="window step (default: --context)")
    p.add_argument("--max-tokens", type=int_range(2, None), default=None, metavar="T", help="evaluate only the first T tokens")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="B", help="windows per forward pass (default 1)")


def add_accel_args(p: argparse.ArgumentParser, *, eval_: bool) -> None:
    """Accelerator-exact execution (SPEC section 8): output widths and static output exponents."""

    g = p.add_argument_group("accelerator-exact execution (SPEC section 8; docs/accelerator-exact.md)")
    if eval_:
        g.add_argument("--backend", default="fake", choices=("fake", "accelerator", "both"),
                       help="fake: fake quantization (default); accelerator: every quantized linear computes "
                            "exactly what the FPGA returns (codes streamed per token, exact integer LINEAR, "
                            "requantization, static output exponents); both: fake then accelerator on the same "
                            "tokens, back to back (JSON: the accelerator's figures, 'fake' and 'time_ratio')")
        g.add_argument("--calibrate-outputs", action="store_true",
                       help="(re)calibrate the static output exponents on --calib-data/--calib-tokens before "
                            "evaluating (a checkpoint without them, or another --out-bits)")
        g.add_argument("--float-model", metavar="M", default=None,
                       help="the float model for top1_agreement and the float perplexity of a checkpoint (default: "
                            "the checkpoint's recorded source model, when it loads offline)")
        g.add_argument("--no-baseline", action="store_true",
                       help="skip the float pass (no float_perplexity / top1_agreement)")
    g.add_argument("--out-bits", type=sfx_bits, default=None, metavar="N",
                   help="width of the accelerator's output codes of every quantized layer (default: "
                        "the recipe's, see docs/accelerator-exact.md)")
    g.add_argument("--headroom", type=float_range(1.0, None), default=None, metavar="H",
                   help="static output exponents leave this factor above the calibrated maximum (default: by width, "
                        "see docs/accelerator-exact.md)")


#: CLI knob -> MethodOptions field
_KNOBS = ("act_clip", "smoothquant", "awq_grid", "adaround_iters", "mp_fraction", "mp_high_bits", "mp_ranking",
          "gptq_damp", "gptq_act_order", "gptq_block", "gptq_mse_clip", "rotate", "rotate_online", "rotate_seed")


def config_from_args(args: argparse.Namespace, weight_bits: int | None = None):
    """The :class:`WASQConfig` the options ask for, or ``None`` (float) without ``--weight-bits``."""
    from superfloat.sw.wasq.config import DEFAULT_SKIP, METHOD_ALIASES, WASQConfig

    bits = weight_bits if weight_bits is not None else getattr(args, "weight_bits", None)
    if isinstance(bits, list):
        raise CLIError("several --weight-bits given where one is expected")
    if bits is None:
        if getattr(args, "act_bits", None) is not None:
            raise CLIError("--act-bits needs --weight-bits (WASQ quantizes the weights of every layer it touches)")
        return None
    method, codes = args.method, getattr(args, "codes", "sfx")
    if method in METHOD_ALIASES:  # round to nearest: vanilla = --codes (default sfx), rtn-int = int
        method, codes = "rtn", ("int" if METHOD_ALIASES[method] == "int" else codes)
    elif args.weight_scale != "channel":
        raise CLIError(f"--method {method} quantizes per output channel (or per group); --weight-scale tensor is a "
                       f"vanilla/rtn-int option")
    kw: dict[str, Any] = {}
    gs = getattr(args, "group_size", None)
    if gs is not None:
        if gs != "dynamic":
            try:
                gs = int(gs)
            except ValueError:
                raise CLIError(f"--group-size must be an int or 'dynamic', got {gs!r}") from None
        kw["group_size"] = gs
    options = {k: getattr(args, k) for k in _KNOBS if getattr(args, k, None) is not None}
    try:
        return WASQConfig(weight_bits=bits, act_bits=args.act_bits, weight_scale=args.weight_scale,
                          scale_kind=args.scale_kind, act_exponent=args.act_exponent, rounding=args.rounding,
                          skip=tuple(args.skip) if args.skip is not None else DEFAULT_SKIP, method=method,
                          codes=codes, act_scale=getattr(args, "act_scale", "pow2"), method_options=options,
                          act_clip_ratio=getattr(args, "act_clip_ratio", 1.0),
                          out_bits=getattr(args, "out_bits", None), **kw)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def load_ids(args: argparse.Namespace, tokenizer: Any, *, data: str | None = None, split: str | None = None,
             max_tokens: int | None = None):
    from superfloat.sw.wasq.data import load_text, tokenize

    try:
        text = load_text(data or args.data, split if split is not None else getattr(args, "split", None))
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        ids = tokenize(tokenizer, text, max_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if ids.numel() < 2:
        raise CLIError(f"data {data or args.data!r} has fewer than 2 tokens")
    return ids


def prepare_model(args: argparse.Namespace, lm, config) -> dict[str, Any]:
    """Apply ``config`` to ``lm.model`` with :func:`~superfloat.sw.wasq.quantize_` (calibrated on
    ``--calib-data``/``--calib-tokens`` when the method or static activations need it);
    returns a description for reports. ``config=None`` leaves the model as it is."""
    from superfloat.sw.wasq.quantize import quantize_, quantize_report, quantized_layers, wasq_config_of

    if config is None:
        existing = wasq_config_of(lm.model)
        return {"quantized_layers": len(quantized_layers(lm.model)), "config": existing}
    if quantized_layers(lm.model):
        raise CLIError(f"{lm.spec} is already quantized (a WASQ checkpoint); drop --weight-bits to evaluate it as saved")
    batches = calibration_text(args, lm) if config.needs_calibration else None
    try:
        quantize_(lm.model, config, calibration=batches, search_tokens=getattr(args, "search_tokens", 256),
                  progress=getattr(args, "progress", False))
    except ValueError as e:
        raise CLIError(str(e)) from None
    return {"quantized_layers": len(quantized_layers(lm.model)), "config": config,
            "report": quantize_report(lm.model), "calibration": batches}


def method_seconds(desc: dict[str, Any]) -> dict[str, float] | None:
    """The post-training method's own time per pass (``quantize_report(model).seconds``: rotation,
    calibration capture, searches, GPTQ, ..., ``total``), or None (round to nearest, no method run)."""
    rep = desc.get("report")
    return None if rep is None else {k: round(v, 3) for k, v in rep.seconds.items()}


def calibration_text(args: argparse.Namespace, lm) -> list:
    """Calibration batches: ``--calib-tokens`` of ``--calib-data`` (default ``--data``), train split."""
    from superfloat.sw.wasq.data import calibration_batches

    if args.calib_tokens < 2:
        raise CLIError(f"--calib-tokens must be >= 2 (one token is scored per preceding token), got "
                       f"{args.calib_tokens}")
    ids = load_ids(args, lm.tokenizer, data=args.calib_data or args.data, split="train", max_tokens=args.calib_tokens)
    return list(calibration_batches(ids, getattr(args, "context", 512), args.calib_tokens))


def calibrate_outputs(args: argparse.Namespace, lm, batches: list | None = None) -> dict[str, Any]:
    """Static output exponents of every quantized layer (SPEC section 8) on the calibration text;
    returns a summary for reports."""
    from superfloat.sw.wasq.accelerator import AcceleratorError, calibrate_outputs_

    if batches is None:
        batches = calibration_text(args, lm)
    kw = {} if args.headroom is None else {"headroom": args.headroom}
    try:
        rep = calibrate_outputs_(lm.model, batches, out_bits=args.out_bits, progress=not getattr(args, "no_progress",
                                                                                               False), **kw)
    except (AcceleratorError, ValueError) as e:
        raise CLIError(str(e)) from None
    tokens = sum(int(b.numel()) for b in batches)
    widths = sorted({r["out_bits"] for r in rep.values()})
    return {"calib_tokens": tokens, "out_bits": widths, "headroom": sorted({r["headroom"] for r in rep.values()}),
            "raised_channels": sum(r["raised_channels"] for r in rep.values())}


def _load(spec: str):
    from superfloat.sw.wasq.models import load_model

    try:
        return load_model(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _run(func):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CLIError as e:
            print(f"sfx {args.command}: error: {e}", file=sys.stderr)
            return 2
    return wrapped


# --------------------------------------------------------------------------- sfx eval


def _config_fields(cfg) -> dict[str, Any]:
    if cfg is None:
        return {"method": "float", "weight_bits": None, "act_bits": None, "scale_kind": None, "weight_scale": None,
                "act_exponent": None, "rounding": None, "label": "float"}
    method = cfg.method
    if method == "rtn" and cfg.codes in ("sfx", "int"):
        method = {"sfx": "vanilla", "int": "rtn-int"}[cfg.codes]
    return {"method": method, "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
            "scale_kind": cfg.scale_kind if cfg.codes == "sfx" else None, "weight_scale": cfg.weight_scale,
            "act_exponent": cfg.act_exponent if cfg.act_bits else None, "rounding": cfg.rounding,
            "label": cfg.describe(), "codes": cfg.codes, "hardware_executable": cfg.hardware_executable}


def _float_reference(args: argparse.Namespace, lm, config, quantized: bool):
    """The float model for top-1 agreement and the float perplexity, or None (with why)."""
    if not quantized or args.no_baseline:
        return None, None
    if config is not None:  # quantized here: the float model is the one we loaded
        return copy.deepcopy(lm.model), None
    spec = args.float_model or lm.source
    if spec is None:
        return None, "no float model: give --float-model M (the checkpoint records no source model)"
    try:
        return _load(spec).model, None
    except CLIError as e:
        if args.float_model:
            raise
        return None, f"the checkpoint's source model {spec!r} does not load here ({e}); give --float-model M"


def cmd_eval(args: argparse.Namespace) -> int:
    from superfloat.sw import __version__
    from superfloat.sw.wasq.accelerator import (AcceleratorError, accelerator_stats, reset_accelerator_stats,
                                                set_backend)
    from superfloat.sw.wasq.evaluate import ReferencePass, perplexity

    for name in ("context", "max_tokens", "batch_size", "stride"):
        v = getattr(args, name)
        if v is not None and v < (2 if name == "max_tokens" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be >= {2 if name == 'max_tokens' else 1}, got {v}")
    if args.stride is not None and args.stride > args.context:
        raise CLIError(f"stride ({args.stride}) must not exceed context ({args.context}): tokens between windows "
                       f"would never be scored")
    config = config_from_args(args)
    lm = _load(args.model)
    limit = getattr(lm.model.config, "max_position_embeddings", None) if hasattr(lm.model, "config") else None
    if isinstance(limit, int) and args.context > limit:
        raise CLIError(f"--context {args.context} exceeds the model's {limit} positions (max_position_embeddings): "
                       f"give --context {limit} or less")
    accel = args.backend in ("accelerator", "both")
    if config is None and (args.out_bits is not None or args.headroom is not None) and not args.calibrate_outputs \
            and lm.kind == "checkpoint":
        raise CLIError("--out-bits/--headroom change the static output exponents of a checkpoint: add "
                       "--calibrate-outputs to recalibrate them (on --calib-data/--calib-tokens)")
    if args.calibrate_outputs and config is None and lm.kind != "checkpoint":
        raise CLIError("--calibrate-outputs needs a quantized model: --weight-bits N or a WASQ checkpoint")
    float_model, why_no_float = _float_reference(args, lm, config, config is not None or lm.kind == "checkpoint")
    desc = prepare_model(args, lm, config)
    if accel and not desc["quantized_layers"]:
        raise CLIError(f"--backend {args.backend} runs quantized layers: give --weight-bits N or a WASQ checkpoint")
    calib = None
    if desc["quantized_layers"] and (args.calibrate_outputs or (accel and config is not None)):
        calib = calibrate_outputs(args, lm, desc.get("calibration"))
    ids = load_ids(args, lm.tokenizer, max_tokens=args.max_tokens)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    label = desc["config"].describe() if desc["config"] else "float"
    reference = None if float_model is None else ReferencePass(float_model)

    def evaluate(backend: str):
        if desc["quantized_layers"]:
            try:
                set_backend(lm.model, backend)
            except AcceleratorError as e:
                raise CLIError(str(e)) from None
            if backend == "accelerator":
                reset_accelerator_stats(lm.model)
        try:
            return perplexity(lm.model, ids, context=args.context, stride=args.stride, batch_size=args.batch_size,
                              pad_token_id=pad, progress=not args.no_progress, desc=f"eval {label} [{backend}]",
                              reference=reference)
        except (AcceleratorError, ValueError) as e:
            msg = str(e)
            if _NAN_INPUT in msg:
                msg = nan_message(msg, lm.model, ids[:args.context])
            raise CLIError(msg) from None

    fake = evaluate("fake") if args.backend == "both" else None
    r = evaluate("accelerator" if accel else "fake")
    del float_model, reference
    extra: dict[str, Any] = {}
    if fake is not None:  # measured back to back, same tokens and float pass
        extra["fake"] = {"perplexity": fake.perplexity, "nll": fake.nll, "top1_agreement": fake.top1_agreement,
                         "seconds": round(fake.seconds, 3), "cpu_seconds": round(fake.cpu_seconds, 3)}
        extra["time_ratio"] = round(r.seconds / fake.seconds, 3) if fake.seconds > 0 else None
        extra["cpu_time_ratio"] = round(r.cpu_seconds / fake.cpu_seconds, 3) if fake.cpu_seconds > 0 else None
    if r.reference_perplexity is not None:
        extra["float_perplexity"] = r.reference_perplexity
        extra["top1_agreement"] = r.top1_agreement
    elif why_no_float:
        extra["float_note"] = why_no_float
    if calib is not None:
        extra["output_calibration"] = calib
    if accel:
        st = accelerator_stats(lm.model)
        worst = sorted(st["layers"].items(), key=lambda kv: -kv[1]["saturated"])[:5]
        extra.update({"saturated": st["saturated"], "outputs": st["outputs"], "clamped_rows": st["clamped_rows"],
                      "saturated_layers": dict(worst)})
    if args.memory and desc["quantized_layers"]:
        import tempfile
        from pathlib import Path

        from superfloat.sw.wasq.packing import memory_report, save_packed

        extra["memory"] = memory_report(lm.model)
        with tempfile.TemporaryDirectory(prefix="sfx-eval-") as d:
            extra["packed_file_bytes"] = save_packed(lm.model, Path(d) / "m.safetensors")["file_bytes"]
    from superfloat.sw.wasq.data import default_split

    if not math.isfinite(r.perplexity):
        raise CLIError(nan_message(f"perplexity is {r.perplexity} (non-finite logits): the model produces NaN/inf "
                                   f"on this text", lm.model, ids[:args.context]))
    out = {
        "model": args.model, "data": args.data, "split": args.split or default_split(args.data),
        **_config_fields(desc["config"]), "backend": "accelerator" if accel else "fake",
        "quantized_layers": desc["quantized_layers"],
        "context": r.context, "stride": r.stride, "max_tokens": args.max_tokens,
        "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "total_tokens": r.total_tokens,
        "windows": r.windows, "seconds": round(r.seconds, 3), "cpu_seconds": round(r.cpu_seconds, 3),
        "tokens_per_second": round(r.tokens / r.seconds, 1) if r.seconds > 0 else None,
        "method_seconds": method_seconds(desc), **extra, "note": lm.note, "superfloat_version": __version__,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.model} [{out['label']}]{' accelerator-exact' if accel else ''} on {args.data} ({out['split']}): perplexity "
          f"{r.perplexity:.4f} (NLL {r.nll:.4f} nats) over {r.tokens} tokens, context {r.context}, stride "
          f"{r.stride}, {r.windows} windows, {r.seconds:.1f} s")
    if fake is not None:
        print(f"fake-quantized model on the same tokens: perplexity {fake.perplexity:.4f}"
              + (f", top-1 agreement {100 * fake.top1_agreement:.2f} %" if fake.top1_agreement is not None else "")
              + f", {fake.seconds:.1f} s (accelerator-exact takes {extra['time_ratio']}x the time, "
              f"{extra['cpu_time_ratio']}x the CPU time)")
    if "float_perplexity" in extra:
        print(f"float model on the same tokens: perplexity {extra['float_perplexity']:.4f} "
              f"({100 * (r.perplexity / extra['float_perplexity'] - 1):+.2f} %), top-1 agreement "
              f"{100 * extra['top1_agreement']:.2f} %")
    elif why_no_float:
        print(f"note: {why_no_float}")
    if calib is not None:
        print(f"output exponents calibrated on {calib['calib_tokens']} tokens (SF{'/'.join(map(str, calib['out_bits']))}"
              f" outputs, headroom {'/'.join(map(str, calib['headroom']))}x)")
    if accel:
        print(f"accelerator: {extra['saturated']} of {extra['outputs']} output codes saturated"
              + (f", {extra['clamped_rows']} activation rows clamped" if extra["clamped_rows"] else "")
              + (f" (most in {next(iter(extra['saturated_layers']))})" if extra["saturated_layers"] else ""))
    if "memory" in extra:
        print(f"quantized layers: {extra['memory']['bits_per_weight']:.3f} bits per weight (codes + scales); "
              f"packed file {extra['packed_file_bytes'] / 2**20:.2f} MiB")
    if desc["config"] is not None and not desc["config"].hardware_executable:
        print(f"hardware-executable: no ({'; '.join(desc['config'].hardware_notes())})")
    if lm.note:
        print(f"note: {lm.note}")
    return 0


# --------------------------------------------------------------------------- sfx quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.checkpoint import save_checkpoint
    from superfloat.sw.wasq.packing import save_packed

    config = config_from_args(args)
    if args.output is None and args.packed is None:
        raise CLIError("give --output DIR (a WASQ checkpoint) and/or --packed FILE (a packed file of any format)")
    if args.output is not None and not config.hardware_executable:  # explain before any work
        raise CLIError(f"--method {args.method} with these options is not executable by the SFx accelerator "
                       f"({'; '.join(config.hardware_notes())}): WASQ checkpoints hold SFx codes with per-channel "
                       f"scales; --packed FILE writes a packed file of any configuration")
    t0 = time.perf_counter()
    lm = _load(args.model)
    desc = prepare_model(args, lm, config)
    calib = None
    if args.output is not None:  # a checkpoint the accelerator runs carries its static output exponents
        calib = calibrate_outputs(args, lm, desc.get("calibration"))
    mem: dict[str, Any] = {}
    try:
        if args.output is not None:
            mem = save_checkpoint(lm.model, args.output, tokenizer=lm.tokenizer, overwrite=args.overwrite,
                                  source=args.model, note=lm.note)
        if args.packed is not None:
            mem["packed"] = save_packed(lm.model, args.packed, metadata={"config": config.to_dict(),
                                                                           "source": args.model})
    except (FileExistsError, ValueError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # an unwritable or missing parent folder, a full disk
        where = e.filename or (args.output if args.output is not None else args.packed)
        raise CLIError(f"cannot write {where}: {e.strerror or e}; choose another --output/--packed path") from None
    out = {"model": args.model, "output": str(args.output), **_config_fields(config),
           "quantized_layers": desc["quantized_layers"], "memory": mem, "output_calibration": calib,
           "seconds": round(time.perf_counter() - t0, 2), "method_seconds": method_seconds(desc), "note": lm.note}
    if args.json:
        print(json.dumps(out, default=str))
    elif args.output is None:
        print(f"wrote {args.packed}: {config.describe()}, {desc['quantized_layers']} layers quantized, "
              f"{mem['packed']['file_bytes'] / 2**20:.2f} MiB packed")
    else:
        mib = 1 / 2**20
        print(f"wrote {args.output}: {config.describe()}, {desc['quantized_layers']} layers quantized, static output "
              f"exponents calibrated on {calib['calib_tokens']} tokens (SF{'/'.join(map(str, calib['out_bits']))} "
              f"outputs, headroom {'/'.join(map(str, calib['headroom']))}x)")
        print(f"  model.safetensors  {mem['model_safetensors_bytes'] * mib:9.2f} MiB (real file bytes; "
              f"directory {mem['directory_bytes'] * mib:.2f} MiB)")
        print(f"  codes as stored    {mem['codes_bytes'] * mib:9.2f} MiB (one uint8/uint16 per code), "
              f"{mem['codes_packed_bytes'] * mib:.2f} MiB if packed at {config.weight_bits} bits")
        print(f"  same weights fp32  {mem['quantized_float32_bytes'] * mib:9.2f} MiB; unquantized tensors "
              f"{mem['unquantized_bytes'] * mib:.2f} MiB")
        if lm.note:
            print(f"note: {lm.note}")
    return 0


# --------------------------------------------------------------------------- sfx generate


def generation_entries(args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """``[(label, model, tokenizer)]`` for ``sfx generate``: each ``--model`` float (unless
    ``--no-float``) and at every ``--weight-bits`` (each its own copy), then each ``--checkpoint``."""
    entries = []
    models = args.model or ([] if args.checkpoint else ["smollm2-135m"])
    bits_list = args.weight_bits or []
    show_float = not (bits_list and args.no_float)
    for spec in models:
        lm = _load(spec)
        if show_float:
            entries.append((f"{spec} float", lm.model, lm.tokenizer))
        for i, b in enumerate(bits_list):
            cfg = config_from_args(args, weight_bits=b)
            inst = copy.copy(lm)
            # the float model is shown as loaded: quantize copies (the last one may take it over if not shown)
            last_and_free = i == len(bits_list) - 1 and not show_float
            inst.model = lm.model if last_and_free else copy.deepcopy(lm.model)
            prepare_model(args, inst, cfg)
            entries.append((f"{spec} {cfg.describe()}", inst.model, lm.tokenizer))
    for d in args.checkpoint or []:
        lm = _load(d)
        if lm.tokenizer is None:
            raise CLIError(f"checkpoint {d} has no tokenizer (save it with a tokenizer: sfx quantize does)")
        entries.append((f"{d}", lm.model, lm.tokenizer))
    return entries


#: what a quantized layer's refusal of a NaN input says (``sfx._check_no_nan`` and its torch twin)
_NAN_INPUT = " NaN value(s)"


def nan_message(msg: str, model: Any, ids: Any, whose: str = "the model's") -> str:
    """``msg`` (a quantized layer refusing a NaN input, or a NaN perplexity) rewritten to name the
    float module that first produced the NaN/infinity on ``ids`` (SFx has no NaN: the quantized
    layer after it is not the cause); ``msg`` unchanged when no module is found."""
    import torch

    from superfloat.sim.nonfinite import describe_source, locate_nonfinite

    src = locate_nonfinite(model, lambda: model(torch.as_tensor(ids).reshape(1, -1)))
    if src is None:
        return msg
    return (f"NaN/infinity in {whose} forward pass, {describe_source(src)}: check the weights and inputs of "
            f"{src['module']} (then: {msg.split('. SFx has no NaN')[0]})")


def cmd_generate(args: argparse.Namespace) -> int:
    from superfloat.sw.wasq.generate import _prompt_ids, generate_many

    entries = generation_entries(args)
    try:
        results = generate_many(entries, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                chat=args.chat)
    except ValueError as e:
        msg = str(e)
        if _NAN_INPUT in msg:
            for label, model, tok in entries:
                new = nan_message(msg, model, _prompt_ids(tok, args.prompt, args.chat), f"{label}'s")
                if new != msg:
                    msg = new
                    break
        raise CLIError(msg) from None
    if args.json:
        print(json.dumps({"prompt": args.prompt, "outputs": [{"model": l, "text": t} for l, t in results]}))
    elif args.layout == "blocks" or len(results) == 1:
        print(_format_blocks(args.prompt, results))
    else:
        print(_format_side_by_side(args.prompt, results))
    return 0


def _format_blocks(prompt: str, results: Sequence[tuple[str, str]]) -> str:
    lines = [f"prompt: {prompt}", ""]
    for label, text in results:
        lines += [f"=== {label} ===", text.strip("\n"), ""]
    return "\n".join(lines)


def _format_side_by_side(prompt: str, results: Sequence[tuple[str, str]], width: int | None = None) -> str:
    """Columns, one per model, wrapped to the terminal width (falls back to blocks when too narrow)."""
    width = width or shutil.get_terminal_size((160, 40)).columns
    n = len(results)
    col = (width - 3 * (n - 1)) // max(n, 1)
    if n == 1 or col < 24:
        return _format_blocks(prompt, results)
    cols = []
    for label, text in results:
        body = []
        for para in text.strip("\n").split("\n"):
            body += textwrap.wrap(para, col) or [""]
        cols.append([label[:col], "-" * min(col, max(len(label), 3))] + body)
    h = max(len(c) for c in cols)
    out = [f"prompt: {prompt}", ""]
    for i in range(h):
        out.append(" | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols).rstrip())
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- registration


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to SFx and write a WASQ checkpoint (SPEC section 7)",
                       description="Quantize a causal LM (WASQ) and write a checkpoint directory: model.safetensors "
                                   "with <layer>.codes/.exponent/.scale/.bias and sfx_config.json, plus the tokenizer.")
    add_model_args(p)
    add_quant_args(p, bits_required=True, ptq=True)
    p.add_argument("--data", "-d", default="shakespeare", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, default=512, help=argparse.SUPPRESS)
    add_accel_args(p, eval_=False)
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="WASQ checkpoint directory to write (atomically; hardware-executable configurations), with "
                        "static output exponents calibrated on --calib-data/--calib-tokens")
    p.add_argument("--packed", default=None, metavar="FILE",
                   help="also (or only) write a packed safetensors file: codes packed at their bits, any format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run(cmd_quantize))

    p = sub.add_parser("eval", help="perplexity of a float or quantized model (one documented protocol)",
                       description="Perplexity by sliding windows, every token scored once (docs/wasq.md). Without "
                                   "--weight-bits the model is evaluated as loaded (float, or a checkpoint as saved).")
    add_model_args(p)
    add_data_args(p)
    add_quant_args(p, ptq=True)
    add_window_args(p)
    add_accel_args(p, eval_=True)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (perplexity, tokens, bits, context, float_perplexity, top1_agreement, "
                        "saturated, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--baseline", action="store_true",
                   help="(default now) evaluate the float model on the same tokens; see --no-baseline")
    p.add_argument("--memory", action="store_true",
                   help="also report the bytes of the quantized layers as stored (codes packed at their bits, scales)")
    p.set_defaults(func=_run(cmd_eval))

    p = sub.add_parser("generate", help="generate text from one or several (quantized) models side by side",
                       description="Each --model is shown float and at every --weight-bits; each --checkpoint as saved.")
    p.add_argument("--model", "-m", action="append", metavar="M",
                   help="model spec (repeatable; default smollm2-135m when no --checkpoint is given)")
    p.add_argument("--checkpoint", "-c", action="append", metavar="DIR", help="WASQ checkpoint (repeatable)")
    add_quant_args(p, multi_bits=True)
    p.add_argument("--no-float", action="store_true", help="with --weight-bits: do not show the float model")
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=probability(open_low=True), default=None)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--layout", choices=("columns", "blocks"), default="columns")
    p.add_argument("--json", action="store_true")
    p.add_argument("--data", default="shakespeare", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, default=512, help=argparse.SUPPRESS)
    p.set_defaults(func=_run(cmd_generate))

    from superfloat.cli import register_modules

    register_modules(sub, EXTENSION_MODULES)
