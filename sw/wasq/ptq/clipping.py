"""Static activation clipping: one calibrated range per layer input, searched per layer.

A static range saturates everything outside it; a tighter range gives finer steps to
the bulk of the values. Strategies (``STRATEGIES``) propose ranges from the layer's
calibration inputs ``X``; each layer keeps the candidate with the smallest output error
``||(A(X) - X) W^T||^2`` (``A`` = the activation quantizer with that range):

* ``max``: ``[min X, max X]`` (plain static calibration; one candidate);
* ``raw``: ``[-1, 1]`` fixed: the upstream "clamp to [-1, 1]". For SFx this is SFx
  **without exponents** (``E = 0``: saturation at ``1 - 2**-M``); the study measured a
  static +-1 clip raising OPT's WikiText-2 perplexity from 25 to 71;
* ``sigma``: ``mean +- k * std`` of all elements, ``k`` in ``SIGMA_KS``;
* ``percentile``: the ``p``-th percentile of ``|X|`` (of ``X`` at both ends for
  asymmetric codes), ``p`` in ``PERCENTILES``;
* ``mse``: a fraction ``r`` in ``MSE_RATIOS`` of the full range.

Symmetric quantizers (SFx, symmetric int) use ``c = max(|lo|, |hi|)``. With SFx
power-of-two exponents the saturation level is ``(1 - 2**-M) * 2**E`` with
``E = choose_exponent(c)``, so ranges snap up to the next power of two; SFx with a
``float`` per-tensor activation scale saturates at ``c`` exactly.

:func:`float_clip` clamps without quantizing: the clipping alone, for analysis.
"""
from __future__ import annotations

import math

import torch

from ..formats import ActQuantizer

__all__ = ["STRATEGIES", "SIGMA_KS", "PERCENTILES", "MSE_RATIOS", "candidate_ranges", "calibrate_act",
           "float_clip", "FloatClip"]

STRATEGIES = ("max", "raw", "sigma", "percentile", "mse")
SIGMA_KS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
PERCENTILES = (99.0, 99.9, 99.99, 99.999, 100.0)
MSE_RATIOS = (1.0, 0.8, 0.6, 0.45, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)


def _quantile(v: torch.Tensor, q: float) -> float:
    """Exact ``q``-quantile (``0 <= q <= 1``, nearest rank) of a 1-D tensor."""
    n = v.numel()
    k = min(n, max(1, int(math.ceil(q * n))))
    return float(torch.kthvalue(v, k).values)


def candidate_ranges(x: torch.Tensor, strategy: str, kind: str, bits: int) -> list[tuple[str, tuple[float, float]]]:
    """``[(parameter label, (lo, hi))]`` proposed by ``strategy`` for inputs ``x``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"clipping strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    xf = x.detach().reshape(-1).to(torch.float64)
    mn, mx = float(xf.min()), float(xf.max())
    mn, mx = min(mn, 0.0), max(mx, 0.0)
    if strategy == "max":
        return [("max", (mn, mx))]
    if strategy == "raw":
        one = 1.0 - 2.0 ** -(bits - 1) if kind == "sfx" else 1.0  # SFx: exponent 0, i.e. no exponent at all
        return [("+-1", (-one, one))]
    out = []
    if strategy == "sigma":
        mu, sd = float(xf.mean()), float(xf.std())
        for k in SIGMA_KS:
            lo, hi = max(mn, mu - k * sd), min(mx, mu + k * sd)
            out.append((f"k={k:g}", (min(lo, 0.0), max(hi, 0.0))))
    elif strategy == "percentile":
        a = xf.abs()
        for p in PERCENTILES:
            if kind == "int_asym":
                lo, hi = _quantile(xf, 1 - p / 100), _quantile(xf, p / 100)
            else:
                c = _quantile(a, p / 100)
                lo, hi = -c, c
            out.append((f"p={p:g}", (min(lo, 0.0), max(hi, 0.0))))
    else:
        for r in MSE_RATIOS:
            out.append((f"r={r:g}", (mn * r, mx * r)))
    return [(lab, (lo, hi)) for lab, (lo, hi) in out if hi - lo > 0]


@torch.no_grad()
def calibrate_act(act: ActQuantizer, x: torch.Tensor, w: torch.Tensor | None, strategy: str) -> dict[str, float | str]:
    """Set ``act``'s static range from ``strategy`` (searched on ``x`` [T, K] through the
    layer's float weight ``w`` [N, K]; plain input error when ``w`` is None).

    Returns ``{"strategy", "param", "lo", "hi", "error"}`` (error relative to the output energy)."""
    if act.mode != "static":
        raise ValueError("calibrate_act needs a static activation quantizer")
    x32 = x.detach().to(torch.float32)
    ref = x32 @ w.t().to(torch.float32) if w is not None else x32
    energy = float(ref.double().pow(2).sum()) or 1.0
    best = None
    for label, (lo, hi) in candidate_ranges(x32, strategy, act.kind, act.bits):
        rng = (lo, hi) if act.kind == "int_asym" else max(-lo, hi)
        act.set_threshold(rng, strategy)
        xq = act(x32)
        y = xq @ w.t().to(torch.float32) if w is not None else xq
        err = float((y - ref).double().pow(2).sum()) / energy
        if best is None or err < best[0]:
            best = (err, label, lo, hi, rng)
    if best is None:  # all-zero input: any range is exact
        best = (0.0, "zero", -1.0, 1.0, (-1.0, 1.0) if act.kind == "int_asym" else 1.0)
    err, label, lo, hi, rng = best
    act.set_threshold(rng, strategy)
    return {"strategy": strategy, "param": label, "lo": lo, "hi": hi, "error": err}


class FloatClip:
    """``clamp(x, -c, c)`` without quantization (the clipping alone)."""

    kind = "float"
    hardware_executable = False

    def __init__(self, c: float = 1.0) -> None:
        self.c = float(c)
        self.bits = 16

    def describe(self) -> str:
        return f"float clamp +-{self.c:g}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, -self.c, self.c)


def float_clip(model: torch.nn.Module, layers: list[str], c: float = 1.0) -> list:
    """Install forward pre-hooks clamping the inputs of ``layers`` to ``+-c``; returns the
    handles (``h.remove()`` undoes it)."""
    handles = []
    clip = FloatClip(c)
    for name in layers:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args: (clip(args[0]), *args[1:])))
    return handles
