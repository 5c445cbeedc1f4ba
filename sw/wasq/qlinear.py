"""``SFxLinear``: the one quantized linear layer (fake-quantized weights and optionally inputs).

Every format goes through it: SFx codes (what the accelerator executes), and the software
baselines (symmetric integer, asymmetric integer with zero points, per-group scales along
K), chosen by :class:`~superfloat.sw.wasq.WASQConfig`. Round-to-nearest quantizes the
float *shadow* weight on the fly; a post-training method (:mod:`superfloat.sw.wasq.ptq`)
or a checkpoint freezes chosen codes in the layer (:meth:`SFxLinear.load_quantized`,
:meth:`SFxLinear.load_exported`) until the weight changes.

The layer keeps the float32 *shadow* weight as its trainable parameter. Its forward
uses the fake-quantized weight (the exact SFx grid value of every element, via
:mod:`superfloat.sw.sfx_torch`), with a straight-through estimator (STE) so that the
gradient of the loss with respect to the quantized weight flows unchanged into the
shadow weight. Optionally the input is fake-quantized too (per-token dynamic or
per-tensor static exponents). The bias stays float.

Speed: in ``eval()`` mode the quantized weight is computed once and cached, keyed on
the weight's storage and version counter, so any in-place update (``optimizer.step()``,
``load_state_dict``, ``with torch.no_grad(): w.copy_(...)``) invalidates it. Writes
through ``.data`` bypass the version counter: call :meth:`SFxLinear.invalidate_cache`
after them. In ``train()`` mode the quantized weight is recomputed on every forward, so
it always follows the optimizer (upstream never re-quantized after optimizer steps).

:meth:`SFxLinear.export` returns exactly what the hardware gets:
``sfx.encode``/``sfx.choose_exponent`` of the float weights, computed by the numpy model.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import sfx, sfx_torch
from .baselines import int_fake_quantize
from .config import WASQConfig
from .formats import ActQuantizer, ExportedLinear, QuantizedWeight, WeightFormat, fake_quant_weight, float_scale, \
    quantize_weight

__all__ = ["SFxLinear", "ExportedLinear", "float_scale"]


#: builds a layer's accelerator program (``LayerProgram.from_layer``); registered by
#: :mod:`superfloat.sw.wasq.accelerator` when it is imported (no import of it from here)
_PROGRAM_BUILDER = None


class _STE(torch.autograd.Function):
    """Forward: the quantized tensor. Backward: the gradient, unchanged (optionally
    zeroed where the float input saturated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor, mask: torch.Tensor | None):  # type: ignore[override]
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return xq.view_as(xq)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            g = g * mask.to(g.dtype)
        return g, None, None


