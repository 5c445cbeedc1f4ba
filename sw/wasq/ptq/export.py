"""From a PTQ model to what the accelerator and the checkpoint format take.

* :func:`to_wasq_model` turns every :class:`PTQLinear` of a hardware-executable
  configuration into WASQ's ``SFxLinear`` with the same codes, scales/exponents and
  activation settings (``load_exported``), so the colleague's ``save_checkpoint`` /
  ``load_checkpoint`` / ``sfx eval`` work on it and give the same logits (tested).
* :func:`save_ptq_checkpoint` does that on a copy and writes a WASQ checkpoint
  (SPEC section 7; bits per layer in ``sfx_config.json``).
* :func:`memory_report` counts the bytes of a PTQ model as stored: packed codes
  (:mod:`.packing`), side tensors, biases and every unquantized tensor once.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import WASQConfig
from ..quantize import quantize_, quantized_layers
from .packing import pack_codes
from .pipeline import ptq_config_of
from .qlinear import ptq_layers

__all__ = ["to_wasq_model", "save_ptq_checkpoint", "memory_report", "float_bytes"]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def to_wasq_model(model: nn.Module) -> nn.Module:
    """Replace every PTQLinear by an equivalent ``SFxLinear`` (in place; returns ``model``).

    Raises:
        ValueError: a layer is not hardware-executable (integer codes, zero points,
            per-group scales) or uses a float static activation scale (checkpoint format
            v1 records activation exponents only); the message names the layer.
    """
    layers = ptq_layers(model)
    if not layers:
        raise ValueError("to_wasq_model: the model has no PTQLinear layers")
    kinds = set()
    for name, l in layers.items():
        if not l.qweight.hardware_executable:
            raise ValueError(f"layer {name}: {l.qweight.fmt.label()} weights need "
                             f"{'per-group scales along K' if l.qweight.fmt.group_size else 'integer codes'}, which "
                             f"the SFx accelerator and the WASQ checkpoint do not have (software only)")
        if l.act is not None:
            if l.act.kind != "sfx":
                raise ValueError(f"layer {name}: integer activations cannot go into an SFx checkpoint")
            if l.act.mode == "static" and l.act.scale_kind != "pow2":
                raise ValueError(f"layer {name}: static float activation scales are not representable in checkpoint "
                                 f"format v1 (exponents only); quantize with act_scale='pow2'")
        kinds.add((l.qweight.fmt.scale_kind, l.qweight.fmt.rounding, None if l.act is None else l.act.mode))
    modes = {k[2] for k in kinds if k[2] is not None}
    if len({k[:2] for k in kinds}) > 1 or len(modes) > 1:
        raise ValueError(f"to_wasq_model: layers mix scale kinds/roundings/activation modes {sorted(map(str, kinds))}")
    scale_kind, rounding, _ = next(iter(kinds))
    bits = [l.bits for l in layers.values()]
    base = max(set(bits), key=bits.count)
    act_bits = [l.act_bits for l in layers.values() if l.act_bits is not None]
    base_act = max(set(act_bits), key=act_bits.count) if act_bits else None
    report = ptq_config_of(model)
    skip = report.config.skip if report is not None else WASQConfig().skip
    wcfg = WASQConfig(weight_bits=base, act_bits=base_act, scale_kind=scale_kind, rounding=rounding,
                      act_exponent=(modes.pop() if modes else "dynamic"), skip=skip,
                      layer_bits={n: l.bits for n, l in layers.items() if l.bits != base})
    for name, l in layers.items():
        lin = nn.Linear(l.in_features, l.out_features, bias=l.bias is not None)
        lin.weight = nn.Parameter(l.weight.detach().clone(), requires_grad=False)
        if l.bias is not None:
            lin.bias = l.bias
        _set_module(model, name, lin)
    quantize_(model, wcfg, layers=list(layers))
    for name, sl in quantized_layers(model).items():
        l = layers[name]
        bias = None if l.bias is None else l.bias.detach().cpu().to(torch.float32).numpy().copy()
        sl.load_exported(l.qweight.to_exported(bias))
        sl.act_bits = l.act_bits
        if l.act is not None:
            sl.act_exponent = l.act.mode
            sl.act_amax = l.act.threshold if l.act.mode == "static" else None
        sl.eval()
    return model


def save_ptq_checkpoint(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                        overwrite: bool = False, source: str | None = None, note: str | None = None) -> dict[str, Any]:
    """Write a WASQ checkpoint of a hardware-executable PTQ model (``model`` is not modified).
    Returns ``save_checkpoint``'s memory summary."""
    from ..checkpoint import save_checkpoint

    twin = to_wasq_model(copy.deepcopy(model))
    report = ptq_config_of(model)
    if report is not None:
        extra = f"PTQ {report.config.method}: {report.config.label()}"
        note = f"{note}; {extra}" if note else extra
    return save_checkpoint(twin, directory, tokenizer=tokenizer, overwrite=overwrite, source=source, note=note)


def _unique_tensors(model: nn.Module, skip_prefixes: set[str]) -> int:
    seen = set()
    total = 0
    for key, t in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p + ".") for p in skip_prefixes):
            continue
        sk = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if sk in seen:
            continue
        seen.add(sk)
        total += t.numel() * t.element_size()
    return total


def float_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor of a (float) model as held (tied tensors once)."""
    return _unique_tensors(model, set())


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of a PTQ model as stored by :func:`.packing.save_packed` (without the file header):
    ``codes_packed`` (really packed), ``side`` (scales, exponents, zero points),
    ``bias``, ``unquantized`` (embeddings, norms, skipped layers), ``total``, plus
    ``weight_params`` and ``bits_per_weight`` (codes + side tensors)."""
    layers = ptq_layers(model)
    if not layers:
        raise ValueError("memory_report: the model has no PTQLinear layers")
    codes = side = bias = params = 0
    for l in layers.values():
        codes += pack_codes(l.qweight.codes, l.qweight.bits).nbytes
        side += sum(np.asarray(a).nbytes for a in l.qweight.side_tensors().values())
        if l.bias is not None:
            bias += l.bias.numel() * l.bias.element_size()
        params += l.qweight.codes.size
    other = _unique_tensors(model, set(layers))
    return {"codes_packed": codes, "side": side, "bias": bias, "unquantized": other,
            "total": codes + side + bias + other, "weight_params": params,
            "bits_per_weight": 8.0 * (codes + side) / params if params else 0.0}
