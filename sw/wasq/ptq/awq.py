"""AWQ (Lin et al. 2024): activation-aware weight quantization, on SFx or integer grids.

Three searches, all on calibration inputs captured from the float model:

* **Scale search** (:func:`awq_scale_`): for every foldable group (:mod:`.graph`), the
  per-input-channel scale ``s = x_mean**a / w_mean**(1-a)`` (AutoAWQ's "duo" form:
  ``x_mean`` = mean ``|x_j|``, ``w_mean`` = mean of ``|W|`` normalised per row),
  normalised to ``sqrt(max * min) = 1``, for ``a`` on a grid in ``[0, 1)``; plus
  ``s = 1``. The chosen ``a`` minimises the consumers' output error
  ``sum_c ||A(X/s) Q(W_c diag(s))^T - X W_c^T||^2`` (``A`` = the activation quantizer
  when activations are quantized: the study's "AWQ with activation quantization").
  Folding ``s`` (:func:`.graph.apply_scale`) leaves the float model unchanged. Since
  ``s = 1`` is a candidate, the calibration error never grows.
* **Clip search** (:func:`clip_search`): per output row (or per row and group) the
  ratio ``r`` in ``1, 0.95, ..., 0.5`` of the range that minimises that row's output
  error ``||X (Q_r(w) - w)||^2`` (a group's partial output for per-group formats).
  Still one scale per row: hardware-executable for per-channel SFx.
* **Dynamic group sizing** (:func:`choose_group_sizes`): per layer a power-of-two
  group size from :data:`.config.GROUP_CHOICES`, from the layer's statistics: the
  activation-weighted quantization error ``E(g) = sum_nk (Q_g(W) - W)_nk^2 E[x_k^2]``
  relative to the output energy, traded against the bytes of the per-group scales by a
  Lagrange multiplier, bisected so that the total scale memory stays within that of
  uniform ``budget`` groups. Layers whose weights have outliers get small groups, smooth
  layers large ones. Per-group scales are software-only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .calib import Calibration
from .graph import ScaleGroup, apply_scale, linear_weight, scale_groups
from ..formats import ActQuantizer, WeightFormat, best_clip, fake_quant_weight, group_view

__all__ = ["awq_scale_", "clip_search", "choose_group_sizes", "group_error", "CLIP_RATIOS"]

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


def _w_mean(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Mean over rows of ``|W|`` normalised by its row (or group) maximum, per column."""
    wg = group_view(w.abs().to(torch.float32), group_size)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return wg.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(dim=0)


@torch.no_grad()
def awq_scale_(model: nn.Module, calib: Calibration, fmt_of: Callable[[str], WeightFormat],
               act_of: Callable[[str], ActQuantizer | None] | None = None, *, grid: int = 20, tokens: int = 256,
               groups: list[ScaleGroup] | None = None) -> dict[str, dict[str, float]]:
    """Search and fold AWQ scales for every group (in place; ``calib`` is rescaled).

    Args:
        fmt_of: weight format of a consumer layer (its bits may differ per layer).
        act_of: activation quantizer of a consumer (or None: weight-only error).
        grid: number of ``a`` values ``0, 1/grid, ..., (grid-1)/grid``.
        tokens: calibration tokens used by the search.
    Returns:
        ``{group: {"alpha" (None for s = 1), "error", "error_rtn"}}``.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"AWQ grid must be a positive int, got {grid!r}")
    groups = scale_groups(model) if groups is None else groups
    report = {}
    for g in groups:
        cons = [c for c in g.consumers if c in calib]
        if not cons:
            continue
        x = calib.sample(cons[0], tokens).to(torch.float32)
        ws = {c: linear_weight(model.get_submodule(c)).to(torch.float32) for c in cons}
        refs = {c: x @ w.t() for c, w in ws.items()}
        energy = sum(float(r.double().pow(2).sum()) for r in refs.values()) or 1.0
        x_mean = g.reduce_columns(x.abs().mean(dim=0).to(torch.float64), "mean")
        w_mean = None
        for c, w in ws.items():
            wm = _w_mean(w, fmt_of(c).group_size).to(torch.float64)
            w_mean = wm if w_mean is None else torch.maximum(w_mean, wm)
        w_mean = g.reduce_columns(w_mean, "mean")

        def loss(s: torch.Tensor | None) -> float:
            cs = None if s is None else g.column_scale(s).to(torch.float32)
            xs = x if cs is None else x / cs
            tot = 0.0
            for c, w in ws.items():
                a = act_of(c) if act_of is not None else None
                xq = a(xs) if a is not None else xs
                wq = fake_quant_weight(w if cs is None else w * cs, fmt_of(c))
                tot += float((xq @ wq.t() - refs[c]).double().pow(2).sum())
            return tot / energy

        base = loss(None)
        best, best_alpha, best_s = base, None, None
        for i in range(grid):
            alpha = i / grid
            s = (x_mean.clamp(min=1e-8).pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
            s = s / torch.sqrt(s.max() * s.min())
            if not bool(torch.all(torch.isfinite(s) & (s > 0))):
                continue
            e = loss(s)
            if e < best:
                best, best_alpha, best_s = e, alpha, s
        if best_s is not None:
            apply_scale(model, g, best_s)
            calib.rescale(g.consumers, g.column_scale(best_s))
        report[g.name] = {"alpha": best_alpha, "error": best, "error_rtn": base}
    return report


@torch.no_grad()
def clip_search(w: torch.Tensor, x: torch.Tensor, fmt: WeightFormat, ratios=CLIP_RATIOS,
                act: ActQuantizer | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-row (per row and group) clip ratios minimising the output error on ``x``.

    Args:
        w: ``[N, K]`` float weights; x: ``[T, K]`` calibration inputs.
    Returns:
        ``(clip [N] or [N, G], {"error", "error_noclip"})`` (relative output errors).
    """
    if w.dim() != 2 or x.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"clip_search: w [N, K] and x [T, K] must agree, got {list(w.shape)} and {list(x.shape)}")
    w = w.detach().to(torch.float32)
    xa = act(x) if act is not None else x
    xg = group_view(xa.to(torch.float32), fmt.group_size).permute(1, 2, 0)  # [G, g, T]
    n = w.shape[0]

    def error(r: float) -> torch.Tensor:
        d = group_view(fake_quant_weight(w, fmt, clip=r) - w, fmt.group_size).permute(1, 0, 2)  # [G, N, g]
        return torch.bmm(d, xg).pow(2).sum(dim=2).t()  # [N, G]

    best, best_err, err1 = best_clip(ratios, error)
    energy = float((xa @ w.t()).double().pow(2).sum()) or 1.0
    clip = best.reshape(n) if best.shape[1] == 1 else best
    return clip, {"error": float(best_err.double().sum()) / energy, "error_noclip": float(err1.double().sum()) / energy}


