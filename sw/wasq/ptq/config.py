"""The post-training methods: their presets and tuning knobs (:class:`MethodOptions`).

A method is named by :attr:`superfloat.sw.wasq.WASQConfig.method`; its knobs come from
the preset (:data:`METHODS`) updated with ``WASQConfig.method_options``. Formats (bits,
codes, groups, activation mode) belong to the ``WASQConfig`` itself; a preset that
implies a format (:func:`preset_formats`) sets it there::

    WASQConfig(weight_bits=4, act_bits=8, method="awq")
    WASQConfig(weight_bits=4, method="awq-g128")                      # group_size=128
    WASQConfig(weight_bits=4, method="smoothquant", method_options={"smoothquant": 0.8})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MethodOptions", "METHODS", "ACT_CLIPS", "GROUP_CHOICES", "preset_formats"]

ACT_CLIPS = ("max", "raw", "sigma", "percentile", "mse")
ROTATIONS = ("hadamard", "random")
ROTATE_ONLINE = ("host", "none")
GROUP_CHOICES = (32, 64, 128, 256, 512)
MP_RANKINGS = ("own", "analyze", "auto")

#: preset name -> (description, knobs of :class:`MethodOptions`, implied WASQConfig formats)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "rtn": ("round to nearest, per-channel scales (the baseline; CLI vanilla / rtn-int)", {}, {}),
    "smoothquant": ("SmoothQuant: s_j = max|X_j|^a / max|W_j|^(1-a) folded into the previous norm/linear",
                    {"smoothquant": 0.5}, {}),
    "awq": ("AWQ: activation-aware per-channel scale search plus per-row clip search",
            {"awq": True, "weight_clip": True}, {}),
    "awq-g128": ("AWQ with per-group scales along K (group 128; software only)",
                 {"awq": True, "weight_clip": True}, {"group_size": 128}),
    "awq-dyngroup": ("AWQ with dynamic group sizing: a power-of-two group per layer under the memory of group "
                     "128 (software only)", {"awq": True, "weight_clip": True}, {"group_size": "dynamic"}),
    "clip": ("static per-layer activation clipping, threshold strategy searched per layer",
             {"act_clip": "mse"}, {"act_exponent": "static"}),
    "mixed": ("layer-wise mixed precision: the most sensitive layers at 8 bits", {"mixed_precision": True}, {}),
    "adaround": ("AdaRound: learned up/down rounding per weight, with outlier-aware per-row clipping",
                 {"adaround": True, "weight_clip": True}, {}),
    "asym": ("asymmetric integer RTN (scale and zero point)", {}, {"codes": "int_asym"}),
    "sq-awq-mixed": ("combined: SmoothQuant (alpha 0.5), then AWQ scale and clip search, then mixed precision",
                     {"smoothquant": 0.5, "awq": True, "weight_clip": True, "mixed_precision": True}, {}),
    "gptq": ("GPTQ: column-by-column rounding with inverse-Hessian error feedback on the fixed per-row grid "
             "(act-order, damping 1 %)", {"gptq": True}, {}),
    "gptq-clip": ("GPTQ on a grid whose per-row range is first clipped by a weight-MSE search",
                  {"gptq": True, "gptq_mse_clip": True}, {}),
    "rotate": ("QuaRot-style rotation: norm scales absorbed, randomized Hadamard on the residual stream, the "
               "value/output heads and (online, on the host) before down_proj; then round to nearest",
               {"rotate": "hadamard"}, {}),
    "rotate-gptq": ("rotation (as 'rotate'), then GPTQ", {"rotate": "hadamard", "gptq": True}, {}),
    "rotate-gptq-clip": ("rotation, then GPTQ on weight-MSE clipped grids",
                         {"rotate": "hadamard", "gptq": True, "gptq_mse_clip": True}, {}),
}


def preset_formats(method: str) -> dict[str, Any]:
    """The WASQConfig fields that preset ``method`` implies (``{}`` for most)."""
    return dict(METHODS[method][2]) if method in METHODS else {}


def _choice(name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        raise ValueError(f"method option {name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


def _pos_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"method option {name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class MethodOptions:
    """The knobs of the post-training passes (validated; ``ValueError``/``TypeError`` name the option).

    Passes (each a module of :mod:`superfloat.sw.wasq.ptq`):
        smoothquant: alpha in [0, 1] or None (:mod:`.smoothquant`); ``smooth_groups``:
            ``"all"`` foldable groups or ``"norm"`` only.
        awq: per-channel scale search, ``awq_grid`` points of alpha (:mod:`.awq`).
        weight_clip: per-row (per-group) clip-ratio search on the layer output error.
        adaround: learned rounding, ``adaround_iters`` Adam steps per layer (:mod:`.adaround`).
        mixed_precision: the most sensitive layers at ``mp_high_bits`` (weights, and
            activations when ``mp_act``): the top ``mp_fraction`` of layers, ranked by
            ``mp_ranking`` (``own`` output error, ``analyze`` = ``sfx analyze``'s
            ``rel_error``, ``auto`` = analyze when available) (:mod:`.mixed_precision`).
        act_clip: static activation range strategy, searched per layer (:mod:`.clipping`):
            ``max``, ``raw`` (+-1: SFx without exponents), ``sigma``, ``percentile``, ``mse``.
        gptq: GPTQ levels on the fixed grid (:mod:`.gptq`): ``gptq_damp`` (fraction of the
            Hessian's mean diagonal added to it), ``gptq_act_order`` (columns by decreasing
            ``H_kk``), ``gptq_block`` (lazy block size), ``gptq_mse_clip`` (per-row clip ratio
            from a weight-MSE search before GPTQ; ``weight_clip`` uses the output-error search).
        rotate: ``"hadamard"`` / ``"random"`` or None: orthogonal rotations folded into the float
            model before calibration (:mod:`.rotation`); ``rotate_online``: ``"host"`` (the
            rotation before down_proj, a float op on the host) or ``"none"``; ``rotate_heads``:
            per-head Hadamard of the value/output projections; ``rotate_seed``: random signs and
            matrices.
    """

    smoothquant: float | None = None
    smooth_groups: str = "all"
    awq: bool = False
    awq_grid: int = 20
    weight_clip: bool = False
    adaround: bool = False
    adaround_iters: int = 100
    mixed_precision: bool = False
    mp_high_bits: int = 8
    mp_fraction: float = 0.05
    mp_act: bool = True
    mp_ranking: str = "auto"
    act_clip: str = "max"
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_block: int = 128
    gptq_mse_clip: bool = False
    rotate: str | None = None
    rotate_online: str = "host"
    rotate_heads: bool = True
    rotate_seed: int = 0

    def __post_init__(self) -> None:
        if self.smoothquant is not None:
            if isinstance(self.smoothquant, bool) or not isinstance(self.smoothquant, (int, float)) \
                    or not 0.0 <= float(self.smoothquant) <= 1.0:
                raise ValueError(f"method option smoothquant (alpha) must be a number in [0, 1] or None, "
                                 f"got {self.smoothquant!r}")
        _choice("smooth_groups", self.smooth_groups, ("all", "norm"))
        for name in ("awq", "weight_clip", "adaround", "mixed_precision", "mp_act"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"method option {name} must be a bool, got {getattr(self, name)!r}")
        _pos_int("awq_grid", self.awq_grid)
        _pos_int("adaround_iters", self.adaround_iters)
        if isinstance(self.mp_high_bits, bool) or not isinstance(self.mp_high_bits, int) \
                or not 2 <= self.mp_high_bits <= 16:
            raise ValueError(f"method option mp_high_bits must be an int in 2..16, got {self.mp_high_bits!r}")
        if isinstance(self.mp_fraction, bool) or not isinstance(self.mp_fraction, (int, float)) \
                or not 0.0 < float(self.mp_fraction) <= 1.0:
            raise ValueError(f"method option mp_fraction must be in (0, 1], got {self.mp_fraction!r}")
        _choice("mp_ranking", self.mp_ranking, MP_RANKINGS)
        _choice("act_clip", self.act_clip, ACT_CLIPS)
        for name in ("gptq", "gptq_act_order", "gptq_mse_clip", "rotate_heads"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"method option {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not 0.0 < float(self.gptq_damp) <= 1.0:
            raise ValueError(f"method option gptq_damp must be a number in (0, 1], got {self.gptq_damp!r}")
        _pos_int("gptq_block", self.gptq_block)
        if self.gptq and self.adaround:
            raise ValueError("method options gptq and adaround both choose the rounding: enable one of them")
        if self.rotate is not None:
            _choice("rotate", self.rotate, ROTATIONS)
        _choice("rotate_online", self.rotate_online, ROTATE_ONLINE)
        if isinstance(self.rotate_seed, bool) or not isinstance(self.rotate_seed, int) or self.rotate_seed < 0:
            raise ValueError(f"method option rotate_seed must be a non-negative int, got {self.rotate_seed!r}")

    @classmethod
    def for_config(cls, config: Any) -> "MethodOptions":
        """The preset of ``config.method`` updated with ``config.method_options``."""
        if config.method not in METHODS:
            raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
        kw = dict(METHODS[config.method][1])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config.method_options) - names)
        if unknown:
            raise ValueError(f"unknown method option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        kw.update(config.method_options)
        return cls(**kw)

    @property
    def scaling(self) -> bool:
        """SmoothQuant or AWQ scales are folded into the float model."""
        return self.smoothquant is not None or self.awq

    def needs_calibration(self, config: Any) -> bool:
        return bool(self.scaling or self.weight_clip or self.adaround or self.gptq or self.mixed_precision
                    or config.group_size == "dynamic" or (config.act_bits is not None
                                                          and config.act_exponent == "static"))
