"""Layer-wise mixed precision: the most sensitive layers keep more bits.

1. **Sensitivity** of each layer, one of:

   * ``own`` (:func:`layer_sensitivity`): the relative output error of that layer
     alone when its weights (and inputs, when activations are quantized) go to the low
     width, on calibration inputs: ``||A(X) Q(W)^T - X W^T||^2 / ||X W^T||^2``;
   * ``analyze``: the ranking of ``sfx analyze`` (:mod:`superfloat.sw.wasq.analyze`,
     metric ``rel_error``: the error of each layer's output in a fully quantized model,
     errors of earlier layers included).

2. **Allocation** (:func:`allocate_bits`): the top ``fraction`` of layers by
   sensitivity (at least one) get ``high_bits``, or, with a memory budget, layers are
   promoted in sensitivity order while the packed weights stay within ``budget_bytes``.

The SFx checkpoint format records the bits of every layer (``sfx_config.json``), and a
layer quantized at 4 bits runs exactly on an accelerator generated for 8 (an SF4 code's
value is the SF8 code with its magnitude shifted left by 4).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..formats import ActQuantizer, WeightFormat, fake_quant_weight

__all__ = ["layer_sensitivity", "allocate_bits", "analyze_ranking"]


@torch.no_grad()
def layer_sensitivity(w: torch.Tensor, x: torch.Tensor, fmt: WeightFormat, act: ActQuantizer | None = None) -> float:
    """Relative output error of one layer quantized to ``fmt`` (and ``act``) on inputs ``x``."""
    w32 = w.detach().to(torch.float32)
    x32 = x.detach().to(torch.float32)
    ref = x32 @ w32.t()
    xq = act(x32) if act is not None else x32
    y = xq @ fake_quant_weight(w32, fmt).t()
    e = float(ref.double().pow(2).sum())
    return float((y - ref).double().pow(2).sum()) / e if e > 0 else 0.0


def allocate_bits(sensitivity: Mapping[str, float], sizes: Mapping[str, int], low_bits: int, high_bits: int, *,
                  fraction: float | None = 0.05, budget_bytes: int | None = None) -> dict[str, int]:
    """Bits per layer: ``high_bits`` for the most sensitive layers, ``low_bits`` elsewhere.

    Args:
        sensitivity: ``{layer: value}`` (higher = more sensitive).
        sizes: ``{layer: number of weights}``.
        fraction: promote the top ``ceil(fraction * layers)`` layers (ignored with ``budget_bytes``).
        budget_bytes: promote in sensitivity order while the weights packed at their
            widths stay within this many bytes (layers that do not fit are skipped).
    """
    if set(sensitivity) != set(sizes):
        raise ValueError("sensitivity and sizes must name the same layers")
    if not sensitivity:
        return {}
    if not high_bits > low_bits:
        raise ValueError(f"high_bits ({high_bits}) must exceed low_bits ({low_bits})")
    order = sorted(sensitivity, key=lambda n: (-sensitivity[n], n))
    bits = {n: low_bits for n in sensitivity}
    if budget_bytes is not None:
        used = sum(math.ceil(sizes[n] * low_bits / 8) for n in bits)
        if used > budget_bytes:
            raise ValueError(f"budget of {budget_bytes} bytes is below the {used} bytes of all layers at "
                             f"{low_bits} bits")
        for n in order:
            extra = math.ceil(sizes[n] * high_bits / 8) - math.ceil(sizes[n] * low_bits / 8)
            if used + extra <= budget_bytes:
                bits[n] = high_bits
                used += extra
        return bits
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    k = max(1, math.ceil(fraction * len(order) - 1e-9))
    for n in order[:k]:
        bits[n] = high_bits
    return bits


def analyze_ranking(model: torch.nn.Module, batches: list[torch.Tensor], wasq_config: Any) -> dict[str, float]:
    """``{layer: rel_error}`` from ``sfx analyze`` (:func:`superfloat.sw.wasq.analyze.analyze`)."""
    from ..analyze import analyze
    from ..train import Blocks

    width = max(int(b.shape[-1]) for b in batches)
    ids = torch.zeros(len(batches), width, dtype=torch.long)
    mask = torch.zeros(len(batches), width, dtype=torch.long)
    for i, b in enumerate(batches):
        row = b.reshape(-1)
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    result = analyze(model, Blocks(ids, mask, labels), wasq_config, metric="rel_error", progress=False)
    return {s.layer: float(s.rel_error) for s in result.layers}
