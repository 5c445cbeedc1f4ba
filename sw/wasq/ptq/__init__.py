"""Post-training quantization methods of the W4A4 study, on SFx and on integer codes.

See ``docs/ptq-methods.md``. The methods (presets of :class:`PTQConfig`):

* ``rtn``: round to nearest, per output channel (the baseline);
* ``smoothquant``: SmoothQuant factors folded into norms / previous linears;
* ``awq``: AWQ scale search (with activation quantization in the loss) + clip search;
* ``awq-g128`` / ``awq-dyngroup``: AWQ with per-group scales along K (fixed 128, or a
  power of two per layer from statistics) -- software only;
* ``clip``: static activation ranges, strategy searched per layer (:mod:`.clipping`);
* ``mixed``: layer-wise mixed precision from a sensitivity ranking;
* ``adaround``: learned rounding on the SFx (or integer) grid, outlier-aware clipping;
* ``asym``: asymmetric integer (scale + zero point) baseline.

Every method works with ``codes="sfx"`` and with the integer baseline ``codes="int"``
(``"int_asym"`` too)::

    from superfloat.sw.wasq.ptq import PTQConfig, ptq_quantize_
    cfg = PTQConfig.preset("awq", weight_bits=4, act_bits=4, codes="sfx")
    report = ptq_quantize_(model, cfg, calibration=batches)
    cfg.hardware_executable      # True: per-channel scales, per-token exponents
"""
from __future__ import annotations

from .calib import Calibration
from .config import METHOD_HELP, METHODS, PTQConfig
from .export import float_bytes, memory_report, save_ptq_checkpoint, to_wasq_model
from .packing import load_packed, pack_codes, packed_nbytes, save_packed, unpack_codes
from .pipeline import PTQReport, ptq_config_of, ptq_quantize_
from .qlinear import PTQLinear, ptq_layers
from .quantizers import ActQuantizer, QuantizedWeight, WeightFormat, fake_quant_weight, quantize_weight

__all__ = [
    "PTQConfig", "METHODS", "METHOD_HELP", "ptq_quantize_", "PTQReport", "ptq_config_of",
    "PTQLinear", "ptq_layers", "Calibration",
    "WeightFormat", "QuantizedWeight", "ActQuantizer", "quantize_weight", "fake_quant_weight",
    "pack_codes", "unpack_codes", "packed_nbytes", "save_packed", "load_packed",
    "to_wasq_model", "save_ptq_checkpoint", "memory_report", "float_bytes",
]
