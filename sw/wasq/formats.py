"""Weight and activation formats: the quantizers of :class:`~superfloat.sw.wasq.SFxLinear` and of every method.

Three kinds of codes (``WeightFormat.kind`` / ``ActQuantizer.kind``):

* ``"sfx"``: SFx sign-magnitude codes (SPEC section 1). Weights get one float scale
  per output channel (``scale_kind="float"``, the
  :func:`~superfloat.sw.wasq.qlinear.float_scale` rule, folded by the hardware into its
  per-lane multiplier) or one power-of-two exponent per channel (``"pow2"``). Every
  rounding and saturation goes through :mod:`superfloat.sw.sfx` (codes) and
  :mod:`superfloat.sw.sfx_torch` (fake quantization); nothing here re-derives them.
* ``"int"``: symmetric integer round-to-nearest (absmax scale, zero point 0), through
  ``torch.fake_quantize_per_channel_affine``: the baseline of
  :mod:`superfloat.sw.wasq.baselines`.
* ``"int_asym"``: asymmetric integer (scale and zero point; see :mod:`.asymmetric`).

Any kind can use **per-group scales along K** (``group_size``): one scale per
``group_size`` consecutive input channels of a row (the last group of a row may be
shorter). The SFx accelerator applies scales per output channel only (SPEC sections 4
and 5), so per-group formats are software-only: :attr:`WeightFormat.hardware_executable`.

All formats share one description, used by the searches and by AdaRound:
``real = (q - zero) * unit`` with integer levels ``q`` in ``[qlo, qhi]`` and ``unit``
per row (or per row and group). For SFx ``unit = scale * 2**-M`` (or ``2**(E-M)``),
``zero = 0`` and ``|q| <= 2**M - 1``; the code of level ``q`` is
``sfx.encode(q * 2**-M, bits)`` (an exact grid value, so encode only maps it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .. import sfx, sfx_torch
from . import asymmetric
from .baselines import int_fake_quantize, int_qrange, int_scale

__all__ = ["KINDS", "ExportedLinear", "float_scale", "WeightFormat", "WeightGrid", "QuantizedWeight", "ActQuantizer", "weight_grid",
           "fake_quant_weight", "quantize_weight", "quantize_levels", "group_view", "ungroup"]

KINDS = ("sfx", "int", "int_asym")
SCALE_KINDS = ("float", "pow2")


def _check_bits(name: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 2..16, got {bits!r}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"{name} must be in 2..16, got {bits}")
    return int(bits)


def _check_kind(name: str, kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class WeightFormat:
    """How one layer's weights are quantized.

    Args:
        kind: ``"sfx"``, ``"int"`` or ``"int_asym"``.
        bits: 2..16.
        scale_kind: SFx only: ``"float"`` per-row scale or ``"pow2"`` exponents.
        group_size: ``None`` (per output channel) or a positive int (per group along K).
        rounding: SFx round-to-nearest mode (``"nearest_even"`` or ``"toward_zero"``);
            the integer kinds always round half to even (torch).
    """

    kind: str = "sfx"
    bits: int = 4
    scale_kind: str = "float"
    group_size: int | None = None
    rounding: str = "nearest_even"

    def __post_init__(self) -> None:
        _check_kind("WeightFormat.kind", self.kind)
        _check_bits("WeightFormat.bits", self.bits)
        if self.scale_kind not in SCALE_KINDS:
            raise ValueError(f"WeightFormat.scale_kind must be 'float' or 'pow2', got {self.scale_kind!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"WeightFormat.group_size must be None or a positive int, got {self.group_size!r}")
        sfx.check_rounding(self.rounding, "WeightFormat.rounding")
        if self.kind != "sfx" and self.rounding != "nearest_even":
            raise ValueError(f"WeightFormat.rounding must be 'nearest_even' for kind {self.kind!r} (torch's "
                             f"fake_quantize rounds half to even)")

    @property
    def hardware_executable(self) -> bool:
        """SFx codes with per-output-channel scales: what the accelerator's LINEAR executes."""
        return self.kind == "sfx" and self.group_size is None

    def qrange(self) -> tuple[int, int]:
        """Integer levels ``(qlo, qhi)``."""
        if self.kind == "sfx":
            m = (1 << (self.bits - 1)) - 1
            return -m, m
        if self.kind == "int":
            return int_qrange(self.bits)
        return asymmetric.qrange(self.bits)

    def label(self) -> str:
        k = {"sfx": f"SF{self.bits}" + ("" if self.scale_kind == "float" else " pow2"),
             "int": f"int{self.bits}", "int_asym": f"int{self.bits} asym"}[self.kind]
        return k + (f" g{self.group_size}" if self.group_size else "")


