"""Asymmetric (affine) integer quantization: a scale and a zero point.

The linear quantization of ``seeds/quantization-notes.md``, ``r = s (q - z)``:

    s = (rmax - rmin) / (qmax - qmin)
    z = round(qmin - rmin / s)                 (clamped to [qmin, qmax])
    q = clamp(round(r / s) + z, qmin, qmax)    (torch: zero_point + nearbyint(r * (1/s)))

with unsigned levels ``qmin = 0``, ``qmax = 2**b - 1`` (the notes' "unsigned int"
range), computed in float32 and executed by ``torch.fake_quantize_per_channel_affine``
/ ``torch.fake_quantize_per_tensor_affine`` (torch's own arithmetic, as the symmetric
baseline in :mod:`superfloat.sw.wasq.baselines`). The range always contains 0
(``rmin <= 0 <= rmax``), so zero is exactly representable (zero padding and the
zero-padded tails of per-group rows are exact) and ``z`` lies in ``[qmin, qmax]``.

A zero point means ``sum_k (q_k - z) x_k = sum_k q_k x_k - z sum_k x_k``: an extra
per-row correction term that the SFx accelerator (sign-magnitude codes, no zero point,
SPEC section 5) does not compute, so this baseline is software-only.
"""
from __future__ import annotations

import torch

__all__ = ["qrange", "scale_zero_point", "fake_quantize_rows", "fake_quantize_tensor"]


def qrange(bits: int) -> tuple[int, int]:
    """``(0, 2**bits - 1)``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"asymmetric integer bits must be an int in 2..16, got {bits!r}")
    return 0, (1 << bits) - 1


def scale_zero_point(rmin: torch.Tensor, rmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scales and int32 zero points for ranges ``[rmin, rmax]`` (any shape).

    ``rmin``/``rmax`` are first widened to contain 0. A degenerate range (all zero)
    gets scale 1 and zero point 0."""
    qmin, qmax = qrange(bits)
    lo = torch.clamp(torch.as_tensor(rmin).detach().to(torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(rmax).detach().to(torch.float32), min=0.0)
    s = (hi - lo) / float(qmax - qmin)
    ok = (s > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s))
    z = torch.round(qmin - lo / s)
    z = torch.where(ok, z, torch.zeros_like(z))
    z = torch.clamp(z, qmin, qmax).to(torch.int32)
    return s, z


def fake_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row (per-token) min/max asymmetric fake quantization of a 2-D tensor."""
    qmin, qmax = qrange(bits)
    xf = x.detach().to(torch.float32)
    s, z = scale_zero_point(xf.amin(dim=1), xf.amax(dim=1), bits)
    return torch.fake_quantize_per_channel_affine(xf, s, z, 0, qmin, qmax)


def fake_quantize_tensor(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric fake quantization with a calibrated range ``[lo, hi]``."""
    qmin, qmax = qrange(bits)
    s, z = scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits)
    return torch.fake_quantize_per_tensor_affine(x.detach().to(torch.float32), float(s), int(z), qmin, qmax)
