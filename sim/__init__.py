"""cocotb benches and the co-simulation harness (see ``docs/simulation.md``).

* :func:`run_linear`: LINEAR computed by the generated RTL in Verilator or Icarus, the
  co-simulation twin of :func:`superfloat.sw.sfx.linear`;
* in-memory models (``docs/python-api.md``): :func:`layer_call` (a quantized layer and its
  input -> LINEAR operations), :func:`run_layer` (one layer on the RTL), :func:`on_rtl` (a
  whole model's linears on the RTL), :func:`capture_inputs`;
* :mod:`.runner`: cached builds and cocotb runs (``cocotb_tools.runner``, no Makefiles);
* :mod:`.streams`: stream driver / sink / per-cycle bench loop for ``lib.stream`` ports;
* :mod:`.scoreboard`: result checking against the reference model;
* :mod:`.packing`: the ``cmd`` word and the per-cycle beat lists of an operation (shared by
  every path that drives the RTL);
* :mod:`.harness` / :mod:`.tb_harness`: the in-simulation stream drivers and monitors (the
  default path of ``run_linear`` and co-simulation); :mod:`.verify`: verification at scale
  (``sfx verify``); :mod:`.tb_accelerator`: the accelerator's per-cycle cocotb benches;
  :mod:`.cosim`: co-simulation of checkpoints (``sfx cosim``).

The names are imported lazily, so that a cocotb bench importing ``superfloat.sim.streams``
inside the simulator does not pay for Amaranth.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["run_linear", "LinearSimStats", "SimulationFailed", "SimulatorNotFound", "layer_call", "run_layer",
           "LayerCall", "LayerRun", "CosimError", "on_rtl", "RTLModel", "capture_inputs"]

_LAZY = {"run_linear": "linear", "LinearSimStats": "linear", "SimulationFailed": "runner",
         "SimulatorNotFound": "runner", "layer_call": "mapping", "run_layer": "mapping", "LayerCall": "mapping",
         "LayerRun": "mapping", "CosimError": "mapping", "on_rtl": "model", "RTLModel": "model",
         "capture_inputs": "model"}

if TYPE_CHECKING:  # pragma: no cover
    from .linear import LinearSimStats, run_linear
    from .mapping import CosimError, LayerCall, LayerRun, layer_call, run_layer
    from .model import RTLModel, capture_inputs, on_rtl
    from .runner import SimulationFailed, SimulatorNotFound


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