def float_scale(w: Any, bits: int, axis: int | None = 0):
    """SPEC section 1 float scale: ``s = max|w| / (1 - 2**-M)`` in float64, per row (``axis=0``)
    or per tensor (``axis=None``); 1.0 for an all-zero slice. numpy in, numpy out; torch in, torch out."""
    m = sfx.check_bits(bits) - 1
    denom = 1.0 - 2.0 ** -m
    if isinstance(w, torch.Tensor):
        a = w.detach().to(torch.float64).abs()
        amax = a.amax(dim=tuple(range(1, a.dim()))) if axis == 0 else (a.amax() if a.numel() else a.new_zeros(()))
        s = amax / denom
        return torch.where(amax > 0, s, torch.ones_like(s))
    a = np.abs(np.asarray(w, dtype=np.float64))
    amax = a.max(axis=tuple(range(1, a.ndim))) if axis == 0 else np.asarray(a.max() if a.size else 0.0)
    s = amax / denom
    return np.where(amax > 0, s, 1.0)


@dataclass
class ExportedLinear:
    """What one quantized layer sends to the accelerator (SPEC section 7 tensors).

    ``real[n, k] = value(codes[n, k]) * 2**exponent[n] * scale[n]`` (``scale`` is 1 when
    ``None``; ``exponent``/``scale`` are 0-d for per-tensor scales).
    """

    bits: int
    codes: np.ndarray          # uint8 / uint16 [N, K]
    exponent: np.ndarray       # int8 [N] or []
    scale: np.ndarray | None   # float64 [N] or [] (scale_kind="float"), else None
    bias: np.ndarray | None    # float32 [N]
    rounding: str = "nearest_even"

    def dequantize(self) -> np.ndarray:
        """float64 ``[N, K]`` real weights (exact)."""
        e = self.exponent.reshape(-1, 1) if self.exponent.ndim else self.exponent
        v = sfx.decode(self.codes, self.bits, e)
        if self.scale is not None:
            v = v * (self.scale.reshape(-1, 1) if self.scale.ndim else self.scale)
        return v

    def fold(self) -> tuple[np.ndarray, np.ndarray]:
        """Hardware ``(mult, shift)`` of the weight scale per output channel (``sfx.fold_scale``;
        mult 1 << 15 with shift 1 for a pure power-of-two scale). The caller adds the
        activation and output exponents to ``shift``."""
        n = self.codes.shape[0]
        e = np.broadcast_to(self.exponent.astype(np.int64), (n,))
        if self.scale is None:
            return np.full(n, 1 << 15, dtype=np.int64), e + 1
        mult, shift = sfx.fold_scale(np.broadcast_to(self.scale, (n,)))
        return mult, shift + e


# --------------------------------------------------------------------------- groups


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[N, K]`` -> ``[N, G, g]`` (zero-padded to ``G * g``); per channel: ``[N, 1, K]``."""
    n, k = w.shape
    if group_size is None or group_size >= k:
        return w.reshape(n, 1, k)
    g = int(group_size)
    groups = -(-k // g)
    if groups * g != k:
        w = torch.nn.functional.pad(w, (0, groups * g - k))
    return w.reshape(n, groups, g)


def ungroup(t: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`group_view`: ``[N, G, g]`` -> ``[N, K]`` (padding dropped)."""
    n = t.shape[0]
    return t.reshape(n, -1)[:, :k]


# --------------------------------------------------------------------------- the grid of one layer


