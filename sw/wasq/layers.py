"""Finding and replacing the linear layers of a model (shared by ``quantize_`` and the methods)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from .config import WASQConfig
from .qlinear import SFxLinear, _module_kind

__all__ = ["candidate_layers", "quantized_layers", "set_module", "convert_rtn_", "distinct_tensors", "evaluating"]


def candidate_layers(model: nn.Module, config: WASQConfig) -> dict[str, str]:
    """``{name: "linear"|"conv1d"}`` of the layers :func:`~superfloat.sw.wasq.quantize_` would replace (not skipped)."""
    out = {}
    for name, mod in model.named_modules():
        kind = _module_kind(mod)
        if kind is not None and name and not config.is_skipped(name):
            out[name] = kind
    return out


def quantized_layers(model: nn.Module) -> dict[str, SFxLinear]:
    """``{name: SFxLinear}`` in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SFxLinear)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_rtn_(model: nn.Module, config: WASQConfig, names) -> nn.Module:
    """Swap the layers ``names`` of ``model`` for round-to-nearest :class:`SFxLinear` (in place)."""
    for name in names:
        set_module(model, name, SFxLinear.from_float(model.get_submodule(name), config, name))
    return model


def distinct_tensors(model: nn.Module, skip=lambda key: False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state-dict tensors of ``model`` whose key is not ``skip(key)``, detached, tensors that
    share storage (tied embeddings) once under their first name: ``({key: tensor}, {alias: key})``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if skip(key):
            continue
        t = t.detach()
        sk = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
              t.dtype)
        if sk in seen:
            aliases[key] = seen[sk]
        else:
            seen[sk] = key
            tensors[key] = t
    return tensors, aliases


@contextmanager
def evaluating(*models: nn.Module, hooks: Iterable = ()):
    """Run the block with ``models`` in eval mode, then (also on an error) remove the hook
    handles ``hooks`` and give every model back its training mode."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
