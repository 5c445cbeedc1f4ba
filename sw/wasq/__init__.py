"""WASQ: Weight and Activation SFx Quantization for causal LMs (see ``docs/wasq.md``).

torchao-style API: one config, one ``quantize_``, one quantized layer, one checkpoint::

    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint, load_checkpoint
    lm = load_model("smollm2-135m")
    quantize_(lm.model, WASQConfig(weight_bits=8))                  # round to nearest
    save_checkpoint(lm.model, "build/sf8", tokenizer=lm.tokenizer)

    quantize_(other, WASQConfig(weight_bits=4, act_bits=8, method="awq"), calibration=batches)

All SFx arithmetic goes through :mod:`superfloat.sw.sfx` / :mod:`superfloat.sw.sfx_torch`.
Submodules import torch/transformers lazily where they can; importing this package
imports torch.
"""
from __future__ import annotations

from .config import CODES, DEFAULT_SKIP, WASQConfig
from .formats import ActQuantizer, ExportedLinear, QuantizedWeight, WeightFormat, float_scale
from .qlinear import SFxLinear
from .quantize import (calibrate_, candidate_layers, invalidate_caches, quantize_, quantize_report, quantized_layers,
                       wasq_config_of)

__all__ = [
    "WASQConfig", "DEFAULT_SKIP", "CODES",
    "SFxLinear", "ExportedLinear", "QuantizedWeight", "WeightFormat", "ActQuantizer", "float_scale",
    "quantize_", "quantize_report", "calibrate_", "quantized_layers", "invalidate_caches", "wasq_config_of",
    "candidate_layers", "save_packed", "load_packed", "memory_report",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "load_model", "LoadedModel", "load_text", "perplexity", "PerplexityResult", "generate",
]


import sys as _sys

if "transformers" in _sys.modules:  # transformers already loaded: register quant_method "superfloat" now
    from . import hf as _hf  # noqa: F401  (docs/huggingface.md; otherwise: import superfloat.sw.wasq.hf)


#: lazily imported names -> their submodule (checkpoint/models/data/evaluate/generate pull in transformers)
_LAZY = {**dict.fromkeys(("save_packed", "load_packed", "memory_report"), "packing"),
         **dict.fromkeys(("save_checkpoint", "load_checkpoint", "CheckpointError"), "checkpoint"),
         **dict.fromkeys(("load_model", "LoadedModel"), "models"), "load_text": "data",
         **dict.fromkeys(("perplexity", "PerplexityResult"), "evaluate"), "generate": "generate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