@dataclass
class WeightGrid:
    """``real = (q - zero) * unit``, ``q`` in ``[qlo, qhi]``; ``unit``/``zero`` are ``[N, G, 1]``.

    ``scale`` is what is stored: the per-row (or per-group) float scale (SFx float: the
    value of magnitude ``2**M - 1``, i.e. ``max / (1 - 2**-M)``; int: the step), or
    ``None`` for SFx pow2, whose ``exponent`` holds ``E``."""

    fmt: WeightFormat
    k: int
    unit: torch.Tensor                 # float64 [N, G, 1]
    zero: torch.Tensor | None          # float64 [N, G, 1] (int_asym) or None
    scale: torch.Tensor | None         # [N, G] stored scales (float64 SFx per channel, float32 otherwise)
    exponent: torch.Tensor | None      # int8 [N, G] (SFx pow2)
    qlo: int = 0
    qhi: int = 0

    def levels_rtn(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest levels (int64 ``[N, K]``), through the official quantizers."""
        return _rtn_levels(w, self)

    def per_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group ``[N, G, 1]`` tensor (``unit``, ``zero``) repeated over its group: ``[N, K]``."""
        gs = self.fmt.group_size
        g = self.k if gs is None or gs >= self.k else gs
        return ungroup(t.expand(t.shape[0], t.shape[1], g), self.k)

    def dequantize_levels(self, q: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, K]`` real values of integer levels ``q``."""
        qg = group_view(q.to(torch.float64), self.fmt.group_size)
        if self.fmt.kind == "sfx":
            v = qg * self.unit
        else:  # torch's fake_quantize arithmetic: (q - zp) * scale in float32
            z = self.zero if self.zero is not None else 0.0
            v = ((qg - z).to(torch.float32) * self.unit.to(torch.float32)).to(torch.float64)
        return ungroup(v, self.k).to(torch.float32)


def _sfx_scale_store_dtype(fmt: WeightFormat) -> torch.dtype:
    # Per-channel SFx float scales are float64 (SPEC section 1, the checkpoint format);
    # per-group scales (software only) are stored as float32 values.
    return torch.float64 if fmt.group_size is None else torch.float32


def weight_grid(w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | float | None = None) -> WeightGrid:
    """The grid RTN would use for ``w`` (``[N, K]``), with optional clip ratios (``[N]``,
    ``[N, G]`` or a scalar in ``(0, 1]``) that shrink the range (per row / group)."""
    if w.dim() != 2:
        raise ValueError(f"weights must be a 2-D [N, K] tensor, got shape {list(w.shape)}")
    n, k = w.shape
    wg = group_view(w.detach().to(torch.float64), fmt.group_size)  # [N, G, g]
    groups = wg.shape[1]
    c = None
    if clip is not None:
        c = torch.as_tensor(clip, dtype=torch.float64)
        if c.dim() == 1:
            c = c.reshape(-1, 1)
        c = torch.broadcast_to(c, (n, groups)) if c.dim() else torch.full((n, groups), float(c), dtype=torch.float64)
        if bool(((c <= 0) | (c > 1) | torch.isnan(c)).any()):
            raise ValueError("clip ratios must be in (0, 1]")
    qlo, qhi = fmt.qrange()
    if fmt.kind == "sfx":
        m = fmt.bits - 1
        amax = wg.abs().amax(dim=2)  # [N, G]
        if c is not None:
            amax = amax * c
        if fmt.scale_kind == "pow2":
            e = sfx_torch.choose_exponent(amax.reshape(-1), fmt.bits, axis=0).reshape(n, groups)
            unit = torch.exp2(e.to(torch.float64) - m).unsqueeze(-1)
            return WeightGrid(fmt, k, unit, None, None, e, qlo, qhi)
        if fmt.group_size is None and c is None:
            s = float_scale(w.detach(), fmt.bits, axis=0).reshape(n, 1)  # exactly SFxLinear's scale
        else:
            s = amax / (1.0 - 2.0 ** -m)
            s = torch.where(amax > 0, s, torch.ones_like(s))
            s = s.to(_sfx_scale_store_dtype(fmt)).to(torch.float64)
        unit = (s * 2.0 ** -m).unsqueeze(-1)
        return WeightGrid(fmt, k, unit, None, s.to(_sfx_scale_store_dtype(fmt)), None, qlo, qhi)
    if fmt.kind == "int":
        amax = wg.abs().amax(dim=2)
        if c is not None:
            amax = amax * c
        s = int_scale(amax, fmt.bits)  # float32
        return WeightGrid(fmt, k, s.to(torch.float64).unsqueeze(-1), None, s, None, qlo, qhi)
    lo = torch.clamp(wg.amin(dim=2), max=0.0)
    hi = torch.clamp(wg.amax(dim=2), min=0.0)
    if c is not None:
        lo, hi = lo * c, hi * c
    s, z = asymmetric.scale_zero_point(lo, hi, fmt.bits)
    return WeightGrid(fmt, k, s.to(torch.float64).unsqueeze(-1), z.to(torch.float64).unsqueeze(-1), s, None,
                      qlo, qhi)


def _rtn_levels(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    fmt = grid.fmt
    n, k = w.shape
    wg = group_view(w.detach().to(torch.float64), fmt.group_size)
    if fmt.kind == "sfx":
        return ungroup(_sfx_signed(_on_sfx_grid(sfx_torch.encode, wg, grid)[0], fmt.bits), k)
    w32 = wg.to(torch.float32)
    inv = 1.0 / grid.unit.to(torch.float32)
    z = grid.zero.to(torch.float32) if grid.zero is not None else 0.0
    q = torch.clamp(torch.round(w32 * inv) + z, grid.qlo, grid.qhi)  # ATen's fake_quantize formula
    return ungroup(q, k).to(torch.int64)


def _on_sfx_grid(fn, wg: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fn(values, bits, exponent, rounding)`` (``sfx_torch.encode`` / ``fake_quantize``) on the
    groups ``wg`` of an SFx grid: at its power-of-two exponents, or at exponent 0 on ``wg / s``
    (float scale ``s``, returned beside the result; None for exponents)."""
    fmt = grid.fmt
    if grid.exponent is not None:
        return fn(wg, fmt.bits, grid.exponent.unsqueeze(-1), fmt.rounding), None
    s = grid.unit * 2.0 ** (fmt.bits - 1)
    return fn(wg / s, fmt.bits, 0, fmt.rounding), s


def _sfx_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed levels of SFx codes: ``decode`` at exponent ``M`` is exactly the signed magnitude."""
    return sfx_torch.decode(codes, bits, bits - 1).to(torch.int64)


def fake_quant_weight(w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Round-to-nearest fake quantization (float32 ``[N, K]``), fast, for searches.

    Equals ``quantize_weight(w, fmt, clip).dequantize()`` bit for bit (tested)."""
    grid = weight_grid(w, fmt, clip)
    n, k = w.shape
    wg = group_view(w.detach().to(torch.float64), fmt.group_size)
    if fmt.kind == "sfx":
        v, s = _on_sfx_grid(sfx_torch.fake_quantize, wg, grid)
        return ungroup(v if s is None else v * s, k).to(torch.float32)
    groups = wg.shape[1]
    flat = wg.to(torch.float32).reshape(n * groups, -1)
    scale = grid.unit.to(torch.float32).reshape(-1)
    zp = (grid.zero.reshape(-1).to(torch.int32) if grid.zero is not None
          else torch.zeros(n * groups, dtype=torch.int32))
    out = torch.fake_quantize_per_channel_affine(flat, scale, zp, 0, grid.qlo, grid.qhi)
    return ungroup(out.reshape(n, groups, -1).to(torch.float64), k).to(torch.float32)


# --------------------------------------------------------------------------- stored weights


def best_clip(ratios, error_of: Callable[[float], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (and group) the clip ratio of ``ratios`` with the least ``error_of(ratio)`` (``[N, G]``;
    the earlier ratio on ties): ``(ratios [N, G], their errors, the errors of the first ratio)``."""
    best_err = best = first = None
    for r in ratios:
        err = error_of(float(r))
        if best_err is None:
            best_err, best, first = err, torch.full_like(err, float(r)), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, float(r)), best)
    return best, best_err, first


@dataclass
class QuantizedWeight:
    """One layer's quantized weights as stored: codes ``[N, K]`` plus side tensors.

    * ``sfx``: SFx codes; ``scale`` (float64 ``[N]`` per channel, float32 ``[N, G]`` per
      group) or ``exponent`` (int8 ``[N]`` / ``[N, G]``) for pow2.
    * ``int``: offset codes ``q - qlo`` (unsigned); ``scale`` float32.
    * ``int_asym``: codes ``q`` in ``[0, 2**b)``; ``scale`` float32, ``zero_point``
      (uint8 for <= 8 bits, else int32).
    """

    fmt: WeightFormat
    shape: tuple[int, int]
    codes: np.ndarray
    scale: np.ndarray | None = None
    exponent: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    _grid: WeightGrid | None = field(default=None, repr=False, compare=False)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def hardware_executable(self) -> bool:
        return self.fmt.hardware_executable

    # ----------------------------------------------------------------- values

    def levels(self) -> torch.Tensor:
        """Integer levels ``q`` (int64 ``[N, K]``)."""
        c = torch.from_numpy(self.codes.astype(np.int64))
        if self.fmt.kind == "sfx":
            return _sfx_signed(c, self.bits)
        if self.fmt.kind == "int":
            return c + self.fmt.qrange()[0]
        return c

    def grid(self) -> WeightGrid:
        if self._grid is None:
            n, k = self.shape
            fmt = self.fmt
            qlo, qhi = fmt.qrange()
            if fmt.kind == "sfx":
                m = fmt.bits - 1
                if self.exponent is not None:
                    e = torch.from_numpy(self.exponent.astype(np.int64)).reshape(n, -1)
                    unit = torch.exp2(e.to(torch.float64) - m).unsqueeze(-1)
                    self._grid = WeightGrid(fmt, k, unit, None, None, e.to(torch.int8), qlo, qhi)
                else:
                    s = torch.from_numpy(np.asarray(self.scale)).reshape(n, -1)
                    self._grid = WeightGrid(fmt, k, (s.to(torch.float64) * 2.0 ** -m).unsqueeze(-1), None, s, None,
                                            qlo, qhi)
            else:
                s = torch.from_numpy(np.asarray(self.scale, dtype=np.float32)).reshape(n, -1)
                z = None
                if self.zero_point is not None:
                    z = torch.from_numpy(self.zero_point.astype(np.float64)).reshape(n, -1).unsqueeze(-1)
                self._grid = WeightGrid(fmt, k, s.to(torch.float64).unsqueeze(-1), z, s, None, qlo, qhi)
        return self._grid

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]`` real weights (exact per the format's arithmetic)."""
        n, k = self.shape
        if self.fmt.kind == "sfx":
            if self.exponent is not None:
                eg = np.asarray(self.exponent).reshape(n, -1)
                if eg.shape[1] == 1:
                    v = sfx.decode(self.codes, self.bits, eg)
                else:
                    cg = group_view(torch.from_numpy(self.codes.astype(np.int64)), self.fmt.group_size).numpy()
                    v = sfx.decode(cg.astype(sfx.code_dtype(self.bits)), self.bits, eg[..., None])
                    v = ungroup(torch.from_numpy(v), k).numpy()
                return torch.from_numpy(np.ascontiguousarray(v)).to(torch.float32)
            v = sfx.decode(self.codes, self.bits)  # float64, exact grid values
            s = np.asarray(self.scale, dtype=np.float64).reshape(n, -1)
            if s.shape[1] == 1:
                out = v * s
            else:
                vg = group_view(torch.from_numpy(v), self.fmt.group_size)
                out = ungroup(vg * torch.from_numpy(s).unsqueeze(-1), k).numpy()
            return torch.from_numpy(np.ascontiguousarray(out)).to(torch.float32)
        return self.grid().dequantize_levels(self.levels())

    # ----------------------------------------------------------------- storage

    def side_tensors(self) -> dict[str, np.ndarray]:
        out = {}
        if self.scale is not None:
            out["scale"] = np.asarray(self.scale)
        if self.exponent is not None:
            out["exponent"] = np.asarray(self.exponent, dtype=np.int8)
        if self.zero_point is not None:
            out["zero_point"] = np.asarray(self.zero_point)
        return out

    def packed_nbytes(self) -> int:
        """Bytes of the packed codes plus the side tensors as stored."""
        return (int(self.codes.size) * self.bits + 7) // 8 + sum(a.nbytes for a in self.side_tensors().values())

    def describe_storage(self) -> dict[str, Any]:
        return {"kind": self.fmt.kind, "bits": self.bits, "shape": list(self.shape),
                "scale_kind": self.fmt.scale_kind, "group_size": self.fmt.group_size, "rounding": self.fmt.rounding,
                "side": sorted(self.side_tensors())}

    @classmethod
    def from_storage(cls, spec: dict[str, Any], codes: np.ndarray, side: dict[str, np.ndarray]) -> "QuantizedWeight":
        fmt = WeightFormat(spec["kind"], int(spec["bits"]), spec.get("scale_kind", "float"), spec.get("group_size"),
                           spec.get("rounding", "nearest_even"))
        return cls(fmt, tuple(spec["shape"]), codes, side.get("scale"), side.get("exponent"), side.get("zero_point"))

    def to_exported(self, bias: np.ndarray | None) -> ExportedLinear:
        """The :class:`ExportedLinear` view (SFx per-channel formats only)."""
        if not self.hardware_executable:
            raise ValueError(f"{self.fmt.label()} weights are not SFx codes with per-channel scales; only those "
                             f"can be exported to a WASQ checkpoint")
        n = self.shape[0]
        if self.exponent is not None:
            return ExportedLinear(self.bits, self.codes, np.asarray(self.exponent, dtype=np.int8).reshape(n), None,
                                  bias, self.fmt.rounding)
        return ExportedLinear(self.bits, self.codes, np.zeros(n, dtype=np.int8),
                              np.asarray(self.scale, dtype=np.float64).reshape(n), bias, self.fmt.rounding)


def _codes_from_levels(q: torch.Tensor, fmt: WeightFormat) -> np.ndarray:
    if fmt.kind == "sfx":
        m = fmt.bits - 1
        lim = (1 << m) - 1
        if q.numel() and int(q.abs().max()) > lim:
            raise ValueError(f"SF{fmt.bits} levels must be in [-{lim}, {lim}]")
        # q * 2**-M is an exact SFx grid value: encode only maps it to its code.
        return sfx.encode(np.ldexp(q.numpy().astype(np.float64), -m), fmt.bits)
    qlo, qhi = fmt.qrange()
    if q.numel() and (int(q.min()) < qlo or int(q.max()) > qhi):
        raise ValueError(f"{fmt.label()} levels must be in [{qlo}, {qhi}]")
    c = (q - qlo).numpy() if fmt.kind == "int" else q.numpy()
    return c.astype(np.uint8 if fmt.bits <= 8 else np.uint16)


def quantize_levels(q: torch.Tensor, grid: WeightGrid) -> QuantizedWeight:
    """Store integer levels ``q`` (``[N, K]``, e.g. from AdaRound) on ``grid``."""
    fmt = grid.fmt
    n, k = q.shape
    codes = _codes_from_levels(q.to(torch.int64), fmt)
    scale = exponent = zp = None
    if grid.exponent is not None:
        exponent = grid.exponent.to(torch.int8).numpy().reshape(n, -1)
    if grid.scale is not None:
        scale = grid.scale.numpy().reshape(n, -1)
    if grid.zero is not None:
        z = grid.zero.reshape(n, -1).to(torch.int64).numpy()
        zp = z.astype(np.uint8 if fmt.bits <= 8 else np.int32)
    if fmt.group_size is None:
        scale = None if scale is None else scale.reshape(n)
        exponent = None if exponent is None else exponent.reshape(n)
        zp = None if zp is None else zp.reshape(n)
    return QuantizedWeight(fmt, (n, k), codes, scale, exponent, zp, grid)


def quantize_weight(w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | float | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (``[N, K]``) to stored codes."""
    grid = weight_grid(w, fmt, clip)
    if fmt.kind == "sfx":
        n, k = w.shape
        wg = group_view(w.detach().to(torch.float64), fmt.group_size)
        if grid.exponent is not None:
            e = grid.exponent.numpy()
            codes = sfx.encode(wg.numpy(), fmt.bits, e[..., None], fmt.rounding)
        else:
            s = (grid.unit * 2.0 ** (fmt.bits - 1)).numpy()
            codes = sfx.encode(wg.numpy() / s, fmt.bits, 0, fmt.rounding)
        codes = np.ascontiguousarray(codes.reshape(n, -1)[:, :k])
        qw = quantize_levels(_sfx_signed(torch.from_numpy(codes.astype(np.int64)), fmt.bits), grid)
        assert np.array_equal(qw.codes, codes)
        return qw
    return quantize_levels(grid.levels_rtn(w), grid)


# --------------------------------------------------------------------------- activations


ACT_MODES = ("dynamic", "static")


def row_scale(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor | None:
    """The float scale per row of the ``xmult`` mode: ``clip_ratio`` times
    :func:`sfx_torch.default_row_scale` (None, the default scale, when ``clip_ratio`` is 1)."""
    return None if clip_ratio == 1.0 else sfx_torch.default_row_scale(x, bits, check=False) * clip_ratio


def row_scaled_fake_quantize(x: torch.Tensor, bits: int, rounding: str = "nearest_even",
                             clip_ratio: float = 1.0) -> torch.Tensor:
    """SFx fake quantization of rows ``x`` ``[T, K]`` with a float scale per row, as the
    accelerator's ``xmult`` mode computes it: ``decode(encode(x[t] / s[t])) * s[t]`` with
    ``s[t] = xmult[t] * 2**(xexp[t] - 16)`` (:func:`sfx_torch.encode_rows_scaled`, exact) of
    :func:`row_scale`."""
    codes, xe, xm = sfx_torch.encode_rows_scaled(x, bits, row_scale(x, bits, clip_ratio), rounding=rounding,
                                                 signed=True, check=False)
    s = torch.ldexp(xm.to(torch.float64), xe - sfx.MULT_FRAC_BITS)
    return (codes.to(torch.float64) * (s * 2.0 ** -(bits - 1))[:, None]).to(x.dtype)


class ActQuantizer:
    """Fake quantization of a linear layer's input.

    * ``mode="dynamic"``: one scale per token (row). SFx with ``scale_kind="pow2"``: a
      power-of-two exponent per token (``sfx_torch.choose_exponent``), which the
      accelerator streams with each row (``xexp``, SPEC section 5); SFx with
      ``scale_kind="float"``: a float scale per token, ``max|x[t]| / (1 - 2**-M)`` rounded
      to 16 significant bits as the accelerator applies it (``xmult[t] * 2**(xexp[t]-16)``,
      SPEC revision 2, sections 4 step 0b and 8; :func:`sfx_torch.encode_rows_scaled`);
      int: absmax (or min/max) float scale per token.
    * ``mode="static"``: one calibrated range per layer: ``threshold`` ``c`` (symmetric
      kinds; values beyond ``+-c`` saturate) or ``(lo, hi)`` (``int_asym``). SFx with
      ``scale_kind="pow2"`` uses ``E = sfx.choose_exponent(c)`` and saturates at
      ``(1 - 2**-M) * 2**E`` (exactly SFxLinear's static exponent, so it survives a
      WASQ checkpoint); ``"float"`` uses the scale ``c / (1 - 2**-M)`` (one scale per
      tensor folds into the hardware's per-lane multiplier, but checkpoint format v1
      records exponents only).
    """

    def __init__(self, kind: str, bits: int, mode: str = "dynamic", *, threshold: float | tuple[float, float] | None = None,
                 scale_kind: str = "pow2", rounding: str = "nearest_even", clip_ratio: float = 1.0) -> None:
        self.kind = _check_kind("act kind", kind)
        self.clip_ratio = clip_ratio  # dynamic float per-token scales (xmult): fraction of the row's max
        self.bits = _check_bits("act_bits", bits)
        if mode not in ACT_MODES:
            raise ValueError(f"act mode must be one of {', '.join(map(repr, ACT_MODES))}, got {mode!r}")
        self.mode = mode
        if scale_kind not in SCALE_KINDS:
            raise ValueError(f"act scale_kind must be 'float' or 'pow2', got {scale_kind!r}")
        self.scale_kind = scale_kind
        self.rounding = sfx.check_rounding(rounding)
        self.threshold = None
        self.strategy: str | None = None
        if threshold is not None:
            self.set_threshold(threshold)

    def set_threshold(self, threshold: float | tuple[float, float], strategy: str | None = None) -> None:
        if self.kind == "int_asym":
            lo, hi = (float(threshold[0]), float(threshold[1])) if isinstance(threshold, (tuple, list)) \
                else (-float(threshold), float(threshold))
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > 0 or hi < 0 or hi - lo <= 0:
                raise ValueError(f"asymmetric activation range must satisfy lo <= 0 <= hi, lo < hi, got ({lo}, {hi})")
            self.threshold = (lo, hi)
        else:
            c = max(abs(float(threshold[0])), abs(float(threshold[1]))) if isinstance(threshold, (tuple, list)) \
                else float(threshold)
            if not math.isfinite(c) or c < 0:
                raise ValueError(f"activation clip threshold must be non-negative and finite, got {c}")
            self.threshold = c
        self.strategy = strategy

    @property
    def exponent(self) -> int | None:
        """Static SFx pow2 exponent (``sfx.choose_exponent`` of the threshold), else None."""
        if self.kind == "sfx" and self.mode == "static" and self.scale_kind == "pow2" and self.threshold is not None:
            return int(sfx.choose_exponent(np.float64(self.threshold), self.bits))
        return None

    def saturation_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the inputs a static quantizer represents without saturating
        (the straight-through gradient is zero outside)."""
        if self.mode != "static" or self.threshold is None:
            return -math.inf, math.inf
        if self.kind == "int_asym":
            return self.threshold
        if self.kind == "sfx":
            lim = (1.0 - 2.0 ** -(self.bits - 1)) * (2.0 ** self.exponent if self.scale_kind == "pow2"
                                                     else self._float_scale())
        else:
            lim = float(int_scale(torch.tensor(self.threshold), self.bits)) * int_qrange(self.bits)[1]
        return -lim, lim

    def _float_scale(self) -> float:
        c = float(self.threshold)
        return c / (1.0 - 2.0 ** -(self.bits - 1)) if c > 0 else 1.0

    @property
    def hardware_executable(self) -> bool:
        """SFx codes with per-token exponents or one per-tensor power-of-two exponent."""
        return self.kind == "sfx" and not (self.mode == "static" and self.scale_kind == "float")

    @property
    def uses_xmult(self) -> bool:
        """Dynamic SFx activations with a float per-token scale: the accelerator's ``xmult`` option."""
        return self.kind == "sfx" and self.mode == "dynamic" and self.scale_kind == "float"

    def describe(self) -> str:
        k = {"sfx": "SF", "int": "int", "int_asym": "int-asym"}[self.kind]
        if self.mode == "dynamic":
            return f"A{self.bits} {k} per-token" + (" float scale (xmult)" if self.uses_xmult else "")
        t = self.threshold
        ts = f"[{t[0]:.3g}, {t[1]:.3g}]" if isinstance(t, tuple) else (f"+-{t:.3g}" if t is not None else "uncalibrated")
        return f"A{self.bits} {k} static {ts}" + (f" ({self.strategy})" if self.strategy else "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.detach()
        if self.mode == "dynamic":
            flat = xd.reshape(-1, xd.shape[-1])
            if self.uses_xmult:
                q = row_scaled_fake_quantize(flat, self.bits, self.rounding, self.clip_ratio)
            elif self.kind == "sfx":
                e = sfx_torch.choose_exponent(flat, self.bits, axis=0, keepdims=True)
                q = sfx_torch.fake_quantize(flat, self.bits, e, self.rounding)
            elif self.kind == "int":
                q = int_fake_quantize(flat, self.bits, axis=0)
            else:
                q = asymmetric.fake_quantize_rows(flat, self.bits)
            return q.reshape(x.shape).to(x.dtype)
        if self.threshold is None:
            raise RuntimeError("static activation quantizer is not calibrated (no threshold); run the PTQ "
                               "calibration or use mode='dynamic'")
        if self.kind == "sfx":
            if self.scale_kind == "pow2":
                return sfx_torch.fake_quantize(xd, self.bits, self.exponent, self.rounding).to(x.dtype)
            s = self._float_scale()
            return (sfx_torch.fake_quantize(xd.to(torch.float64) / s, self.bits, 0, self.rounding) * s).to(x.dtype)
        if self.kind == "int":
            qmin, qmax = int_qrange(self.bits)
            scale = float(int_scale(torch.tensor(self.threshold), self.bits))
            return torch.fake_quantize_per_tensor_affine(xd.to(torch.float32), scale, 0, qmin, qmax).to(x.dtype)
        lo, hi = self.threshold
        return asymmetric.fake_quantize_tensor(xd, lo, hi, self.bits).to(x.dtype)
