"""The post-training methods: passes over the float model that prepare scales and rounding
before the one conversion of :func:`superfloat.sw.wasq.quantize_` (see ``docs/ptq-methods.md``).

A method is ``WASQConfig.method`` (presets in :data:`METHODS`; knobs in
:class:`MethodOptions`, overridden by ``WASQConfig.method_options``):

* ``rtn``: round to nearest, per output channel (the baseline);
* ``smoothquant``: SmoothQuant factors folded into norms / previous linears (:mod:`.smoothquant`);
* ``awq``: AWQ scale search (with activation quantization in the loss) + clip search (:mod:`.awq`);
* ``awq-g128`` / ``awq-dyngroup``: AWQ with per-group scales along K (fixed 128, or a
  power of two per layer from statistics) -- software only;
* ``clip``: static activation ranges, strategy searched per layer (:mod:`.clipping`);
* ``mixed``: layer-wise mixed precision from a sensitivity ranking (:mod:`.mixed_precision`);
* ``adaround``: learned rounding on the SFx (or integer) grid, outlier-aware clipping (:mod:`.adaround`);
* ``asym``: asymmetric integer (scale + zero point) baseline.

Every method works with ``codes="sfx"`` and with the integer baselines ``codes="int"`` /
``"int_asym"``; the result is always :class:`~superfloat.sw.wasq.SFxLinear` layers::

    from superfloat.sw.wasq import WASQConfig, quantize_, quantize_report
    cfg = WASQConfig(weight_bits=4, act_bits=4, method="awq")
    quantize_(model, cfg, calibration=batches)
    cfg.hardware_executable        # True: per-channel scales, per-token exponents
    quantize_report(model)         # what each pass did, and how long it took
"""
from __future__ import annotations

from .calib import Calibration
from .config import METHODS, MethodOptions
from .pipeline import PTQReport, run_method

__all__ = ["METHODS", "MethodOptions", "PTQReport", "run_method", "Calibration"]
