"""The PTQ methods inside WASQ's own ``sfx quantize`` / ``sfx eval`` (``--method awq`` ...).

:mod:`superfloat.cli.wasq` calls these helpers when ``--method`` names a PTQ method
(:data:`PTQ_METHODS`); ``vanilla`` / ``rtn-int`` keep their WASQ meaning (SFx and integer
round-to-nearest). ``--codes`` picks SFx codes (default) or the integer baselines for
the PTQ methods. ``sfx ptq ...`` has the full set of options.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .config import METHODS, PTQConfig

__all__ = ["PTQ_METHODS", "add_codes_arg", "is_ptq", "ptq_config_from_args", "prepare", "config_fields",
           "save"]

#: ``--method`` values that select a PTQ preset (``rtn`` is WASQ's ``vanilla``)
PTQ_METHODS = tuple(m for m in METHODS if m != "rtn")


def is_ptq(method: Any) -> bool:
    return method in PTQ_METHODS


def add_codes_arg(group) -> None:
    group.add_argument("--codes", default="sfx", choices=("sfx", "int", "int_asym"),
                       help="codes for the PTQ methods (--method awq, smoothquant, ...): SFx (default) or the integer "
                            "baselines, symmetric (int) or asymmetric (int_asym); see docs/ptq-methods.md")


def ptq_config_from_args(args: argparse.Namespace, bits: int, error: Callable[[str], Exception]) -> PTQConfig:
    """The :class:`PTQConfig` of ``--method M`` and WASQ's quantization options."""
    from ..config import DEFAULT_SKIP

    if getattr(args, "weight_scale", "channel") != "channel":
        raise error(f"--method {args.method} quantizes per output channel (or per group); --weight-scale tensor is a "
                    f"vanilla/rtn-int option")
    kw: dict[str, Any] = {"weight_bits": bits, "act_bits": args.act_bits, "codes": getattr(args, "codes", "sfx"),
                          "scale_kind": args.scale_kind, "rounding": args.rounding,
                          "skip": tuple(args.skip) if args.skip is not None else DEFAULT_SKIP}
    if args.method == "asym":
        kw["codes"] = "int_asym"
    if args.act_bits is not None and getattr(args, "act_exponent", "dynamic") == "static":
        kw["act_mode"] = "static"
    try:
        return PTQConfig.preset(args.method, **kw)
    except (TypeError, ValueError) as e:
        raise error(str(e)) from None


def prepare(args: argparse.Namespace, lm, config: PTQConfig, load_ids: Callable, error: Callable[[str], Exception]):
    """Run the PTQ pipeline on ``lm.model`` with calibration text from ``--calib-data``
    (default ``--data``, train split) and ``--calib-tokens``; returns WASQ's description dict."""
    from ..data import calibration_batches
    from ..quantize import quantized_layers
    from .pipeline import ptq_quantize_
    from .qlinear import ptq_layers

    if quantized_layers(lm.model) or ptq_layers(lm.model):
        raise error(f"{lm.spec} is already quantized (a WASQ checkpoint); drop --weight-bits to evaluate it as saved")
    batches = None
    if config.needs_calibration:
        ids = load_ids(args, lm.tokenizer, data=args.calib_data or args.data, split="train",
                       max_tokens=args.calib_tokens)
        batches = list(calibration_batches(ids, getattr(args, "context", 512), args.calib_tokens))
    try:
        report = ptq_quantize_(lm.model, config, calibration=batches)
    except ValueError as e:
        raise error(str(e)) from None
    return {"quantized_layers": len(ptq_layers(lm.model)), "config": config, "ptq_report": report}


def config_fields(cfg: PTQConfig) -> dict[str, Any]:
    """WASQ's ``_config_fields`` for a PTQ config (plus the hardware flag)."""
    return {"method": cfg.method, "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
            "scale_kind": cfg.scale_kind if cfg.codes == "sfx" else None, "weight_scale": "channel",
            "act_exponent": (cfg.act_mode if cfg.act_bits else None), "rounding": cfg.rounding,
            "label": cfg.describe(), "codes": cfg.codes, "hardware_executable": cfg.hardware_executable}


def save(lm, config: PTQConfig, args: argparse.Namespace, error: Callable[[str], Exception]) -> dict[str, Any]:
    """Write the WASQ checkpoint of a hardware-executable PTQ model (``sfx quantize``)."""
    from .export import save_ptq_checkpoint

    if not config.hardware_executable:
        raise error(f"--method {config.method} with these options is not hardware-executable "
                    f"({'; '.join(config.hardware_notes())}): checkpoints hold SFx codes with per-channel scales; "
                    f"'sfx ptq quantize --packed FILE' writes a packed file of any configuration")
    try:
        return save_ptq_checkpoint(lm.model, args.output, tokenizer=lm.tokenizer, overwrite=args.overwrite,
                                   source=args.model, note=lm.note)
    except (FileExistsError, ValueError) as e:
        raise error(str(e)) from None
