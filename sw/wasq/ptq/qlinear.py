"""``PTQLinear``: a linear layer whose weights are fixed quantized codes.

Post-training quantization chooses codes (and scales, zero points, exponents) once;
the layer keeps them (:attr:`PTQLinear.qweight`, a
:class:`~superfloat.sw.wasq.ptq.quantizers.QuantizedWeight`) and the exact dequantized
weight as a float32 buffer. An optional :class:`ActQuantizer` fake-quantizes the input.
The weight is not trainable (PTQ; use WASQ's ``SFxLinear`` for training).

For configurations the SFx accelerator executes, :func:`superfloat.sw.wasq.ptq.to_wasq_model`
turns these layers into WASQ ``SFxLinear`` layers with the same codes and the same
outputs, which ``save_checkpoint`` writes (SPEC section 7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, QuantizedWeight

__all__ = ["PTQLinear", "ptq_layers"]


class PTQLinear(nn.Module):
    """``y = A(x) @ dequant(codes).T + b``.

    Args:
        qweight: the stored weights (``[out_features, in_features]``).
        bias: float bias or None (kept as given).
        act: input quantizer or None (weight-only).
        name: the module name (error messages and reports).
        source: ``"linear"`` or ``"conv1d"`` (what was replaced).
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, act: ActQuantizer | None = None,
                 *, name: str = "", source: str = "linear") -> None:
        super().__init__()
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight", qweight.dequantize(), persistent=True)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{name or 'PTQLinear'}: bias has shape {list(bias.shape)}, expected "
                                 f"[{self.out_features}]")
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone(),
                                                                                 requires_grad=False)
        else:
            self.bias = None
        self.act = act
        self.layer_name = name
        self.source = source

    @property
    def bits(self) -> int:
        return self.qweight.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act is None else self.act.bits

    @property
    def hardware_executable(self) -> bool:
        return self.qweight.hardware_executable and (self.act is None or self.act.hardware_executable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        if self.act is not None:
            x = self.act(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)

    def extra_repr(self) -> str:
        a = "a=float" if self.act is None else f"a={self.act.describe()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w={self.qweight.fmt.label()}, {a}")


def ptq_layers(model: nn.Module) -> dict[str, PTQLinear]:
    """``{name: PTQLinear}`` in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PTQLinear)}
