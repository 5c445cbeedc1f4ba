"""``PTQConfig``: which post-training methods to apply, and the formats they target.

One frozen, validated dataclass (``ValueError``/``TypeError`` naming the field), with
``to_dict``/``from_dict`` and the presets of :data:`METHODS` (the W4A4 study's methods,
see ``docs/ptq-methods.md``)::

    PTQConfig.preset("awq", weight_bits=4, act_bits=4, codes="sfx")

:attr:`PTQConfig.hardware_executable` says whether the SFx accelerator's LINEAR
operation (SPEC section 5: per-output-channel scales or exponents, per-token activation
exponents, no per-group scales along K, no zero points) can run the result exactly;
:meth:`PTQConfig.hardware_notes` says why not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import DEFAULT_SKIP
from .quantizers import KINDS, WeightFormat

__all__ = ["PTQConfig", "METHODS", "METHOD_HELP", "ACT_CLIPS", "GROUP_CHOICES"]

ACT_CLIPS = ("max", "raw", "sigma", "percentile", "mse")
GROUP_CHOICES = (32, 64, 128, 256, 512)
MP_RANKINGS = ("own", "analyze", "auto")

#: preset name -> (description, overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("round to nearest, per-channel scales (the baseline)", {}),
    "smoothquant": ("SmoothQuant: s_j = max|X_j|^a / max|W_j|^(1-a) folded into the previous norm/linear",
                    {"smoothquant": 0.5}),
    "awq": ("AWQ: activation-aware per-channel scale search plus per-row clip search", {"awq": True,
                                                                                       "weight_clip": True}),
    "awq-g128": ("AWQ with per-group scales along K (group 128; software only)", {"awq": True, "weight_clip": True,
                                                                                  "group_size": 128}),
    "awq-dyngroup": ("AWQ with dynamic group sizing: a power-of-two group per layer under the memory of group "
                     "128 (software only)", {"awq": True, "weight_clip": True, "group_size": "dynamic"}),
    "clip": ("static per-layer activation clipping, threshold strategy searched per layer",
             {"act_mode": "static", "act_clip": "mse"}),
    "mixed": ("layer-wise mixed precision: the most sensitive layers at 8 bits", {"mixed_precision": True}),
    "adaround": ("AdaRound: learned up/down rounding per weight, with outlier-aware per-row clipping",
                 {"adaround": True, "weight_clip": True}),
    "asym": ("asymmetric integer RTN (scale and zero point)", {"codes": "int_asym"}),
    "sq-awq-mixed": ("combined: SmoothQuant (alpha 0.5), then AWQ scale and clip search, then mixed precision",
                     {"smoothquant": 0.5, "awq": True, "weight_clip": True, "mixed_precision": True}),
}
METHOD_HELP = {k: v[0] for k, v in METHODS.items()}


def _bits(name: str, v: Any, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"PTQConfig.{name} must be an int in 2..16, got {v!r}")
    if not 2 <= v <= 16:
        raise ValueError(f"PTQConfig.{name} must be in 2..16, got {v}")
    return v


def _choice(name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        raise ValueError(f"PTQConfig.{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


def _pos_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"PTQConfig.{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization recipe.

    Formats:
        weight_bits, act_bits: widths (``act_bits=None``: weight-only).
        codes: ``"sfx"`` (SFx codes), ``"int"`` (symmetric integer RTN baseline),
            ``"int_asym"`` (scale + zero point; weights and activations).
        scale_kind: SFx weight scales, ``"float"`` per row (hardware multiplier) or ``"pow2"``.
        group_size: ``None`` per output channel; an int: per group of that many input
            channels (software only); ``"dynamic"``: a power of two per layer from
            :data:`GROUP_CHOICES`, chosen from the layer's statistics so that the scales
            take no more memory than uniform ``group_budget`` groups.
        rounding: SFx round-to-nearest mode.
        act_mode: ``"dynamic"`` (per token) or ``"static"`` (one calibrated range per layer).
        act_clip: static range strategy, searched per layer (:mod:`.clipping`):
            ``max``, ``raw`` (+-1: SFx without exponents), ``sigma``, ``percentile``, ``mse``.
        act_scale: SFx static activations: ``"pow2"`` exponent (default, checkpointable) or ``"float"``.
    Methods:
        smoothquant: alpha in [0, 1] or None. ``smooth_groups``: ``"all"`` foldable groups or ``"norm"`` only.
        awq: per-channel scale search (``awq_grid`` points of alpha).
        weight_clip: per-row (per-group) clip-ratio search on the layer output error.
        adaround: learned rounding (``adaround_iters`` Adam steps per layer).
        mixed_precision: the most sensitive layers at ``mp_high_bits`` (weights, and
            activations when ``mp_act``): the top ``mp_fraction`` of layers, ranked by
            ``mp_ranking`` (``own`` output error, ``analyze`` = ``sfx analyze``'s
            ``rel_error``, ``auto`` (default) = analyze when available, else own).
        skip: module-name globs never quantized (WASQ's defaults).
    """

    weight_bits: int = 4
    act_bits: int | None = None
    codes: str = "sfx"
    scale_kind: str = "float"
    group_size: int | str | None = None
    group_budget: int = 128
    rounding: str = "nearest_even"
    act_mode: str = "dynamic"
    act_clip: str = "max"
    act_scale: str = "pow2"
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
    skip: tuple[str, ...] = DEFAULT_SKIP
    method: str = "custom"

    def __post_init__(self) -> None:
        _bits("weight_bits", self.weight_bits)
        _bits("act_bits", self.act_bits, allow_none=True)
        _choice("codes", self.codes, KINDS)
        _choice("scale_kind", self.scale_kind, ("float", "pow2"))
        gs = self.group_size
        if gs is not None and gs != "dynamic":
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise ValueError(f"PTQConfig.group_size must be None, a positive int or 'dynamic', got {gs!r}")
        _choice("group_budget", self.group_budget, GROUP_CHOICES)
        _choice("rounding", self.rounding, ("nearest_even", "toward_zero"))
        if self.codes != "sfx" and self.rounding != "nearest_even":
            raise ValueError("PTQConfig.rounding must be 'nearest_even' for integer codes (torch rounds half to even)")
        _choice("act_mode", self.act_mode, ("dynamic", "static"))
        _choice("act_clip", self.act_clip, ACT_CLIPS)
        _choice("act_scale", self.act_scale, ("pow2", "float"))
        if self.smoothquant is not None:
            if isinstance(self.smoothquant, bool) or not isinstance(self.smoothquant, (int, float)) \
                    or not 0.0 <= float(self.smoothquant) <= 1.0:
                raise ValueError(f"PTQConfig.smoothquant (alpha) must be a number in [0, 1] or None, "
                                 f"got {self.smoothquant!r}")
        _choice("smooth_groups", self.smooth_groups, ("all", "norm"))
        for name in ("awq", "weight_clip", "adaround", "mixed_precision", "mp_act"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PTQConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _pos_int("awq_grid", self.awq_grid)
        _pos_int("adaround_iters", self.adaround_iters)
        _bits("mp_high_bits", self.mp_high_bits)
        if isinstance(self.mp_fraction, bool) or not isinstance(self.mp_fraction, (int, float)) \
                or not 0.0 < float(self.mp_fraction) <= 1.0:
            raise ValueError(f"PTQConfig.mp_fraction must be in (0, 1], got {self.mp_fraction!r}")
        _choice("mp_ranking", self.mp_ranking, MP_RANKINGS)
        if isinstance(self.skip, str):
            raise TypeError(f"PTQConfig.skip must be a sequence of glob patterns, got the string {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.act_bits is None and self.act_mode == "static":
            raise ValueError("PTQConfig.act_mode='static' needs act_bits (static ranges quantize activations)")

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> "PTQConfig":
        """The config of a named method (:data:`METHODS`) with ``overrides``."""
        if method not in METHODS:
            raise ValueError(f"unknown PTQ method {method!r}; choose one of {', '.join(METHODS)}")
        kw = dict(METHODS[method][1])
        if method == "asym" and overrides.get("codes", "int_asym") != "int_asym":
            raise ValueError("method 'asym' is the asymmetric integer baseline: it has no codes other than 'int_asym'")
        kw.update(overrides)
        kw["method"] = method
        return cls(**kw)

    def replace(self, **changes: Any) -> "PTQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PTQConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PTQConfig field(s): {', '.join(unknown)}")
        return cls(**dict(d))

    # ------------------------------------------------------------------ derived

    def weight_format(self, bits: int | None = None, group_size: int | None = None) -> WeightFormat:
        gs = group_size if group_size is not None else (self.group_size if isinstance(self.group_size, int) else None)
        return WeightFormat(self.codes, bits or self.weight_bits, self.scale_kind, gs,
                            self.rounding if self.codes == "sfx" else "nearest_even")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.smoothquant is not None or self.awq or self.weight_clip or self.adaround
                    or self.mixed_precision or self.group_size == "dynamic"
                    or (self.act_bits is not None and self.act_mode == "static"))

    def hardware_notes(self) -> list[str]:
        """Why the SFx accelerator cannot execute this configuration (empty: it can)."""
        notes = []
        if self.codes == "int":
            notes.append("integer codes (baseline; per-token integer activation scales need a multiplier per row)")
        elif self.codes == "int_asym":
            notes.append("zero points (the LINEAR contract has no zero-point correction)")
        if self.group_size is not None:
            notes.append("per-group scales along K (the accelerator scales whole output channels)")
        return notes

    def hardware_short(self) -> str:
        """``"yes"`` or ``"no: ..."`` in a few words (for tables)."""
        parts = []
        if self.codes == "int":
            parts.append("integer codes")
        elif self.codes == "int_asym":
            parts.append("zero points")
        if self.group_size is not None:
            parts.append("groups along K")
        return "yes" if not parts else "no: " + ", ".join(parts)

    @property
    def hardware_executable(self) -> bool:
        """True when SPEC section 5's LINEAR computes every quantized layer exactly: SFx codes,
        per-output-channel scales (float -> per-lane multiplier, or exponents), per-token
        or per-tensor activation exponents/scales. Folded smoothing/AWQ scales and
        clipping change only values; mixed widths embed exactly into a wider accelerator
        (an SF4 code is the SF8 code with the magnitude shifted left by 4)."""
        return not self.hardware_notes()

    def describe(self) -> str:
        """Short label (the name WASQ's ``WASQConfig.describe`` has), e.g. ``awq W4A4 SF4``."""
        return self.label()

    def label(self) -> str:
        w = self.weight_format().label() if self.group_size != "dynamic" else \
            f"{self.weight_format().label()} g-dyn"
        a = "A16" if self.act_bits is None else f"A{self.act_bits}"
        return f"{self.method} W{self.weight_bits}{a[0:]} {w}"