def group_error(w: torch.Tensor, h_diag: torch.Tensor, fmt: WeightFormat) -> float:
    """``sum_nk (Q(W) - W)^2 h_k`` (float64) for the diagonal second moment ``h``."""
    d = (fake_quant_weight(w, fmt) - w.to(torch.float32)).double()
    return float((d.pow(2) * h_diag.reshape(1, -1).double()).sum())


def _scale_bytes(fmt: WeightFormat, n: int, k: int, g: int) -> int:
    groups = -(-k // g)
    per = 4  # float32 scale (or int8 exponent for pow2)
    if fmt.kind == "sfx" and fmt.scale_kind == "pow2":
        per = 1
    if fmt.kind == "int_asym":
        per += 1 if fmt.bits <= 8 else 4
    return n * groups * per


@torch.no_grad()
def choose_group_sizes(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], fmt_of: Callable[[str], WeightFormat],
                       budget: int = 128, choices=(32, 64, 128, 256, 512)) -> tuple[dict[str, int], dict[str, float]]:
    """Per-layer power-of-two group sizes (see the module docstring).

    Args:
        layers: ``{name: (w [N, K], h_diag [K] = mean x_k^2)}``.
        fmt_of: the base format of a layer (its group size is replaced).
        budget: the uniform group size whose scale memory must not be exceeded.
    Returns:
        ``({name: group_size}, {"scale_bytes", "budget_bytes", "lambda"})``.
    """
    for c in choices:
        if c < 1 or c & (c - 1):
            raise ValueError(f"group size choices must be powers of two, got {c}")
    table: dict[str, list[tuple[int, float, int]]] = {}
    budget_bytes = 0
    for name, (w, h) in layers.items():
        n, k = w.shape
        base = fmt_of(name)
        energy = float(((w.double() ** 2) * h.double().reshape(1, -1)).sum()) or 1.0
        opts = []
        for g in choices:
            if g > k and g != min(choices):
                continue
            f = WeightFormat(base.kind, base.bits, base.scale_kind, g, base.rounding)
            opts.append((g, group_error(w, h, f) / energy, _scale_bytes(base, n, k, g)))
        table[name] = opts
        budget_bytes += _scale_bytes(base, n, k, budget)

    def pick(lam: float) -> tuple[dict[str, int], int]:
        out, tot = {}, 0
        for name, opts in table.items():
            g, _, b = min(opts, key=lambda o: (o[1] + lam * o[2], -o[0]))
            out[name] = g
            tot += b
        return out, tot

    lo, hi = 0.0, 1.0
    choice, tot = pick(hi)
    while tot > budget_bytes and hi < 1e30:
        hi *= 16
        choice, tot = pick(hi)
    if tot > budget_bytes:  # even the largest groups do not fit: take them
        return {n: max(o[0] for o in opts) for n, opts in table.items()}, {"scale_bytes": float(tot),
                                                                        "budget_bytes": float(budget_bytes),
                                                                        "lambda": math.inf}
    for _ in range(60):  # bisection in log space
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        c, t = pick(mid)
        if t <= budget_bytes:
            hi, choice, tot = mid, c, t
        else:
            lo = mid
        if lo > 0 and hi / lo < 1.001:
            break
    return choice, {"scale_bytes": float(tot), "budget_bytes": float(budget_bytes), "lambda": hi}
