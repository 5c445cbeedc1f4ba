"""WASQ: Weight and Activation SFx Quantization for causal LMs (see ``docs/wasq.md``).

torchao-style API::

    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint, load_checkpoint
    lm = load_model("smollm2-135m")
    quantize_(lm.model, WASQConfig(weight_bits=8))
    save_checkpoint(lm.model, "build/sf8", tokenizer=lm.tokenizer)

All SFx arithmetic goes through :mod:`superfloat.sw.sfx` / :mod:`superfloat.sw.sfx_torch`.
Submodules import torch/transformers lazily where they can; importing this package
imports torch.
"""
from __future__ import annotations

from .config import DEFAULT_SKIP, WASQConfig, normalize_method
from .qlinear import ExportedLinear, SFxLinear, float_scale
from .quantize import calibrate_, candidate_layers, invalidate_caches, quantize_, quantized_layers, wasq_config_of

__all__ = [
    "WASQConfig", "DEFAULT_SKIP", "normalize_method",
    "SFxLinear", "ExportedLinear", "float_scale",
    "quantize_", "calibrate_", "quantized_layers", "invalidate_caches", "wasq_config_of", "candidate_layers",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "load_model", "LoadedModel", "load_text", "perplexity", "PerplexityResult", "generate",
]


def __getattr__(name: str):  # lazy: checkpoint/models/data/evaluate/generate pull in transformers
    if name in ("save_checkpoint", "load_checkpoint", "CheckpointError"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name in ("load_model", "LoadedModel"):
        from . import models

        return getattr(models, name)
    if name == "load_text":
        from .data import load_text

        return load_text
    if name in ("perplexity", "PerplexityResult"):
        from . import evaluate

        return getattr(evaluate, name)
    if name == "generate":
        from .generate import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
