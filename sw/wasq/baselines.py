"""The integer round-to-nearest (RTN) baseline that SFx is compared against.

Symmetric integer quantization with zero point 0, through torch's own
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``
(so the baseline is torch's arithmetic, not ours):

    scale[n] = max|w[n, :]| / (2**(b-1) - 1)        (1.0 for an all-zero row)
    q = clamp(round_half_even(w / scale), -2**(b-1), 2**(b-1) - 1)
    w_hat = q * scale

This is the "absmax" RTN of the LLM quantization literature (GPTQ's RTN rows). Since
``|w| <= max|w|``, the level ``-2**(b-1)`` is never reached, so its grid is the SFx grid
with a float scale: any difference between ``method="int"`` and SFx ``scale_kind="float"``
comes only from float32 versus float64 arithmetic of the scale and division.

Activations (``act_bits``) use the same recipe per token (dynamic) or per tensor (static).
"""
from __future__ import annotations

import torch

__all__ = ["int_qrange", "int_scale", "int_fake_quantize"]


def int_qrange(bits: int) -> tuple[int, int]:
    """``(quant_min, quant_max) = (-2**(b-1), 2**(b-1) - 1)``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"integer bits must be an int in 2..16, got {bits!r}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def int_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 scale ``amax / (2**(b-1) - 1)``; 1.0 where ``amax`` is 0 (or not finite)."""
    _, qmax = int_qrange(bits)
    amax = amax.detach().to(torch.float32)
    s = amax / qmax
    return torch.where((amax > 0) & torch.isfinite(amax), s, torch.ones_like(s))


def int_fake_quantize(t: torch.Tensor, bits: int, axis: int | None = 0) -> torch.Tensor:
    """Symmetric absmax RTN of ``t`` (no gradient; wrap in an STE to train).

    ``axis`` is the channel axis (one scale per index along it) or ``None`` for one
    scale per tensor. Returns ``t``'s dtype.
    """
    qmin, qmax = int_qrange(bits)
    x = t.detach()
    orig = x.dtype
    xf = x.to(torch.float32)
    if axis is None:
        scale = int_scale(xf.abs().amax() if xf.numel() else torch.zeros(()), bits)
        out = torch.fake_quantize_per_tensor_affine(xf, float(scale), 0, qmin, qmax)
        return out.to(orig)
    axis = axis % xf.dim()
    red = [i for i in range(xf.dim()) if i != axis]
    amax = xf.abs().amax(dim=red) if red else xf.abs()
    scale = int_scale(amax, bits)
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=xf.device)
    out = torch.fake_quantize_per_channel_affine(xf, scale, zp, axis, qmin, qmax)
    return out.to(orig)
