"""``quantize_(model, config)``: swap linear layers for :class:`SFxLinear`, in place (torchao style)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .config import WASQConfig
from .qlinear import SFxLinear, _module_kind

__all__ = ["quantize_", "calibrate_", "quantized_layers", "invalidate_caches", "wasq_config_of", "candidate_layers"]

_ATTR = "_superfloat_wasq"


def candidate_layers(model: nn.Module, config: WASQConfig) -> dict[str, str]:
    """``{name: "linear"|"conv1d"}`` of the layers :func:`quantize_` would replace (not skipped)."""
    out = {}
    for name, mod in model.named_modules():
        kind = _module_kind(mod)
        if kind is not None and name and not config.is_skipped(name):
            out[name] = kind
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: WASQConfig | None = None, *, calibration: Iterable[Any] | None = None,
              layers: Iterable[str] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` and transformers ``Conv1D`` of ``model`` that ``config``
    does not skip by an :class:`SFxLinear` (in place; returns ``model``).

    Args:
        model: any ``nn.Module`` (a transformers causal LM in practice).
        config: :class:`WASQConfig` (default: ``WASQConfig()``: SF8 float per-channel scales, weight-only).
        calibration: batches for :func:`calibrate_` (needed when ``act_bits`` is set with
            ``act_exponent="static"``; ignored otherwise).
        layers: explicit layer names to replace instead of applying ``config.skip``
            (used when rebuilding a checkpoint).

    Raises:
        ValueError: the model already holds SFxLinear layers, ``layers`` names a module that is
            not a Linear/Conv1D, or nothing would be quantized.
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
    for name in targets:
        mod = model.get_submodule(name)
        _set_module(model, name, SFxLinear.from_float(mod, config, name))
    setattr(model, _ATTR, config)
    if config.act_bits is not None and config.act_exponent == "static" and calibration is not None:
        calibrate_(model, calibration)
    return model


def wasq_config_of(model: nn.Module) -> WASQConfig | None:
    """The :class:`WASQConfig` that :func:`quantize_` applied to ``model`` (None if never quantized)."""
    return getattr(model, _ATTR, None)


def quantized_layers(model: nn.Module) -> dict[str, SFxLinear]:
    """``{name: SFxLinear}`` in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SFxLinear)}


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
    was_training = model.training
    model.eval()
    for m in layers.values():
        m.act_amax = None
        m._calibrating = True
    n = 0
    try:
        for batch in batches:
            _run_batch(model, batch)
            n += 1
    finally:
        for m in layers.values():
            m._calibrating = False
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate_: no calibration batches were given")
    return {name: float(m.act_amax or 0.0) for name, m in layers.items()}
