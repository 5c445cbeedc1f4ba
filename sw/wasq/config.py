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

__all__ = ["WASQConfig", "DEFAULT_SKIP", "METHODS", "METHOD_ALIASES", "normalize_method"]

#: Module-name patterns that are never quantized by default (``fnmatch`` globs; a
#: pattern matches a module when it matches its full dotted name or its last component).
DEFAULT_SKIP: tuple[str, ...] = (
    "lm_head",      # output projection (tied to the token embedding in most small LMs)
    "*embed*",      # token / position embeddings (embed_tokens, embed_positions, embed_out)
    "wte", "wpe",   # GPT-2 embeddings
    "*norm*",       # RMSNorm / LayerNorm (never Linear, listed for clarity)
    "ln_*",         # GPT-2 LayerNorms
)

METHODS = ("sfx", "int")
#: CLI spellings: ``vanilla`` is SFx round-to-nearest (the upstream name), ``rtn-int`` the integer baseline.
METHOD_ALIASES = {"sfx": "sfx", "vanilla": "sfx", "int": "int", "rtn-int": "int", "rtn_int": "int"}
WEIGHT_SCALES = ("channel", "tensor")
SCALE_KINDS = ("pow2", "float")
ACT_EXPONENTS = ("dynamic", "static")
INT_MIN_BITS, INT_MAX_BITS = 2, 16


def normalize_method(method: str) -> str:
    """``"vanilla"``/``"sfx"`` -> ``"sfx"``, ``"rtn-int"``/``"int"`` -> ``"int"``."""
    if not isinstance(method, str) or method.lower() not in METHOD_ALIASES:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHOD_ALIASES))}, got {method!r}")
    return METHOD_ALIASES[method.lower()]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"WASQConfig.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"WASQConfig.{name} must be an int in {sfx.MIN_BITS}..{sfx.MAX_BITS}, got {value!r}")
    if not sfx.MIN_BITS <= value <= sfx.MAX_BITS:
        raise ValueError(f"WASQConfig.{name} must be in {sfx.MIN_BITS}..{sfx.MAX_BITS} (SFx widths), got {value}")
    return value


@dataclass(frozen=True)
class WASQConfig:
    """How to quantize a model (torchao style: pass it to :func:`quantize_`).

    Attributes:
        weight_bits: SFx width of the weights, 2..16 (for ``method="int"``: integer bits).
        act_bits: SFx width of the inputs of every quantized linear layer, or ``None``
            (weight-only, the default).
        weight_scale: ``"channel"`` (one scale per output channel, default) or ``"tensor"``.
        scale_kind: ``"float"`` (default): codes ``encode(w / s[n])`` with
            ``s[n] = max|w_row| / (1 - 2**-M)`` in float64 (SPEC section 1), folded into
            the hardware multiplier by ``sfx.fold_scale``; ``"pow2"``: power-of-two
            exponents ``sfx.choose_exponent`` (multiplier-free). Ignored by ``method="int"``.
        act_exponent: ``"dynamic"`` (one exponent per token, computed on the fly, default)
            or ``"static"`` (one calibrated exponent per layer input; see
            :func:`superfloat.sw.wasq.calibrate_`).
        rounding: ``"nearest_even"`` (default) or ``"toward_zero"`` (SPEC section 2).
        skip: module-name globs never quantized (default :data:`DEFAULT_SKIP`).
        method: ``"sfx"`` (default; CLI ``vanilla``) or ``"int"`` (CLI ``rtn-int``): the
            symmetric per-channel integer round-to-nearest baseline
            (``torch.fake_quantize_per_channel_affine``, scale ``max|w_row| / (2**(b-1) - 1)``).
        layer_bits: optional ``{glob: weight_bits}`` overrides (first match wins), for
            mixed precision; the checkpoint records the bits of every layer.
    """

    weight_bits: int = 8
    act_bits: int | None = None
    weight_scale: str = "channel"
    scale_kind: str = "float"
    act_exponent: str = "dynamic"
    rounding: str = "nearest_even"
    skip: tuple[str, ...] = DEFAULT_SKIP
    method: str = "sfx"
    layer_bits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        if self.act_bits is not None:
            _check_bits("act_bits", self.act_bits)
        _check_choice("weight_scale", self.weight_scale, WEIGHT_SCALES)
        _check_choice("scale_kind", self.scale_kind, SCALE_KINDS)
        _check_choice("act_exponent", self.act_exponent, ACT_EXPONENTS)
        if self.rounding not in sfx.ROUNDINGS:
            raise ValueError(f"WASQConfig.rounding must be one of {', '.join(map(repr, sfx.ROUNDINGS))}, "
                             f"got {self.rounding!r}")
        try:
            object.__setattr__(self, "method", normalize_method(self.method))
        except ValueError as e:
            raise ValueError(f"WASQConfig.{e}") from None
        if self.method == "int" and self.rounding != "nearest_even":
            raise ValueError("WASQConfig.rounding must be 'nearest_even' for method='int' "
                             "(torch.fake_quantize_per_channel_affine rounds half to even)")
        skip = self.skip
        if isinstance(skip, str):
            raise TypeError(f"WASQConfig.skip must be a sequence of glob patterns, got the string {skip!r} "
                            f"(write skip=({skip!r},))")
        skip = tuple(skip)
        for p in skip:
            if not isinstance(p, str) or not p:
                raise TypeError(f"WASQConfig.skip must hold non-empty strings, got {p!r}")
        object.__setattr__(self, "skip", skip)
        if not isinstance(self.layer_bits, Mapping):
            raise TypeError(f"WASQConfig.layer_bits must be a mapping {{glob: bits}}, got {self.layer_bits!r}")
        lb = {}
        for k, v in self.layer_bits.items():
            if not isinstance(k, str) or not k:
                raise TypeError(f"WASQConfig.layer_bits keys must be non-empty glob strings, got {k!r}")
            lb[k] = _check_bits(f"layer_bits[{k!r}]", v)
        object.__setattr__(self, "layer_bits", lb)

    # ------------------------------------------------------------------ helpers

    def is_skipped(self, name: str) -> bool:
        """True when module ``name`` matches a :attr:`skip` pattern (full name or last component)."""
        last = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in self.skip)

    def bits_for(self, name: str) -> int:
        """Weight bits of module ``name`` (first matching :attr:`layer_bits` glob, else :attr:`weight_bits`)."""
        last = name.rsplit(".", 1)[-1]
        for pat, bits in self.layer_bits.items():
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(last, pat):
                return bits
        return self.weight_bits

    def replace(self, **changes: Any) -> "WASQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["layer_bits"] = dict(self.layer_bits)
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
        """Short human label, e.g. ``SF8 float/channel`` or ``SF8 + A8 dyn`` or ``int4 RTN``."""
        if self.method == "int":
            w = f"int{self.weight_bits} RTN"
        else:
            w = f"SF{self.weight_bits} {self.scale_kind}/{self.weight_scale}"
        if self.act_bits is not None:
            w += f" + A{self.act_bits} {self.act_exponent}"
        return w
