"""``quantize_(model, config)``: swap linear layers for :class:`SFxLinear`, in place (torchao style)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from . import hooks
from .config import WASQConfig
from .layers import candidate_layers, convert_rtn_, evaluating, quantized_layers
from .qlinear import SFxLinear, _module_kind

__all__ = ["quantize_", "calibrate_", "quantized_layers", "invalidate_caches", "wasq_config_of", "candidate_layers",
           "quantize_report"]

_ATTR = "_superfloat_wasq"
_REPORT = "_superfloat_wasq_report"


def quantize_(model: nn.Module, config: WASQConfig | None = None, *, calibration: Iterable[Any] | None = None,
              layers: Iterable[str] | None = None, calib_tokens: int | None = None, search_tokens: int = 256,
              progress: bool = False, weight_cache: dict | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` and transformers ``Conv1D`` of ``model`` that ``config``
    does not skip by an :class:`SFxLinear` (in place; returns ``model``).

    With ``config.method == "rtn"`` (the default) the layers quantize their weights by
    round to nearest; any other method (:data:`superfloat.sw.wasq.ptq.METHODS`) first runs
    its passes over the float model (SmoothQuant / AWQ scales folded into the model,
    clip searches, AdaRound, mixed precision, static activation ranges) and the layers
    then hold the codes it chose. Either way the result is the same layer class, saved
    by :func:`~superfloat.sw.wasq.save_checkpoint` when the format is hardware-executable.

    Args:
        model: any ``nn.Module`` (a transformers causal LM in practice).
        config: :class:`WASQConfig` (default: ``WASQConfig()``: SF8 float per-channel scales, weight-only).
        calibration: token batches (``[B, T]`` / ``[T]`` tensors, or dicts of model inputs):
            needed by the methods that calibrate (``config.needs_calibration``) and for
            static activation exponents; ignored otherwise.
        layers: explicit layer names to replace instead of applying ``config.skip``
            (used when rebuilding a checkpoint: the layers are only converted, the method's
            passes do not run, its codes come from the checkpoint).
        calib_tokens, search_tokens, progress, weight_cache: the methods' calibration
            budget, search budget, progress messages and weight cache
            (:func:`superfloat.sw.wasq.ptq.pipeline.run_method`).

    Raises:
        ValueError: the model already holds SFxLinear layers, ``layers`` names a module that is
            not a Linear/Conv1D, nothing would be quantized, or a method needs calibration.
    """
    config = WASQConfig() if config is None else config
    if not isinstance(config, WASQConfig):
        raise TypeError(f"config must be a WASQConfig, got {type(config).__name__}")
    if any(isinstance(m, SFxLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it holds SFxLinear layers); quantize a fresh float model")
    if layers is None:
        targets = candidate_layers(model, config)
    else:
        targets = {}
        for name in layers:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"layer {name!r} does not exist in {type(model).__name__}") from None
            kind = _module_kind(mod)
            if kind is None:
                raise ValueError(f"layer {name!r} is a {type(mod).__name__}, not an nn.Linear or Conv1D")
            targets[name] = kind
    if not targets:
        raise ValueError(f"nothing to quantize in {type(model).__name__}: no nn.Linear/Conv1D outside the skip "
                         f"patterns {list(config.skip)}")
    if layers is None and (config.method != "rtn" or config.group_size == "dynamic"):
        from .ptq.pipeline import run_method

        with torch.no_grad():
            report = run_method(model, config, targets, calibration, calib_tokens=calib_tokens,
                                search_tokens=search_tokens, progress=progress, weight_cache=weight_cache)
        setattr(model, _ATTR, config)
        setattr(model, _REPORT, report)
        hooks.run(hooks.AFTER_QUANTIZE, model)
        return model
    convert_rtn_(model, config, targets)
    setattr(model, _ATTR, config)
    if config.act_bits is not None and config.act_exponent == "static" and calibration is not None:
        calibrate_(model, calibration)
    hooks.run(hooks.AFTER_QUANTIZE, model)
    return model


def quantize_report(model: nn.Module):
    """The :class:`~superfloat.sw.wasq.ptq.PTQReport` of the method :func:`quantize_` ran on
    ``model`` (what each pass did and how long it took), or None (round to nearest)."""
    return getattr(model, _REPORT, None)


def wasq_config_of(model: nn.Module) -> WASQConfig | None:
    """The :class:`WASQConfig` that :func:`quantize_` applied to ``model`` (None if never quantized)."""
    return getattr(model, _ATTR, None)


def invalidate_caches(model: nn.Module) -> None:
    """Drop every cached quantized weight (only needed after writes through ``param.data``)."""
    for m in quantized_layers(model).values():
        m.invalidate_cache()


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, torch.Tensor):
        model(batch if batch.dim() == 2 else batch.reshape(1, -1))
    else:
        model(torch.as_tensor(batch).reshape(1, -1))


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Calibrate static activation exponents: run ``batches`` (token-id tensors ``[B, T]`` or
    ``[T]``, or dicts of model inputs) through ``model`` with quantized weights and float
    activations, record ``max|input|`` of every :class:`SFxLinear`, and set its static
    exponent to ``sfx.choose_exponent`` of that maximum. Returns ``{name: amax}``.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("calibrate_: the model has no SFxLinear layers; call quantize_ first")
    for m in layers.values():
        m.act_amax = None
        m._calibrating = True
    n = 0
    try:
        with evaluating(model):
            for batch in batches:
                _run_batch(model, batch)
                n += 1
    finally:
        for m in layers.values():
            m._calibrating = False
    if n == 0:
        raise ValueError("calibrate_: no calibration batches were given")
    return {name: float(m.act_amax or 0.0) for name, m in layers.items()}
