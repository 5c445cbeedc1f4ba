"""``WASQConfig``: what :func:`superfloat.sw.wasq.quantize_` does to a model.

One frozen dataclass, validated on construction (``ValueError``/``TypeError`` with the
offending field named), serialisable with :meth:`WASQConfig.to_dict` /
:meth:`WASQConfig.from_dict` (this is what ``sfx_config.json`` records).

Defaults, and why (measured on SmolLM2-135M, weight-only, per output channel, 4096
held-out tokens, windows of 512; see ``docs/wasq.md``):

* ``weight_scale="channel"``: one scale per output channel (weight row). Per tensor is
  far worse for LLM weights, and per-channel scales fold into the accelerator's output
  shift / multiplier at no cost per processing element (SPEC section 1).
* ``scale_kind="float"``: float per-channel scales cost +0.4 % perplexity at SF8 and
  +84 % at SF4, power-of-two exponents +1.1 % and +319 %. The float scale reaches the
  hardware as the per-lane 16-bit multiplier of SPEC section 4 (``sfx.fold_scale``):
  one multiplier per output lane, not per PE. ``"pow2"`` is the multiplier-free choice.
* ``act_bits=None``: weight-only by default (SF8 per-token activations cost +6.2 %).
* ``act_exponent="dynamic"``: one exponent per token (per activation row), which the
  accelerator streams with each row (``xexp``, SPEC section 5). Static per-tensor
  exponents need calibration and saturate outliers.
* ``rounding="nearest_even"``: SPEC section 2's default; ``"toward_zero"`` is upstream's.
* ``skip``: embeddings, norms and the LM head stay float (see :data:`DEFAULT_SKIP`).
  Only ``nn.Linear`` and GPT-2's ``Conv1D`` are ever quantized, so embeddings and norms
  are never touched anyway; the patterns make that explicit and also keep ``lm_head``
  (usually tied to the embedding) float.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import sfx

__all__ = ["WASQConfig", "DEFAULT_SKIP", "CODES", "METHOD_ALIASES"]

#: Module-name patterns that are never quantized by default (``fnmatch`` globs; a
#: pattern matches a module when it matches its full dotted name or its last component).
DEFAULT_SKIP: tuple[str, ...] = (
    "lm_head",      # output projection (tied to the token embedding in most small LMs)
    "*embed*",      # token / position embeddings (embed_tokens, embed_positions, embed_out)
    "wte", "wpe",   # GPT-2 embeddings
    "*norm*",       # RMSNorm / LayerNorm (never Linear, listed for clarity)
    "ln_*",         # GPT-2 LayerNorms
)

#: Code families of the quantized weights (and activations). Only ``"sfx"`` is executed by
#: the accelerator; ``"int"`` (symmetric integer RTN) and ``"int_asym"`` (scale + zero
#: point) are the software baselines.
CODES = ("sfx", "int", "int_asym")
#: Legacy spellings of ``method`` that name a code family (checkpoints of format 1 and the
#: CLI): ``vanilla``/``sfx`` is SFx round-to-nearest, ``rtn-int``/``int`` the integer baseline.
METHOD_ALIASES = {"sfx": "sfx", "vanilla": "sfx", "int": "int", "rtn-int": "int", "rtn_int": "int"}
WEIGHT_SCALES = ("channel", "tensor")
SCALE_KINDS = ("pow2", "float")
ACT_EXPONENTS = ("dynamic", "static")
INT_MIN_BITS, INT_MAX_BITS = 2, 16


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"WASQConfig.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"WASQConfig.{name} must be an int in {sfx.MIN_BITS}..{sfx.MAX_BITS}, got {value!r}")
    if not sfx.MIN_BITS <= value <= sfx.MAX_BITS:
        raise ValueError(f"WASQConfig.{name} must be in {sfx.MIN_BITS}..{sfx.MAX_BITS} (SFx widths), got {value}")
    return value


_UNSET = object()


@dataclass(frozen=True)
class WASQConfig:
    """How to quantize a model: the one config of :func:`superfloat.sw.wasq.quantize_` (torchao style).

    Formats:
        weight_bits: width of the weights, 2..16 (SFx, or integer bits for the integer codes).
        act_bits: width of the inputs of every quantized linear layer, or ``None``
            (weight-only, the default).
        out_bits: width of the accelerator's output codes (SPEC section 4) for the
            accelerator-exact backend, or ``None`` (the backend's default); ``layer_out_bits``
            overrides it per layer.
        codes: ``"sfx"`` (SFx codes, default; the only family the accelerator executes),
            ``"int"`` (symmetric per-channel integer RTN baseline,
            ``torch.fake_quantize_per_channel_affine``, scale ``max|w_row| / (2**(b-1) - 1)``)
            or ``"int_asym"`` (scale and zero point). The integer families are software only.
        weight_scale: ``"channel"`` (one scale per output channel, default) or ``"tensor"``.
        scale_kind: ``"float"`` (default): codes ``encode(w / s[n])`` with
            ``s[n] = max|w_row| / (1 - 2**-M)`` in float64 (SPEC section 1), folded into
            the hardware multiplier by ``sfx.fold_scale``; ``"pow2"``: power-of-two
            exponents ``sfx.choose_exponent`` (multiplier-free). SFx only.
        group_size: ``None`` (per output channel or tensor, default), an int (one scale per
            group of that many input channels: software only) or ``"dynamic"`` (a power of
            two per layer chosen from its statistics within the memory of ``group_budget``).
        act_exponent: ``"dynamic"`` (one exponent per token, computed on the fly, default)
            or ``"static"`` (one calibrated range per layer input; see
            :func:`superfloat.sw.wasq.calibrate_`).
        act_scale: ``"pow2"`` (default): power-of-two activation exponents, per token
            (dynamic) or per layer (static); ``"float"``: dynamic, a float scale per token
            that the accelerator applies with its per-row multiplier (``xmult``, SPEC
            revision 2; a generation option of the RTL); static, a float scale (software
            only).
        act_clip_ratio: with per-token float scales, the row scale is this fraction of
            ``max|x[t]| / (1 - 2**-M)`` (``1.0``, default: no clipping); values above it
            saturate (activation clipping, as QuaRot does at 4 bits).
        rounding: ``"nearest_even"`` (default) or ``"toward_zero"`` (SPEC section 2; SFx only).
        skip: module-name globs never quantized (default :data:`DEFAULT_SKIP`).
        layer_bits: optional ``{glob: weight_bits}`` overrides (first match wins), for
            mixed precision; the checkpoint records the bits of every layer.
        layer_out_bits: optional ``{glob: out_bits}`` overrides of ``out_bits``.
    Method:
        method: the post-training method that prepares scales and rounding before the one
            conversion: ``"rtn"`` (round to nearest, default; CLI ``vanilla``/``rtn-int``) or
            a preset of :data:`superfloat.sw.wasq.ptq.METHODS` (``smoothquant``, ``awq``,
            ``adaround``, ``clip``, ``mixed``, ...). A preset that implies a format
            (``awq-g128``: ``group_size=128``; ``clip``: static activations; ``asym``:
            ``codes="int_asym"``) sets it when the field is left at its default.
            Legacy: ``method="sfx"/"vanilla"`` and ``"int"/"rtn-int"`` mean ``method="rtn"``
            with ``codes="sfx"`` / ``"int"`` (format-1 checkpoints store it so).
        method_options: the method's tuning knobs, overriding the preset
            (:class:`superfloat.sw.wasq.ptq.MethodOptions`: ``smoothquant`` alpha,
            ``awq_grid``, ``adaround_iters``, ``mp_fraction``, ``act_clip``, ...).
    """

    weight_bits: int = 8
    act_bits: int | None = None
    weight_scale: str = "channel"
    scale_kind: str = "float"
    act_exponent: str = "dynamic"
    rounding: str = "nearest_even"
    skip: tuple[str, ...] = DEFAULT_SKIP
    method: str = "rtn"
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    codes: str = "sfx"
    group_size: int | str | None = None
    group_budget: int = 128
    act_scale: str = "pow2"
    act_clip_ratio: float = 1.0
    out_bits: int | None = None
    layer_out_bits: Mapping[str, int] = field(default_factory=dict)
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .ptq.config import GROUP_CHOICES, METHODS as PTQ_METHODS, MethodOptions, preset_formats

        _check_bits("weight_bits", self.weight_bits)
        if self.act_bits is not None:
            _check_bits("act_bits", self.act_bits)
        if self.out_bits is not None:
            _check_bits("out_bits", self.out_bits)
        # method: legacy code-family names, then the presets
        m = self.method
        if isinstance(m, str) and m.lower() in METHOD_ALIASES:
            fam = METHOD_ALIASES[m.lower()]
            if self.codes not in ("sfx", fam):
                raise ValueError(f"WASQConfig.method={m!r} means codes={fam!r} but codes={self.codes!r} was given")
            object.__setattr__(self, "codes", fam)
            object.__setattr__(self, "method", "rtn")
        elif m not in PTQ_METHODS:
            raise ValueError(f"WASQConfig.method must be one of {', '.join(map(repr, PTQ_METHODS))} "
                             f"(or a code family: {', '.join(map(repr, METHOD_ALIASES))}), got {m!r}")
        _check_choice("codes", self.codes, CODES)
        for fname, value in preset_formats(self.method).items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == fname)
            cur = getattr(self, fname)
            if cur == default:
                object.__setattr__(self, fname, value)
            elif cur != value:
                raise ValueError(f"WASQConfig.method={self.method!r} implies {fname}={value!r}, got {cur!r}")
        _check_choice("weight_scale", self.weight_scale, WEIGHT_SCALES)
        _check_choice("scale_kind", self.scale_kind, SCALE_KINDS)
        _check_choice("act_exponent", self.act_exponent, ACT_EXPONENTS)
        _check_choice("act_scale", self.act_scale, SCALE_KINDS)
        r = self.act_clip_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"WASQConfig.act_clip_ratio must be a number in (0, 1], got {r!r}")
        if r != 1.0 and not self.uses_xmult:
            raise ValueError("WASQConfig.act_clip_ratio applies to dynamic SFx activations with a float scale per "
                             "token (act_bits set, act_exponent='dynamic', act_scale='float')")
        object.__setattr__(self, "act_clip_ratio", float(r))
        if self.rounding not in sfx.ROUNDINGS:
            raise ValueError(f"WASQConfig.rounding must be one of {', '.join(map(repr, sfx.ROUNDINGS))}, "
                             f"got {self.rounding!r}")
        if self.codes != "sfx" and self.rounding != "nearest_even":
            raise ValueError(f"WASQConfig.rounding must be 'nearest_even' for codes={self.codes!r} "
                             f"(torch's fake_quantize rounds half to even)")
        gs = self.group_size
        if gs is not None and gs != "dynamic" and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise ValueError(f"WASQConfig.group_size must be None, a positive int or 'dynamic', got {gs!r}")
        _check_choice("group_budget", self.group_budget, GROUP_CHOICES)
        if gs is not None and self.weight_scale != "channel":
            raise ValueError("WASQConfig.group_size needs weight_scale='channel' (groups split each output channel)")
        if self.act_bits is None and self.act_exponent == "static" and self.method != "rtn":
            raise ValueError(f"WASQConfig.method={self.method!r} with static activation ranges needs act_bits")
        skip = self.skip
        if isinstance(skip, str):
            raise TypeError(f"WASQConfig.skip must be a sequence of glob patterns, got the string {skip!r} "
                            f"(write skip=({skip!r},))")
        skip = tuple(skip)
        for p in skip:
            if not isinstance(p, str) or not p:
                raise TypeError(f"WASQConfig.skip must hold non-empty strings, got {p!r}")
        object.__setattr__(self, "skip", skip)
        for mapping in ("layer_bits", "layer_out_bits"):
            value = getattr(self, mapping)
            if not isinstance(value, Mapping):
                raise TypeError(f"WASQConfig.{mapping} must be a mapping {{glob: bits}}, got {value!r}")
            lb = {}
            for k, v in value.items():
                if not isinstance(k, str) or not k:
                    raise TypeError(f"WASQConfig.{mapping} keys must be non-empty glob strings, got {k!r}")
                lb[k] = _check_bits(f"{mapping}[{k!r}]", v)
            object.__setattr__(self, mapping, lb)
        if not isinstance(self.method_options, Mapping):
            raise TypeError(f"WASQConfig.method_options must be a mapping, got {self.method_options!r}")
        object.__setattr__(self, "method_options", dict(self.method_options))
        MethodOptions.for_config(self)  # validates the options (names the bad one)

    # ------------------------------------------------------------------ helpers

    @classmethod
    def preset(cls, method: str, **fields: Any) -> "WASQConfig":
        """``WASQConfig(method=method, **fields)`` (reads like torchao's presets)."""
        return cls(method=method, **fields)

    def is_skipped(self, name: str) -> bool:
        """True when module ``name`` matches a :attr:`skip` pattern (full name or last component)."""
        return any(_glob(name, p) for p in self.skip)

    def bits_for(self, name: str) -> int:
        """Weight bits of module ``name`` (first matching :attr:`layer_bits` glob, else :attr:`weight_bits`)."""
        return next((b for p, b in self.layer_bits.items() if _glob(name, p)), self.weight_bits)

    def out_bits_for(self, name: str) -> int | None:
        """Output bits of module ``name`` (first matching :attr:`layer_out_bits` glob, else :attr:`out_bits`)."""
        return next((b for p, b in self.layer_out_bits.items() if _glob(name, p)), self.out_bits)

    @property
    def options(self):
        """The validated :class:`~superfloat.sw.wasq.ptq.MethodOptions` of :attr:`method`."""
        from .ptq.config import MethodOptions

        return MethodOptions.for_config(self)

    def weight_format(self, bits: int | None = None, group_size: int | None = _UNSET):  # type: ignore[assignment]
        """The :class:`~superfloat.sw.wasq.formats.WeightFormat` of a layer (``bits`` and a
        concrete group size override the config's)."""
        from .formats import WeightFormat

        gs = (self.group_size if isinstance(self.group_size, int) else None) if group_size is _UNSET else group_size
        return WeightFormat(self.codes, bits or self.weight_bits, self.scale_kind, gs,
                            self.rounding if self.codes == "sfx" else "nearest_even")

    def hardware_notes(self) -> list[str]:
        """Why the SFx accelerator cannot execute this configuration (empty: it can)."""
        notes = []
        if self.codes == "int":
            notes.append("integer codes (baseline; per-token integer activation scales need a multiplier per row)")
        elif self.codes == "int_asym":
            notes.append("zero points (the LINEAR contract has no zero-point correction)")
        if self.group_size is not None:
            notes.append("per-group scales along K (the accelerator scales whole output channels)")
        if self.act_bits is not None and self.act_exponent == "static" and self.act_scale == "float":
            notes.append("a static float activation scale (the accelerator streams power-of-two exponents)")
        return notes

    @property
    def uses_xmult(self) -> bool:
        """Dynamic SFx activations with a float per-token scale: the accelerator needs its
        per-row multiplier (``xmult``, SPEC revision 2), a generation option of the RTL."""
        return self.codes == "sfx" and self.act_bits is not None and self.act_exponent == "dynamic" \
            and self.act_scale == "float"

    @property
    def hardware_executable(self) -> bool:
        """True when SPEC section 5's LINEAR computes every quantized layer exactly: SFx codes,
        per-output-channel (or per-tensor) scales, per-token or static power-of-two
        activation exponents. Folded smoothing/AWQ scales and clipping change only values;
        mixed widths embed exactly into a wider accelerator."""
        return not self.hardware_notes()

    @property
    def needs_calibration(self) -> bool:
        """Calibration text is needed (a method's search or static activation ranges)."""
        return self.method != "rtn" and self.options.needs_calibration(self) or \
            (self.act_bits is not None and self.act_exponent == "static")

    def replace(self, **changes: Any) -> "WASQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        for k in ("layer_bits", "layer_out_bits", "method_options"):
            d[k] = dict(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WASQConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WASQConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        if "skip" in d and d["skip"] is not None:
            d["skip"] = tuple(d["skip"])
        return cls(**d)

    def describe(self) -> str:
        """Short human label, e.g. ``SF8 float/channel``, ``SF8 + A8 dyn``, ``int4 RTN``, ``awq SF4 + A8 dyn``."""
        if self.codes == "int":
            w = f"int{self.weight_bits} RTN"
        elif self.codes == "int_asym":
            w = f"int{self.weight_bits} asym"
        else:
            w = f"SF{self.weight_bits} {self.scale_kind}/{self.weight_scale}"
        if self.group_size is not None:
            w += f" g{self.group_size}"
        if self.method != "rtn":
            w = f"{self.method} {w}"
        if self.act_bits is not None:
            w += f" + A{self.act_bits} {self.act_exponent}" + (" xmult" if self.uses_xmult else "") \
                + (f" clip {self.act_clip_ratio:g}" if self.act_clip_ratio != 1.0 else "")
        return w


def _glob(name: str, pattern: str) -> bool:
    """A pattern matches a module when it matches its full dotted name or its last component."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