class SFxLinear(nn.Linear):
    """``y = x_q @ w_q.T + b`` with fake quantization (see the module docstring).

    Build it with :meth:`from_float` (``quantize_`` does) or directly. Arguments:

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits: weight width (SFx 2..16, or integer bits for the integer codes).
        act_bits: input width or ``None`` (weight-only).
        weight_scale: ``"channel"`` or ``"tensor"``.
        scale_kind: ``"float"`` or ``"pow2"`` (SFx).
        act_exponent: ``"dynamic"`` (per token) or ``"static"`` (calibrated per tensor).
        rounding: ``"nearest_even"`` or ``"toward_zero"``.
        codes: ``"sfx"`` (default), ``"int"`` or ``"int_asym"`` (software baselines).
        group_size: ``None`` or a positive int (per-group scales along K, software only).
        act_scale: ``"pow2"`` (default) or ``"float"``: per-token float scales of dynamic SFx
            activations (the accelerator's ``xmult``), a float scale of static ones (software only).
        method: legacy spelling of ``codes`` (``"sfx"``/``"int"``).
        source: ``"linear"`` or ``"conv1d"`` (what was replaced; informational).

    Accelerator-exact attributes (SPEC section 8, stored in the checkpoint): ``out_bits``
    (output width) and ``out_exponent`` (int8 ``[N]`` static output exponents), ``None``
    until calibrated.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 act_bits: int | None = None, weight_scale: str = "channel", scale_kind: str = "float",
                 act_exponent: str = "dynamic", rounding: str = "nearest_even", codes: str | None = None,
                 group_size: int | None = None, act_scale: str = "pow2", method: str | None = None,
                 source: str = "linear", act_clip_ratio: float = 1.0, device=None, dtype=None) -> None:
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise ValueError(f"SFxLinear group_size must be None or a positive int, got {group_size!r}")
        # Validate through WASQConfig (one place for the rules and messages).
        cfg = WASQConfig(weight_bits=bits, act_bits=act_bits, weight_scale=weight_scale, scale_kind=scale_kind,
                         act_exponent=act_exponent, rounding=rounding, codes=codes or "sfx",
                         method=method or "rtn", group_size=group_size, act_scale=act_scale,
                         act_clip_ratio=act_clip_ratio)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits = cfg.weight_bits
        self.act_bits = cfg.act_bits
        self.weight_scale = cfg.weight_scale
        self.scale_kind = cfg.scale_kind
        self.act_exponent = cfg.act_exponent
        self.rounding = cfg.rounding
        self.codes = cfg.codes
        self.group_size = cfg.group_size
        self.act_scale = cfg.act_scale
        self.act_clip_ratio = cfg.act_clip_ratio
        self.source = source
        #: static activation quantization: calibrated max |input| (or ``(lo, hi)`` for
        #: ``int_asym``); None until calibrated
        self.act_amax: float | tuple[float, float] | None = None
        #: accelerator-exact execution (SPEC section 8): output width and static output exponents
        self.out_bits: int | None = None
        self.out_exponent: np.ndarray | None = None
        self.layer_name = ""  # set by quantize_, used in error messages
        #: ``"fake"`` (fake quantization) or ``"accelerator"`` (SPEC section 8 exactly; see
        #: :func:`superfloat.sw.wasq.accelerator.set_backend`)
        self.backend = "fake"
        self._calibrating = False
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._frozen: tuple[tuple, ExportedLinear | QuantizedWeight] | None = None
        self._program: tuple[tuple, Any] | None = None

    @property
    def method(self) -> str:
        """Legacy name of :attr:`codes` (the code family: ``"sfx"``, ``"int"``, ``"int_asym"``)."""
        return self.codes

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(cls, module: nn.Module, config: WASQConfig, name: str = "", bits: int | None = None,
                   group_size: int | None = None) -> "SFxLinear":
        """Replace an ``nn.Linear`` (sharing its weight and bias parameters) or a
        transformers ``Conv1D`` (weight transposed to ``[out, in]``). ``bits`` and
        ``group_size`` override the config's for this layer."""
        kind = _module_kind(module)
        if kind is None:
            raise TypeError(f"{name or 'module'}: can only quantize nn.Linear or transformers Conv1D, "
                            f"got {type(module).__name__}")
        if kind == "linear":
            n, k = module.out_features, module.in_features
        else:
            k, n = module.weight.shape
        if group_size is None and isinstance(config.group_size, int):
            group_size = config.group_size
        w = module.weight
        layer = cls(k, n, bias=module.bias is not None, bits=config.bits_for(name) if bits is None else bits,
                    act_bits=config.act_bits, weight_scale=config.weight_scale, scale_kind=config.scale_kind,
                    act_exponent=config.act_exponent, rounding=config.rounding, codes=config.codes,
                    group_size=group_size, act_scale=config.act_scale, source=kind,
                    act_clip_ratio=config.act_clip_ratio, device="meta")
        if kind == "linear":
            layer.weight = w  # same Parameter: ties and optimizer references survive
            layer.bias = module.bias
        else:
            layer.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
            layer.bias = module.bias
        layer.layer_name = name
        layer.out_bits = config.out_bits_for(name)
        layer.train(module.training)
        return layer

    def weight_format(self) -> WeightFormat:
        """The :class:`~superfloat.sw.wasq.formats.WeightFormat` of this layer's weights."""
        return WeightFormat(self.codes, self.bits, self.scale_kind, self.group_size,
                            self.rounding if self.codes == "sfx" else "nearest_even")

    @property
    def hardware_executable(self) -> bool:
        """SFx codes with per-channel (or per-tensor) scales and SFx power-of-two activations."""
        return (self.codes == "sfx" and self.group_size is None
                and not (self.act_bits is not None and self.act_exponent == "static" and self.act_scale == "float"))

    # ------------------------------------------------------------------ weight quantization

    def _key(self) -> tuple:
        w = self.weight
        return (id(w), w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape))

    def invalidate_cache(self) -> None:
        """Forget the cached quantized weight (needed only after writes through ``.data``)."""
        self._cache = None
        self._frozen = None

    def _compute_qweight(self) -> torch.Tensor:
        w = self.weight.detach()
        try:
            if self.group_size is not None or self.codes == "int_asym":
                return fake_quant_weight(w, self.weight_format()).to(w.dtype)
            if self.codes == "int":
                return int_fake_quantize(w, self.bits, axis=0 if self.weight_scale == "channel" else None)
            if self.scale_kind == "pow2":
                if self.weight_scale == "channel":
                    e = sfx_torch.choose_exponent(w, self.bits, axis=0, keepdims=True)
                else:
                    e = sfx_torch.choose_exponent(w, self.bits)
                return sfx_torch.fake_quantize(w, self.bits, e, self.rounding)
            s = float_scale(w, self.bits, axis=0 if self.weight_scale == "channel" else None)
            if s.dim():
                s = s.reshape(-1, 1)
            q = sfx_torch.fake_quantize(w.to(torch.float64) / s, self.bits, 0, self.rounding)
            return (q * s).to(w.dtype)
        except ValueError as e:
            raise ValueError(f"layer {self.layer_name or '?'}: weight: {e}") from None

    def qweight(self) -> torch.Tensor:
        """The fake-quantized weight (detached; cached in eval mode)."""
        key = self._key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        wq = self._compute_qweight()
        if not self.training:
            self._cache = (key, wq)
        else:
            self._cache = None
        return wq

    def quantized_weight(self) -> torch.Tensor:
        """The weight used by forward: quantized values, gradient straight through to the shadow weight."""
        if self.training:
            self._cache = None  # recompute each step: weights move under the optimizer
        wq = self.qweight()
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _STE.apply(self.weight, wq, None)
        return wq

    # ------------------------------------------------------------------ activations

    def act_quantizer(self) -> ActQuantizer | None:
        """The input quantizer (:class:`~superfloat.sw.wasq.formats.ActQuantizer`), or None (weight-only)."""
        if self.act_bits is None:
            return None
        q = ActQuantizer(self.codes, self.act_bits, self.act_exponent, scale_kind=self.act_scale,
                         rounding=self.rounding, clip_ratio=self.act_clip_ratio)
        if self.act_exponent == "static":
            if self.act_amax is None:
                raise RuntimeError(
                    f"layer {self.layer_name or '?'}: static activation exponent is not calibrated; "
                    f"run superfloat.sw.wasq.calibrate_(model, batches) (or quantize_(..., calibration=...)) "
                    f"or use act_exponent='dynamic'")
            q.set_threshold(self.act_amax)
        return q

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.act_quantizer()
        assert q is not None
        try:
            xq = q(x)
        except ValueError as e:
            raise ValueError(f"layer {self.layer_name or '?'}: input: {e}") from None
        if torch.is_grad_enabled() and x.requires_grad:
            mask = None
            if q.mode == "static":
                lo, hi = q.saturation_range()
                xd = x.detach()
                mask = (xd >= lo) & (xd <= hi)
            return _STE.apply(x, xq, mask)
        return xq

    @property
    def static_act_exponent(self) -> int | None:
        """Calibrated per-tensor input exponent (``sfx.choose_exponent`` of the calibrated max), or None."""
        if self.act_amax is None or self.act_bits is None or self.codes != "sfx" or self.act_scale != "pow2":
            return None
        return int(sfx.choose_exponent(np.float64(self.act_amax), self.act_bits))

    # ------------------------------------------------------------------ forward

    def _program_key(self) -> tuple:
        eo = None if self.out_exponent is None else np.asarray(self.out_exponent).tobytes()
        return (self._key(), self.out_bits, eo, self.act_bits, self.act_exponent, self.act_amax, self.act_scale,
                self.rounding, self.act_clip_ratio)

    def _accel_program(self, build: bool = True):
        if self._program is not None and self._program[0] == self._program_key():
            return self._program[1]
        if not build:
            return None
        if _PROGRAM_BUILDER is None:
            raise RuntimeError("the accelerator backend is not loaded: switch layers with "
                               "superfloat.sw.wasq.accelerator.set_backend(model, 'accelerator')")
        prog = _PROGRAM_BUILDER(self)
        self._program = (self._program_key(), prog)
        return prog

    def accelerator_program(self):
        """The :class:`~superfloat.sw.wasq.accelerator.LayerProgram` this layer runs on the
        accelerator (built on first use, rebuilt when the weights or calibration change)."""
        return self._accel_program(build=True)

    def invalidate_program(self) -> None:
        self._program = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        if self.backend == "accelerator" and not self._calibrating:
            prog = self.accelerator_program()
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
                # QAT on the accelerator's arithmetic: the values the hardware computes, the
                # gradients of the fake-quantized layer (straight through the difference)
                y = self._fake_forward(x)
                return y + (prog.forward(x) - y).detach()
            return prog.forward(x)
        return self._fake_forward(x)

    def _fake_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if self._calibrating:
            amax = float(x.detach().abs().amax()) if x.numel() else 0.0
            self.act_amax = amax if self.act_amax is None else max(self.act_amax, amax)
        elif self.act_bits is not None:
            x = self._quantize_input(x)
        return F.linear(x, w, self.bias)

    # ------------------------------------------------------------------ export / load

    def _frozen_value(self) -> ExportedLinear | QuantizedWeight | None:
        if self._frozen is not None and self._frozen[0] == self._key():
            return self._frozen[1]
        return None

    def stored_weight(self) -> QuantizedWeight:
        """The weights as stored, in any format: the frozen codes of a method or checkpoint, else
        round-to-nearest of the current weight (:func:`~superfloat.sw.wasq.formats.quantize_weight`)."""
        fz = self._frozen_value()
        if isinstance(fz, QuantizedWeight):
            return fz
        if isinstance(fz, ExportedLinear) and fz.exponent.ndim:
            fmt = self.weight_format()
            scale = None if fz.scale is None else np.asarray(fz.scale, dtype=np.float64)
            return QuantizedWeight(fmt, tuple(fz.codes.shape), fz.codes, scale,
                                   None if fz.scale is not None else fz.exponent)
        if self.weight_scale != "channel":
            raise ValueError(f"layer {self.layer_name or '?'}: per-tensor weights have no stored per-channel form; "
                             f"use export()")
        return quantize_weight(self.weight.detach().cpu().to(torch.float32), self.weight_format())

    def export(self) -> ExportedLinear:
        """Codes, exponents, float scales and bias for the hardware, from the numpy model:
        ``sfx.encode(w, bits, sfx.choose_exponent(w, bits, axis=0)[:, None])`` (pow2) or
        ``sfx.encode(w / s[:, None], bits)`` with :func:`float_scale` (float); the frozen
        codes of a method or checkpoint when the weight has not changed since."""
        if not self.hardware_executable:
            why = ("per-group scales along K" if self.group_size is not None else
                   "a static float activation scale" if self.codes == "sfx" else
                   f"{self.codes} codes (a software baseline)")
            raise ValueError(f"layer {self.layer_name or '?'}: {why} cannot be executed by the SFx accelerator "
                             f"(software only): nothing to export; quantize with codes='sfx', per-channel scales "
                             f"(or save a packed file with superfloat.sw.wasq.packing.save_packed)")
        fz = self._frozen_value()
        if isinstance(fz, ExportedLinear):
            return fz
        bias = None if self.bias is None else self.bias.detach().cpu().to(torch.float32).numpy().copy()
        if isinstance(fz, QuantizedWeight):
            return fz.to_exported(bias)
        w = self.weight.detach().cpu()
        if w.dtype == torch.bfloat16:
            w = w.to(torch.float32)  # exact
        w = w.numpy()
        bits = self.bits
        try:
            if self.scale_kind == "pow2":
                if self.weight_scale == "channel":
                    e = sfx.choose_exponent(w, bits, axis=0)
                    codes = sfx.encode(w, bits, e.reshape(-1, 1), self.rounding)
                else:
                    e = np.asarray(sfx.choose_exponent(w, bits), dtype=np.int8)
                    codes = sfx.encode(w, bits, e, self.rounding)
                scale = None
            else:
                scale = np.asarray(float_scale(w, bits, axis=0 if self.weight_scale == "channel" else None),
                                   dtype=np.float64)
                codes = sfx.encode(w.astype(np.float64) / (scale.reshape(-1, 1) if scale.ndim else scale), bits,
                                   0, self.rounding)
                e = np.zeros(scale.shape, dtype=np.int8)
        except ValueError as err:
            raise ValueError(f"layer {self.layer_name or '?'}: weight: {err}") from None
        return ExportedLinear(bits, codes, np.asarray(e, dtype=np.int8), scale, bias, self.rounding)

    def _freeze(self, wq: torch.Tensor, value: ExportedLinear | QuantizedWeight) -> None:
        dtype = self.weight.dtype if self.weight.device.type != "meta" else torch.float32
        dev = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        wq = wq.to(dtype=dtype, device=dev)
        self.weight = nn.Parameter(wq, requires_grad=True)
        key = self._key()
        self._cache = (key, wq.clone())
        self._frozen = (key, value)

    @torch.no_grad()
    def load_exported(self, ex: ExportedLinear) -> None:
        """Set the shadow weight to the decoded codes and freeze this exact quantization
        (so that :meth:`export` returns the same codes and forward the same values until
        the weight changes)."""
        if ex.codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"layer {self.layer_name}: codes shape {list(ex.codes.shape)} != "
                             f"[{self.out_features}, {self.in_features}]")
        if ex.bias is not None:
            if self.bias is None:
                raise ValueError(f"layer {self.layer_name}: checkpoint has a bias but the layer has none")
            dtype = self.weight.dtype if self.weight.device.type != "meta" else torch.float32
            dev = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
            self.bias = nn.Parameter(torch.from_numpy(np.asarray(ex.bias)).to(dtype=dtype, device=dev))
        self.bits = ex.bits
        self.rounding = ex.rounding
        self._freeze(torch.from_numpy(ex.dequantize()), ex)

    @torch.no_grad()
    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Freeze the codes a post-training method chose (any format; the layer's format
        becomes ``qw``'s): forward uses their exact values, :meth:`export` returns them
        (hardware formats), :meth:`stored_weight` too, until the weight changes."""
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(f"layer {self.layer_name}: codes shape {list(qw.shape)} != "
                             f"[{self.out_features}, {self.in_features}]")
        fmt = qw.fmt
        self.codes, self.bits, self.group_size = fmt.kind, fmt.bits, fmt.group_size
        if fmt.kind == "sfx":
            self.scale_kind, self.rounding = fmt.scale_kind, fmt.rounding
        self.weight_scale = "channel"
        self._freeze(qw.dequantize(), qw)

    def extra_repr(self) -> str:
        fmt = self.weight_format()
        w = f"w={fmt.label()}" + ("" if self.codes != "sfx" else f" {self.scale_kind}/{self.weight_scale}")
        a = "a=float" if self.act_bits is None else f"a={self.act_quantizer_label()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {w}, {a}"

    def act_quantizer_label(self) -> str:
        k = {"sfx": "SF", "int": "int", "int_asym": "int-asym"}[self.codes]
        return f"{k}{self.act_bits} {self.act_exponent}"


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, SFxLinear):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    if isinstance(module, Conv1D):
        return "conv1d"
    return None
