"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For every foldable group (:mod:`.graph`) with input channels ``j``::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(``max|W_j|`` over every output row of every consumer; ``max|X_j|`` over the
calibration tokens). The consumers' input columns are multiplied by ``s`` and the
producer's output channels divided by it (norm weight and bias, or the previous
linear's rows), so the float model is unchanged while the activations that reach the
quantizer are flatter (``X_j / s_j``) and the weights absorb the range. ``alpha = 0.5``
is the paper's default; larger values move more difficulty into the weights.

With grouped-query attention the ``v_proj -> o_proj`` factors live on the value
channels (several ``o_proj`` columns read one value channel), so the statistics are
maxima over the columns that share a channel.
"""
from __future__ import annotations

import torch
from torch import nn

from .calib import Calibration
from .graph import ScaleGroup, apply_scale, linear_weight, scale_groups

__all__ = ["smoothing_factors", "smooth_"]

_EPS = 1e-5


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X|**alpha / max|W|**(1-alpha)`` per channel (float64), 1 where either is 0,
    clamped to ``[1e-5, 1e5]``."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    x = x_absmax.detach().to(torch.float64)
    w = w_absmax.detach().to(torch.float64)
    if x.shape != w.shape:
        raise ValueError(f"activation and weight statistics differ in shape: {list(x.shape)} vs {list(w.shape)}")
    ok = (x > 0) & (w > 0) & torch.isfinite(x) & torch.isfinite(w)
    s = x.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1.0 - alpha)
    s = torch.where(ok, s, torch.ones_like(s))
    return s.clamp(_EPS, 1.0 / _EPS)


def group_weight_absmax(model: nn.Module, group: ScaleGroup) -> torch.Tensor:
    """max |W| per consumer input column, over all consumers."""
    out = None
    for name in group.consumers:
        w = linear_weight(model.get_submodule(name)).abs().amax(dim=0).to(torch.float64)
        out = w if out is None else torch.maximum(out, w)
    return out


@torch.no_grad()
def smooth_(model: nn.Module, calib: Calibration, alpha: float = 0.5, *, groups: list[ScaleGroup] | None = None,
            which: str = "all") -> dict[str, dict[str, float]]:
    """Fold SmoothQuant factors into ``model`` (in place) and rescale ``calib`` to match.

    Args:
        which: ``"all"`` foldable groups or ``"norm"`` (only norm -> linear, the paper's
            choice for OPT/BLOOM).
    Returns:
        ``{group: {"s_min", "s_max", "x_max_before", "x_max_after"}}``.
    """
    if which not in ("all", "norm"):
        raise ValueError(f"which must be 'all' or 'norm', got {which!r}")
    groups = scale_groups(model) if groups is None else groups
    report = {}
    for g in groups:
        if which == "norm" and g.prev_kind != "norm":
            continue
        cons = [c for c in g.consumers if c in calib]
        if not cons:
            continue
        x = calib.x(cons[0])
        x_cols = x.abs().amax(dim=0).to(torch.float64)
        w_cols = group_weight_absmax(model, g)
        s = smoothing_factors(g.reduce_columns(x_cols), g.reduce_columns(w_cols), alpha)
        apply_scale(model, g, s)
        calib.rescale(g.consumers, g.column_scale(s))
        report[g.name] = {"s_min": float(s.min()), "s_max": float(s.max()), "x_max_before": float(x_cols.max()),
                          "x_max_after": float(calib.x(cons[0]).abs().max())}
    return report
