"""``SFxLinear``: a linear layer with fake-quantized SFx weights (and optionally inputs).

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import sfx, sfx_torch
from .baselines import int_fake_quantize, int_qrange, int_scale
from .config import WASQConfig

__all__ = ["SFxLinear", "ExportedLinear", "float_scale"]


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


class SFxLinear(nn.Linear):
    """``y = x_q @ w_q.T + b`` with SFx fake quantization (see the module docstring).

    Build it with :meth:`from_float` (``quantize_`` does) or directly. Arguments:

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits: weight width (SFx 2..16, or integer bits for ``method="int"``).
        act_bits: input width or ``None`` (weight-only).
        weight_scale: ``"channel"`` or ``"tensor"``.
        scale_kind: ``"float"`` or ``"pow2"``.
        act_exponent: ``"dynamic"`` (per token) or ``"static"`` (calibrated per tensor).
        rounding: ``"nearest_even"`` or ``"toward_zero"``.
        method: ``"sfx"`` or ``"int"`` (integer RTN baseline).
        source: ``"linear"`` or ``"conv1d"`` (what was replaced; informational).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 act_bits: int | None = None, weight_scale: str = "channel", scale_kind: str = "float",
                 act_exponent: str = "dynamic", rounding: str = "nearest_even", method: str = "sfx",
                 source: str = "linear", device=None, dtype=None) -> None:
        # Validate through WASQConfig (one place for the rules and messages).
        cfg = WASQConfig(weight_bits=bits, act_bits=act_bits, weight_scale=weight_scale, scale_kind=scale_kind,
                         act_exponent=act_exponent, rounding=rounding, method=method)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits = cfg.weight_bits
        self.act_bits = cfg.act_bits
        self.weight_scale = cfg.weight_scale
        self.scale_kind = cfg.scale_kind
        self.act_exponent = cfg.act_exponent
        self.rounding = cfg.rounding
        self.method = cfg.method
        self.source = source
        #: static activation quantization: calibrated max |input| (None until calibrated)
        self.act_amax: float | None = None
        self.layer_name = ""  # set by quantize_, used in error messages
        self._calibrating = False
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._frozen: tuple[tuple, ExportedLinear] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(cls, module: nn.Module, config: WASQConfig, name: str = "", bits: int | None = None) -> "SFxLinear":
        """Replace an ``nn.Linear`` (sharing its weight and bias parameters) or a
        transformers ``Conv1D`` (weight transposed to ``[out, in]``)."""
        kind = _module_kind(module)
        if kind is None:
            raise TypeError(f"{name or 'module'}: can only quantize nn.Linear or transformers Conv1D, "
                            f"got {type(module).__name__}")
        if kind == "linear":
            n, k = module.out_features, module.in_features
        else:
            k, n = module.weight.shape
        w = module.weight
        layer = cls(k, n, bias=module.bias is not None, bits=config.bits_for(name) if bits is None else bits,
                    act_bits=config.act_bits, weight_scale=config.weight_scale, scale_kind=config.scale_kind,
                    act_exponent=config.act_exponent, rounding=config.rounding, method=config.method,
                    source=kind, device="meta")
        if kind == "linear":
            layer.weight = w  # same Parameter: ties and optimizer references survive
            layer.bias = module.bias
        else:
            layer.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
            layer.bias = module.bias
        layer.layer_name = name
        layer.train(module.training)
        return layer

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
            if self.method == "int":
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

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.act_bits
        assert bits is not None
        xd = x.detach()
        mask = None
        try:
            if self.act_exponent == "dynamic":
                flat = xd.reshape(-1, xd.shape[-1])
                if self.method == "int":
                    xq = int_fake_quantize(flat, bits, axis=0)
                else:
                    e = sfx_torch.choose_exponent(flat, bits, axis=0, keepdims=True)  # one per token (row)
                    xq = sfx_torch.fake_quantize(flat, bits, e, self.rounding)
                xq = xq.reshape(x.shape)
            else:
                if self.act_amax is None:
                    raise RuntimeError(
                        f"layer {self.layer_name or '?'}: static activation exponent is not calibrated; "
                        f"run superfloat.sw.wasq.calibrate_(model, batches) (or quantize_(..., calibration=...)) "
                        f"or use act_exponent='dynamic'")
                if self.method == "int":
                    qmin, qmax = int_qrange(bits)
                    scale = float(int_scale(torch.tensor(self.act_amax), bits))
                    xq = torch.fake_quantize_per_tensor_affine(xd.to(torch.float32), scale, 0, qmin, qmax).to(x.dtype)
                    limit = scale * qmax
                else:
                    e = self.static_act_exponent
                    xq = sfx_torch.fake_quantize(xd, bits, e, self.rounding)
                    limit = (1.0 - 2.0 ** -(bits - 1)) * 2.0 ** e
                if torch.is_grad_enabled() and x.requires_grad:
                    mask = xd.abs() <= limit
        except ValueError as e:
            raise ValueError(f"layer {self.layer_name or '?'}: input: {e}") from None
        if torch.is_grad_enabled() and x.requires_grad:
            return _STE.apply(x, xq, mask)
        return xq

    @property
    def static_act_exponent(self) -> int | None:
        """Calibrated per-tensor input exponent (``sfx.choose_exponent`` of the calibrated max), or None."""
        if self.act_amax is None or self.act_bits is None or self.method != "sfx":
            return None
        return int(sfx.choose_exponent(np.float64(self.act_amax), self.act_bits))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        w = self.quantized_weight()
        if self._calibrating:
            amax = float(x.detach().abs().amax()) if x.numel() else 0.0
            self.act_amax = amax if self.act_amax is None else max(self.act_amax, amax)
        elif self.act_bits is not None:
            x = self._quantize_input(x)
        return F.linear(x, w, self.bias)

    # ------------------------------------------------------------------ export / load

    def export(self) -> ExportedLinear:
        """Codes, exponents, float scales and bias for the hardware, from the numpy model:
        ``sfx.encode(w, bits, sfx.choose_exponent(w, bits, axis=0)[:, None])`` (pow2) or
        ``sfx.encode(w / s[:, None], bits)`` with :func:`float_scale` (float)."""
        if self.method != "sfx":
            raise ValueError(f"layer {self.layer_name or '?'}: method 'int' (the integer RTN baseline) has no SFx "
                             f"codes to export; quantize with method='sfx'")
        if self._frozen is not None and self._frozen[0] == self._key():
            return self._frozen[1]
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
        bias = None if self.bias is None else self.bias.detach().cpu().to(torch.float32).numpy().copy()
        return ExportedLinear(bits, codes, np.asarray(e, dtype=np.int8), scale, bias, self.rounding)

    @torch.no_grad()
    def load_exported(self, ex: ExportedLinear) -> None:
        """Set the shadow weight to the decoded codes and freeze this exact quantization
        (so that :meth:`export` returns the same codes and forward the same values until
        the weight changes)."""
        if ex.codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"layer {self.layer_name}: codes shape {list(ex.codes.shape)} != "
                             f"[{self.out_features}, {self.in_features}]")
        dtype = self.weight.dtype if self.weight.device.type != "meta" else torch.float32
        dev = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        wq = torch.from_numpy(ex.dequantize()).to(dtype=dtype, device=dev)
        self.weight = nn.Parameter(wq, requires_grad=True)
        if ex.bias is not None:
            if self.bias is None:
                raise ValueError(f"layer {self.layer_name}: checkpoint has a bias but the layer has none")
            self.bias = nn.Parameter(torch.from_numpy(np.asarray(ex.bias)).to(dtype=dtype, device=dev))
        self.bits = ex.bits
        self.rounding = ex.rounding
        key = self._key()
        self._cache = (key, wq.clone())
        self._frozen = (key, ex)

    def extra_repr(self) -> str:
        if self.method == "int":
            w = f"w=int{self.bits} RTN/{self.weight_scale}"
        else:
            w = f"w=SF{self.bits} {self.scale_kind}/{self.weight_scale}"
        a = "a=float" if self.act_bits is None else f"a={'int' if self.method == 'int' else 'SF'}{self.act_bits} {self.act_exponent}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {w}, {a}"


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
